"""Error behaviour.  Conformance tests run against cpool.Pool and
multiprocessing.Pool; cpool-only expectations are marked."""
import multiprocessing
import multiprocessing.pool
import pickle
import sys
import threading
import traceback

import pytest

import helpers
from helpers import START_TIMEOUT

T = START_TIMEOUT
RemoteTraceback = multiprocessing.pool.RemoteTraceback
MaybeEncodingError = multiprocessing.pool.MaybeEncodingError
PICKLING_ERRORS = (pickle.PicklingError, AttributeError, TypeError)


# ---------------------------------------------------- exceptions in tasks

def _check_remote(exc, exc_type, args, funcname):
    assert type(exc) is exc_type
    assert exc.args == args
    cause = exc.__cause__
    assert type(cause) is RemoteTraceback
    assert funcname in cause.tb
    assert exc_type.__name__ in cause.tb
    # the remote traceback is part of what the user sees
    text = "".join(traceback.format_exception(exc))
    assert funcname in text


def test_apply_exception_type_args_and_remote_traceback(Pool):
    with Pool(1) as p:
        with pytest.raises(ValueError) as ei:
            p.apply(helpers.raise_value_error, (3,))
        _check_remote(ei.value, ValueError, ("bad value", 3), "raise_value_error")

        with pytest.raises(RuntimeError) as ei:
            p.apply(helpers.raise_runtime_error_with_comment)
        _check_remote(ei.value, RuntimeError, (123,), "raise_runtime_error_with_comment")
        # the worker's source line (with its comment) is in the remote traceback
        assert "raise RuntimeError(123)  # marker-comment-in-worker-source" in ei.value.__cause__.tb

        with pytest.raises(KeyError) as ei:
            p.apply_async(helpers.raise_key_error).get(timeout=T)
        _check_remote(ei.value, KeyError, ("key",), "raise_key_error")
        # and the pool keeps working
        assert p.apply(helpers.square, (4,)) == 16


def test_remote_traceback_printed_by_excepthook(Pool, impl, capsys):
    with Pool(1) as p:
        with pytest.raises(RuntimeError) as ei:
            p.apply(helpers.raise_runtime_error_with_comment)
    try:
        raise ei.value
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "RemoteTraceback" in err
    assert "raise_runtime_error_with_comment" in err
    if impl == "cpool":
        # The worker's source line is in the remote traceback.  (Not checked
        # for multiprocessing: after some of the other tests have run in this
        # process, its workers intermittently print the frame without its
        # source line.)
        assert "marker-comment-in-worker-source" in err


@pytest.mark.parametrize("chunksize", [None, 1, 3, 100])
def test_map_chunk_exception(Pool, chunksize):
    with Pool(2) as p:
        with pytest.raises(KeyError) as ei:
            p.map(helpers.fail_at, range(20), chunksize)
        _check_remote(ei.value, KeyError, (5,), "fail_at")
        with pytest.raises(KeyError) as ei:
            p.map_async(helpers.fail_at, range(20), chunksize).get(timeout=T)
        assert ei.value.args == (5,)
        with pytest.raises(ValueError) as ei:
            p.starmap(helpers.square_unless, [(i, 7) for i in range(20)], chunksize)
        _check_remote(ei.value, ValueError, ("bad item", 7), "square_unless")
        # pool still fine
        assert p.map(helpers.square, range(20), chunksize) == [i * i for i in range(20)]


def test_imap_task_exception_does_not_end_iteration(Pool):
    # multiprocessing: with chunksize=1 the failing item raises from next()
    # and iteration continues with the following items.
    with Pool(2) as p:
        it = p.imap(helpers.fail_at, range(8))
        assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
        with pytest.raises(KeyError) as ei:
            next(it)
        _check_remote(ei.value, KeyError, (5,), "fail_at")
        assert list(it) == [36, 49]


def test_imap_chunked_task_exception_ends_generator(Pool):
    # chunksize > 1: a plain generator; the failing chunk raises and ends it.
    with Pool(2) as p:
        it = p.imap(helpers.fail_at, range(12), chunksize=2)
        assert [next(it) for _ in range(4)] == [0, 1, 4, 9]
        with pytest.raises(KeyError) as ei:
            next(it)
        assert ei.value.args == (5,)
        with pytest.raises(StopIteration):
            next(it)


def test_imap_unordered_task_exception(Pool):
    with Pool(2) as p:
        values, errors = [], []
        it = p.imap_unordered(helpers.fail_at, range(10))
        while True:
            try:
                values.append(next(it))
            except StopIteration:
                break
            except KeyError as e:
                errors.append(e)
        assert sorted(values) == [i * i for i in range(10) if i != 5]
        assert len(errors) == 1 and errors[0].args == (5,)


def test_error_callback_receives_exception(Pool):
    seen = []
    with Pool(2) as p:
        r = p.apply_async(helpers.raise_key_error, error_callback=seen.append)
        with pytest.raises(KeyError):
            r.get(timeout=T)
        r = p.map_async(helpers.fail_at, range(10), chunksize=1, error_callback=seen.append)
        with pytest.raises(KeyError):
            r.get(timeout=T)
        r = p.starmap_async(helpers.square_unless, [(1, 1)], error_callback=seen.append)
        with pytest.raises(ValueError):
            r.get(timeout=T)
    assert [type(e) for e in seen] == [KeyError, KeyError, ValueError]
    assert [e.args for e in seen] == [("key",), (5,), ("bad item", 1)]
    assert all(type(e.__cause__) is RemoteTraceback for e in seen)


# -------------------------------------------------------- custom exceptions

def test_exception_with_custom_init_round_trips(Pool):
    with Pool(1) as p:
        with pytest.raises(helpers.TwoArgError) as ei:
            p.apply(helpers.raise_two_arg_error, ("x", [1, 2]))
        e = ei.value
        assert type(e) is helpers.TwoArgError
        assert e.args == ("x", [1, 2])
        assert (e.a, e.b) == ("x", [1, 2])
        assert type(e.__cause__) is RemoteTraceback

        with pytest.raises(helpers.AttrOnlyError) as ei:
            p.apply(helpers.raise_attr_only_error, (404, "missing"))
        e = ei.value
        assert type(e) is helpers.AttrOnlyError
        assert (e.code, e.detail) == (404, "missing")
        assert e.args == (404, "missing")
        assert str(e) == "code=404 detail=missing"
        assert type(e.__cause__) is RemoteTraceback

        with pytest.raises(helpers.TwoArgError):
            p.starmap(helpers.raise_two_arg_error, [(1, 2)], chunksize=1)
        assert p.apply(helpers.square, (2,)) == 4


def test_unpicklable_exception_instance(Pool, impl):
    with Pool(1) as p:
        with pytest.raises(Exception) as ei:
            p.apply(helpers.raise_locked_error, ("the lock message",))
        if impl == "mp":
            # multiprocessing wraps the failure to send the exception
            assert type(ei.value) is MaybeEncodingError
            assert "_thread.lock" in str(ei.value)
        else:
            # cpool: the caller learns what the task actually raised
            text = str(ei.value)
            assert "LockedError" in text
            assert "the lock message" in text
        # the pool keeps working
        assert p.apply(helpers.square, (6,)) == 36
        assert p.map(helpers.square, range(5)) == [0, 1, 4, 9, 16]


# ------------------------------------------------ unpicklable results / args

@pytest.mark.parametrize("task", [helpers.return_lambda, helpers.return_lock])
def test_unpicklable_result_maybe_encoding_error(Pool, task):
    with Pool(2) as p:
        for _ in range(10):  # no lost workers, no hang
            seen = []
            r = p.apply_async(task, error_callback=seen.append)
            with pytest.raises(MaybeEncodingError) as ei:
                r.get(timeout=T)
            assert seen == [ei.value]
            assert isinstance(ei.value.exc, str) and ei.value.exc
            assert isinstance(ei.value.value, str) and ei.value.value
            assert "Error sending result" in str(ei.value)
        assert p.apply(helpers.square, (3,)) == 9


def test_unpicklable_result_in_map_and_imap(Pool):
    with Pool(2) as p:
        with pytest.raises(MaybeEncodingError):
            p.map(helpers.return_unpicklable_in_list, range(6), chunksize=2)
        with pytest.raises(MaybeEncodingError):
            p.map(helpers.return_unpicklable_in_list, range(6), chunksize=1)
        it = p.imap(helpers.return_unpicklable_in_list, range(6))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(MaybeEncodingError):
            next(it)
        assert list(it) == [4, 5]
        assert p.map(helpers.square, range(6)) == [i * i for i in range(6)]


ARG_SUBMITTERS = {
    "apply": lambda p, a: p.apply(helpers.identity, (a,)),
    "apply_kwds": lambda p, a: p.apply(helpers.echo_args, (), {"k": a}),
    "apply_async": lambda p, a: p.apply_async(helpers.identity, (a,)).get(timeout=T),
    "map": lambda p, a: p.map(helpers.identity, [1, a, 3]),
    "map_cs1": lambda p, a: p.map(helpers.identity, [a] * 10, chunksize=1),
    "map_async": lambda p, a: p.map_async(helpers.identity, [1, a]).get(timeout=T),
    "starmap": lambda p, a: p.starmap(helpers.mul, [(1, 2), (a, 2)]),
    "imap": lambda p, a: list(p.imap(helpers.identity, [1, a, 3])),
    "imap_unordered": lambda p, a: list(p.imap_unordered(helpers.identity, [a])),
}


@pytest.mark.parametrize("submit", sorted(ARG_SUBMITTERS))
@pytest.mark.parametrize("arg", ["lock", "lambda", "reduce-raises"])
def test_unpicklable_argument_raises_at_caller(Pool, submit, arg):
    obj = {"lock": threading.Lock(), "lambda": lambda: 1,
           "reduce-raises": helpers.Unpicklable()}[arg]
    try:
        pickle.dumps(obj)
    except Exception as e:
        expected_type = type(e)
    with Pool(2) as p:
        with pytest.raises(Exception) as ei:
            ARG_SUBMITTERS[submit](p, obj)
        # pickle's own exception reaches the caller unchanged in type
        assert isinstance(ei.value, expected_type), (ei.type, expected_type)
        if arg == "reduce-raises":
            assert type(ei.value) is RuntimeError
            assert ei.value.args == ("cannot pickle Unpicklable",)
        else:
            assert isinstance(ei.value, PICKLING_ERRORS)
        assert p.map(helpers.square, range(10)) == [i * i for i in range(10)]
        assert p.apply(helpers.square, (3,)) == 9


# ------------------------------------------------------- iterable exceptions

def test_map_generator_exception_propagates_unchanged(Pool):
    with Pool(2) as p:
        for when in (0, 3):
            boom = helpers.SayWhenError("boom", when)
            with pytest.raises(helpers.SayWhenError) as ei:
                p.map(helpers.square, helpers.generator_raising(boom, 10, when), 1)
            assert ei.value is boom
            assert ei.value.__cause__ is None
            boom = helpers.SayWhenError("boom-async", when)
            with pytest.raises(helpers.SayWhenError) as ei:
                p.map_async(helpers.square, helpers.generator_raising(boom, 10, when))
            assert ei.value is boom
            boom = helpers.SayWhenError("boom-star", when)
            with pytest.raises(helpers.SayWhenError) as ei:
                p.starmap(helpers.mul, ((x, x) for x in helpers.generator_raising(boom, 10, when)))
            assert ei.value is boom
        # re-entrant, pool still healthy
        with pytest.raises(helpers.SayWhenError):
            p.map(helpers.square, helpers.exception_throwing_generator(1, -1), 1)
        with pytest.raises(helpers.SayWhenError):
            p.map(helpers.square, helpers.exception_throwing_generator(1, -1), 1)
        assert p.map(helpers.square, range(5)) == [0, 1, 4, 9, 16]


def _check_sized_iterable_exception(Pool, length, when, chunksize):
    with Pool(2) as p:
        for _ in range(2):  # re-entrant
            with pytest.raises(helpers.SayWhenError) as ei:
                p.map(helpers.square, helpers.SizedRaisingIterable(length, when), chunksize)
            assert type(ei.value) is helpers.SayWhenError
            assert ei.value.args == ("sized iterable said when", when)
            assert ei.value.__cause__ is None
            with pytest.raises(helpers.SayWhenError):
                p.map_async(helpers.square, helpers.SizedRaisingIterable(length, when),
                            chunksize).get(timeout=T)
        assert p.map(helpers.square, range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("length,chunksize", [(1, 1), (4, 1), (4, 2), (5, 2), (7, 3)])
def test_map_sized_iterable_exception_on_last_item(Pool, length, chunksize):
    # An iterable with __len__ is consumed lazily (multiprocessing does it in
    # its task-handler thread); the exception still reaches map's caller with
    # its type and args, and without a RemoteTraceback cause.  Failing on the
    # *last* item is the case multiprocessing gets right (see below).
    _check_sized_iterable_exception(Pool, length, length - 1, chunksize)


@pytest.mark.cpool_only
@pytest.mark.parametrize("length,when,chunksize", [(10, 0, 1), (10, 3, 1), (10, 3, 2),
                                                   (100, 50, 7)])
def test_map_sized_iterable_exception_midway(cpool_Pool, length, when, chunksize):
    # multiprocessing hangs here: its MapResult waits for len(iterable)
    # worth of chunks that are never produced.
    _check_sized_iterable_exception(cpool_Pool, length, when, chunksize)


@pytest.mark.cpool_only
@pytest.mark.parametrize("length,items,chunksize", [
    (10, 8, 3),         # a chunk before the last comes out short
    (9, 8, 3),          # the last chunk comes out short
    (10, 6, 3),         # whole chunks, too few of them
    (10, 0, 2),         # nothing at all
    (10, 9, 1),
    (10, 7, None),      # the default chunk size
    (10, 11, 3),        # one item too many
    (9, 10, 3),
    (5, None, 2),       # endless
])
def test_map_input_whose_len_is_wrong_fails(cpool_Pool, length, items, chunksize):
    # map() cuts its result by len() before reading the input: with more or
    # fewer items than that, multiprocessing waits forever for the missing
    # chunks, or returns a list of the wrong length.  cpool reads at most one
    # item past len() and fails the call.
    def check(call):
        with pytest.raises(ValueError, match=r"its len\(\)") as ei:
            call()
        assert type(ei.value) is ValueError
        assert ei.value.__cause__ is None
    with cpool_Pool(2) as p:
        for _ in range(2):  # the pool goes on after each
            check(lambda: p.map(helpers.square, helpers.MisSized(length, items),
                                chunksize))
            check(lambda: p.map_async(
                helpers.square, helpers.MisSized(length, items),
                chunksize).get(timeout=T))
            check(lambda: p.starmap(helpers.mul,
                                    helpers.MisSized(length, items, pairs=True),
                                    chunksize))
        assert p.map(helpers.square, helpers.MisSized(length, length),
                     chunksize) == [i * i for i in range(length)]
        assert p.starmap(helpers.mul, helpers.MisSized(length, length, True),
                         chunksize) == [i * i for i in range(length)]


def test_imap_iterable_exception(Pool):
    with Pool(2) as p:
        for _ in range(2):  # re-entrant
            it = p.imap(helpers.square, helpers.exception_throwing_generator(1, -1))
            with pytest.raises(helpers.SayWhenError):
                next(it)
        it = p.imap(helpers.square, helpers.exception_throwing_generator(10, 3))
        assert [next(it) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(helpers.SayWhenError) as ei:
            next(it)
        assert type(ei.value) is helpers.SayWhenError
        assert ei.value.args == ("Somebody said when", 3)
        assert ei.value.__cause__ is None
        # the iteration is over after the failing position
        with pytest.raises(StopIteration):
            it.next(timeout=T)
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.parametrize("chunksize,when,before", [(2, 7, 6), (4, 7, 4), (3, 3, 3)])
def test_imap_chunked_iterable_exception(Pool, chunksize, when, before):
    # multiprocessing builds a chunk before sending it: the items of the
    # chunk being built when the iterable fails are never run, so only the
    # complete chunks before it are yielded, then the exception.
    with Pool(2) as p:
        it = p.imap(helpers.square, helpers.exception_throwing_generator(20, when), chunksize)
        assert [next(it) for _ in range(before)] == [i * i for i in range(before)]
        with pytest.raises(helpers.SayWhenError) as ei:
            next(it)
        assert ei.value.args == ("Somebody said when", when)
        with pytest.raises(StopIteration):
            next(it)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_imap_unordered_iterable_exception(Pool, chunksize):
    with Pool(2) as p:
        for _ in range(2):
            it = p.imap_unordered(helpers.square, helpers.exception_throwing_generator(1, -1),
                                  chunksize)
            with pytest.raises(helpers.SayWhenError):
                next(it)
        when = 6
        it = p.imap_unordered(helpers.square, helpers.exception_throwing_generator(20, when),
                              chunksize)
        values, errors = [], []
        while True:
            try:
                values.append(next(it))
            except StopIteration:
                break
            except helpers.SayWhenError as e:
                errors.append(e)
        assert len(errors) == 1
        assert errors[0].args == ("Somebody said when", when)
        assert len(set(values)) == len(values)
        assert set(values) <= {i * i for i in range(when)}
        if chunksize == 1:
            # the IMapUnorderedIterator keeps going after the error
            assert sorted(values) == [i * i for i in range(when)]
        assert p.apply(helpers.square, (3,)) == 9


# ---------------------------------------------------- pool state errors

SUBMIT_ALL = {
    "apply": lambda p: p.apply(helpers.square, (1,)),
    "apply_async": lambda p: p.apply_async(helpers.square, (1,)),
    "map": lambda p: p.map(helpers.square, [1]),
    "map_empty": lambda p: p.map(helpers.square, []),
    "map_async": lambda p: p.map_async(helpers.square, [1]),
    "starmap": lambda p: p.starmap(helpers.mul, [(1, 2)]),
    "starmap_async": lambda p: p.starmap_async(helpers.mul, [(1, 2)]),
    "imap": lambda p: p.imap(helpers.square, [1]),
    "imap_cs2": lambda p: p.imap(helpers.square, [1], chunksize=2),
    "imap_unordered": lambda p: p.imap_unordered(helpers.square, [1]),
    "imap_unordered_cs2": lambda p: p.imap_unordered(helpers.square, [1], chunksize=2),
    "enter": lambda p: p.__enter__(),
}


@pytest.mark.parametrize("method", sorted(SUBMIT_ALL))
@pytest.mark.parametrize("state", ["closed", "terminated", "closed-joined", "exited"])
def test_not_running_pool_rejects_every_submission(Pool, state, method):
    p = Pool(1)
    try:
        assert p.apply(helpers.square, (2,)) == 4
        if state.startswith("closed"):
            p.close()
            if state == "closed-joined":
                p.join()
        elif state == "terminated":
            p.terminate()
        else:
            with p:
                pass
        with pytest.raises(ValueError, match="Pool not running"):
            SUBMIT_ALL[method](p)
    finally:
        p.terminate()
        p.join()


def test_join_running_pool_raises(Pool):
    with Pool(1) as p:
        with pytest.raises(ValueError):
            p.join()
        # still running and usable
        assert p.apply(helpers.square, (5,)) == 25
        p.close()
        p.join()
