"""Conformance tests: cpool.Pool must behave like multiprocessing.Pool.

Every test taking the ``Pool`` fixture runs against both cpool.Pool and
multiprocessing's fork-context Pool.
"""
import collections
import functools
import gc
import itertools
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.pool
import operator
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings

import pytest

import helpers
from helpers import START_TIMEOUT

T = START_TIMEOUT  # generous upper bound for results that should come quickly


def module_level_task(x):
    """A task defined in the test module itself (pickled as test_api.module_level_task)."""
    return ("module", x)


class IterOnly:
    """Iterable without __len__."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


# ------------------------------------------------------------------ apply

def test_apply_args_and_kwds(Pool):
    with Pool(2) as p:
        assert p.apply(helpers.square, (5,)) == 25
        assert p.apply(helpers.square, (), {"x": 3}) == 9
        assert p.apply(helpers.square, kwds={"x": 4}) == 16
        assert p.apply(helpers.const_42) == 42
        assert p.apply(helpers.echo_args, (1, "two"), {"k": [3]}) == ((1, "two"), {"k": [3]})
        # list args are accepted like tuples
        assert p.apply(helpers.mul, [6, 7]) == 42


def test_apply_runs_in_a_worker_process(Pool):
    with Pool(2) as p:
        pid = p.apply(helpers.getpid)
    assert pid != os.getpid()


def test_apply_async_returns_result(Pool):
    with Pool(2) as p:
        r = p.apply_async(helpers.power, (2, 10))
        assert r.get(timeout=T) == 1024
        r = p.apply_async(helpers.echo_args, (1,), {"a": 2})
        assert r.get(timeout=T) == ((1,), {"a": 2})


def test_apply_async_arguments_by_keyword_and_bad_calls(Pool):
    with Pool(1) as p:
        got, errs = [], []
        r = p.apply_async(func=helpers.power, args=(3,), kwds={"exp": 2},
                          callback=got.append, error_callback=errs.append)
        assert r.get(timeout=T) == 9
        r = p.apply_async(helpers.raise_value_error, (), {}, None, errs.append)
        with pytest.raises(ValueError):
            r.get(timeout=T)
        assert got == [9] and len(errs) == 1 and isinstance(errs[0], ValueError)
        # the same TypeErrors as multiprocessing's Python signature gives
        bad_calls = [
            lambda: p.apply_async(),
            lambda: p.apply_async(helpers.square, (1,), {}, None, None, None),
            lambda: p.apply_async(helpers.square, (1,), func=helpers.square),
            lambda: p.apply_async(helpers.square, (1,), timeout=1),
        ]
        for call in bad_calls:
            with pytest.raises(TypeError):
                call()
        assert p.apply(helpers.square, (4,)) == 16    # the pool is unharmed


def test_apply_kwds_any_mapping_as_with_double_star(Pool):
    # func(*args, **kwds) in the worker: any mapping works, anything else is
    # the TypeError ** gives, in the result (never silently dropped).
    with Pool(1) as p:
        for call in (lambda *a: p.apply_async(*a).get(timeout=T), p.apply):
            assert call(helpers.power, (2,), helpers.KeysMapping(exp=3)) == 8
            assert call(helpers.power, (2,), collections.OrderedDict(exp=4)) == 16
            for bad in (None, 5, [("exp", 2)]):
                with pytest.raises(TypeError, match="must be a mapping"):
                    call(helpers.power, (2,), bad)


def test_result_get_arguments(Pool):
    with Pool(1) as p:
        r = p.apply_async(helpers.square, (5,))
        assert r.get(timeout=T) == 25 and r.get(T) == 25 and r.get(None) == 25
        with pytest.raises(TypeError):
            r.get(1, 2)
        with pytest.raises(TypeError):
            r.get(wait=1)
        with pytest.raises(TypeError):
            r.get(1, timeout=2)
        assert r.get() == 25


def test_pool_subclass_overrides_apply_async(Pool, impl):
    # A library's Pool subclass that wraps apply_async() keeps working.
    calls = []
    if impl == "mp":
        base = multiprocessing.pool.Pool
        kw = {"context": multiprocessing.get_context("fork")}
    else:
        base, kw = Pool, {}

    class Logged(base):
        def apply_async(self, func, args=(), kwds={}, callback=None,
                        error_callback=None):
            calls.append(func.__name__)
            return super().apply_async(func, args, kwds, callback,
                                       error_callback)

    with Logged(1, **kw) as p:
        assert p.apply_async(helpers.square, (6,)).get(timeout=T) == 36
        assert p.map(helpers.square, [1, 2]) == [1, 4]
        # multiprocessing's apply() is apply_async().get()
        assert p.apply(helpers.mul, (2, 3)) == 6
    assert calls[0] == "square"
    assert calls[-1] == "mul"


def test_apply_async_callback_in_parent_other_thread(Pool):
    calls = []

    def cb(value):
        calls.append((value, os.getpid(), threading.get_ident()))

    def ecb(exc):
        calls.append(("error", exc))

    with Pool(2) as p:
        r = p.apply_async(helpers.square, (9,), callback=cb, error_callback=ecb)
        assert r.get(timeout=T) == 81
        # multiprocessing runs the callback before the result becomes ready
        assert len(calls) == 1
        value, pid, tid = calls[0]
        assert value == 81
        assert pid == os.getpid()
        assert tid != threading.get_ident()


def test_apply_async_error_callback(Pool):
    calls = []

    def cb(value):
        calls.append(("value", value))

    def ecb(exc):
        calls.append(("error", exc, os.getpid(), threading.get_ident()))

    with Pool(2) as p:
        r = p.apply_async(helpers.raise_value_error, (7,), callback=cb, error_callback=ecb)
        with pytest.raises(ValueError) as ei:
            r.get(timeout=T)
        assert len(calls) == 1
        kind, exc, pid, tid = calls[0]
        assert kind == "error"
        assert type(exc) is ValueError
        assert exc.args == ("bad value", 7)
        assert exc is ei.value
        assert pid == os.getpid()
        assert tid != threading.get_ident()


def test_idle_worker_takes_work_while_another_is_blocked(Pool, gate):
    # A busy worker must not hold on to queued tasks: the idle one runs them.
    with Pool(2) as p:
        sp = gate.started_path()
        blocked = p.apply_async(helpers.gated, ("late", gate.path, sp))
        gate.wait_started(sp)
        assert p.apply_async(helpers.square, (7,)).get(timeout=T) == 49
        assert p.map_async(helpers.square, range(20), chunksize=1).get(timeout=T) == \
            [i * i for i in range(20)]
        assert not blocked.ready()
        gate.open()
        assert blocked.get(timeout=T) == "late"


# -------------------------------------------------------------- map family

@pytest.mark.parametrize("chunksize", [None, 1, 3, 7, 1000])
@pytest.mark.parametrize("n", [1, 10, 101])
def test_map_in_order(Pool, n, chunksize):
    with Pool(2) as p:
        assert p.map(helpers.square, range(n), chunksize) == [i * i for i in range(n)]
        assert p.map(helpers.square, list(range(n)), chunksize=chunksize) == \
            [i * i for i in range(n)]


def test_map_order_with_out_of_order_completion(Pool, gate):
    items = [(0, gate.path)] + [(i, None) for i in range(1, 30)]
    with Pool(2) as p:
        r = p.map_async(helpers.gated_item, items, chunksize=1)
        # queued behind the map's tasks: done => the fast items very likely finished
        assert p.apply_async(helpers.const_42).get(timeout=T) == 42
        assert not r.ready()
        gate.open()
        assert r.get(timeout=T) == list(range(30))


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_map_async(Pool, chunksize):
    got = []
    with Pool(2) as p:
        r = p.map_async(helpers.square, range(50), chunksize=chunksize, callback=got.append)
        assert isinstance(r, multiprocessing.pool.MapResult)
        assert r.get(timeout=T) == [i * i for i in range(50)]
        # callback gets the whole result list, once, before the result is ready
        assert got == [[i * i for i in range(50)]]


def test_map_async_error_callback(Pool):
    got = []
    errs = []
    with Pool(2) as p:
        r = p.map_async(int, ["1", "x", "3"], chunksize=1,
                        callback=got.append, error_callback=errs.append)
        with pytest.raises(ValueError):
            r.get(timeout=T)
        assert got == []
        assert len(errs) == 1
        assert type(errs[0]) is ValueError
        assert "'x'" in str(errs[0])


@pytest.mark.parametrize("chunksize", [None, 1, 5])
def test_starmap(Pool, chunksize):
    pairs = list(zip(range(40), range(39, -1, -1)))
    with Pool(2) as p:
        assert p.starmap(helpers.mul, pairs, chunksize) == list(itertools.starmap(helpers.mul, pairs))
        assert p.starmap(operator.add, pairs, chunksize=chunksize) == [39] * 40


@pytest.mark.parametrize("chunksize", [None, 1, 5])
def test_starmap_async(Pool, chunksize):
    pairs = [(i, i + 1) for i in range(30)]
    got = []
    errs = []
    with Pool(2) as p:
        r = p.starmap_async(helpers.mul, pairs, chunksize, got.append, errs.append)
        assert isinstance(r, multiprocessing.pool.MapResult)
        expected = [a * b for a, b in pairs]
        assert r.get(timeout=T) == expected
        assert got == [expected]
        assert errs == []
        r = p.starmap_async(helpers.square_unless, [(1, 2), (2, 2)], chunksize=chunksize,
                            callback=got.append, error_callback=errs.append)
        with pytest.raises(ValueError):
            r.get(timeout=T)
        assert len(errs) == 1 and type(errs[0]) is ValueError
        assert errs[0].args == ("bad item", 2)


def test_map_large_chunksize_one(Pool):
    n = 10 ** 5
    with Pool(2) as p:
        out = p.map(abs, range(-n // 2, n // 2), chunksize=1)
    assert out == [abs(i) for i in range(-n // 2, n // 2)]


@pytest.mark.parametrize("input_type", [list, tuple, range])
def test_map_takes_any_integer_chunksize(Pool, input_type):
    # numpy's integers (np.ceil(n / k).astype(int)), and one far larger
    # than the input, as multiprocessing takes the former.
    np = pytest.importorskip("numpy")
    items = range(10) if input_type is range else input_type(range(10))
    pairs = (tuple if input_type is tuple else list)((i, 2) for i in range(10))
    with Pool(2) as p:
        for cs in (np.int64(3), np.int32(4), np.uint8(1)):
            assert p.map(helpers.square, items, cs) == [i * i for i in range(10)]
            assert p.starmap(helpers.mul, pairs, cs) == [2 * i for i in range(10)]
            assert list(p.imap(helpers.square, items, cs)) == \
                [i * i for i in range(10)]


@pytest.mark.cpool_only
def test_map_chunksize_larger_than_a_machine_word(cpool_Pool):
    # multiprocessing raises ValueError (islice's) in its task thread
    with cpool_Pool(2) as p:
        assert p.map(helpers.square, [1, 2, 3], 10 ** 20) == [1, 4, 9]
        assert p.starmap(helpers.mul, ((1, 2),), 10 ** 30) == [2]


# ---------------------------------------------------------------- imap

@pytest.mark.parametrize("chunksize", [1, 2, 7, 1000])
def test_imap(Pool, chunksize):
    with Pool(2) as p:
        it = p.imap(helpers.square, range(100), chunksize)
        assert list(it) == [i * i for i in range(100)]
        it = p.imap(helpers.square, range(10), chunksize=chunksize)
        for i in range(10):
            assert next(it) == i * i
        with pytest.raises(StopIteration):
            next(it)


@pytest.mark.parametrize("chunksize", [1, 2, 7, 1000])
def test_imap_unordered(Pool, chunksize):
    with Pool(2) as p:
        it = p.imap_unordered(helpers.square, range(100), chunksize)
        out = list(it)
    assert sorted(out) == [i * i for i in range(100)]


def test_imap_result_types(Pool):
    with Pool(2) as p:
        it = p.imap(helpers.square, range(5))
        assert isinstance(it, multiprocessing.pool.IMapIterator)
        assert list(it) == [0, 1, 4, 9, 16]
        it = p.imap_unordered(helpers.square, range(5))
        assert isinstance(it, multiprocessing.pool.IMapUnorderedIterator)
        assert isinstance(it, multiprocessing.pool.IMapIterator)
        assert sorted(it) == [0, 1, 4, 9, 16]
        # chunksize > 1: a plain generator, exactly like multiprocessing
        g = p.imap(helpers.square, range(5), chunksize=2)
        assert isinstance(g, types.GeneratorType)
        assert list(g) == [0, 1, 4, 9, 16]
        g = p.imap_unordered(helpers.square, range(5), chunksize=2)
        assert isinstance(g, types.GeneratorType)
        assert sorted(g) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [0, -1])
def test_imap_bad_chunksize(Pool, method, chunksize):
    with Pool(1) as p:
        with pytest.raises(ValueError):
            getattr(p, method)(helpers.square, range(5), chunksize)
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.cpool_only
@pytest.mark.parametrize("method", ["map", "map_async", "starmap", "starmap_async"])
@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_bad_chunksize(cpool_Pool, method, chunksize):
    # multiprocessing returns a list of None here, without running the
    # function (3.10 to 3.13); cpool raises imap's ValueError rather than
    # lose the work silently.  An empty input still gives [], as with
    # multiprocessing.
    star = method.startswith("star")
    items = [(i, 2) for i in range(5)] if star else range(5)
    func = helpers.mul if star else helpers.square
    with cpool_Pool(1) as p:
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            getattr(p, method)(func, items, chunksize)
        out = getattr(p, method)(func, [], chunksize)
        assert (out.get(T) if method.endswith("async") else out) == []
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_of_a_non_iterable_raises_type_error(Pool, method, chunksize):
    with Pool(1) as p:
        it = getattr(p, method)(helpers.square, 5, chunksize)
        with pytest.raises(TypeError):
            helpers.call_within(list, T, it)
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.cpool_only
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_an_imap_input_error_comes_after_the_items_read_before_it(
        cpool_Pool, method, chunksize):
    # As multiprocessing's (sent as a task behind those items), so a loop
    # sees their results first, unordered too.
    def records():
        yield from range(20)
        raise ValueError("bad record 20")

    with cpool_Pool(2) as p:
        got = []
        with pytest.raises(ValueError, match="bad record 20"):
            for r in getattr(p, method)(helpers.square, records(), chunksize):
                got.append(r)
        # The chunk being read when the input raised is lost with it, as
        # with multiprocessing.
        full = 20 // chunksize * chunksize
        assert sorted(got) == [i * i for i in range(full)]
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_next_timeout(Pool, method, gate):
    with Pool(2) as p:
        it = getattr(p, method)(helpers.gated_item, [(5, gate.path)])
        with pytest.raises(multiprocessing.TimeoutError) as ei:
            it.next(timeout=0.05)
        assert ei.type is multiprocessing.TimeoutError
        gate.open()
        assert it.next(timeout=T) == 5
        with pytest.raises(StopIteration):
            it.next(timeout=T)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_imap_streams_results(Pool, gate, chunksize):
    # The first results must be delivered while the last item is still blocked.
    items = [(0, None), (1, None), (2, None), (3, gate.path)]
    with Pool(2) as p:
        it = p.imap(helpers.gated_item, items, chunksize)
        first = helpers.call_within(next, T, it)
        assert first == 0
        assert not os.path.exists(gate.path)  # so item 3 has certainly not finished
        gate.open()
        assert helpers.call_within(list, T, it) == [1, 2, 3]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_imap_unordered_streams_results(Pool, gate, chunksize):
    items = [(0, gate.path)] + [(i, None) for i in range(1, 6)]
    with Pool(2) as p:
        it = p.imap_unordered(helpers.gated_item, items, chunksize)
        first = helpers.call_within(next, T, it)
        assert first in range(1, 6)
        gate.open()
        rest = helpers.call_within(list, T, it)
        assert sorted([first] + rest) == list(range(6))


# --------------------------------------------------- empty / lazy iterables

@pytest.mark.parametrize("flavour", [
    "map", "map_async", "starmap", "starmap_async",
    "imap", "imap_cs3", "imap_unordered", "imap_unordered_cs3",
])
@pytest.mark.parametrize("empty", [[], (), "gen"], ids=["list", "tuple", "generator"])
def test_empty_iterables(Pool, flavour, empty):
    def it():
        return (x for x in []) if empty == "gen" else empty

    with Pool(1) as p:
        func = helpers.mul if flavour.startswith("starmap") else helpers.square
        if flavour in ("map", "starmap"):
            out = getattr(p, flavour)(func, it())
        elif flavour in ("map_async", "starmap_async"):
            out = getattr(p, flavour)(func, it(), chunksize=1).get(timeout=T)
        elif flavour.endswith("_cs3"):
            out = list(getattr(p, flavour[:-4])(func, it(), chunksize=3))
        else:
            out = list(getattr(p, flavour)(func, it()))
        assert out == []
        assert p.apply(helpers.square, (2,)) == 4


def test_map_async_empty_never_calls_callback(Pool):
    # multiprocessing quirk: an empty map_async is ready at once and its
    # callback is never invoked.
    got = []
    with Pool(1) as p:
        r = p.map_async(helpers.square, [], callback=got.append)
        assert r.ready()
        assert r.get(timeout=T) == []
        assert p.apply(helpers.square, (2,)) == 4
        p.close()
        p.join()
    assert got == []


@pytest.mark.parametrize("make", [
    lambda n: (i for i in range(n)),
    lambda n: iter(list(range(n))),
    lambda n: IterOnly(n),
    lambda n: map(int, range(n)),
], ids=["generator", "iterator", "iter-only-class", "map-object"])
def test_iterables_without_len(Pool, make):
    n = 57
    sq = [i * i for i in range(n)]
    with Pool(2) as p:
        assert p.map(helpers.square, make(n)) == sq
        assert p.map(helpers.square, make(n), chunksize=4) == sq
        assert p.map_async(helpers.square, make(n)).get(timeout=T) == sq
        assert list(p.imap(helpers.square, make(n))) == sq
        assert list(p.imap(helpers.square, make(n), chunksize=5)) == sq
        assert sorted(p.imap_unordered(helpers.square, make(n))) == sq
        assert sorted(p.imap_unordered(helpers.square, make(n), chunksize=5)) == sq
        pairs = ((i, 2) for i in make(n))
        assert p.starmap(helpers.mul, pairs) == [2 * i for i in range(n)]
        pairs = ((i, 3) for i in make(n))
        assert p.starmap_async(helpers.mul, pairs, chunksize=3).get(timeout=T) == \
            [3 * i for i in range(n)]


# ------------------------------------------------------- close/join/terminate

def test_close_join_completes_submitted_work(Pool, gate):
    with Pool(2) as p:
        sp = gate.started_path()
        blocker = p.apply_async(helpers.gated, ("done", gate.path, sp))
        gate.wait_started(sp)
        asyncs = [p.apply_async(helpers.square, (i,)) for i in range(50)]
        m = p.map_async(helpers.square, range(100), chunksize=7)
        sm = p.starmap_async(helpers.mul, [(i, 2) for i in range(30)])
        it = p.imap(helpers.square, range(40))
        itu = p.imap_unordered(helpers.square, range(40), chunksize=3)
        p.close()
        assert not blocker.ready()
        gate.open()
        p.join()
        assert blocker.ready() and blocker.get(timeout=0) == "done"
        assert all(r.ready() for r in asyncs)
        assert [r.get(timeout=0) for r in asyncs] == [i * i for i in range(50)]
        assert m.ready() and m.get(timeout=0) == [i * i for i in range(100)]
        assert sm.ready() and sm.get(timeout=0) == [2 * i for i in range(30)]
        assert list(it) == [i * i for i in range(40)]
        assert sorted(itu) == [i * i for i in range(40)]


def test_close_is_idempotent_and_join_repeatable(Pool):
    p = Pool(2)
    try:
        r = p.map_async(helpers.square, range(10))
        p.close()
        p.close()
        p.join()
        p.join()
        assert r.get(timeout=0) == [i * i for i in range(10)]
    finally:
        p.terminate()
        p.join()


def _pending_result_after_terminate(impl, r):
    """multiprocessing leaves a result pending at terminate() unresolved
    forever; cpool fails it with PoolTerminatedError."""
    if impl == "mp":
        assert not r.ready()
    else:
        import cpool
        with pytest.raises(cpool.PoolTerminatedError):
            r.get(timeout=T)


def test_terminate_kills_busy_workers(Pool, impl, gate):
    p = Pool(2)
    try:
        sps = [gate.started_path() for _ in range(2)]
        rs = [p.apply_async(helpers.gated, (i, gate.path, sp)) for i, sp in enumerate(sps)]
        queued = p.map_async(helpers.square, range(100), chunksize=1)
        pids = [gate.wait_started(sp) for sp in sps]
        assert len(set(pids)) == 2
        procs = list(p._pool)
    finally:
        p.terminate()
        p.join()
    # the gate was never opened: the workers were killed, not drained,
    # with multiprocessing's signal
    assert all(helpers.process_gone(pid) for pid in pids)
    assert sorted(w.pid for w in procs) == sorted(pids)
    assert [w.exitcode for w in procs] == [-signal.SIGTERM] * 2
    for r in rs:
        _pending_result_after_terminate(impl, r)
    _pending_result_after_terminate(impl, queued)
    with pytest.raises(ValueError):
        p.apply(helpers.square, (1,))


def test_terminate_runs_the_error_callbacks_of_the_results_it_fails(cpool_Pool, gate):
    # Each unfinished result fails with PoolTerminatedError, and its
    # error_callback runs with that error (once), as for any failed
    # result, on the collector thread: by the time join() returns; no
    # callback runs.  (multiprocessing runs neither: its results stay
    # pending forever.)
    import cpool
    got = []
    p = cpool_Pool(1)
    try:
        sp = gate.started_path()
        rs = [p.apply_async(helpers.gated, (0, gate.path, sp),
                            callback=got.append, error_callback=got.append)]
        gate.wait_started(sp)
        rs += [p.apply_async(helpers.square, (i,), callback=got.append,
                             error_callback=got.append) for i in range(3)]
        rs.append(p.map_async(helpers.square, range(5), callback=got.append,
                              error_callback=got.append))
    finally:
        p.terminate()
        p.join()
    assert len(got) == len(rs) == 5
    assert all(isinstance(e, cpool.PoolTerminatedError) for e in got), got
    for r in rs:
        with pytest.raises(cpool.PoolTerminatedError):
            r.get(timeout=0)


def test_terminate_idle_and_twice(Pool):
    p = Pool(2)
    assert p.apply(helpers.square, (3,)) == 9
    p.terminate()
    p.terminate()
    p.join()
    with pytest.raises(ValueError):
        p.map(helpers.square, [1])


def test_close_then_terminate(Pool):
    p = Pool(2)
    r = p.map_async(helpers.square, range(10))
    assert r.get(timeout=T) == [i * i for i in range(10)]
    p.close()
    p.terminate()
    p.join()


def test_context_manager_returns_pool(Pool):
    p = Pool(1)
    with p as entered:
        assert entered is p
        assert entered.apply(helpers.square, (4,)) == 16
    p.join()


def test_context_manager_exit_terminates(Pool, impl, gate):
    with Pool(2) as p:
        sp = gate.started_path()
        r = p.apply_async(helpers.gated, ("never", gate.path, sp))
        pid = gate.wait_started(sp)
    p.join()
    assert helpers.process_gone(pid)
    _pending_result_after_terminate(impl, r)
    with pytest.raises(ValueError):
        p.apply_async(helpers.square, (1,))
    # bpo-35477: entering a pool that is not running fails
    with pytest.raises(ValueError):
        with p:
            pass


def test_context_manager_propagates_exception(Pool):
    with pytest.raises(KeyError):
        with Pool(1) as p:
            assert p.apply(helpers.square, (2,)) == 4
            raise KeyError("from body")
    p.join()
    with pytest.raises(ValueError):
        p.apply(helpers.square, (1,))


def test_pool_cannot_be_pickled(Pool):
    with Pool(1) as p:
        with pytest.raises(NotImplementedError):
            pickle.dumps(p)
        # passing the pool to a task fails at the caller the same way
        with pytest.raises(NotImplementedError):
            p.apply_async(helpers.identity, (p,)).get(timeout=T)
        assert p.apply(helpers.square, (5,)) == 25
        # a pending result holds its pool, and refuses the same way; a
        # finished one cannot be pickled either
        r = p.apply_async(helpers.wait_for_path, ("/nonexistent", 0.2))
        with pytest.raises(NotImplementedError):
            pickle.dumps(r)
        r.wait(T)
        # multiprocessing's result thread wakes the waiter before it lets the
        # result's pool go: wait for that too
        deadline = time.monotonic() + T
        while r._pool is not None and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(TypeError):
            pickle.dumps(r)


def _make_and_drop_running_pool(Pool):
    p = Pool(1)
    assert p.apply(helpers.square, (3,)) == 9
    # multiprocessing's result thread wakes get() before it drops the
    # finished result (which refers to the pool) from the pool's cache: wait
    # for that, or the pool may outlive the reference dropped below
    deadline = time.monotonic() + helpers.START_TIMEOUT
    while p._cache and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not p._cache
    # returning drops the only reference while the pool is running


def _cleanup_warning_sources(records):
    for w in records:
        src = getattr(w, "source", None)
        if src is not None and hasattr(src, "terminate"):
            src.terminate()
            src.join()


def test_resource_warning_for_running_pool(Pool):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _make_and_drop_running_pool(Pool)
        gc.collect()
    try:
        pool_warnings = [w for w in caught
                         if issubclass(w.category, ResourceWarning)
                         and "pool" in str(w.message).lower()]
        assert len(pool_warnings) == 1, [str(w.message) for w in caught]
    finally:
        _cleanup_warning_sources(caught)


@pytest.mark.parametrize("how", ["close", "terminate", "with"])
def test_no_resource_warning_for_stopped_pool(Pool, how):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "with":
            with Pool(1) as p:
                assert p.apply(helpers.square, (3,)) == 9
        else:
            p = Pool(1)
            assert p.apply(helpers.square, (3,)) == 9
            getattr(p, how)()
        p.join()
        del p
        gc.collect()
    try:
        assert [w for w in caught if issubclass(w.category, ResourceWarning)
                and "pool" in str(w.message).lower()] == []
    finally:
        _cleanup_warning_sources(caught)


# ------------------------------------------------------------ result objects

def test_apply_result_api(Pool, gate):
    with Pool(2) as p:
        r = p.apply_async(helpers.gated, ("v", gate.path))
        assert isinstance(r, multiprocessing.pool.ApplyResult)
        assert isinstance(r, multiprocessing.pool.AsyncResult)
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError) as ei:
            r.get(timeout=0.05)
        assert ei.type is multiprocessing.TimeoutError
        assert r.wait(0.05) is None
        assert not r.ready()
        gate.open()
        assert r.wait(T) is None
        assert r.ready()
        assert r.successful() is True
        assert r.get(timeout=0) == "v"
        assert r.get() == "v"  # repeatable

        bad = p.apply_async(helpers.raise_value_error, (1,))
        bad.wait(T)
        assert bad.ready()
        assert bad.successful() is False
        for _ in range(2):
            with pytest.raises(ValueError):
                bad.get(timeout=0)


def test_map_result_api(Pool, gate):
    items = [(i, None) for i in range(5)] + [(5, gate.path)]
    with Pool(2) as p:
        r = p.map_async(helpers.gated_item, items, chunksize=1)
        assert isinstance(r, multiprocessing.pool.MapResult)
        assert isinstance(r, multiprocessing.pool.ApplyResult)
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.05)
        assert r.wait(0.05) is None
        gate.open()
        r.wait(T)
        assert r.ready() and r.successful() is True
        assert r.get(timeout=0) == list(range(6))

        r = p.starmap_async(helpers.mul, [(1, 2)])
        assert isinstance(r, multiprocessing.pool.MapResult)
        assert r.get(timeout=T) == [2]


# ------------------------------------------------------------- constructor

@pytest.mark.parametrize("processes", [0, -1])
def test_bad_processes(Pool, processes):
    with pytest.raises(ValueError):
        Pool(processes)
    with pytest.raises(ValueError):
        Pool(processes=processes)


@pytest.mark.parametrize("value", [0, -1, "x", 0.5, "12"])
def test_bad_maxtasksperchild(Pool, value):
    with pytest.raises(ValueError):
        Pool(1, maxtasksperchild=value)


@pytest.mark.parametrize("value", [3, "f"])
def test_non_callable_initializer(Pool, value):
    with pytest.raises(TypeError):
        Pool(1, initializer=value)


def test_default_process_count(Pool, impl):
    cpu = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0))
    if impl == "mp" or cpu == affinity:
        # Python 3.11's multiprocessing uses os.cpu_count()
        expected = cpu
    else:
        expected = affinity
    with Pool() as p:
        assert p._processes == expected
        assert p.apply(helpers.square, (2,)) == 4


@pytest.mark.parametrize("n", [1, 3])
def test_explicit_process_count(Pool, n, tmp_path):
    gate = helpers.Gate(tmp_path)
    with Pool(n) as p:
        assert p._processes == n
        # n tasks blocked at the same time must run in n distinct workers
        sps = [gate.started_path() for _ in range(n)]
        rs = [p.apply_async(helpers.gated, (i, gate.path, sp)) for i, sp in enumerate(sps)]
        pids = {gate.wait_started(sp) for sp in sps}
        assert len(pids) == n
        gate.open()
        assert [r.get(timeout=T) for r in rs] == list(range(n))


# --------------------------------------------------------------- initializer

def test_initializer_runs_once_in_every_worker(Pool, gate):
    with Pool(2, initializer=helpers.init_worker, initargs=("tag", 2)) as p:
        sps = [gate.started_path() for _ in range(2)]
        rs = [p.apply_async(helpers.init_state_gated, (gate.path, sp)) for sp in sps]
        pids = [gate.wait_started(sp) for sp in sps]
        assert len(set(pids)) == 2
        gate.open()
        states = [r.get(timeout=T) for r in rs]
        assert sorted(s[0] for s in states) == sorted(pids)
        assert all(s[1:] == (1, ("tag", 2)) for s in states)
        more = p.map(helpers.init_state, range(40), chunksize=1)
        assert {s[0] for s in more} <= set(pids)
        assert all(s[1:] == (1, ("tag", 2)) for s in more)
    # never in the parent
    assert helpers._init_calls == 0 and helpers._init_tag is None


def test_initializer_without_args_and_in_replacement_workers(Pool):
    with Pool(1, initializer=helpers.init_worker, maxtasksperchild=1) as p:
        states = p.map(helpers.init_state, range(6), chunksize=1)
    assert len({s[0] for s in states}) == 6
    assert all(s[1:] == (1, ()) for s in states)


# ----------------------------------------------------------- maxtasksperchild

@pytest.mark.parametrize("maxtasks", [1, 2])
def test_maxtasksperchild_replaces_workers(Pool, maxtasks):
    n = 24
    with Pool(2, maxtasksperchild=maxtasks) as p:
        rs = [p.apply_async(helpers.square_and_pid, (i,)) for i in range(n)]
        out = [r.get(timeout=T) for r in rs]
        assert [v for v, _ in out] == [i * i for i in range(n)]
        assert len({pid for _, pid in out}) >= math.ceil(n / maxtasks)
        assert os.getpid() not in {pid for _, pid in out}

        out = p.map(helpers.square_and_pid, range(n), chunksize=1)
        assert [v for v, _ in out] == [i * i for i in range(n)]
        assert len({pid for _, pid in out}) >= math.ceil(n / maxtasks)

        out = list(p.imap(helpers.square_and_pid, range(n)))
        assert [v for v, _ in out] == [i * i for i in range(n)]
        assert len({pid for _, pid in out}) >= math.ceil(n / maxtasks)


def test_maxtasksperchild_early_close_does_not_hang(Pool):
    # bpo-10332
    p = Pool(3, maxtasksperchild=1)
    try:
        rs = [p.apply_async(helpers.square, (i,)) for i in range(12)]
        p.close()
        p.join()
        assert [r.get(timeout=0) for r in rs] == [i * i for i in range(12)]
    finally:
        p.terminate()
        p.join()


# ------------------------------------------------------------- pool._pool
# Code reads the workers' processes from the private pool._pool: their pids
# (to watch their memory), is_alive() and exitcode, join(), terminate().


def _until(cond, timeout=T):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_pool_lists_its_workers(Pool):
    with Pool(2) as p:
        procs = p._pool
        assert len(procs) == 2
        assert all(w.is_alive() and w.exitcode is None and w.daemon for w in procs)
        listed = {(w.name, w.pid) for w in procs}
        pids = {pid for _, pid in listed}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(name.startswith("ForkPoolWorker-") for name, _ in listed)
        # The tasks run in the processes listed, under the names listed.
        assert set(p.map(helpers.name_and_pid, range(50), chunksize=1)) <= listed
        # The same objects while the workers live.
        assert all(a is b for a, b in zip(p._pool, procs))


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_a_worker_killed_through_the_pool_list_is_replaced(cpool_Pool):
    # cpool only: multiprocessing's idle workers wait for tasks holding the
    # task queue's lock, so one killed there takes the lock with it and the
    # pool hangs.
    with cpool_Pool(2) as p:
        p.map(helpers.square, range(10))
        assert len(p._pool) == 2
        fds = _open_fds()       # with the pidfds of the two workers listed
        for _ in range(3):
            victim = p._pool[0]
            others = {w.pid for w in p._pool[1:]}
            victim.kill()
            assert multiprocessing.connection.wait([victim.sentinel], T) == [victim.sentinel]
            victim.join(T)
            assert victim.exitcode == -signal.SIGKILL and not victim.is_alive()
            _until(lambda: len(p._pool) == 2 and victim.pid not in {w.pid for w in p._pool})
            fresh = [w for w in p._pool if w.pid not in others]
            assert len(fresh) == 1 and fresh[0].is_alive()
            assert fresh[0].name != victim.name
            assert p.map(helpers.square, range(20)) == [i * i for i in range(20)]
        del victim, fresh
        gc.collect()
        assert _open_fds() <= fds      # the pidfds of workers let go are closed


@pytest.mark.parametrize("how", ["maxtasksperchild", "close", "terminate"])
def test_the_pool_list_tells_how_workers_ended(cpool_Pool, how, tmp_path):
    # cpool only: multiprocessing's own threads reap its workers, and a
    # join() or exitcode from another thread races with them (the loser's
    # waitpid() fails, and its Process keeps exitcode None).
    n = 1 if how == "maxtasksperchild" else 2
    p = cpool_Pool(n, maxtasksperchild=1 if how == "maxtasksperchild" else None)
    try:
        procs = p._pool
        assert len(procs) == n
        assert p.map(helpers.square, range(4), chunksize=1) == [0, 1, 4, 9]
        if how == "terminate":      # both started (one starting is killed)
            assert len(set(p.map(functools.partial(helpers.meet, str(tmp_path)),
                                 range(2), chunksize=1))) == 2
        if how == "close":
            p.close()
        elif how == "terminate":
            p.terminate()
        for w in procs:
            w.join(T)
            assert not w.is_alive()
        # Idle when the pool is terminated, they leave as after close()
        # (see test_crash's test_idle_workers_leave_normally...); one still
        # starting would be killed.
        assert [w.exitcode for w in procs] == [0] * n
    finally:
        p.terminate()
        p.join()


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_the_pool_list_after_the_pool_ends(Pool, how):
    # Once the pool has ended, the list still holds its workers, ended.
    p = Pool(2)
    try:
        assert p.map(helpers.square, range(8)) == [i * i for i in range(8)]
        getattr(p, how)()
        p.join()
        procs = p._pool
        assert len(procs) == 2 and len({w.pid for w in procs}) == 2
        assert not any(w.is_alive() for w in procs)
        codes = [w.exitcode for w in procs]
        if how == "close":
            assert codes == [0, 0]
        else:       # SIGTERM, or 0 for one that was idle (cpool lets those
            # leave, see below; so do multiprocessing's that read its stop
            # sentinel before the signal)
            assert all(c in (0, -signal.SIGTERM) for c in codes), codes
        assert [w.pid for w in p._pool] == [w.pid for w in procs]
    finally:
        p.terminate()
        p.join()


def test_the_pool_list_read_only_after_terminate(cpool_Pool, tmp_path):
    # Objects made after the workers ended (their pids may be others' by
    # then) hold no pidfd and signal nothing; their records say how they
    # ended, and their sentinels are readable.  Objects made before are
    # the ones listed after.
    for read_before in (False, True):
        p = cpool_Pool(2)
        meet = functools.partial(helpers.meet, str(tmp_path / str(read_before)))
        os.mkdir(meet.args[0])
        try:
            # Both started, and idle at terminate(): they leave (exit code 0).
            assert len(set(p.map(meet, range(2), chunksize=1))) == 2
            before = p._pool if read_before else []
            p.terminate()
            p.join()
            procs = p._pool
            assert len(procs) == 2 and [w.exitcode for w in procs] == [0, 0]
            assert all(a is b for a, b in zip(before, procs))
            for w in procs:
                assert w._doomed != read_before and not w.is_alive()
                assert multiprocessing.connection.wait([w.sentinel], 0) == [w.sentinel]
                w.kill()
                w.join()
            assert all(a is b for a, b in zip(p._pool, procs))
        finally:
            p.terminate()
            p.join()


def test_the_pool_list_read_from_a_callback(cpool_Pool):
    # cpool only (multiprocessing's threads race a join, as above).  A
    # callback runs on the thread that reads the workers' exits: what it
    # asks of them is answered at once, from what is known, and a
    # terminate() it calls takes the workers that had left as having left.
    p = cpool_Pool(2, maxtasksperchild=1)
    procs = p._pool
    assert len(procs) == 2
    seen = {}

    def callback(_):
        if seen:
            return
        # Both workers leave after their one task: wait until they have.
        seen["ended"] = [multiprocessing.connection.wait([w.sentinel], T) != []
                         for w in procs]
        start = time.monotonic()
        # Their exits are not read yet (this thread reads them), nor any
        # replacement's pid: the list says what is known.
        listed = p._pool
        for w in procs:
            w.join(T)               # gone: does not wait for the report
        seen["codes"] = [w.exitcode for w in procs]
        seen["alive"] = [w.is_alive() for w in procs]
        seen["listed"] = [w.pid for w in listed]
        seen["took"] = time.monotonic() - start
        p.terminate()

    try:
        rs = [p.apply_async(helpers.square, (i,), callback=callback) for i in range(2)]
        for r in rs:
            r.wait(T)
        p.join()
        assert seen["ended"] == [True, True]
        assert seen["alive"] == [False, False]
        assert all(c in (None, 0) for c in seen["codes"]), seen["codes"]
        assert len(seen["listed"]) <= 2
        assert seen["took"] < 0.5, seen        # no waiting on itself
        # Left on their own before terminate(): not counted as killed.
        assert [w.exitcode for w in procs] == [0, 0]
    finally:
        p.terminate()
        p.join()


def test_a_worker_object_keeps_its_deadlines(cpool_Pool):
    from cpool.pool import WorkerProcess
    with cpool_Pool(1) as p:
        (w,) = p._pool
        start = time.monotonic()
        w.join(0.05)
        assert w.is_alive() and w.exitcode is None
        assert time.monotonic() - start < T
        with pytest.raises(ValueError, match="still running"):
            w.close()
        # An object for a process that was gone before it was made (as the
        # pool makes one for a worker whose end it has not read yet): its
        # sentinel is readable, and a join with a timeout returns although
        # no exit code is recorded for that pid.
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        gone = WorkerProcess(child, 99, 0, 0, p._core)
        assert not gone.is_alive() and gone.exitcode is None
        assert multiprocessing.connection.wait([gone.sentinel], 0) == [gone.sentinel]
        start = time.monotonic()
        gone.join(0.05)
        assert time.monotonic() - start < T
        assert "stopped" in repr(gone)
        gone.kill()                 # nothing to signal: no error
        gone.close()


def test_a_worker_object_made_after_its_worker_ended(cpool_Pool):
    # The collector is held in a callback, so the pool has not read that the
    # worker was killed and still lists it.  Its pid may already be another
    # process's: the object takes the exit code the fork server recorded
    # before it reaped the worker, keeps no pidfd, and signals nothing.
    p = cpool_Pool(1)
    entered, release = threading.Event(), threading.Event()
    try:
        p.apply(abs, (1,))
        # (The task can run before the collector reads the fork server's
        # report of the worker's pid.)
        _until(lambda: len(p._core.pids()) == 1)
        (pid,) = p._core.pids()
        r = p.apply_async(abs, (1,), callback=lambda _: (entered.set(), release.wait(T)))
        assert entered.wait(T)
        os.kill(pid, signal.SIGKILL)
        _until(lambda: not os.path.exists("/proc/%d" % pid))    # reaped
        (w,) = p._pool
        assert w.pid == pid and w._pidfd == -1
        assert w.exitcode == -signal.SIGKILL and not w.is_alive()
        assert multiprocessing.connection.wait([w.sentinel], 0) == [w.sentinel]
        w.kill()
        w.join()
        release.set()
        assert r.get(T) == 1
        assert p.apply(abs, (-3,)) == 3        # replaced
        assert [x.pid for x in p._pool] != [pid]
    finally:
        release.set()
        p.terminate()
        p.join()


def test_threads_reading_the_pool_list_at_once_get_the_same_objects(cpool_Pool, monkeypatch):
    from cpool.pool import WorkerProcess
    made = []
    init = WorkerProcess.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self.pid)
        time.sleep(0.02)            # the other reader runs meanwhile

    monkeypatch.setattr(WorkerProcess, "__init__", slow_init)
    with cpool_Pool(1) as p:
        _until(lambda: len(p._core.pids()) == 1)
        got = [None, None]

        def read(i):
            got[i] = p._pool

        threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(T)
        assert len(made) == 2 and made[0] == made[1]    # both made one...
        assert len(got[0]) == 1 and got[0][0] is got[1][0] is p._pool[0]  # ...one kept
        (w,) = got[0]
        w.kill()
        w.join(T)
        assert w.exitcode == -signal.SIGKILL


def test_worker_objects_in_a_forked_child(cpool_Pool):
    # As multiprocessing's Process objects: only the process that made the
    # pool joins its workers or asks whether they live.
    with cpool_Pool(1) as p:
        (w,) = p._pool
        r, wfd = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                msgs = []
                for call in (w.join, w.is_alive):
                    try:
                        call()
                    except AssertionError as e:
                        msgs.append(str(e))
                msgs.append(str(len(p._pool)))
                os.write(wfd, "|".join(msgs).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
        os.waitpid(child, 0)
        assert said == "can only join a child process|can only test a child process|0"
        assert w.is_alive()


def test_the_pool_list_after_terminate_from_another_thread(cpool_Pool):
    # Objects read while terminate() runs learn how their workers ended.
    for _ in range(5):
        p = cpool_Pool(2)
        procs = p._pool
        stop = threading.Event()
        seen = []

        def reader():
            while not stop.is_set():
                seen.extend(p._pool)

        t = threading.Thread(target=reader)
        t.start()
        p.terminate()
        stop.set()
        t.join(T)
        p.join()
        for w in procs + seen:
            w.join(T)
            assert w.exitcode is not None and not w.is_alive()


# ------------------------------------------------------------- concurrency

def test_many_threads_share_one_pool(Pool):
    nthreads = 8
    barrier = threading.Barrier(nthreads)
    errors = []
    done = []

    def worker(k):
        try:
            barrier.wait(T)
            for rep in range(5):
                base = k * 1000 + rep * 100
                assert p.apply(helpers.mul, (base, 2)) == base * 2
                assert p.map(helpers.square, range(base, base + 50), chunksize=3) == \
                    [i * i for i in range(base, base + 50)]
                r = p.apply_async(helpers.power, (k, rep))
                assert list(p.imap(helpers.square, range(base, base + 20))) == \
                    [i * i for i in range(base, base + 20)]
                assert sorted(p.imap_unordered(helpers.square, range(base, base + 20), 4)) == \
                    [i * i for i in range(base, base + 20)]
                assert p.starmap(helpers.mul, [(base, j) for j in range(10)]) == \
                    [base * j for j in range(10)]
                assert r.get(timeout=T) == k ** rep
            done.append(k)
        except BaseException as e:  # reported below
            errors.append((k, e))

    with Pool(2) as p:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), errors
    assert errors == []
    assert sorted(done) == list(range(nthreads))


def test_a_thread_holding_the_gil_keeps_the_workers_busy(cpool_Pool):
    # Results are read (by the collector thread) only with the GIL, which a
    # thread submitting a burst keeps for a whole switch interval.  What the
    # workers have finished must not count as queued to them meanwhile, or
    # they run out of work once as many tasks as their credit (at most 1024
    # each) are unread.  Here the submitting thread never lets the GIL go.
    import sys
    from multiprocessing.sharedctypes import RawArray
    n = 2 * 1024 + 200
    helpers.FLAGS = RawArray("b", n)       # inherited by the workers
    interval = sys.getswitchinterval()
    try:
        with cpool_Pool(2) as p:
            assert p.map(helpers.square, range(4)) == [0, 1, 4, 9]
            stalled = None
            results = []
            sys.setswitchinterval(1000.0)
            for i in range(n):
                results.append(p.apply_async(helpers.set_flag, (i,)))
                deadline = time.monotonic() + 10
                while not helpers.FLAGS[i]:
                    if time.monotonic() > deadline:
                        stalled = i
                        break
                if stalled is not None:
                    break
            sys.setswitchinterval(interval)
            assert stalled is None, "task %d never ran" % stalled
            assert [r.get(timeout=T) for r in results] == list(range(n))
    finally:
        sys.setswitchinterval(interval)
        helpers.FLAGS = None


def _hold_up_a_while_b_is_busy(p, gate_a, gate_b):
    """Worker b runs a task held by gate b; worker a sends a result and is
    then held up letting go of its value until gate a opens.  Returns b's
    result and the pids of a and b."""
    started = gate_b.started_path()
    rb = p.apply_async(helpers.gated, ("b", gate_b.path, started))
    pid_b = gate_b.wait_started(started)
    ra = p.apply_async(helpers.hold_after_result, (gate_a.path,))
    pid_a = ra.get(timeout=START_TIMEOUT)
    assert pid_a != pid_b
    return rb, pid_a, pid_b


def test_a_worker_held_up_after_its_result_still_counts_its_queue(cpool_Pool, tmp_path):
    # A worker counts a result (towards its credit) just after sending it, so
    # the parent may read the result first.  It must not then take the worker
    # for one with nothing left to do, which sent every pending task to a
    # worker that was stuck and passed them back and forth with the idle one.
    gate_a, gate_b = helpers.Gate(tmp_path, "a"), helpers.Gate(tmp_path, "b")
    with cpool_Pool(2) as p:
        rb, pid_a, pid_b = _hold_up_a_while_b_is_busy(p, gate_a, gate_b)
        rt = p.apply_async(helpers.square, (3,))
        queues = {pid: (queued, unfinished)
                  for pid, queued, unfinished in p._core.queues()}
        assert queues == {pid_a: (1, 1), pid_b: (1, 1)}   # rt, rb
        gate_a.open()
        gate_b.open()
        assert rt.get(timeout=START_TIMEOUT) == 9
        assert rb.get(timeout=START_TIMEOUT) == "b"


@pytest.fixture
def a_held_up(cpool_Pool, tmp_path):
    """A pool of 2 after _hold_up_a_while_b_is_busy(); both gates are opened
    at the end whatever happens."""
    gate_a, gate_b = helpers.Gate(tmp_path, "a"), helpers.Gate(tmp_path, "b")
    try:
        with cpool_Pool(2) as p:
            rb, pid_a, pid_b = _hold_up_a_while_b_is_busy(p, gate_a, gate_b)
            yield types.SimpleNamespace(p=p, gate_a=gate_a, gate_b=gate_b,
                                        rb=rb, pid_a=pid_a, pid_b=pid_b)
    finally:
        gate_a.open()
        gate_b.open()


def test_a_task_queued_at_a_worker_held_up_between_tasks_goes_to_an_idle_one(
        a_held_up):
    # Worker a sent its result and is held up letting go of it; a task queued
    # to it meanwhile must not wait for it while worker b is idle (with
    # multiprocessing's shared queue, an idle worker takes it).
    h = a_held_up
    p, pid_a, pid_b = h.p, h.pid_a, h.pid_b
    rt = p.apply_async(os.getpid)          # queued at a: b is busy
    queues = {pid: queued for pid, queued, _ in p._core.queues()}
    assert queues == {pid_a: 1, pid_b: 1}
    h.gate_b.open()
    assert h.rb.get(timeout=START_TIMEOUT) == "b"
    assert rt.get(timeout=START_TIMEOUT) == pid_b
    # Nothing is sent to a while it is held up (it would only be taken back
    # later); b runs it all.
    more = [p.apply_async(helpers.square_and_pid, (k,)) for k in range(20)]
    queues = {pid: queued for pid, queued, _ in p._core.queues()}
    assert queues[pid_a] == 0
    assert [r.get(timeout=START_TIMEOUT) for r in more] == \
        [(k * k, pid_b) for k in range(20)]
    h.gate_a.open()
    # Once a moves again, it takes work again.
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        rs = [p.apply_async(helpers.square_and_pid, (k,)) for k in range(20)]
        a_queued = {pid: q for pid, q, _ in p._core.queues()}.get(pid_a, 0)
        assert [r.get(timeout=START_TIMEOUT)[0] for r in rs] == \
            [k * k for k in range(20)]
        if a_queued or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert a_queued


def _hold_back_a(p, gate_a, gate_b):
    """After _hold_up_a_while_b_is_busy(), a task queued at held-up worker a
    is taken back for b once b is free; a is then held back (sent nothing)
    until it moves again.  Returns the pids of a and b."""
    rb, pid_a, pid_b = _hold_up_a_while_b_is_busy(p, gate_a, gate_b)
    rt = p.apply_async(os.getpid)              # queued at a: b is busy
    gate_b.open()
    assert rb.get(timeout=T) == "b"
    assert rt.get(timeout=T) == pid_b          # taken back from a
    return pid_a, pid_b


@pytest.mark.parametrize("where", ["behind a long task", "pending",
                                   "at another held-up worker"])
def test_a_held_back_worker_takes_work_once_it_moves(
        cpool_Pool, tmp_path, monkeypatch, where):
    # A worker held back after a task was taken from it does not say when it
    # moves on: the collector must look while there is work it could take,
    # wherever that work waits: queued behind another worker's long task,
    # in the parent (the other worker, busy, is retiring: maxtasksperchild),
    # or unread at another worker that is held up in turn.  The collector's
    # own periodic look is put off for a minute here, so only that can move
    # the task in time.
    monkeypatch.setenv("CPOOL_RING_CHECK_MS", "60000")
    gates = [helpers.Gate(tmp_path, name) for name in "abc"]
    gate_a, gate_b, gate_c = gates
    maxtasks = 3 if where == "pending" else None
    try:
        with cpool_Pool(2, maxtasksperchild=maxtasks) as p:
            pid_a, pid_b = _hold_back_a(p, gate_a, gate_b)
            if where == "at another held-up worker":
                rc = p.apply_async(helpers.hold_after_result, (gate_c.path,))
                assert rc.get(timeout=T) == pid_b
            else:
                started = gate_c.started_path()
                rc = p.apply_async(helpers.gated, ("c", gate_c.path, started))
                assert gate_c.wait_started(started) == pid_b  # b's third
            ru = p.apply_async(os.getpid)
            at_b = 2 if where == "behind a long task" else 1
            assert {pid: q for pid, q, _ in p._core.queues()} == \
                {pid_a: 0, pid_b: at_b}
            assert p._core.unfinished == (2 if where == "pending" else at_b)
            gate_a.open()
            assert ru.get(timeout=10) == pid_a
            gate_c.open()
            assert rc.get(timeout=T) == \
                (pid_b if where == "at another held-up worker" else "c")
    finally:
        for g in gates:
            g.open()


def test_work_queued_while_apply_holds_the_only_worker_is_sent_after(
        cpool_Pool, monkeypatch):
    # apply() takes an idle worker for itself and reads its result directly;
    # what other threads queue meanwhile waits in the parent (nothing is
    # sent to a worker a caller holds), and must be sent when the caller
    # lets the worker go, with the collector asleep.  Its periodic look is
    # put off for a minute here, and apply() spins on its result for up to
    # a minute (normally at most 200 us): each round's call holds the worker
    # until its task returns, which is after the other thread has queued.
    monkeypatch.setenv("CPOOL_RING_CHECK_MS", "60000")
    monkeypatch.setenv("CPOOL_CALL_SPIN_NS", str(60 * 10**9))
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        with cpool_Pool(1) as p:
            pid = p.apply(os.getpid)
            for _ in range(20):
                out = []
                caller = threading.Thread(target=lambda: out.append(
                    p.apply(helpers.pipe_handshake, (w1, r2))))
                caller.start()
                os.read(r1, 1)                     # the call's task runs
                rs = p.apply_async(os.getpid)
                # rs waits in the parent: the call holds the worker
                assert [q for _, q, _ in p._core.queues()] == [1]
                assert p._core.unfinished == 2
                os.write(w2, b"x")
                caller.join(T)
                assert out == [1]
                assert rs.get(timeout=10) == pid
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_apply_sent_to_a_worker_held_up_between_tasks_is_run_by_another(a_held_up):
    # apply() takes a worker with nothing queued, which a held-up one is.
    h = a_held_up
    # b is busy, so the call goes to a; b is let go meanwhile.
    opener = threading.Timer(0.2, h.gate_b.open)
    opener.start()
    try:
        assert h.p.apply(os.getpid) == h.pid_b
    finally:
        opener.join()
    assert h.rb.get(timeout=START_TIMEOUT) == "b"


@pytest.mark.cpool_only
def test_queues_of_a_core_whose_init_failed():
    # The diagnostic must not read shared memory that was never made.
    from cpool import _core
    core = _core.Core.__new__(_core.Core)
    with pytest.raises(OSError):
        core.__init__(2, None, (), 0, 5000, {}, None, 0)   # ring not a power of 2
    assert core.queues() == [(0, 0, 0), (0, 0, 0)]


@pytest.mark.cpool_only
def test_nested_pool_inside_worker(cpool_Pool):
    # multiprocessing cannot do this: its workers are daemonic
    # ("daemonic processes are not allowed to have children").
    with cpool_Pool(2) as p:
        out, pid = p.apply_async(helpers.nested_cpool_map, (20,)).get(timeout=T)
        assert out == [i * i for i in range(20)]
        assert pid != os.getpid()
        outs = p.map(helpers.nested_cpool_map, [5, 6], chunksize=1)
        assert [o for o, _ in outs] == [[i * i for i in range(5)], [i * i for i in range(6)]]


def test_replacement_workers_with_an_import_hook_and_threads_submitting(cpool_Pool,
                                                                      monkeypatch):
    # Asking for a replacement worker runs no Python code: an import hook
    # that lets other threads run (here by sleeping) must not let one of
    # them ask for a second worker for the same slot meanwhile.
    import builtins
    real_import = builtins.__import__

    def slow_import(name, *args, **kwargs):
        if name.startswith("multiprocessing"):
            time.sleep(0.005)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", slow_import)
    with cpool_Pool(1, maxtasksperchild=1) as p:
        got = [None, None]

        def submit(k):
            # Each submission pumps while the last worker is being replaced.
            rs = []
            for i in range(40):
                rs.append(p.apply_async(helpers.square, (k * 100 + i,)))
                time.sleep(0.002)
            got[k] = [r.get(T) for r in rs]

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(3 * T)
        assert got == [[(k * 100 + i) ** 2 for i in range(40)] for k in range(2)]


def test_a_nested_pools_workers_are_named_as_multiprocessing_would(cpool_Pool, tmp_path):
    # Below worker "ForkPoolWorker-m", its own count from 1: "ForkPoolWorker-m:k".
    with cpool_Pool(1) as p:
        outer, inner, listed = p.apply(helpers.nested_names, (str(tmp_path),))
    m = outer.rsplit("-", 1)[1]
    assert inner == listed == ["ForkPoolWorker-%s:1" % m, "ForkPoolWorker-%s:2" % m]


# ------------------------------------------------------------ callables

CALLABLES = [
    pytest.param(module_level_task, (7,), ("module", 7), id="test-module-function"),
    pytest.param(helpers.square, (7,), 49, id="helpers-function"),
    pytest.param(abs, (-7,), 7, id="builtin-abs"),
    pytest.param(len, ("seven",), 5, id="builtin-len"),
    pytest.param(operator.add, (3, 4), 7, id="operator-add"),
    pytest.param(pow, (2, 5), 32, id="builtin-pow"),
    pytest.param(functools.partial(helpers.power, 2), (6,), 64, id="partial"),
    pytest.param(functools.partial(pow, exp=3), (2,), 8, id="partial-kw-builtin"),
    pytest.param(helpers.Multiplier(3).mul, (5,), 15, id="bound-method"),
    pytest.param(helpers.Multiplier.cls_name, (1,), "Multiplier:1", id="classmethod"),
    pytest.param(helpers.Multiplier.negate, (4,), -4, id="staticmethod"),
    pytest.param("-".join, (["a", "b"],), "a-b", id="builtin-bound-method"),
    pytest.param(str.upper, ("abc",), "ABC", id="method-descriptor"),
]


@pytest.mark.parametrize("func,args,expected", CALLABLES)
def test_callable_kinds(Pool, func, args, expected):
    with Pool(2) as p:
        assert p.apply(func, args) == expected
        assert p.apply_async(func, args).get(timeout=T) == expected
        assert p.starmap(func, [args] * 5) == [expected] * 5
        if len(args) == 1:
            assert p.map(func, [args[0]] * 5) == [expected] * 5
            assert list(p.imap(func, [args[0]] * 3)) == [expected] * 3
            assert list(p.imap_unordered(func, [args[0]] * 3, chunksize=2)) == [expected] * 3


def test_class_as_task_returns_instance(Pool):
    with Pool(1) as p:
        m = p.apply(helpers.Multiplier, (4,))
        assert type(m) is helpers.Multiplier and m.factor == 4
        assert [o.factor for o in p.map(helpers.Multiplier, range(3))] == [0, 1, 2]


def _make_closure():
    captured = 10

    def closure(x=1):
        return x + captured
    return closure


def _pickling_error_type(obj):
    try:
        pickle.dumps(obj)
    except Exception as e:
        return type(e)
    raise AssertionError("%r unexpectedly picklable" % (obj,))


SUBMITTERS = {
    "apply": lambda p, f: p.apply(f, (1,)),
    "apply_async": lambda p, f: p.apply_async(f, (1,)).get(timeout=T),
    "map": lambda p, f: p.map(f, [1, 2, 3]),
    "map_cs2": lambda p, f: p.map(f, [1, 2, 3], chunksize=2),
    "map_async": lambda p, f: p.map_async(f, [1, 2, 3]).get(timeout=T),
    "starmap": lambda p, f: p.starmap(f, [(1,), (2,)]),
    "starmap_async": lambda p, f: p.starmap_async(f, [(1,), (2,)]).get(timeout=T),
    "imap": lambda p, f: list(p.imap(f, [1, 2, 3])),
    "imap_cs2": lambda p, f: list(p.imap(f, [1, 2, 3], chunksize=2)),
    "imap_unordered": lambda p, f: list(p.imap_unordered(f, [1, 2, 3])),
    "imap_unordered_cs2": lambda p, f: list(p.imap_unordered(f, [1, 2, 3], chunksize=2)),
}


@pytest.mark.parametrize("submit", sorted(SUBMITTERS))
@pytest.mark.parametrize("kind", ["closure", "lambda"])
def test_unpicklable_function_raises_at_caller(Pool, submit, kind):
    func = _make_closure() if kind == "closure" else (lambda x=1: x)
    expected_type = _pickling_error_type(func)
    with Pool(2) as p:
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)) as ei:
            SUBMITTERS[submit](p, func)
        assert isinstance(ei.value, expected_type), (ei.type, expected_type)
        # the pool keeps working
        assert p.map(helpers.square, range(10)) == [i * i for i in range(10)]
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.cpool_only
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_consumed_by_several_threads(cpool_Pool, method):
    # One iterator, four consumer threads: every result reaches exactly one
    # of them, and (imap) each thread sees its share in order.  None of
    # them gets a TimeoutError without a timeout because another took the
    # result it was woken for (multiprocessing's next() raises it then).
    n = 3000
    with cpool_Pool(2) as p:
        it = getattr(p, method)(helpers.square, range(n))
        got = [[] for _ in range(4)]

        def consume(out):
            try:
                for v in it:
                    out.append(v)
            except BaseException as e:      # noqa: B036 (reported below)
                out.append(e)

        threads = [threading.Thread(target=consume, args=(out,)) for out in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        assert not any(t.is_alive() for t in threads)
    assert [v for out in got for v in out if isinstance(v, BaseException)] == []
    assert sorted(v for out in got for v in out) == [i * i for i in range(n)]
    if method == "imap":
        assert all(out == sorted(out) for out in got)


@pytest.mark.cpool_only
def test_imap_feeder_threads_are_reused(cpool_Pool):
    # One imap call after another is fed by the same thread (starting one
    # costs most of a millisecond); calls at the same time each get one, and
    # at most MAX_IDLE_FEEDERS wait idle afterwards; close() and join() end
    # them all.
    from cpool.pool import MAX_IDLE_FEEDERS
    before = threading.active_count()
    def wait_idle(p):
        # the feeder goes idle just after the consumer has seen the end
        deadline = time.monotonic() + T
        while not p._idle_feeders and time.monotonic() < deadline:
            time.sleep(0.001)

    with cpool_Pool(2) as p:
        for k in range(20):
            assert list(p.imap(helpers.square, range(k))) == [i * i for i in range(k)]
            wait_idle(p)
        assert len(p._feed_threads) == 1 and len(p._idle_feeders) == 1
        # an input that raises leaves the thread fit for the next call
        with pytest.raises(ZeroDivisionError):
            list(p.imap(helpers.square, (1 // (2 - i) for i in range(5))))
        assert list(p.imap_unordered(helpers.square, [3])) == [9]
        # several at once
        its = [p.imap(helpers.square, range(200)) for _ in range(MAX_IDLE_FEEDERS + 2)]
        assert all(list(it) == [i * i for i in range(200)] for it in its)
        deadline = time.monotonic() + T
        while (sum(t.is_alive() for t in p._feed_threads) > MAX_IDLE_FEEDERS
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert sum(t.is_alive() for t in p._feed_threads) <= MAX_IDLE_FEEDERS
        assert len(p._idle_feeders) <= MAX_IDLE_FEEDERS
        p.close()
        p.join()
        assert not any(t.is_alive() for t in p._feed_threads)
    assert threading.active_count() == before


@pytest.mark.cpool_only
def test_pool_dropped_after_imap_is_collected(cpool_Pool):
    # An idle feeder thread does not keep its pool alive: a running pool
    # dropped after an imap call is collected (and terminated, with the
    # usual ResourceWarning), and its threads end.
    import weakref
    before = threading.active_count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        p = cpool_Pool(1)
        assert list(p.imap(helpers.square, range(3))) == [0, 1, 4]
        ref = weakref.ref(p)
        del p
        gc.collect()
    assert ref() is None
    deadline = time.monotonic() + T
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_abandoned_imap_still_runs_every_item(Pool, method, tmp_path):
    # A caller that drops the iterator (a loop that breaks early, or imap()
    # used only for its side effects) does not stop the call: as with
    # multiprocessing, every item runs before close(); join() returns.
    n = 3000                            # well beyond the bound of 1024
    with Pool(2) as p:
        it = getattr(p, method)(helpers.touch, ((str(tmp_path), i) for i in range(n)))
        next(it)
        del it
        gc.collect()
        p.close()
        p.join()
    assert sorted(int(x) for x in os.listdir(tmp_path)) == list(range(n))


@pytest.mark.cpool_only
def test_iterator_dropped_while_its_lock_is_held_does_not_deadlock(cpool_Pool):
    # A garbage collection may finalize an abandoned iterator in a thread
    # that holds the call's lock (the collector delivering results, the
    # feeder waiting for room): the finalizer must not wait for it.
    with cpool_Pool(2) as p:
        it = p.imap(helpers.identity, range(3000))
        next(it)
        results = it._results
        with results._lock:
            del it              # finalized here, with the lock held
        # The finalizer's thread waits for the lock, then drops the results;
        # meanwhile the rest of the call may complete: wait for both.
        deadline = time.monotonic() + T
        while (p._cache or results._items) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p._cache == {} and len(results._items) == 0


@pytest.mark.cpool_only
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_abandoned_imap_keeps_nothing(cpool_Pool, method):
    # Its results are dropped as they come, and once its input is done the
    # call leaves the cache and its feeder thread is free: many abandoned
    # calls leave no threads, results or memory behind.
    from cpool.pool import MAX_IDLE_FEEDERS
    before = threading.active_count()
    with cpool_Pool(2) as p:
        calls = []
        for _ in range(30):
            it = getattr(p, method)(helpers.identity, range(3000))
            next(it)
            calls.append(it._results)
            del it
        gc.collect()
        deadline = time.monotonic() + T
        while p._cache and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p._cache == {}
        assert all(len(c._items) == 0 and not c._unsorted and not c._taken
                   for c in calls)
        deadline = time.monotonic() + T
        while (threading.active_count() > before + 1 + MAX_IDLE_FEEDERS
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert threading.active_count() <= before + 1 + MAX_IDLE_FEEDERS
    # A call the caller still holds is not affected.
    with cpool_Pool(2) as p:
        it = getattr(p, method)(helpers.identity, range(3000))
        first = [next(it) for _ in range(10)]
        gc.collect()
        assert sorted(first + list(it)) == list(range(3000))


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 10])
def test_imap_runs_its_whole_input_before_results_are_read(Pool, method, chunksize):
    # Without buffersize, every task runs in the background whether or not
    # the consumer reads yet (multiprocessing's task handler feeds them
    # all): a program may wait for the tasks' side effects first.
    n = 1100 * chunksize + 7
    done = multiprocessing.Value("i", 0)
    with Pool(2, initializer=helpers.set_counter, initargs=(done,)) as p:
        it = getattr(p, method)(helpers.counted_square, (i for i in range(n)), chunksize)
        deadline = time.monotonic() + T
        while done.value < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done.value == n
        got = list(it)
    assert (got if method == "imap" else sorted(got)) == [i * i for i in range(n)]


@pytest.mark.cpool_only
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("buffersize", [64, 1024])
def test_imap_bound_holds_with_results_taken_in_batches(cpool_Pool, method,
                                                        buffersize):
    # Results moved to the consumer's side in batches still count against
    # the bound until they are taken, and the room comes back: an endless
    # input is read at most `buffersize` ahead, and never stalls.
    read = [0]

    def source():
        while True:
            read[0] += 1
            yield read[0]

    with cpool_Pool(2) as p:
        it = getattr(p, method)(helpers.square, source(), buffersize=buffersize)
        for k in range(1, 4001):
            helpers.call_within(next, T, it)
            if k % 500 == 0:
                time.sleep(0.02)          # let the feeder use all its room
                assert k <= read[0] <= k + buffersize + 1, (k, read[0])


@pytest.mark.cpool_only
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_buffersize_argument(cpool_Pool, method, chunksize):
    # API_SPEC: imap/imap_unordered(func, iterable, chunksize=1, buffersize=None)
    with cpool_Pool(2) as p:
        out = list(getattr(p, method)(helpers.square, range(50), chunksize, buffersize=4))
        if method == "imap":
            assert out == [i * i for i in range(50)]
        else:
            assert sorted(out) == [i * i for i in range(50)]
        it = getattr(p, method)(helpers.square, itertools.count(), chunksize=chunksize,
                                buffersize=2)
        first = [helpers.call_within(next, T, it) for _ in range(10)]
        if method == "imap":
            assert first == [i * i for i in range(10)]
        else:
            assert len(set(first)) == 10
            assert all(math.isqrt(v) ** 2 == v for v in first)


# ------------------------------------------------ the worker's environment


def test_inherited_multiprocessing_queue_works_in_workers(Pool):
    # multiprocessing's after-fork hooks run in the workers: a Queue the
    # parent has used (its feeder thread started) is reset there, so what
    # tasks put arrives.
    q = helpers.SHARED_QUEUE = multiprocessing.Queue()
    try:
        q.put("parent")
        assert q.get(timeout=T) == "parent"
        with Pool(2) as p:
            assert p.map(helpers.put_in_shared_queue, range(6)) == list(range(6))
            assert sorted(q.get(timeout=T) for _ in range(6)) == list(range(6))
    finally:
        helpers.SHARED_QUEUE = None
        q.close()
        q.join_thread()


def test_workers_are_pool_workers_to_multiprocessing(Pool):
    with Pool(2) as p:
        seen = p.map(helpers.whoami, range(8), chunksize=1)
    for name, daemon, depth, parent, parent_alive, stdin in seen:
        assert name.startswith("ForkPoolWorker-") and daemon is True
        assert depth == 1 and parent == os.getpid() and parent_alive is True
        assert stdin == ""                  # /dev/null, not the parent's stdin
    assert len({name for name, *_ in seen}) <= 2


def test_worker_exit_runs_multiprocessing_finalizers(Pool, tmp_path):
    # A worker that leaves normally (here: its task count is reached) runs
    # the finalizers registered in it, as multiprocessing's workers do.
    path = str(tmp_path / "trace")
    p = Pool(1, maxtasksperchild=1)
    try:
        pid = p.apply(helpers.register_exit_finalizer, (path,))
        p.close()
        p.join()
    finally:
        p.terminate()
    with open(path) as f:
        assert f.read() == str(pid)


# ------------------------------------------- multiprocessing's reducers


def test_socket_argument_goes_through_as_with_multiprocessing(Pool):
    # Plain pickle refuses sockets; multiprocessing's reducers pass them.
    import socket
    a, b = socket.socketpair()
    try:
        with Pool(1) as p:
            assert p.apply(helpers.send_hi, (b,)) == "sent"
            assert a.recv(2) == b"hi"
    finally:
        a.close()
        b.close()


def test_reducers_registered_with_forkingpickler_apply(Pool):
    from multiprocessing.reduction import ForkingPickler
    ForkingPickler.register(helpers.Registered, helpers.reduce_registered)
    try:
        with Pool(1) as p:
            assert p.apply(helpers.registered_value,
                           (helpers.Registered(4),)) == ("rebuilt", 4)
            # in a large message too
            big = [helpers.Registered(5), b"x" * (1 << 20)]
            got = p.apply(helpers.identity, (big,))
            assert got[0].v == ("rebuilt", ("rebuilt", 5)) and got[1] == big[1]
            # registered again for the same type: the new reducer applies
            ForkingPickler.register(helpers.Registered,
                                    helpers.reduce_registered_again)
            assert p.apply(helpers.registered_value,
                           (helpers.Registered(6),)) == ("again", 6)
            # (the workers keep the table they were forked with, as
            # multiprocessing's do: their result goes back the old way)
            got = p.apply(helpers.identity, (big,))
            assert got[0].v == ("rebuilt", ("again", 5))
    finally:
        del ForkingPickler._extra_reducers[helpers.Registered]


def test_get_with_nan_timeout_times_out(Pool, gate):
    with Pool(1) as p:
        r = p.apply_async(helpers.gated, (1, gate.path))
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(float("nan"))
        r.wait(float("nan"))
        assert not r.ready()
        gate.open()
        assert r.get(timeout=T) == 1


def test_bound_builtin_method_sees_its_object_as_it_is_now(Pool):
    # d.get pickles a copy of d: every call sends the dict as it is then
    # (two d.get objects compare equal whatever d holds, so a pool that
    # cached the first pickle would keep answering from the first copy).
    with Pool(2) as p:
        d = {"a": 1}
        assert p.map(d.get, ["a", "b"]) == [1, None]
        d.update(a=10, b=2)
        assert p.map(d.get, ["a", "b"]) == [10, 2]
        assert p.apply(d.get, ("b",)) == 2
        assert p.apply_async(d.get, ("b",)).get(timeout=T) == 2
        assert list(p.imap(d.get, ["a", "b"])) == [10, 2]
        lst = [1, 2, 3]
        assert p.apply(lst.count, (1,)) == 1
        lst.extend([1, 1])
        assert p.apply(lst.count, (1,)) == 3
        assert p.map(lst.count, [1, 2]) == [3, 1]
        # builtins bound to a module or a class pickle by name
        assert p.map(len, ["ab", "c"]) == [2, 1]
        assert p.map(bytes.fromhex, ["01", "ff"], chunksize=1) == [b"\x01", b"\xff"]


def test_bound_builtin_method_is_not_kept(Pool, impl):
    import weakref
    with Pool(2) as p:
        d = helpers.WeakDict(a=1)
        alive = weakref.ref(d)
        assert p.map(d.get, ["a", "b"]) == [1, None]
        assert p.apply(d.get, ("a",)) == 1
        del d
        gc.collect()
        if impl == "mp":
            # Its task thread lets go of the last task after sending it,
            # which can be after the result is back (seen once in 29 runs of the suite).
            deadline = time.monotonic() + T
            while alive() is not None and time.monotonic() < deadline:
                time.sleep(0.001)
                gc.collect()
        assert alive() is None


def _run_writers(Pool, tmp_path, task, maxtasks):
    func = helpers.start_writer_thread if task == "thread" else helpers.submit_writer
    paths = [str(tmp_path / ("out%d" % i)) for i in range(4)]
    p = Pool(2, maxtasksperchild=maxtasks)
    try:
        assert p.map(func, paths, chunksize=1) == paths
    finally:
        p.close()
        p.join()
    assert sorted(os.listdir(tmp_path)) == ["out%d" % i for i in range(4)]


@pytest.mark.parametrize("task", ["thread", "executor"])
def test_worker_exit_waits_for_the_threads_its_tasks_started(Pool, tmp_path, task):
    # A worker that leaves at close() finishes as a process does: non-daemon
    # threads and queued executor work run to the end first.
    _run_writers(Pool, tmp_path, task, None)


@pytest.mark.parametrize("task", ["thread", "executor"])
def test_retiring_worker_waits_for_the_threads_its_tasks_started(cpool_Pool, tmp_path,
                                                                 task):
    # The same for workers that reach maxtasksperchild.  (multiprocessing
    # loses the plain threads started in the workers it started as
    # replacements: with maxtasksperchild=1, two of the four files here.)
    _run_writers(cpool_Pool, tmp_path, task, 1)


def _run_with(impl, code, timeout=60):
    """Run `code` in a new interpreter where Pool is the pool under test,
    with stdout block-buffered (a pipe, and PYTHONUNBUFFERED unset)."""
    head = ("from cpool import Pool\n" if impl == "cpool" else
            "import multiprocessing\n"
            "Pool = multiprocessing.get_context('fork').Pool\n")
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, "-c", head + code],
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("maxtasks", [None, 1])
def test_what_the_parent_printed_before_the_pool_is_printed_once(impl, maxtasks):
    # Output still in the parent's buffer when the workers are forked must
    # not be printed again by each worker as it exits.
    out = _run_with(impl, f"""
import helpers
print("before the pool")
p = Pool(2, maxtasksperchild={maxtasks!r})
assert p.map(helpers.square, range(6), 1) == [0, 1, 4, 9, 16, 25]
p.close()
p.join()
print("after")
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["before the pool", "after"]


def test_programs_a_task_runs_get_ctrl_c(Pool):
    # Whatever the worker does with SIGINT, a program it executes starts
    # with the default disposition: Ctrl-C stops it.
    with Pool(1) as p:
        assert p.apply(helpers.child_gets_ctrl_c) == "True"


def _wait_for(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("installed", ["before", "after"])
def test_a_signal_a_task_sends_its_parent_reaches_the_pools_process(Pool, sig, installed):
    # os.getppid() in a task: with multiprocessing, the pool's process.  A
    # program's handler runs, whether it was installed before the pool (the
    # workers have it too) or after, and the pool goes on.
    got = []
    old = signal.getsignal(sig)
    try:
        if installed == "before":
            signal.signal(sig, lambda s, f: got.append(s))
        p = Pool(1)
        try:
            if installed == "after":
                signal.signal(sig, lambda s, f: got.append(s))
            p.apply(helpers.square, (1,))
            p.apply(helpers.signal_parent, (sig,))
            _wait_for(lambda: got)
            assert got == [sig]
            assert p.apply(helpers.square, (3,)) == 9
        finally:
            # Not terminate(): multiprocessing's workers would get its
            # SIGTERM, run the handler they inherited (which does not
            # exit), and multiprocessing would wait for them forever.
            p.close()
            p.join()
    finally:
        signal.signal(sig, old)


def test_a_signal_from_a_worker_that_exits_at_once_still_reaches_the_parent(cpool_Pool):
    # The fork server reads the signal before it reaps the sender.
    got = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
    try:
        with cpool_Pool(1) as p:
            with pytest.raises(multiprocessing.ProcessError):
                p.apply(helpers.signal_parent, (signal.SIGUSR2, True))
            _wait_for(lambda: got)
            assert got == [signal.SIGUSR2]
            assert p.apply(helpers.square, (3,)) == 9
    finally:
        signal.signal(signal.SIGUSR2, old)


def _pending(pid, sig):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("SigPnd:", "ShdPnd:")) and \
                    int(line.split()[1], 16) >> (sig - 1) & 1:
                return True
    return False


def test_a_signal_sent_to_the_fork_server_by_others_is_not_passed_on(cpool_Pool):
    # Only what its workers send goes to the parent.  And the parent's
    # Python handler, which the fork server inherited, is not run there: it
    # would write to the parent's wake-up fd (asyncio's self-pipe), as if
    # the parent had got the signal.
    got = []
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    old_fd = signal.set_wakeup_fd(w.fileno())
    try:
        with cpool_Pool(1) as p:
            assert p.apply(helpers.square, (2,)) == 4
            z = p._core.zygote_pid
            os.kill(z, signal.SIGUSR1)
            _wait_for(lambda: not _pending(z, signal.SIGUSR1))
            time.sleep(0.05)
            assert p.apply(helpers.square, (3,)) == 9
            assert got == []
            with pytest.raises(BlockingIOError):
                r.recv(16)
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old)
        r.close()
        w.close()


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_sends_each_item_of_a_generator_before_reading_the_next(Pool, method):
    # A feedback loop: each input is made from the result before it.  Items
    # read but held back for a batch would wait for themselves.
    import queue
    results = queue.Queue()

    def feedback():
        x = 1
        for _ in range(6):
            yield x
            x = results.get(timeout=T)
            if x is None:
                return

    with Pool(2) as p:
        it = getattr(p, method)(helpers.square, feedback())
        out = []
        try:
            for _ in range(6):
                out.append(it.next(timeout=T))
                results.put(out[-1] + 1)
        finally:
            results.put(None)
    assert out == [1, 4, 25, 676, 458329, 210066388900]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_an_imap_input_reading_its_own_results_gets_those_it_sent(
        cpool_Pool, method):
    # A feedback loop that reads the call's own iterator: it gets the
    # results of the items it sent, and a RuntimeError, instead of waiting
    # forever, once it wants one more than it sent (multiprocessing hangs).
    box = []
    got = []
    ready = threading.Event()
    done = threading.Event()

    def feedback():
        try:
            yield 1
            assert ready.wait(T)
            for _ in range(3):
                got.append(box[0].next())
                yield got[-1] + 1
            got.append(box[0].next())   # the last item's result: fine
            box[0].next()       # no item is left to give one
        finally:
            done.set()

    with cpool_Pool(2) as p:
        it = getattr(p, method)(helpers.square, feedback())
        box.append(it)
        ready.set()
        # The consumer waits, not to take the input's results.
        assert done.wait(T)
        assert got == [1, 4, 25, 676]
        with pytest.raises(RuntimeError, match="would never come"):
            it.next(timeout=T)
        # The call still ends, and the pool still works.
        with pytest.raises(StopIteration):
            it.next(timeout=T)
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_an_imap_input_may_share_its_results_with_the_consumer(
        cpool_Pool, method):
    # The consumer and the input both read the call's results: the input
    # may wait for one the consumer takes first, and then learns that none
    # is left for it rather than waiting forever.
    box = []
    read = []
    ready = threading.Event()

    def feedback():
        yield 1
        assert ready.wait(T)
        while True:
            read.append(box[0].next())
            yield read[-1] + 1

    with cpool_Pool(2) as p:
        it = getattr(p, method)(helpers.square, feedback())
        box.append(it)
        ready.set()
        with pytest.raises(RuntimeError, match="would never come"):
            for _ in range(20):
                it.next(timeout=T)
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.parametrize("method", ["map", "map_async", "starmap"])
def test_close_while_a_map_call_is_sending_lets_it_finish(Pool, method):
    # A call past its check is sent whole, as with multiprocessing, even if
    # another thread closes the pool before its input has been read.
    reached = threading.Event()
    go = threading.Event()
    star = method.startswith("star")

    class Slow:
        def __len__(self):
            return 30

        def __iter__(self):
            for i in range(30):
                if i == 15:
                    reached.set()
                    assert go.wait(T)
                yield (i, 2) if star else i

    p = Pool(2)
    out = []

    def user():
        func = helpers.mul if star else helpers.square
        try:
            r = getattr(p, method)(func, Slow(), 1)
            out.append(r.get(T) if method.endswith("async") else r)
        except Exception as e:
            out.append(e)
    t = threading.Thread(target=user)
    t.start()
    try:
        assert reached.wait(T)
        p.close()
        with pytest.raises(ValueError, match="Pool not running"):
            p.map(helpers.square, [1])
        # Time for the items sent to finish (the pool then used to stop,
        # and refuse the rest); the outcome does not depend on it.
        time.sleep(0.2)
    finally:
        go.set()
        t.join(T)
    p.join()
    assert out == [[2 * i if star else i * i for i in range(30)]]


@pytest.mark.parametrize("how", ["close", "terminate", "interrupt"])
def test_a_map_call_interrupted_at_its_check_leaves_the_pool_closable(
        cpool_Pool, how):
    # A signal handler may close or terminate the pool while the thread is
    # in a map call's locked check (it used to wait for itself there), and
    # a KeyboardInterrupt there must not leave the call registered (close()
    # would then wait for it forever).
    class Interrupted(cpool_Pool):
        armed = True

        def _check_running(self):
            if self.armed:
                self.armed = False
                if how == "interrupt":
                    raise KeyboardInterrupt
                getattr(self, how)()
            super()._check_running()

    p = Interrupted(2)
    out = []

    def call():
        try:
            p.map_async(helpers.square, range(4))
        except BaseException as e:
            out.append(type(e))
        if how == "interrupt":
            assert p.map(helpers.square, range(3)) == [0, 1, 4]
            p.close()
        p.join()
        out.append("joined")
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(T)
    assert not t.is_alive()
    assert out == [KeyboardInterrupt if how == "interrupt" else ValueError,
                   "joined"]


def test_join_while_an_imap_call_starts_its_feeder(cpool_Pool, monkeypatch):
    # close(); join() from another thread between an imap() call
    # registering its feeder thread and starting it: join() used to fail
    # ("cannot join thread before it is started").
    start = threading.Thread.start
    registered = threading.Event()
    go = threading.Event()

    def late_start(self):
        if self.name == "cpool-feeder":
            registered.set()
            assert go.wait(T)
        start(self)
    monkeypatch.setattr(threading.Thread, "start", late_start)
    p = cpool_Pool(1)
    out = []
    t = threading.Thread(target=lambda: out.append(
        list(p.imap(helpers.square, range(3)))))
    t.start()
    try:
        assert registered.wait(T)
        p.close()
        errors = []

        def join():
            try:
                p.join()
            except Exception as e:
                errors.append(e)
        joiner = threading.Thread(target=join)
        start(joiner)
        time.sleep(0.05)    # (on the code before, join() raised meanwhile)
    finally:
        go.set()
    joiner.join(T)
    t.join(T)
    assert not joiner.is_alive() and errors == []
    assert out == [[0, 1, 4]]


def test_join_in_a_map_input_raises_instead_of_waiting_for_itself(cpool_Pool):
    p = cpool_Pool(2)

    def closing():
        yield 1
        p.close()
        p.join()
        yield 2

    with pytest.raises(RuntimeError, match="would wait for itself"):
        p.map(helpers.square, closing())
    p.join()


def test_join_in_an_imap_input_raises_instead_of_waiting_for_itself(
        cpool_Pool):
    # multiprocessing hangs here; the error reaches the consumer in the
    # input's place, and the pool still closes.
    p = cpool_Pool(2)
    seen = []

    def closing():
        yield 1
        p.close()
        try:
            p.join()
        except RuntimeError as e:
            seen.append(e)
            raise
        yield 2

    it = p.imap(helpers.square, closing())
    assert it.next(timeout=T) == 1
    with pytest.raises(RuntimeError, match="would wait for itself"):
        it.next(timeout=T)
    assert len(seen) == 1
    with pytest.raises(StopIteration):
        it.next(timeout=T)
    p.join()


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_terminate_fails_an_imap_whose_input_waits(cpool_Pool, method):
    # The input waits for items that will not come: terminate() ends the
    # call there (that item fails) rather than leaving its consumer
    # waiting, and join() does not
    # wait for the feeder stuck in the input.  (multiprocessing's
    # terminate() waits for it forever.)
    import queue
    import cpool
    q = queue.Queue()
    q.put(1)

    def from_queue():
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    p = cpool_Pool(2)
    try:
        it = getattr(p, method)(helpers.square, from_queue())
        assert it.next(timeout=T) == 1
        got = []

        def wait():
            try:
                got.append(it.next(timeout=T))
            except BaseException as e:
                got.append(e)
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.05)    # (most likely waiting by then; either way works)
        p.terminate()
        waiter.join(T)
        assert len(got) == 1 and isinstance(got[0], cpool.PoolTerminatedError), got
        # The call ended with the item its input was reading.
        with pytest.raises(StopIteration):
            it.next(timeout=0)
        helpers.call_within(p.join, T)
    finally:
        q.put(None)         # the feeder leaves the input, and stops
        p.terminate()
        p.join()


def test_the_pool_has_multiprocessings_signature_and_context(impl):
    import inspect
    base = _pool_class(impl)
    assert inspect.signature(base) == inspect.signature(multiprocessing.pool.Pool)
    fork = multiprocessing.get_context("fork")
    for context, expected in [(None, multiprocessing.get_context()), (fork, fork)]:
        with base(1, context=context) as p:
            assert p._ctx is expected

    class Sub(base):
        def __init__(self, n, extra=None):
            super().__init__(n)
    assert str(inspect.signature(Sub)) == "(n, extra=None)"


def _pool_class(impl):
    if impl == "mp":
        return multiprocessing.pool.Pool
    import cpool
    return cpool.Pool


@pytest.mark.parametrize("how", ["context", "Process"])
def test_the_non_daemonic_pool_recipe(impl, how):
    # A context whose Process ignores daemon = True (or a Pool subclass
    # whose Process makes such processes): its workers may start processes,
    # and are named after the class, as multiprocessing names them.
    base = _pool_class(impl)
    if how == "context":
        class NestablePool(base):
            def __init__(self, *args, **kwargs):
                kwargs["context"] = helpers.NoDaemonContext()
                super().__init__(*args, **kwargs)
    else:
        class NestablePool(base):
            @staticmethod
            def Process(ctx, *args, **kwds):
                return helpers.NoDaemonProcess(*args, **kwds)
    counter = multiprocessing.process._process_counter
    first = next(counter)
    with NestablePool(2) as p:
        # Its workers took two numbers, no more (the class was tried out
        # on an object that was not counted).
        assert next(counter) == first + 3
        assert p.map(helpers.start_a_process, range(2), chunksize=1) == \
            [("NoDaemonProcess", False, "NoDaemonPoolWorker", 0)] * 2
        assert sorted(w.name for w in p._pool) == \
            ["NoDaemonPoolWorker-%d" % (first + 1), "NoDaemonPoolWorker-%d" % (first + 2)]


def test_a_stock_pool_worker_is_a_daemon_that_cannot_start_processes(impl):
    with _pool_class(impl)(1) as p:
        me = p.apply(helpers.name_and_pid)
        with pytest.raises(AssertionError, match="daemonic processes"):
            p.apply(helpers.start_a_process)
    assert me[0].startswith("ForkPoolWorker-")


@pytest.mark.parametrize("initargs", [None, 5, ()])
def test_initargs_are_not_looked_at_without_an_initializer(Pool, initargs):
    with Pool(1, initargs=initargs) as p:
        assert p.apply(helpers.square, (3,)) == 9


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_imap_next_with_a_timeout_that_allows_no_wait(Pool, tmp_path, timeout):
    gate = helpers.Gate(tmp_path)
    with Pool(1) as p:
        it = p.imap(functools.partial(helpers.gated, gate_path=gate.path), [1])
        t0 = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=timeout)
        assert time.monotonic() - t0 < 1
        gate.open()
        assert it.next(timeout=T) == 1


@pytest.mark.parametrize("how", ["apply_async", "map_async"])
def test_error_callback_of_a_task_that_cannot_be_sent_runs_after_the_call(Pool, how):
    # Not inside apply_async()/map_async(), in the caller's thread: the
    # caller would not have the result yet, and may hold locks the callback
    # takes (here: a callback run inside the call would wait for the lock
    # the caller holds until it gave up).
    lock = threading.Lock()
    got = []

    def on_error(e):
        ok = lock.acquire(timeout=5)
        got.append((type(e), threading.get_ident(), ok, len(results)))
        if ok:
            lock.release()

    results = []
    with Pool(1) as p:
        with lock:
            if how == "apply_async":
                r = p.apply_async(helpers.identity, (threading.Lock(),),
                                  error_callback=on_error)
            else:
                # its only chunk: the one that ends the call
                r = p.map_async(helpers.identity, [threading.Lock()],
                                error_callback=on_error)
            results.append(r)
        r.wait(T)
        assert r.ready() and not r.successful()
        deadline = time.monotonic() + T
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [(t, ident != threading.get_ident(), ok, n) for t, ident, ok, n in got] \
        == [(TypeError, True, True, 1)]
    with pytest.raises(TypeError):
        r.get(0)


def test_a_task_that_cannot_be_sent_fails_with_its_error_even_if_terminated_at_once(
        cpool_Pool):
    # Its failure, left to the collector thread, is delivered before the
    # collector ends.  (multiprocessing may terminate before its task
    # thread fails it: the result then waits forever.)
    got = []
    p = cpool_Pool(1)
    try:
        r = p.apply_async(helpers.identity, (threading.Lock(),),
                          error_callback=got.append)
    finally:
        p.terminate()
        p.join()
    with pytest.raises(TypeError):
        r.get(T)
    assert [type(e) for e in got] == [TypeError]


def test_a_fork_context_makes_a_cpool_pool(cpool_Pool):
    with cpool_Pool(1, context=multiprocessing.get_context("fork")) as p:
        assert type(p) is cpool_Pool
        assert p.apply(helpers.whoami)[0] == p._pool[0].name
        assert p._pool[0].name.startswith("ForkPoolWorker-")


def _next_process_number():
    # The number multiprocessing gives the next process this one makes
    # (reading it uses it up, as making a process would).
    return next(multiprocessing.process._process_counter) + 1


def test_workers_are_numbered_as_multiprocessing_numbers_processes(Pool, tmp_path):
    # One count per process, across pools and replacement workers:
    # ForkPoolWorker-<n> is the n-th process it made, as it calls itself and
    # as the pool lists it.
    n = _next_process_number()
    p = Pool(2)
    try:
        met = tmp_path / "met"
        met.mkdir()
        names = p.map(functools.partial(helpers.met_name, str(met)), range(2), chunksize=1)
        assert sorted(names) == ["ForkPoolWorker-%d" % n, "ForkPoolWorker-%d" % (n + 1)]
        assert sorted(w.name for w in p._pool) == sorted(names)
    finally:
        p.terminate()
        p.join()
    n = _next_process_number()
    with Pool(1, maxtasksperchild=1) as p:     # a new worker for each task
        names = p.map(helpers.whoami, range(3), chunksize=1)
        assert [name for name, *_ in names] == ["ForkPoolWorker-%d" % k
                                                for k in range(n, n + 3)]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_another_start_method_gets_a_multiprocessing_pool_with_it(cpool_Pool, method):
    # cpool forks; asked for fresh interpreters, it hands over to
    # multiprocessing rather than fork anyway.
    with cpool_Pool(1, context=multiprocessing.get_context(method)) as p:
        assert type(p) is multiprocessing.pool.Pool
        name = {"spawn": "SpawnPoolWorker-", "forkserver": "ForkServerPoolWorker-"}
        assert p.apply(helpers.whoami)[0].startswith(name[method])
        assert p.map(helpers.square, range(4)) == [0, 1, 4, 9]
    # A subclass cannot be handed over: its own methods would be lost.
    class Sub(cpool_Pool):
        pass
    with pytest.raises(ValueError, match="forks its workers"):
        Sub(1, context=multiprocessing.get_context(method))


def test_a_subclass_may_take_other_arguments(cpool_Pool):
    class Tagged(cpool_Pool):
        def __init__(self, n, tag=None, *rest):
            super().__init__(n, context=multiprocessing.get_context("fork"))
            self.tag = tag

    with Tagged(1, tag="x") as p:
        assert p.tag == "x" and p.apply(helpers.square, (3,)) == 9
    with Tagged(1, "y", 3, 4, 5, 6) as p:
        assert p.tag == "y" and p.apply(helpers.square, (4,)) == 16


def test_a_default_start_method_set_to_spawn_is_followed(cpool_Pool):
    out = _run_with("cpool", """
import multiprocessing, helpers
multiprocessing.set_start_method("spawn")
with Pool(1) as p:
    print(type(p).__module__, p.apply(helpers.whoami)[0])
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["multiprocessing.pool", "SpawnPoolWorker-1"]


def test_a_context_that_is_not_one_is_refused(cpool_Pool):
    for P in (cpool_Pool, multiprocessing.pool.Pool):
        with pytest.raises(AttributeError):
            P(1, context="fork")


def test_the_pool_is_a_multiprocessing_pool(Pool):
    # For code that checks what it was given (isinstance, type annotations).
    with Pool(1) as p:
        assert isinstance(p, multiprocessing.pool.Pool)
        assert isinstance(p.apply_async(helpers.square, (2,)),
                          multiprocessing.pool.ApplyResult)
        assert isinstance(p.map_async(helpers.square, [2]),
                          multiprocessing.pool.MapResult)
        assert isinstance(p.imap(helpers.square, [2]),
                          multiprocessing.pool.IMapIterator)
        assert isinstance(p.imap_unordered(helpers.square, [2]),
                          multiprocessing.pool.IMapUnorderedIterator)


@pytest.mark.parametrize("args, kwds, message", [
    (None, {}, "helpers.echo_args() argument after * must be an iterable, not NoneType"),
    (5, {}, "helpers.echo_args() argument after * must be an iterable, not int"),
    ((), None, "helpers.echo_args() argument after ** must be a mapping, not NoneType"),
    ((), [("a", 1)], "helpers.echo_args() argument after ** must be a mapping, not list"),
    (None, {}, "len() argument after * must be an iterable, not NoneType"),
])
def test_arguments_of_the_wrong_kind_fail_as_python_says(Pool, args, kwds, message):
    func = len if message.startswith("len") else helpers.echo_args
    with Pool(1) as p:
        with pytest.raises(TypeError) as info:
            p.apply(func, args, kwds)
        assert str(info.value) == message
        with pytest.raises(TypeError) as info:
            p.apply_async(func, args, kwds).get(T)
        assert str(info.value) == message


def _refilled(nbytes, n):
    """One buffer, refilled in place for every item (reading a file in
    blocks with readinto(), say)."""
    buf = bytearray(nbytes)
    for i in range(n):
        buf[:] = bytes([i]) * nbytes
        yield buf


@pytest.mark.parametrize("nbytes", [1000, 300_000, 2 << 20])
def test_imap_of_a_generator_that_refills_one_buffer(Pool, nbytes):
    # Each item is taken as it is when the input yields it, before the
    # input is asked for the next one.
    with Pool(1) as p:
        for imap in (p.imap, p.imap_unordered):
            got = sorted(imap(helpers.first_and_last, _refilled(nbytes, 30)))
            assert got == [(i, i) for i in range(30)]


@pytest.mark.parametrize("nbytes", [1000, 300_000])
def test_imap_input_fed_before_the_results_are_read(Pool, nbytes):
    # The input reads a bounded queue that the calling thread fills in full
    # before it reads any result: the pool must read the input ahead of the
    # results taken, as multiprocessing's task handler does.
    import queue
    q = queue.Queue(maxsize=4)

    def items():
        while True:
            x = q.get(timeout=T)
            if x is None:
                return
            yield x

    with Pool(2) as p:
        it = p.imap(len, items())
        for _ in range(40):
            q.put(bytes(nbytes), timeout=T)
        q.put(None, timeout=T)
        assert list(it) == [nbytes] * 40
