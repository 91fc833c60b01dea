"""Resource-leak tests (cpool only).

Release builds have no sys.gettotalrefcount, so leaks are detected by
running two equal batches of calls after a warm-up and requiring that the
number of gc-tracked objects and the tracemalloc-traced memory do not grow
between the end of the first and the end of the second batch beyond a small
bound (a per-call leak of even one small object exceeds it).
Pool lifecycle tests check that fds, threads and child processes return to
their baseline after creating and shutting down many pools.
"""
import gc
import os
import sys
import threading
import time
import tracemalloc

import pytest

import helpers

pytestmark = pytest.mark.cpool_only

T = helpers.START_TIMEOUT
N_CALLS = 2000
# Allowed growth between two equal batches of N_CALLS calls.
MAX_OBJECT_GROWTH = 100          # gc-tracked objects (a leak is >= N_CALLS)
MAX_TRACED_GROWTH = 12 * 1024    # bytes (6-24 bytes per call, by kind)
WINDOW = 100                     # outstanding apply_async results at most


def _batch(p, kind, n):
    if kind == "apply":
        for i in range(n // 2):
            assert p.apply(helpers.square, (i,)) == i * i
            assert p.apply(helpers.echo_args, (i,), {"k": i}) == ((i,), {"k": i})
    elif kind == "apply_async":
        # in windows, so the pool's result cache (a dict, whose table size
        # depends on its history) stays small: its resizing is not a leak
        for start in range(0, n, WINDOW):
            rs = [p.apply_async(helpers.square, (i,)) for i in range(start, start + WINDOW)]
            assert [r.get(timeout=T) for r in rs] == [i * i for i in range(start, start + WINDOW)]
        del rs
    elif kind == "apply_async_callback":
        for start in range(0, n, WINDOW):
            got = []
            rs = [p.apply_async(helpers.square, (i,), callback=got.append)
                  for i in range(start, start + WINDOW)]
            for r in rs:
                r.wait(T)
            assert sorted(got) == [i * i for i in range(start, start + WINDOW)]
        del rs, got
    elif kind == "map":
        for i in range(n // 4):
            assert p.map(helpers.square, range(i, i + 10)) == [x * x for x in range(i, i + 10)]
    elif kind == "map_cs1":
        assert p.map(helpers.square, range(n), chunksize=1) == [x * x for x in range(n)]
    elif kind == "starmap":
        for i in range(n // 4):
            assert p.starmap(helpers.mul, [(i, x) for x in range(10)]) == [i * x for x in range(10)]
    elif kind == "imap":
        for i in range(n // 4):
            assert list(p.imap(helpers.square, range(i, i + 10))) == [x * x for x in range(i, i + 10)]
    elif kind == "imap_cs4":
        for i in range(n // 4):
            assert list(p.imap(helpers.square, range(i, i + 10), 4)) == \
                [x * x for x in range(i, i + 10)]
    elif kind == "imap_unordered":
        for i in range(n // 4):
            assert sorted(p.imap_unordered(helpers.square, range(i, i + 10))) == \
                [x * x for x in range(i, i + 10)]
    elif kind == "imap_error":
        # failed items, raised by iterating (C) and by next(timeout)
        for i in range(n // 8):
            it = p.imap(helpers.raise_value_error, range(i, i + 4))
            for x in range(i, i + 4):
                try:
                    it.next(T) if x % 2 else next(it)
                except ValueError as e:
                    assert e.args == ("bad value", x)
                else:
                    raise AssertionError("no exception")
            assert next(it, None) is None
        del it
    elif kind == "apply_error":
        for i in range(n // 4):
            try:
                p.apply(helpers.raise_value_error, (i,))
            except ValueError as e:
                assert e.args == ("bad value", i)
            else:
                raise AssertionError("no exception")
    elif kind == "apply_async_fail":
        # results failed in the worker, and by an argument that cannot be sent
        for start in range(0, n, WINDOW):
            rs = [p.apply_async(helpers.raise_value_error, (i,)) if i % 2 else
                  p.apply_async(helpers.identity, (helpers.Unpicklable(),))
                  for i in range(start, start + WINDOW)]
            for r in rs:
                r.wait(T)
                assert not r.successful()
        del rs, r
    elif kind == "plain_data":
        # the plain-data encoding, both ways, every type it covers
        for i in range(n // 2):
            v = (i, -i * 2**70, 1.5, "é" * (i % 3), b"x", None, True, [i, (i,)], {"k": [i]})
            assert p.apply(helpers.identity, (v,)) == v
            assert p.apply_async(helpers.identity, (v,)).get(timeout=T) == v
    elif kind == "objects":
        # instances the plain-data encoding carries (namedtuples,
        # dataclasses, plain classes), both ways
        for i in range(n // 4):
            v = helpers.make_objects(i)
            got = p.apply(helpers.identity, (v,))
            assert got[0] == v[0] and got[1] == v[1] and got[3] == v[3]
            assert p.apply(helpers.make_objects, (i,))[2] == v[2]
    elif kind == "plain_data_large":
        # plain data too large for one record: the memo-less pickle writer
        pairs = [(x, -x) for x in range(30000)]
        for i in range(n // 200):
            assert p.starmap(helpers.mul, pairs, chunksize=30000)[-1] == -29999 ** 2
    elif kind == "large_payload":
        blob = b"x" * 100_000
        for i in range(n // 10):
            assert p.apply(len, (blob,)) == 100_000
    elif kind == "arena_arrays":
        np = pytest.importorskip("numpy")
        a = np.ones(1 << 17)      # 1 MiB: through the shared-memory arena
        for i in range(n // 50):
            assert p.apply(helpers.array_total, (a,)) == float(1 << 17)
            out = p.apply(helpers.ones, (1 << 17, i))
            assert out.shape == (1 << 17,) and out[-1] == i
        del out
    elif kind == "read_only_arrays":
        # read-only arrays rebuilt writable: in band, out of band, arena;
        # and big-endian ones rebuilt in native order
        np = pytest.importorskip("numpy")
        big = np.arange(1000, dtype=">f8")
        for i in range(n // 20):
            assert p.apply(helpers.identity, (big,)).dtype.isnative
            for size in (8, 1 << 15, 1 << 17):
                out = p.apply(helpers.read_only_ones, (size, i))
                assert out.flags.writeable and out[-1] == i
                out.flags.writeable = False
                assert p.apply(helpers.array_total, (out,)) == float(size * i)
        del out
    elif kind == "pool_list":
        for i in range(n // 2):
            procs = p._pool
            assert len(procs) == 2 and all(w.is_alive() for w in procs)
            assert p.apply(helpers.square, (i,)) == i * i
        del procs
    else:
        raise AssertionError(kind)


def _settle():
    for _ in range(3):
        gc.collect()
    # CPython's type attribute cache (4096 entries) keeps a reference to each
    # attribute name it caches.  pickle makes fresh name strings for every
    # dotted global it saves (numpy's reconstructors), so the cache fills
    # with them over thousands of calls, which multiprocessing shows too:
    # bounded interpreter state, not a leak of cpool's, and cleared here.
    # cpool's own names are checked by test_attribute_names_are_not_fresh.
    sys._clear_type_cache()


KINDS = ["apply", "apply_async", "apply_async_callback", "map", "map_cs1", "starmap",
         "imap", "imap_cs4", "imap_unordered", "imap_error", "apply_error", "apply_async_fail",
         "plain_data", "objects", "plain_data_large", "large_payload", "arena_arrays", "read_only_arrays", "pool_list"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_growth_between_equal_batches(cpool_Pool, kind):
    with cpool_Pool(2) as p:
        _batch(p, kind, N_CALLS // 4)  # warm-up, untraced
        tracemalloc.start()
        try:
            # traced warm-up: free lists and internal caches reach their
            # high-water mark with traced allocations
            _batch(p, kind, N_CALLS // 2)
            _settle()
            _batch(p, kind, N_CALLS)
            _settle()
            mem1, objs1 = tracemalloc.get_traced_memory()[0], len(gc.get_objects())
            # Two more batches; a leak grows with every one of them, while a
            # transient (the collector thread still finishing its last
            # bookkeeping when the caller wakes) shows in one at most: take
            # the smaller of the two readings.
            later = []
            for _ in range(2):
                _batch(p, kind, N_CALLS)
                _settle()
                later.append((tracemalloc.get_traced_memory()[0], len(gc.get_objects())))
            mem2 = min(m for m, _ in later)
            objs2 = min(o for _, o in later)
        finally:
            tracemalloc.stop()
    assert objs2 - objs1 <= MAX_OBJECT_GROWTH, (objs1, later)
    assert mem2 - mem1 <= MAX_TRACED_GROWTH, (mem1, later)


def test_attribute_names_are_not_fresh(cpool_Pool):
    # A large message is pickled and unpickled through attribute lookups by
    # name.  A name made afresh for each lookup stays referenced from the type
    # attribute cache: thousands of dead strings after thousands of calls.
    # (bytes, not numpy: pickle's own dotted-name lookups for numpy's
    # reconstructors make fresh strings that are not cpool's.)
    blob = b"x" * (1 << 20)   # through the arena, by the segmented pickler
    echo = b"y" * 100_000     # a large result: the persistent-id unpickler
    with cpool_Pool(2) as p:
        for _ in range(50):
            assert p.apply(len, (blob,)) == 1 << 20
            assert p.apply(helpers.identity, (echo,)) == echo
        _settle()
        tracemalloc.start()
        try:
            mem1 = tracemalloc.get_traced_memory()[0]
            for _ in range(300):
                assert p.apply(len, (blob,)) == 1 << 20
                assert p.apply(helpers.identity, (echo,)) == echo
            gc.collect()
            mem2 = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    # fresh names would hold ~50 bytes each, a few per call: 30+ KiB here
    assert mem2 - mem1 <= 4096, (mem1, mem2)


# ------------------------------------------------------------ pool lifecycle

def _fds():
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def _children():
    kids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/children" % tid) as f:
                kids.update(int(x) for x in f.read().split())
        except FileNotFoundError:  # thread exited meanwhile
            pass
    return kids


def _resources():
    _settle()
    return len(_fds()), threading.active_count(), _children()


def _cycle(Pool, how):
    if how == "close-join":
        p = Pool(2)
        assert p.map(helpers.square, range(8)) == [i * i for i in range(8)]
        p.close()
        p.join()
    elif how == "terminate":
        p = Pool(2)
        assert p.apply_async(helpers.square, (3,)).get(timeout=T) == 9
        p.terminate()
        p.join()
    elif how == "terminate-no-join":
        p = Pool(2)
        assert p.apply(helpers.square, (3,)) == 9
        p.terminate()
    elif how == "with":
        with Pool(2) as p:
            assert list(p.imap(helpers.square, range(4))) == [0, 1, 4, 9]
    elif how == "with-join":
        with Pool(2) as p:
            assert p.apply(helpers.square, (3,)) == 9
        p.join()
    elif how == "pool-list":
        # the workers' entries (each with a pidfd) outlive the pool
        p = Pool(2)
        procs = p._pool
        procs[0].kill()
        procs[0].join(T)
        # (Once the pool has read it: a task sent to a worker that dies
        # starting up would be failed for it.)
        deadline = time.monotonic() + T
        while procs[0].pid in p._core.pids() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert p.apply(helpers.square, (3,)) == 9
        p.terminate()
        p.join()
        assert all(w.exitcode is not None for w in procs + p._pool)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["close-join", "terminate", "terminate-no-join", "with",
                                 "with-join", "pool-list"])
def test_pool_lifecycle_releases_fds_threads_processes(cpool_Pool, how):
    _cycle(cpool_Pool, how)  # warm-up: one-time lazy resources
    nfds, nthreads, kids = _resources()
    for _ in range(50):
        _cycle(cpool_Pool, how)
    after_fds, after_threads, after_kids = _resources()
    assert after_fds == nfds
    assert after_threads == nthreads
    assert after_kids == kids


def test_pool_lifecycle_with_busy_workers_terminated(cpool_Pool, tmp_path):
    gate = helpers.Gate(tmp_path)

    def cycle():
        p = cpool_Pool(2)
        try:
            sp = gate.started_path()
            r = p.apply_async(helpers.gated, (1, gate.path, sp))
            gate.wait_started(sp)
        finally:
            p.terminate()
            p.join()
        return r

    cycle()
    nfds, nthreads, kids = _resources()
    for _ in range(20):
        cycle()
    assert _resources() == (nfds, nthreads, kids)


def test_no_unclosed_file_reported_at_exit():
    # The workers' stdin (/dev/null) is opened once in the parent; it must
    # not show as an unclosed file when the interpreter shuts down.
    import subprocess
    import textwrap
    code = textwrap.dedent("""
        import cpool
        p = cpool.Pool(1)
        assert p.apply(abs, (-3,)) == 3
        p.close()
        p.join()
        with cpool.Pool(1) as q:
            assert q.apply(abs, (-4,)) == 4
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-X", "dev", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "ResourceWarning" not in out.stderr, out.stderr[-2000:]
