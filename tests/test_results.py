"""apply_async()'s result objects, which cpool makes and (without callbacks)
completes in C: they must look exactly like the ones ApplyResult.__init__
and _set() make, with and without callbacks, on success and failure."""
import threading
import time
from multiprocessing import pool as mp_pool

import pytest

import helpers
from cpool import pool as cpool_pool

pytestmark = pytest.mark.cpool_only

T = helpers.START_TIMEOUT


def _check_done(p, r, success, value):
    assert isinstance(r, mp_pool.ApplyResult) and type(r) is cpool_pool.ApplyResult
    assert r.ready()
    assert r._ready is True and r._success is success
    assert r._pool is None
    assert r._job not in p._cache
    # released (every waiter gets through), or never made: nobody waited
    assert r._done is None or not r._done.locked()
    if success:
        assert r.successful() and r.get(0) == value and r._value == value
    else:
        assert not r.successful() and isinstance(r._value, type(value))
        with pytest.raises(type(value)):
            r.get(0)


def test_fresh_result_has_the_init_attributes(cpool_Pool, tmp_path):
    gate = helpers.Gate(tmp_path)
    with cpool_Pool(1) as p:
        cb, ecb = (lambda v: None), (lambda e: None)
        r = p.apply_async(helpers.gated, (1, gate.path), callback=cb, error_callback=ecb)
        assert type(r) is cpool_pool.ApplyResult
        assert r._pool is p and r._cache is p._cache and p._cache[r._job] is r
        assert r._callback is cb and r._error_callback is ecb
        assert r._ready is False and not r.ready() and r._done is None
        assert not r.wait(0.01) and r._done.locked()   # made by the first waiter
        with pytest.raises(ValueError):
            r.successful()
        r2 = p.apply_async(helpers.square, (2,))
        assert r2._job > r._job and r2._callback is None and r2._error_callback is None
        gate.open()
        assert r.get(T) == 1 and r2.get(T) == 4
        _check_done(p, r, True, 1)
        _check_done(p, r2, True, 4)


def _check_all(p, ok, bad):
    for i, r in enumerate(ok):
        r.wait(T)
        _check_done(p, r, True, i * i)
    for r in bad:
        r.wait(T)
        _check_done(p, r, False, ValueError())


def test_completion_without_callbacks(cpool_Pool):
    with cpool_Pool(2) as p:
        ok = [p.apply_async(helpers.square, (i,)) for i in range(200)]
        bad = [p.apply_async(helpers.raise_value_error, (i,)) for i in range(50)]
        _check_all(p, ok, bad)
        assert not p._cache


def test_completion_with_callbacks(cpool_Pool):
    with cpool_Pool(2) as p:
        got, errs, threads = [], [], set()

        def cb(v):
            threads.add(threading.current_thread().name)
            got.append(v)

        ok = [p.apply_async(helpers.square, (i,), callback=cb) for i in range(100)]
        bad = [p.apply_async(helpers.raise_value_error, (i,), error_callback=errs.append)
               for i in range(20)]
        # a callback only for the other outcome is not called
        other = p.apply_async(helpers.square, (3,), error_callback=errs.append)
        _check_all(p, ok, bad)
        other.wait(T)
        _check_done(p, other, True, 9)
        assert sorted(got) == [i * i for i in range(100)]
        assert len(errs) == 20 and all(isinstance(e, ValueError) for e in errs)
        assert threads == {"cpool-collector"}


def test_unpicklable_argument_fails_the_result(cpool_Pool):
    with cpool_Pool(2) as p:
        r = p.apply_async(helpers.identity, (threading.Lock(),))
        r.wait(T)
        _check_done(p, r, False, TypeError())
        seen = []
        r = p.apply_async(helpers.identity, (helpers.Unpicklable(),), error_callback=seen.append)
        r.wait(T)
        assert not r.successful() and len(seen) == 1 and seen[0] is r._value
        assert p.apply_async(helpers.square, (5,)).get(T) == 25


def test_apply_async_on_a_closed_or_terminated_pool(cpool_Pool):
    p = cpool_Pool(1)
    p.close()
    with pytest.raises(ValueError):
        p.apply_async(helpers.square, (1,))
    p.join()
    p = cpool_Pool(1)
    p.terminate()
    with pytest.raises(ValueError):
        p.apply_async(helpers.square, (1,))
    p.join()


def test_waiters_before_and_after_completion(cpool_Pool, tmp_path):
    gate = helpers.Gate(tmp_path)
    with cpool_Pool(2) as p:
        r = p.apply_async(helpers.gated, (7, gate.path))
        r_cb = p.apply_async(helpers.gated, (8, gate.path), callback=lambda v: None)
        got = []

        def waiter(res):
            got.append(res.get(T))

        threads = [threading.Thread(target=waiter, args=(res,))
                   for res in (r, r, r, r_cb, r_cb, r_cb)]
        for t in threads:
            t.start()
        with pytest.raises(mp_pool.TimeoutError):
            r.get(0.05)
        gate.open()
        for t in threads:
            t.join(T)
        assert sorted(got) == [7, 7, 7, 8, 8, 8]
        _check_done(p, r, True, 7)
        _check_done(p, r_cb, True, 8)
        # waiting after the fact needs no lock
        late = p.apply_async(helpers.square, (3,))
        while not late.ready():
            pass
        late.wait()
        assert late._done is None and late.get(0) == 9


def test_many_racing_waiters(cpool_Pool):
    """Waiters that come just as results complete: every one gets through."""
    with cpool_Pool(2) as p:
        for _ in range(20):
            rs = [p.apply_async(helpers.square, (i,)) for i in range(50)]
            out = {}

            def waiter(k):
                out[k] = [r.get(T) for r in rs[k::4]]

            threads = [threading.Thread(target=waiter, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(T)
            assert all(out[k] == [i * i for i in range(k, 50, 4)] for k in range(4))
            for r in rs:
                assert r._done is None or not r._done.locked()


def test_cycles_through_a_result_are_collected(cpool_Pool):
    # The C fields are visited by the collector: a result reachable only
    # from its own value or callback is freed.
    import gc
    import weakref
    with cpool_Pool(1) as p:
        r = p.apply_async(helpers.identity, ([1],))
        v = r.get(timeout=T)
        v.append(r)                          # r -> _value -> v -> r
        box = []
        r2 = p.apply_async(helpers.square, (3,), callback=lambda _: box)
        box.append(r2)                       # r2 -> _callback -> box -> r2
        assert r2.get(timeout=T) == 9
        refs = [weakref.ref(r), weakref.ref(r2)]
        del r, v, r2, box
        gc.collect()
        assert [ref() for ref in refs] == [None, None]


def test_pending_results_are_tracked_from_completion_on(cpool_Pool, tmp_path):
    # The garbage collector does not walk results while they are pending
    # (their pool holds them); completion hands them over to it, so cycles
    # made through a result while it was pending are collected as usual.
    import gc
    import weakref
    gate = helpers.Gate(tmp_path)
    with cpool_Pool(1) as p:
        r1 = p.apply_async(helpers.gated, ([1], gate.path))
        r2 = p.apply_async(helpers.gated, (2, gate.path))
        r3 = p.apply_async(helpers.raise_value_error, (3,))
        rc = p.apply_async(helpers.square, (4,), callback=lambda _: None)
        assert gc.is_tracked(rc)          # callbacks may refer to the result
        assert not any(map(gc.is_tracked, (r1, r2, r3)))
        r2.me = r2                        # r2 -> its attributes -> r2
        r3.__dict__["me"] = r3
        gate.open()
        v1 = r1.get(timeout=T)
        v1.append(r1)                     # r1 -> _value -> v1 -> r1
        assert r2.get(timeout=T) == 2
        with pytest.raises(ValueError) as info:
            r3.get(timeout=T)
        info.value.result = r3            # and r3 -> _value -> r3
        assert rc.get(timeout=T) == 16
        assert all(map(gc.is_tracked, (r1, r2, r3, rc)))
        refs = [weakref.ref(r) for r in (r1, r2, r3)]
        del r1, r2, r3, v1, info
        gc.collect()
        assert [ref() for ref in refs] == [None, None, None]


def test_a_callback_set_while_pending_is_run_and_its_cycle_collected(cpool_Pool,
                                                                    tmp_path):
    # Made without callbacks (so left untracked while pending), then given
    # one: _set() completes it, and the collector tracks it from then on.
    import gc
    import weakref
    gate = helpers.Gate(tmp_path)
    got = []
    with cpool_Pool(1) as p:
        r = p.apply_async(helpers.gated, (5, gate.path))
        r._callback = got.append
        r.me = r
        gate.open()
        assert r.get(timeout=T) == 5 and got == [5]
        assert gc.is_tracked(r)
        ref = weakref.ref(r)
        del r
        # get() returns once _set() has released it; the collector thread
        # lets go of the result a few bytecodes later.
        deadline = time.monotonic() + T
        gc.collect()
        while ref() is not None:
            assert time.monotonic() < deadline, "the cycle was not collected"
            time.sleep(0.01)
            gc.collect()


def test_finished_results_that_cannot_be_in_a_cycle_stay_untracked(cpool_Pool):
    # A result whose value holds nothing the garbage collector follows (and
    # which let go of its pool and cache when it completed) cannot be part
    # of a cycle: the collector need not walk it.  Any other value makes it
    # tracked, as do callbacks.
    import gc
    with cpool_Pool(1) as p:
        atomic = [p.apply_async(helpers.identity, (v,))
                  for v in (7, 2.5, "s", b"b", None, True, (1, "x"), ((1,), 2.0))]
        other = [p.apply_async(helpers.identity, (v,))
                 for v in ([1], {}, {"k": 1}, ([],), {1}, helpers.Multiplier(2))]
        failed = p.apply_async(helpers.raise_value_error, (3,))
        with_cb = p.apply_async(helpers.identity, (7,), callback=lambda _: None)
        for r in atomic + other + [with_cb]:
            r.get(timeout=T)
        with pytest.raises(ValueError):
            failed.get(timeout=T)
        assert [gc.is_tracked(r) for r in atomic] == [False] * len(atomic)
        assert [gc.is_tracked(r) for r in other] == [True] * len(other)
        assert gc.is_tracked(failed) and gc.is_tracked(with_cb)


@pytest.mark.parametrize("how", ["setattr", "vars", "__dict__", "set __dict__",
                                 "field descriptor"])
def test_an_untracked_finished_result_is_tracked_when_it_may_refer_back(
        cpool_Pool, how):
    # Setting an attribute, or reaching the instance dict, may make a cycle
    # through a finished result that the collector does not track: it is
    # tracked first, and the cycle is collected.
    import gc
    import weakref
    with cpool_Pool(1) as p:
        r = p.apply_async(helpers.identity, (5,))
        assert r.get(timeout=T) == 5
        assert not gc.is_tracked(r)
        if how == "setattr":
            r.me = r
        elif how == "vars":
            vars(r)["me"] = r
        elif how == "__dict__":
            r.__dict__["me"] = r
        elif how == "set __dict__":
            r.__dict__ = {"me": r}
        else:
            # multiprocessing's attributes are C fields: their descriptor,
            # called directly, tracks it too
            vars(type(r).__mro__[1])["_callback"].__set__(r, {"me": r})
            assert type(r).__mro__[1].__name__ == "ResultBase"
        assert gc.is_tracked(r)
        assert (r._callback if how == "field descriptor" else vars(r))["me"] is r
        ref = weakref.ref(r)
        del r
        gc.collect()
        assert ref() is None


def test_finished_results_have_no_dict_of_their_own(cpool_Pool):
    # multiprocessing's attributes are C fields (ResultBase): making and
    # completing a result must not allocate an instance dict.
    import gc
    with cpool_Pool(2) as p:
        p.map(helpers.square, range(4))
        gc.collect()
        before = sum(type(o) is dict for o in gc.get_objects())
        rs = [p.apply_async(helpers.square, (i,)) for i in range(500)]
        assert [r.get(timeout=30) for r in rs] == [i * i for i in range(500)]
        after = sum(type(o) is dict for o in gc.get_objects())
    assert after - before < 50, (before, after)


def test_default_chunksize(cpool_Pool):
    # Finer than multiprocessing's 4 chunks per worker, capped; with
    # maxtasksperchild (where a chunk is the unit a worker counts),
    # multiprocessing's own size.
    with cpool_Pool(2) as p:
        assert p._default_chunksize(10**6) == cpool_pool.DEFAULT_CHUNK_MAX
        assert p._default_chunksize(100) == 4
        assert p._default_chunksize(1) == 1
        assert p.map(helpers.square, range(1000)) == [i * i for i in range(1000)]
    with cpool_Pool(2, maxtasksperchild=2) as p:
        assert p._default_chunksize(100) == 13 == -(-100 // (2 * 4))
        assert p.map(helpers.square, range(100)) == [i * i for i in range(100)]


def test_results_nobody_holds_complete_cleanly(cpool_Pool):
    # Fire and forget: the cache holds a result's only reference until it
    # completes.  (Run under -X dev too, where freed memory is poisoned:
    # completing must not touch the result after the cache let it go.)
    import subprocess
    import sys
    import textwrap
    with cpool_Pool(2) as p:
        for i in range(3000):
            p.apply_async(helpers.square, (i,))
        p.close()
        p.join()
        assert p._cache == {}
    code = textwrap.dedent("""
        import cpool, helpers
        with cpool.Pool(2) as p:
            for i in range(3000):
                p.apply_async(helpers.square, (i,))
            p.close()
            p.join()
            assert p._cache == {}, p._cache
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-X", "dev", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


class _InterruptOnPickle:
    def __reduce__(self):
        raise KeyboardInterrupt


class _TerminateOnPickle:
    def __init__(self, pool):
        self.pool = pool

    def __reduce__(self):
        self.pool.terminate()
        return (int, (0,))


def test_a_task_that_never_went_out_leaves_no_result_behind(cpool_Pool):
    # apply_async() raises instead of returning the result: the result must
    # not stay in the pool's cache (holding the pool) for ever.
    with cpool_Pool(1) as p:
        with pytest.raises(KeyboardInterrupt):
            p.apply_async(helpers.identity, (_InterruptOnPickle(),))
        assert p._cache == {}
        assert p.apply(helpers.square, (3,)) == 9
        with pytest.raises(ValueError, match="Pool not running"):
            p.apply_async(helpers.identity, (_TerminateOnPickle(p),))
        assert p._cache == {}


@pytest.mark.parametrize("method", ["map", "map_async", "starmap_async"])
def test_a_map_abandoned_by_ctrl_c_leaves_no_result_behind(cpool_Pool, method):
    with cpool_Pool(1) as p:
        star = method.startswith("star")
        items = [1, 2, _InterruptOnPickle(), 4]
        if star:
            items = [(x,) for x in items]
        with pytest.raises(KeyboardInterrupt):
            getattr(p, method)(helpers.identity, items, 1)
        assert p._cache == {}
        assert p.map(helpers.square, range(4)) == [0, 1, 4, 9]
