"""Large out-of-band buffers (numpy arrays) through the shared-memory arena:
copied once into a block that the other side wraps in place (cpool only)."""
import gc
import os

import pytest

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.cpool_only

T = 60
MiB = 1 << 20
N8 = MiB          # float64 elements in 8 MiB


# ------------------------------------------------------------------- tasks

def total(a):
    return float(a.sum())


def make(n, k=1.0):
    return np.arange(n, dtype=np.float64) * k


def make_with_pid(n):
    return os.getpid(), np.arange(n, dtype=np.float64)


def bump_and_sum(a):
    a += 1                      # the worker's copy; the parent's is untouched
    return float(a.sum())


_kept = []


def digest(*arrays):
    import hashlib
    return [hashlib.sha256(a).hexdigest() for a in arrays]


def make_pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 2**63, n, dtype=np.int64)


def keep(a):
    _kept.append(a)             # the worker goes on holding the block
    return len(_kept)


def worker_exit(code):
    os._exit(code)


def describe(x):
    return [(type(v).__name__, getattr(v, "shape", None),
             bool(getattr(getattr(v, "flags", None), "writeable", True)))
            for v in x]


# ----------------------------------------------------------------- helpers

def new_pool(n=2, monkeypatch=None, **env):
    from cpool import Pool
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Pool(n)


def info(pool):
    return pool._core.arena_info()


def args_busy(pool):
    use, live, brk, busy, nbusy, warm = info(pool)[0]
    assert use == "args"
    return busy, nbusy


def wait_for(cond, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def pool():
    from cpool import Pool
    p = Pool(2)
    yield p
    p.terminate()
    p.join()


@pytest.fixture
def fresh_pool():
    """A pool with an arena of its own (not one carried over)."""
    from cpool import Pool
    nothing_carried()
    p = Pool(2)
    yield p
    p.terminate()
    p.join()


def arena_mapped():
    with open("/proc/self/maps") as f:
        return "cpool-arena" in f.read()


# ------------------------------------------------------------------- tests

def test_arguments_and_results_round_trip(pool):
    a = np.arange(3 * N8, dtype=np.float64)
    assert pool.apply(total, (a,)) == float(a.sum())
    out = pool.apply(make, (3 * N8, 2.0))
    assert out.dtype == np.float64 and out.shape == (3 * N8,)
    assert (out == a * 2).all()
    out[0] = -1.0                       # writable, as with multiprocessing
    assert out[0] == -1.0


@pytest.mark.parametrize("arr", [
    np.arange(MiB, dtype=np.int32).reshape(512, 512, 4),
    np.asfortranarray(np.arange(MiB, dtype=np.float32).reshape(1024, 1024)),
    np.zeros(2 * MiB, dtype=np.uint8),
    np.arange(MiB // 2, dtype=np.complex128),
    np.arange(4 * MiB, dtype=np.int8)[::2],        # not contiguous: in band
    np.arange(1000, dtype=np.float64),             # small: in band
], ids=["3d-int32", "fortran", "uint8", "complex", "strided", "small"])
def test_shapes_dtypes_and_layouts(pool, arr):
    from helpers import identity
    out = pool.apply(identity, (arr,))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        assert out.flags.f_contiguous == arr.flags.f_contiguous
    assert (out == arr).all()


def test_several_buffers_in_one_message(pool):
    from helpers import identity
    parts = (np.full(MiB, 1.0), np.full(2 * MiB, 2.0), bytearray(b"x" * (3 * MiB)),
             np.full(10, 3.0))
    out = pool.apply(identity, (parts,))
    assert describe(out) == [("ndarray", (MiB,), True), ("ndarray", (2 * MiB,), True),
                             ("bytearray", None, True), ("ndarray", (10,), True)]
    assert (out[0] == 1.0).all() and (out[1] == 2.0).all() and (out[3] == 3.0).all()
    assert out[2] == parts[2]
    res = pool.map(make, [N8, 2 * N8, 10], chunksize=1)
    assert [r.shape for r in res] == [(N8,), (2 * N8,), (10,)]
    assert all((r == np.arange(len(r))).all() for r in res)


def test_arguments_are_taken_when_submitted(pool, gate):
    from helpers import gated
    a = np.ones(2 * N8)
    expected = float(a.sum())
    blockers = [pool.apply_async(gated, (k, gate.path)) for k in range(2)]
    r = pool.apply_async(total, (a,))
    a[:] = 5.0                          # after submission: not seen
    gate.open()
    assert r.get(timeout=T) == expected
    assert [b.get(timeout=T) for b in blockers] == [0, 1]


def test_worker_changes_stay_in_the_worker(pool):
    a = np.zeros(2 * N8)
    assert pool.apply(bump_and_sum, (a,)) == float(2 * N8)
    assert not a.any()


def test_blocks_are_reused(pool):
    a = np.arange(2 * N8, dtype=np.float64)
    for _ in range(3):
        assert pool.apply(total, (a,)) == float(a.sum())
    brk_args = info(pool)[0][2]
    for _ in range(30):
        assert pool.apply(total, (a,)) == float(a.sum())
        out = pool.apply(make, (2 * N8,))
        assert out[-1] == 2 * N8 - 1
        del out
    # No growth: each transfer found the block the previous one freed.
    assert info(pool)[0][2] == brk_args
    used = [(brk, live) for use, live, brk, *_ in info(pool)[1:]
            if isinstance(use, int) and brk > 4096]
    assert used                        # results did go through the arena
    for brk, live in used:             # at most two 16 MiB blocks each
        assert brk <= 4096 + 2 * (16 * MiB + 4096)
        assert live == 0
    wait_for(lambda: args_busy(pool) == (0, 0))


def test_results_outlive_the_pool(monkeypatch):
    from cpool import Pool
    monkeypatch.setenv("CPOOL_ARENA_CARRY", "0")     # nothing carried over
    nothing_carried()
    assert not arena_mapped()
    with Pool(2) as p:
        outs = [p.apply(make, (N8, float(k))) for k in range(3)]
        assert [use for use, *_ in p._core.arena_info() if use == "args"]
    del p
    gc.collect()
    for k, out in enumerate(outs):
        assert (out == np.arange(N8) * k).all()
        out += 1                        # still writable memory
    assert arena_mapped()
    del out, outs
    gc.collect()
    assert not arena_mapped()


def test_held_results_survive_their_workers_death(monkeypatch):
    from cpool import Pool, WorkerLostError
    with Pool(1) as p:
        pid0, held = p.apply(make_with_pid, (2 * N8,))
        part0 = [i for i, (use, *_) in enumerate(info(p)) if use == 0][0]
        assert info(p)[part0][1] == 1   # the parent wraps one block there
        with pytest.raises(WorkerLostError):
            p.apply(worker_exit, (3,))
        pid1, fresh = p.apply(make_with_pid, (2 * N8,))
        assert pid1 != pid0
        # The replacement writes elsewhere: the held array is intact.
        assert (held == np.arange(2 * N8)).all() and (fresh == held).all()
        parts = info(p)
        assert parts[part0][0] == "retired"
        new = [i for i, (use, *_) in enumerate(parts) if use == 0]
        assert new and new[0] != part0
        del held
        gc.collect()
        assert info(p)[part0][0] == "free"
        assert (fresh == np.arange(2 * N8)).all()


def test_blocks_a_dead_worker_held_are_freed():
    from cpool import Pool, WorkerLostError
    with Pool(1) as p:
        a = np.ones(2 * N8)
        assert p.apply(keep, (a,)) == 1
        assert p.apply(keep, (a,)) == 2
        wait_for(lambda: args_busy(p)[1] == 2)    # held by the worker
        with pytest.raises(WorkerLostError):
            p.apply(worker_exit, (3,))
        wait_for(lambda: args_busy(p) == (0, 0))
        assert p.apply(total, (a,)) == float(a.sum())


def test_arguments_beyond_the_limit_go_through_the_rings(monkeypatch, gate):
    from helpers import gated
    monkeypatch.setenv("CPOOL_ARENA_ARGS", str(5 * MiB))
    from cpool import Pool
    with Pool(1) as p:
        blocker = p.apply_async(gated, (0, gate.path))
        arrays = [np.full(N8 // 4, float(k)) for k in range(6)]   # 2 MiB each
        rs = [p.apply_async(total, (x,)) for x in arrays]
        busy, nbusy = args_busy(p)
        assert nbusy == 2 and busy <= 5 * MiB    # the rest did not fit
        gate.open()
        assert blocker.get(timeout=T) == 0
        assert [r.get(timeout=T) for r in rs] == [float(x.sum()) for x in arrays]
        wait_for(lambda: args_busy(p) == (0, 0))


def test_without_the_arena(monkeypatch):
    monkeypatch.setenv("CPOOL_ARENA", "0")
    from cpool import Pool
    from helpers import identity
    with Pool(2) as p:
        assert p._core.arena_info() is None
        a = np.arange(3 * N8, dtype=np.float64)
        out = p.apply(identity, (a,))
        assert (out == a).all() and out.flags.writeable


def test_forked_child_does_not_free_the_parents_blocks(pool):
    held = pool.apply(make, (2 * N8, 3.0))
    pid = os.fork()
    if pid == 0:                         # the child drops its copy
        try:
            del held
            gc.collect()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    for _ in range(3):                   # would reuse the block if freed
        other = pool.apply(make, (2 * N8, 7.0))
        assert (other == np.arange(2 * N8) * 7.0).all()
    assert (held == np.arange(2 * N8) * 3.0).all()


def test_unpicklable_result_releases_its_blocks():
    # The array is copied into the arena before pickling fails on the
    # lambda: that block must be freed, not left on offer.
    from multiprocessing.pool import MaybeEncodingError
    from cpool import Pool
    with Pool(1) as p:
        with pytest.raises(MaybeEncodingError):
            p.apply(array_and_lambda, (N8,))
        part = [i for i, (use, *_) in enumerate(info(p)) if use == 0][0]
        brk = info(p)[part][2]
        for _ in range(10):
            with pytest.raises(MaybeEncodingError):
                p.apply(array_and_lambda, (N8,))
        assert info(p)[part][2] == brk      # the same block, every time
        assert all(live == 0 for _, live, *_ in info(p))
        assert (p.apply(make, (N8,)) == np.arange(N8)).all()


def array_and_lambda(n):
    return np.arange(n, dtype=np.float64), lambda: None


def test_recycled_workers_with_held_results_run_out_of_spares_safely():
    # Every task gets a new worker, and the parent keeps each result: each
    # exit retires a partition the parent still uses, the spares run out,
    # and later workers send their results through their rings.
    from cpool import Pool
    with Pool(2, maxtasksperchild=1) as p:
        outs = [p.apply_async(make, (N8 // 4, float(k))) for k in range(12)]
        held = [r.get(timeout=T) for r in outs]
        for k, a in enumerate(held):
            assert (a == np.arange(N8 // 4) * k).all()
        uses = [use for use, *_ in info(p)]
        assert "retired" in uses
        del a, held, outs      # (the result objects hold the arrays too)
        gc.collect()
        assert all(live == 0 for _, live, *_ in info(p))
        assert "retired" not in [use for use, *_ in info(p)]
        assert (p.apply(make, (N8, 2.0)) == np.arange(N8) * 2.0).all()


def test_threads_submitting_arrays_at_once(pool):
    import threading
    errors = []

    def submit(t):
        try:
            rs = [pool.apply_async(total, (np.full(N8 // 4, float(t * 100 + k)),))
                  for k in range(15)]
            got = [r.get(timeout=T) for r in rs]
            assert got == [float((t * 100 + k) * (N8 // 4)) for k in range(15)]
        except BaseException as e:      # reported below
            errors.append(e)
    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    wait_for(lambda: args_busy(pool) == (0, 0))


def scribble_on_header(a):
    # A buggy C extension in the worker zeroes its argument block's size.
    import ctypes
    ctypes.c_uint64.from_address(a.ctypes.data - 64 + 8).value = 0
    return 1


def test_a_worker_scribbling_on_block_headers_cannot_hang_the_parent():
    from cpool import Pool
    with Pool(1) as p:
        assert p.apply(scribble_on_header, (np.ones(N8 // 4),)) == 1
        # The parent finds the header bad when it next allocates, stops
        # using that partition, and sends arrays through the rings.
        for k in range(3):
            assert p.apply(total, (np.full(N8 // 4, float(k)),)) == float(k * (N8 // 4))
        assert info(p)[0][2] == 0           # partition 0 disabled


def test_forked_child_gets_a_copy_not_a_window(pool):
    held = pool.apply(make, (2 * N8, 3.0))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = bool((held == np.arange(2 * N8) * 3.0).all())
        held[:] = 7.0                      # its own copy, as after any fork
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    assert (held == np.arange(2 * N8) * 3.0).all()


def test_forked_child_copies_held_arrays_as_they_were_at_the_fork(pool):
    # The parent lets go of an array right after the fork and the worker
    # reuses its block at once: the child's copy is of the fork's moment.
    from helpers import fork_to_check_later
    for _ in range(3):
        a = pool.apply(make, (2 * N8, 5.0))
        go = fork_to_check_later(lambda: (a == np.arange(2 * N8) * 5.0).all())
        del a
        b = pool.apply(make, (2 * N8, 7.0))
        assert go()
        del b


_held = None


def overwrite_held(value):
    _held[:] = value                       # the worker's inherited copy
    return float(_held[0])


def test_workers_of_a_later_pool_get_copies_of_held_arrays(pool):
    global _held
    from cpool import Pool
    _held = pool.apply(make, (2 * N8, 1.0))
    try:
        with Pool(1) as p2:                # forked while _held lives in the arena
            assert p2.apply(overwrite_held, (5.0,)) == 5.0
        assert (_held == np.arange(2 * N8)).all()
    finally:
        _held = None


def warm_mark(pool, part=0):
    return info(pool)[part][5]


def pattern(nbytes, seed):
    """nbytes of data that differs everywhere (int64s, then odd bytes)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def test_fresh_and_warm_pages_are_filled_exactly(fresh_pool):
    # Blocks landing on fresh pages (prepared, then copied: by two threads
    # past 16 MiB, split at a page boundary inside odd lengths), on pages a
    # block used before, and across the edge between the two.
    pool = fresh_pool
    first = pattern(20 * MiB + 123, 1)
    assert warm_mark(pool) <= 4096                 # nothing populated yet
    assert pool.apply(digest, (first,)) == digest(first)
    assert warm_mark(pool) >= 20 * MiB             # the pages it filled
    # Two at once: the second block starts beyond the first, on fresh pages.
    a, b = pattern(3 * MiB + 7, 2), pattern(18 * MiB + 4097, 3)
    assert pool.apply(digest, (a, b)) == digest(a, b)
    mark = warm_mark(pool)
    assert mark >= 21 * MiB
    # Both free again: a bigger one starts on warm pages and runs past them.
    big = pattern(mark + 9 * MiB + 5, 4)
    assert pool.apply(digest, (big,)) == digest(big)
    assert warm_mark(pool) >= mark + 9 * MiB
    # Warm pages throughout, again.
    again = pattern(20 * MiB + 1, 5)
    assert pool.apply(digest, (again,)) == digest(again)


def test_results_fill_the_workers_partitions_exactly(pool):
    outs = [pool.apply(make_pattern, (n, seed))
            for seed, n in enumerate([3 * MiB + 1, 2 * MiB + 3, 5 * MiB + 11])]
    for seed, (n, out) in enumerate(zip([3 * MiB + 1, 2 * MiB + 3, 5 * MiB + 11],
                                        outs)):
        assert out.shape == (n,)
        assert (out == make_pattern(n, seed)).all()
    used = [warm for use, _, _, _, _, warm in info(pool) if isinstance(use, int)]
    assert max(used) >= 2 * MiB * 8     # a result partition's pages, recorded


# ------------------------------------------------------------ carrying over

def carried():
    from cpool import _core
    return _core.arena_carried()


def arena_files():
    """{inode: bytes allocated} of the arena memory files this process holds."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
            if target.startswith("/memfd:cpool-arena"):
                st = os.fstat(int(fd))
                out[st.st_ino] = st.st_blocks * 512
        except OSError:             # the listing's own fd, gone meanwhile
            continue
    return out


def nothing_carried():
    """Let go of the pools gone (whose arenas may be parked), then of the
    arena parked."""
    from cpool import _core
    gc.collect()
    _core.drop_carried_arena()


def ended(pool):
    pool.terminate()
    pool.join()
    gc.collect()


def test_the_next_pool_adopts_the_last_pools_warm_arena():
    from cpool import Pool
    nothing_carried()
    before = set(arena_files())
    a = pattern(24 * MiB + 5, 7)
    p = Pool(2)
    assert p.apply(digest, (a,)) == digest(a)
    out = p.apply(make_pattern, (2 * MiB, 3))
    (ino,) = set(arena_files()) - before
    del p
    gc.collect()            # (the pool was not ended: that is done here)
    # A result array still holds the old arena: nothing is parked yet.
    assert carried() == 0
    assert (out == make_pattern(2 * MiB, 3)).all()
    del out
    gc.collect()
    kept = carried()
    assert 24 * MiB <= kept <= 24 * MiB + 16 * MiB + 3 * 4096 + (1 << 16)
    assert 24 * MiB <= arena_files()[ino] <= kept + 3 * 4096
    q = Pool(2)
    try:
        assert carried() == 0                       # taken
        assert ino in arena_files() and set(arena_files()) - before == {ino}
        assert warm_mark(q) >= 24 * MiB             # still mapped here
        # Over the old contents and past them, arguments and results alike.
        b = pattern(30 * MiB + 3, 8)
        assert q.apply(digest, (b,)) == digest(b)
        c = q.apply(make_pattern, (3 * MiB + 1, 9))
        assert (c == make_pattern(3 * MiB + 1, 9)).all()
        del c
    finally:
        ended(q)
    del q
    gc.collect()
    assert carried() >= 30 * MiB


def worker_marks(pool):
    return [warm for use, _, _, _, _, warm in info(pool) if isinstance(use, int)]


def test_workers_of_the_next_pool_map_the_carried_result_pages():
    # A worker's result partition carried over is marked as having pages
    # (the new worker maps them, without allocating them anew), and results
    # landing on those pages and past them arrive exactly.
    from cpool import Pool
    nothing_carried()
    p = Pool(2)
    outs = [p.apply(make_pattern, (MiB + 3, s)) for s in range(2)]  # 8 MiB each
    del outs
    ended(p)
    del p
    gc.collect()
    q = Pool(2)
    try:
        assert max(worker_marks(q)) >= 8 * MiB     # before any transfer
        # and the workers map those pages while they wait for work
        wait_for(lambda: all(w.pid for w in q._pool))
        wait_for(lambda: max(arena_rss(w.pid) for w in q._pool) >= 8 * 1024)
        for s, n in [(5, MiB + 1), (6, 2 * MiB + 7), (7, MiB // 2 + 5)]:
            out = q.apply(make_pattern, (n, s))
            assert (out == make_pattern(n, s)).all()
            del out
    finally:
        ended(q)


def test_a_replacement_worker_maps_its_partitions_pages():
    # A worker's second task ends it; its replacement reuses its partition
    # (the parent holds nothing there), whose pages it has yet to map.
    from cpool import Pool
    with Pool(1, maxtasksperchild=2) as p:
        first = p.apply(make_pattern, (2 * MiB + 3, 1))     # 16 MiB
        assert (first == make_pattern(2 * MiB + 3, 1)).all()
        del first
        pid = p.apply(os.getpid)
        wait_for(lambda: [w.pid for w in p._pool] not in ([pid], [None]))
        assert max(worker_marks(p)) >= 16 * MiB
        for s, n in [(2, 3 * MiB + 1), (3, MiB + 5)]:
            out = p.apply(make_pattern, (n, s))
            assert (out == make_pattern(n, s)).all()
            del out


def arena_rss(pid):
    """KiB of the arena mapped in process pid (its pages in its page tables)."""
    rss, inside = 0, False
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            if "-" in line.split()[0]:              # a mapping's first line
                inside = "cpool-arena" in line
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


def test_idle_workers_of_the_next_pool_map_the_carried_arguments_pages():
    from cpool import Pool
    nothing_carried()
    a = pattern(24 * MiB + 5, 3)
    p = Pool(2)
    assert p.apply(digest, (a,)) == digest(a)
    ended(p)
    del p
    gc.collect()
    q = Pool(2)
    try:
        # Nothing sent yet: the workers map them while they wait for work.
        wait_for(lambda: all(w.pid for w in q._pool))
        pids = [w.pid for w in q._pool]
        wait_for(lambda: all(arena_rss(pid) >= 24 * 1024 for pid in pids))
        b = pattern(20 * MiB + 1, 4)
        assert q.apply(digest, (b,)) == digest(b)
    finally:
        ended(q)


def test_carried_memory_is_bounded(monkeypatch):
    from cpool import Pool
    nothing_carried()
    before = set(arena_files())
    monkeypatch.setenv("CPOOL_ARENA_CARRY", str(8 * MiB))
    p = Pool(2)
    a = pattern(24 * MiB, 1)
    assert p.apply(digest, (a,)) == digest(a)
    assert len(p.apply(make_pattern, (2 * MiB, 3))) == 2 * MiB
    (ino,) = set(arena_files()) - before
    ended(p)
    del p
    gc.collect()
    assert 0 < carried() <= 8 * MiB
    assert arena_files()[ino] <= 8 * MiB
    # Nothing at all: the arena goes with the pool.
    monkeypatch.setenv("CPOOL_ARENA_CARRY", "0")
    q = Pool(2)
    assert q.apply(digest, (a,)) == digest(a)
    ended(q)
    del q
    gc.collect()
    assert carried() == 0
    assert set(arena_files()) == before


def test_a_pool_of_another_size_gives_the_carried_arena_back():
    from cpool import Pool
    nothing_carried()
    before = set(arena_files())
    p = Pool(2)
    a = pattern(4 * MiB, 1)
    assert p.apply(digest, (a,)) == digest(a)
    ended(p)
    del p
    gc.collect()
    assert carried() >= 4 * MiB
    q = Pool(3)
    try:
        assert carried() == 0
        assert len(set(arena_files()) - before) == 1    # its own, new one
        assert q.apply(digest, (a,)) == digest(a)
    finally:
        ended(q)


def mapped_inodes():
    with open("/proc/self/maps") as f:
        return {int(line.split()[4]) for line in f if "cpool-arena" in line}


def carried_in_a_child(path, parents):
    """In a forked child: what is carried, whether it holds the parent's
    parked arena (an fd or a mapping), then a pool of its own."""
    from cpool import Pool
    got = [carried(), parents in arena_files() or parents in mapped_inodes()]
    with Pool(2) as p:
        a = pattern(4 * MiB, 5)
        got.append(p.apply(digest, (a,)) == digest(a))
    p.join()
    with open(path, "w") as f:
        f.write(repr(got))


def test_a_forked_child_leaves_the_parents_carried_arena_alone(tmp_path):
    from cpool import Pool
    nothing_carried()
    p = Pool(2)
    a = pattern(12 * MiB, 2)
    assert p.apply(digest, (a,)) == digest(a)
    before = set(arena_files())
    ended(p)
    del p
    gc.collect()
    kept = carried()
    (ino,) = set(arena_files()) & before
    held = arena_files()[ino]
    assert kept >= 12 * MiB and held >= 12 * MiB
    pid = os.fork()
    if pid == 0:                                # pragma: no cover (child)
        code = 1
        try:
            carried_in_a_child(str(tmp_path / "child"), ino)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # It had nothing carried, and let go of the parent's (else it would keep
    # those pages for as long as it lives).
    assert (tmp_path / "child").read_text() == "[0, False, True]"
    assert carried() == kept and arena_files()[ino] == held
    q = Pool(2)
    try:
        assert carried() == 0 and ino in arena_files()
        assert q.apply(digest, (a,)) == digest(a)
    finally:
        ended(q)


def test_a_pool_not_all_reaped_carries_nothing():
    # Its fork server killed, its workers die by their death signal,
    # unreaped by it: the arena is not kept for another pool.
    import signal
    from cpool import Pool
    nothing_carried()
    p = Pool(2)
    a = pattern(4 * MiB, 3)
    assert p.apply(digest, (a,)) == digest(a)
    os.kill(p._core.zygote_pid, signal.SIGKILL)
    ended(p)
    del p
    gc.collect()
    assert carried() == 0


def nested_pool_carried(_=None):
    """In a worker: what a pool made here leaves carried over once gone."""
    from cpool import Pool
    p = Pool(2)
    a = np.arange(MiB, dtype=np.float64)
    assert p.apply(total, (a,)) == float(a.sum())
    ended(p)
    del p
    gc.collect()
    return carried()


@pytest.mark.parametrize("env", [None, str(64 * MiB)])
def test_a_pool_made_in_a_worker_carries_over_only_if_asked(monkeypatch, env):
    # Every worker of a pool would keep its own otherwise.
    from cpool import Pool
    if env is not None:
        monkeypatch.setenv("CPOOL_ARENA_CARRY", env)
    with Pool(1) as p:
        got = p.apply(nested_pool_carried)
    if env is None:
        assert got == 0
    else:
        assert 8 * MiB <= got <= 64 * MiB


def test_partitions_of_a_large_pool_keep_less():
    # 1 GiB of kept pages shared among 16 workers: 64 MiB of a worker's
    # partition stay populated; with 2 workers, up to 256 MiB.
    from cpool import Pool
    for n in (16, 2):
        nothing_carried()
        p = Pool(n)
        try:
            out = p.apply(make, (12 * N8,))           # 96 MiB
            assert out.shape == (12 * N8,) and out[-1] == 12 * N8 - 1
            del out
            mark = max(worker_marks(p))
            if n == 16:
                assert mark == 64 * MiB
            else:                       # the block's pages, header and all
                assert 96 * MiB < mark <= 97 * MiB
        finally:
            p.terminate()
            p.join()
