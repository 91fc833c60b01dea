"""Messages larger than a ring, through every path (cpool only: the ring
size is cpool's)."""
import os
import time

import pytest

import helpers

pytestmark = pytest.mark.cpool_only

T = 60


def echo(x):
    return x


def make_bytes(n):
    return b"\x5a" * n


@pytest.fixture(scope="module")
def pool():
    from cpool import Pool
    p = Pool(2)
    yield p
    p.terminate()
    p.join()


SIZES = [(1 << 20) - 100, 3 << 20, (8 << 20) + 13]


@pytest.mark.parametrize("n", SIZES)
def test_apply_large_argument_and_result(pool, n):
    data = os.urandom(n)
    assert pool.apply(len, (data,)) == n
    assert pool.apply(helpers.identity, (data,)) == data


@pytest.mark.parametrize("n", SIZES)
def test_apply_async_large_result(pool, n):
    r = pool.apply_async(make_bytes, (n,))
    assert r.get(timeout=T) == b"\x5a" * n


def test_map_with_large_items_interleaved_with_small(pool):
    items = [os.urandom(3 << 20) if i % 3 == 0 else b"s%d" % i for i in range(12)]
    assert pool.map(len, items, chunksize=1) == [len(x) for x in items]
    out = list(pool.imap(helpers.identity, items))
    assert out == items


def test_many_concurrent_large_messages(pool):
    data = [os.urandom((2 << 20) + i) for i in range(6)]
    rs = [pool.apply_async(helpers.identity, (d,)) for d in data]
    assert [r.get(timeout=T) for r in rs] == data


@pytest.mark.skipif(os.environ.get("CPOOL_TEST_HUGE") != "1",
                    reason="needs ~12 GiB of memory and a minute; CPOOL_TEST_HUGE=1")
def test_argument_and_result_over_4_gib(pool):
    n = (4 << 30) + 4096
    data = bytes(n)
    assert pool.apply(len, (data,)) == n
    del data
    out = pool.apply(bytes, (n,))
    assert len(out) == n


def make_bytearrays(sizes):
    return [bytearray(os.urandom(n)) for n in sizes]


def concat(parts):
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize("sizes", [[300_000], [1 << 20, 5, 3 << 20], [256 << 10] * 5])
def test_out_of_band_buffers_both_ways(pool, sizes):
    # bytearrays pickle (protocol 5) through PickleBuffers: they travel out
    # of band and come back as writable bytearrays.
    parts = make_bytearrays(sizes)
    assert pool.apply(concat, (parts,)) == b"".join(parts)
    out = pool.apply(make_bytearrays, (sizes,))
    assert [len(x) for x in out] == sizes
    assert all(type(x) is bytearray for x in out)
    out[0][0:1] = b"!"           # writable, as the original was
    r = pool.apply_async(helpers.identity, (parts,))
    assert r.get(timeout=T) == parts


def test_numpy_arrays_round_trip(pool):
    np = pytest.importorskip("numpy")
    a = np.arange(1 << 20, dtype=np.float64)
    b = pool.apply(helpers.identity, (a,))
    assert b.dtype == a.dtype and b.shape == a.shape and (b == a).all()
    b[0] = 42.0                  # writable
    sl = a[::2]                  # not contiguous: pickled in-band
    assert (pool.apply(helpers.identity, (sl,)) == sl).all()
    outs = pool.map(helpers.identity, [a, a[:10], a * 2], chunksize=1)
    assert (outs[2] == a * 2).all() and (outs[1] == a[:10]).all()


class Blob(bytes):
    """A bytes subclass: pickled as itself, never unwrapped as plain bytes."""


def describe_bytes(x):
    """Types, lengths and which items are the same object, of a structure
    like the ones below (so the parent can check what the worker got)."""
    flat = []

    def walk(v):
        if isinstance(v, (tuple, list)):
            for e in v:
                walk(e)
        elif isinstance(v, dict):
            for e in v.values():
                walk(e)
        else:
            flat.append(v)
    walk(x)
    return [(type(v).__name__, len(v), [w is v for w in flat].index(True)) for v in flat]


def test_large_bytes_keep_types_nesting_and_sharing(pool):
    big = os.urandom(2 << 20)
    sub = Blob(os.urandom(1 << 20))
    small = b"tiny"
    value = (big, [big, small, {"k": big, "s": sub}], (sub, (big,)))
    got = pool.apply(describe_bytes, (value,))
    # as multiprocessing would give: same types, and one object where the
    # caller had one
    assert got == describe_bytes(value)
    back = pool.apply(helpers.identity, (value,))
    assert back == value
    assert type(back[2][0]) is Blob and type(back[1][2]) is dict
    assert describe_bytes(back) == describe_bytes(value)
    kw = pool.apply(helpers.echo_args, (big,), {"data": big, "n": 1})
    assert kw == ((big,), {"data": big, "n": 1})
    assert kw[0][0] is kw[1]["data"]


# ------------------------------------------------- what a worker keeps

_pinned = []


def free_under_kept(mib):
    """A large temporary, freed after the task allocated things it keeps:
    freed memory in the middle of the heap, which free() does not trim."""
    big = bytearray(mib << 20)
    big[::4096] = b"x" * len(big[::4096])        # resident
    _pinned.extend(bytearray(16 << 10) for _ in range(256))
    del big
    return os.getpid()


_held = []


def hold_big(mib):
    big = bytearray(mib << 20)
    big[::4096] = b"x" * len(big[::4096])
    _held.append(big)
    _pinned.extend(bytearray(16 << 10) for _ in range(256))
    return os.getpid()


def drop_big():
    _held.clear()
    return os.getpid()


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10
    raise AssertionError("no VmRSS")


NO_ASAN = pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                             reason="ASan's allocator keeps freed memory in quarantine")


def worker_rss(p):
    """Each worker's resident MiB by pid, once they all run (a worker's
    resident set includes the pages it shares with the process it was
    forked from: measure growth from here)."""
    deadline = time.monotonic() + 10
    while not all(w.pid for w in p._pool):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return {w.pid: rss_mib(w.pid) for w in p._pool}


def wait_rss_below(pid, mib):
    deadline = time.monotonic() + 10
    while rss_mib(pid) > mib:
        assert time.monotonic() < deadline, (rss_mib(pid), mib)
        time.sleep(0.02)


@NO_ASAN
def test_a_worker_gives_back_large_freed_memory():
    # A worker keeps at most 256 MiB of freed heap warm; a 768 MiB hole
    # under memory in use used to stay resident for the worker's life.
    from cpool import Pool
    with Pool(1) as p:
        base = worker_rss(p)
        pid = p.apply(free_under_kept, (768,))
        assert p.apply(free_under_kept, (768,)) == pid
        wait_rss_below(pid, base[pid] + 128)


@NO_ASAN
def test_an_idle_worker_gives_back_what_its_last_task_freed():
    # The worker looks at its heap at most every 100 ms: a task that frees
    # a lot right after a look is caught up with when the worker goes idle.
    from cpool import Pool
    with Pool(1) as p:
        base = worker_rss(p)
        pid = p.apply(hold_big, (768,))
        assert rss_mib(pid) >= 768               # held, resident
        assert p.apply(drop_big) == pid
        wait_rss_below(pid, base[pid] + 128)


@NO_ASAN
def test_workers_of_a_large_pool_keep_less():
    # 1 GiB of warm heap shared among 8 workers: 128 MiB each, so a freed
    # 200 MiB hole (which a worker of a small pool keeps) goes back.
    from cpool import Pool
    with Pool(8) as p:
        base = worker_rss(p)
        pid = p.apply(free_under_kept, (200,))
        wait_rss_below(pid, base[pid] + 64)


# ------------------------------------- arguments are taken when submitted

def ends(a):
    return type(a).__name__, len(a), bytes(a[:1]), bytes(a[-1:])


@pytest.mark.parametrize("arena", ["1", "0"])
@pytest.mark.parametrize("nbytes", [300_000, 4 << 20])
@pytest.mark.parametrize("change", ["write", "clear", "shrink", "extend"])
def test_a_queued_bytearray_changed_by_the_caller(monkeypatch, gate, arena,
                                                   nbytes, change):
    # The task is queued behind a busy worker when the caller changes or
    # resizes what it passed (a resize used to crash the parent or fail the
    # task as malformed).  300 KB goes into the worker's ring at the call:
    # the task gets it as it was, and a view holds it until the task is
    # done (a resize raises BufferError, as for any buffer a view holds).
    # 4 MiB does not fit the ring: what did went at the call, and the rest
    # was copied then, so the caller may change or resize it.
    monkeypatch.setenv("CPOOL_ARENA", arena)
    from cpool import Pool
    with Pool(1) as p:
        blocker = p.apply_async(helpers.gated, (0, gate.path))
        a = bytearray(b"\x01" * nbytes)
        r = p.apply_async(ends, (a,))
        held = nbytes < (1 << 20) and change != "write"
        try:
            if change == "write":
                a[0] = a[-1] = 2
            elif change == "clear":
                a.clear()
            elif change == "shrink":
                del a[-100:]
            else:
                a.extend(b"\x02" * (8 << 20))
        except BufferError:
            assert held
        else:
            assert not held
        gate.open()
        assert blocker.get(timeout=T) == 0
        assert r.get(timeout=T) == ("bytearray", nbytes, b"\x01", b"\x01")
        a.clear()                       # its task is done: nothing holds it
        assert p.apply(ends, (bytearray(b"ok"),)) == ("bytearray", 2, b"o", b"k")


def test_a_bytearray_whose_task_waits_for_room(gate):
    # Tasks that do not fit the worker's ring yet hold their large buffers
    # by a view, read when they are sent, as multiprocessing reads a task
    # when it pickles it: a change meanwhile is seen, a resize is refused
    # (BufferError) instead of read past its end.
    from cpool import Pool
    with Pool(1) as p:
        blocker = p.apply_async(helpers.gated, (0, gate.path))
        args = [bytearray(b"\x01" * 600_000) for _ in range(4)]
        rs = [p.apply_async(ends, (a,)) for a in args]
        last = args[-1]
        with pytest.raises(BufferError):
            last.clear()
        last[0] = 2
        gate.open()
        assert blocker.get(timeout=T) == 0
        got = [r.get(timeout=T) for r in rs]
        assert got[0] == ("bytearray", 600_000, b"\x01", b"\x01")  # in the ring
        assert got[-1] == ("bytearray", 600_000, b"\x02", b"\x01")
        last.clear()                    # its task is done: nothing holds it
