"""A worker's large numpy arrays made in its arena partition, and returned
without a copy when nothing in the worker holds them any more (cpool only:
csrc/npalloc.c)."""
import contextlib
import ctypes
import datetime
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.cpool_only

MiB = 1 << 20
N = MiB                  # float64 elements: 8 MiB


# ------------------------------------------------------------------- tasks

def arena_span():
    with open("/proc/self/maps") as f:
        for line in f:
            if "cpool-arena" in line:
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    return 0, 0


def in_arena(a):
    lo, hi = arena_span()
    return lo <= a.ctypes.data < hi


def handler_name(a=None):
    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:                     # numpy 1.x
        from numpy.core.multiarray import get_handler_name
    return get_handler_name(a) if a is not None else get_handler_name()


def make(n, k=1.0):
    a = np.arange(n, dtype=np.float64)
    a *= k                  # in place: no temporary (numpy elides it only
    return a                # when it can tell it is one)


def made_where(n):
    big, small = np.empty(n), np.empty(100)
    return handler_name(big), in_arena(big), in_arena(small)


def make_with_address(n, k=1.0):
    a = make(n, k)
    return a, a.ctypes.data, in_arena(a)


_kept = []


def keep_and_return(n):
    a = np.arange(n, dtype=np.float64)
    _kept.append(a)
    return a, a.ctypes.data, in_arena(a)


def bump_kept():
    for a in _kept:
        a += 1000.0
    return len(_kept)


def tail_view(n):
    a = np.arange(n, dtype=np.float64)
    return a[8:]


def twice(n):
    a = np.arange(n, dtype=np.float64)
    return a, a[:]


class Cycle:
    pass


def held_by_a_cycle(n):
    box = Cycle()
    box.me = box
    box.a = np.arange(n, dtype=np.float64)
    return box.a


def fork_with_array(n):
    a = np.arange(n, dtype=np.float64)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = bool((a == np.arange(n)).all())
            a[:] = -1.0                  # the child's copy
            del a                        # freed there: nothing of the worker's
            gc.collect()
            b = np.full(n, 3.0)          # numpy's own memory in the child
            ok = ok and not in_arena(b) and float(b.sum()) == 3.0 * n
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    child_ok = os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    return child_ok, in_arena(a), bool((a == np.arange(n)).all())


def resize_in_place(n):
    a = np.arange(n, dtype=np.float64)
    was = in_arena(a)
    a.resize(n + n // 2, refcheck=False)     # grows: moves
    grown = bool((a[:n] == np.arange(n)).all())
    a.resize(n // 2, refcheck=False)         # shrinks: stays
    return was, grown, a


def zeros_on_used_pages(n):
    z = np.zeros(n)
    return in_arena(z), bool((z == 0).all())


def pid_and_array(n):
    return os.getpid(), np.arange(n, dtype=np.float64)


def fork_then_reuse(n):
    # The child reads its copy only after the worker freed the array and
    # made another one, which may take the freed block.
    from helpers import fork_to_check_later
    a = np.full(n, 5.0)
    go = fork_to_check_later(lambda: (a == 5.0).all())
    del a
    b = np.full(n, 7.0)
    return go(), float(b[0])


def fork_and_return(n, done_path):
    # The child changes its copy after the worker returned the array.
    a = np.full(n, 5.0)
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(0.05)
            a[:] = -1.0
            with open(done_path, "w") as f:
                f.write("done")
        finally:
            os._exit(0)
    return a


class Scrubbed:
    """A result whose __del__ changes its array and clears its bytearray."""
    def __init__(self, a, ba):
        self.a, self.ba = a, ba

    def __del__(self):
        a, ba = self.__dict__.get("a"), self.__dict__.get("ba")
        if a is not None:
            a[:] = 0.0
        if ba is not None:
            ba.clear()


def scrubbed(n):
    # (The array beside it makes the result one with large buffers.)
    return Scrubbed(make(n, 3.0), bytearray(b"z" * (512 * 1024))), make(n)


class ExitsWhenDropped:
    def __init__(self, a):
        self.a, self.pid = a, os.getpid()

    def __del__(self):
        if os.getpid() == self.pid:     # in the worker only
            os._exit(0)


def exits_when_dropped(n):
    return ExitsWhenDropped(make(n, 2.0)), make(n)


class Zeroes:
    """Zeroes its array when freed; pickles as something harmless."""
    def __init__(self, a):
        self.a = a

    def __del__(self):
        self.a[:] = 0.0

    def __reduce__(self):
        return (int, ())


class ZoneThatZeroes(datetime.tzinfo):
    def __init__(self, a):
        self.a = a

    def __del__(self):
        self.a[:] = 0.0

    def utcoffset(self, dt):
        return datetime.timedelta(0)

    def __reduce__(self):
        return (datetime.timezone, (datetime.timedelta(0),))


def hidden_del(n, how):
    # Freeing the result runs a __del__ reached through an object the
    # worker's check must look into, or must refuse.
    a = make(n, 3.0)
    if how == "void":              # a scalar of an object array
        s = np.zeros(1, dtype=[("o", "O"), ("x", "f8")])
        s[0]["o"] = Zeroes(a)
        other = s[0]
    elif how == "dtype metadata":
        other = np.zeros(4, dtype=np.dtype(np.float64, metadata={"z": Zeroes(a)}))
    elif how == "field title":
        other = np.zeros(2, dtype=[((Zeroes(a), "t"), "f8")])
    elif how == "tzinfo":
        other = datetime.datetime(2020, 1, 1, tzinfo=ZoneThatZeroes(a))
    return a, other


# ----------------------------------------------------------------- helpers

def nothing_carried():
    from cpool import _core
    gc.collect()
    _core.drop_carried_arena()


def released(pool):
    """Wait until the parent holds no result arrays of the pool's workers
    (the collector thread may hold the last value a moment longer)."""
    import time
    deadline = time.monotonic() + 10
    while any(live for use, live, *_ in pool._core.arena_info()
              if isinstance(use, int)):
        assert time.monotonic() < deadline, "result blocks still held"
        gc.collect()
        time.sleep(0.002)


@pytest.fixture
def pool():
    """One worker, its partition warmed by one result copied into it."""
    from cpool import Pool
    nothing_carried()
    p = Pool(1)
    warm = p.apply(make, (4 * N,))          # 32 MiB of the partition's pages
    assert (warm == np.arange(4 * N)).all()
    del warm
    released(p)
    yield p
    p.terminate()
    p.join()


# ------------------------------------------------------------------- tests

def test_large_arrays_go_to_warm_pages_only():
    from cpool import Pool
    nothing_carried()
    with Pool(1) as p:
        # Nothing of the partition exists yet: numpy's memory, our handler.
        assert p.apply(made_where, (N,)) == ("cpool_arena", False, False)
        out = p.apply(make, (2 * N,))       # copied in: 16 MiB of pages
        del out
        released(p)
        assert p.apply(made_where, (N,)) == ("cpool_arena", True, False)
        # Larger than the pages there are: numpy's.
        assert p.apply(made_where, (8 * N,)) == ("cpool_arena", False, False)


def test_an_array_let_go_of_goes_to_the_parent_without_a_copy(pool):
    for k in (1.0, 2.0, 3.0):
        a, addr, there = pool.apply(make_with_address, (2 * N, k))
        assert there
        assert a.ctypes.data == addr        # the worker's own block
        assert a.flags.writeable
        assert (a == np.arange(2 * N) * k).all()
        a[:] = 0                            # the parent's to change
        del a
        released(pool)


def test_an_array_the_worker_keeps_is_copied(pool):
    _kept.clear()
    a, addr, there = pool.apply(keep_and_return, (2 * N,))
    assert there and a.ctypes.data != addr
    assert pool.apply(bump_kept) == 1       # the worker changes its own
    assert (a == np.arange(2 * N)).all()


def test_an_array_held_by_a_cycle_is_copied(pool):
    a = pool.apply(held_by_a_cycle, (2 * N,))
    b = pool.apply(make, (2 * N, 5.0))      # may reuse anything freed
    assert (a == np.arange(2 * N)).all()
    assert (b == np.arange(2 * N) * 5.0).all()


def test_views_and_repeats(pool):
    v = pool.apply(tail_view, (2 * N,))
    assert (v == np.arange(8, 2 * N)).all()
    x, y = pool.apply(twice, (2 * N,))
    assert (x == np.arange(2 * N)).all() and (y == np.arange(2 * N)).all()
    x[:] = -1                               # independent, as with pickle
    assert (y == np.arange(2 * N)).all()


def test_a_fork_in_a_task_gets_copies(pool):
    child_ok, there, intact = pool.apply(fork_with_array, (2 * N,))
    assert (child_ok, there, intact) == (True, True, True)
    for k in (2.0, 3.0):                    # the partition is still sound
        out = pool.apply(make, (3 * N, k))
        assert (out == np.arange(3 * N) * k).all()


def test_a_forked_child_copies_arrays_as_they_were_at_the_fork(pool):
    for _ in range(3):
        assert pool.apply(fork_then_reuse, (2 * N,)) == (True, 7.0)


def test_a_forked_child_cannot_change_a_returned_array(pool, tmp_path):
    done = tmp_path / "done"
    a = pool.apply(fork_and_return, (2 * N, str(done)))
    deadline = time.monotonic() + 30
    while not done.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (a == 5.0).all()


def test_a_result_is_sent_as_pickled_before_its_del_runs(pool):
    for _ in range(3):
        r, other = pool.apply(scrubbed, (2 * N,))
        a, ba = r.__dict__.pop("a"), r.__dict__.pop("ba")
        assert (a == np.arange(2 * N) * 3.0).all()
        assert ba == b"z" * (512 * 1024)
        assert (other == np.arange(2 * N)).all()
        del r, a, other
        released(pool)


def test_a_result_is_delivered_before_its_del_ends_the_worker():
    from cpool import Pool
    nothing_carried()
    with Pool(1) as p:
        warm = p.apply(make, (4 * N,))
        del warm
        released(p)
        r, other = p.apply(exits_when_dropped, (2 * N,))
        assert (r.a == np.arange(2 * N) * 2.0).all()
        assert (other == np.arange(2 * N)).all()
        assert p.apply(make, (10,)).sum() == 45.0      # a new worker


@pytest.mark.parametrize("how", ["void", "dtype metadata", "field title",
                                 "tzinfo"])
def test_a_del_reached_through_odd_objects_does_not_change_the_result(pool, how):
    for _ in range(2):
        a, other = pool.apply(hidden_del, (2 * N, how))
        assert (a == np.arange(2 * N) * 3.0).all()
        del a, other
        released(pool)


@pytest.fixture(scope="module")
def fork_lib(tmp_path_factory):
    """A C function that forks (the child exits at once), called through
    ctypes, which releases the GIL: a fork from a thread without it."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("forklib")
    (d / "f.c").write_text(
        "#include <unistd.h>\n#include <sys/wait.h>\n"
        "int fork_and_exit(void) { pid_t p = fork(); if (p == 0) _exit(0);"
        " if (p > 0) waitpid(p, 0, 0); return p > 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "f.so"),
                    str(d / "f.c")], check=True)
    return ctypes.CDLL(str(d / "f.so"))


@contextlib.contextmanager
def forking_thread(fork_and_exit):
    """A thread calling fork_and_exit() (a ctypes function: it runs without
    the GIL) over and over while the block runs; yields the count of forks
    so far, a list of one int."""
    stop = threading.Event()
    forks = [0]

    def forker():
        while not stop.is_set():
            forks[0] += fork_and_exit()

    t = threading.Thread(target=forker)
    t.start()
    try:
        yield forks
    finally:
        stop.set()
        t.join()


def forks_beside_arrays(lib_path, n, rounds):
    # In a worker: a thread forks without the GIL while this one makes and
    # frees arrays in the partition (few enough for the worker to go on
    # making them there: see test_temporaries_go_back_to_numpy).
    ok, live = True, []
    with forking_thread(ctypes.CDLL(lib_path).fork_and_exit) as forks:
        for k in range(rounds):
            live.append(make(n, float(k)))
            ok = ok and in_arena(live[-1]) and live[-1][-1] == (n - 1) * float(k)
            del live[:-2]
            time.sleep(0.001)
    return ok, forks[0] > 0


def test_forks_without_the_gil_in_a_worker_making_arrays(pool, fork_lib):
    assert pool.apply(forks_beside_arrays, (fork_lib._name, N // 4, 30)) == \
        (True, True)
    out = pool.apply(make_with_address, (2 * N, 2.0))      # still sound
    assert out[2] and (out[0] == np.arange(2 * N) * 2.0).all()


def test_forks_without_the_gil_while_results_come_and_go(pool, fork_lib):
    # The parent's fork handler walks the arrays it holds while the main
    # thread makes and drops them.
    held, k = [], 0
    with forking_thread(fork_lib.fork_and_exit) as forks:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline or forks[0] == 0:
            held.extend(pool.starmap(make, [(N // 8, float(k + i))
                                            for i in range(8)]))
            del held[:-4]
            k += 8
    for a in held:
        assert a[1] == float(int(a[1]))


def temporaries(n, rounds):
    for _ in range(rounds):
        a = np.ones(n)
        b = a * 2.0
        del a, b
    return made_where(n)[1]


def test_temporaries_go_back_to_numpy(pool):
    # Arrays in the arena cost passes over them more (no huge pages there),
    # which only pays for arrays that go to the parent without a copy: a
    # worker whose arena arrays are mostly freed in it stops making them
    # there, and one whose arrays go to the parent goes on.
    for _ in range(3):
        a, addr, there = pool.apply(make_with_address, (2 * N,))
        assert there and a.ctypes.data == addr
        del a
        released(pool)
    # 48 MiB went over: 2 * 48 + 64 MiB of temporaries are allowed.
    assert pool.apply(temporaries, (2 * N, 1)) is True      # 16-48 MiB freed
    assert pool.apply(temporaries, (2 * N, 12)) is False    # 208 MiB or more


def test_resized_arrays_keep_their_contents(pool):
    was, grown, a = pool.apply(resize_in_place, (2 * N,))
    assert was and grown
    assert (a == np.arange(N)).all()


def test_zeros_on_used_pages_are_zeros(pool):
    junk = pool.apply(make, (3 * N, 7.0))   # the worker's pages hold data
    del junk
    released(pool)
    assert pool.apply(zeros_on_used_pages, (3 * N,)) == (True, True)


def test_many_arrays_in_one_result(pool):
    sizes = [MiB // 8 + i for i in range(70)]   # 1 MiB each, past 64 buffers
    for k in (1.0, 2.0):
        out = pool.starmap(make, [(n, k) for n in sizes], chunksize=70)
        for n, a in zip(sizes, out):
            assert (a == np.arange(n) * k).all()
        del out


def test_arrays_survive_their_workers_exit():
    from cpool import Pool
    nothing_carried()
    with Pool(1, maxtasksperchild=2) as p:
        warm = p.apply(make, (4 * N,))
        del warm
        released(p)
        held = [p.apply(pid_and_array, (2 * N,)) for _ in range(4)]
        assert len({pid for pid, _ in held}) == 3   # two tasks each
        for _, a in held:
            assert (a == np.arange(2 * N)).all()
        out = p.apply(make, (2 * N, 9.0))
        assert (out == np.arange(2 * N) * 9.0).all()


def test_blocks_are_reused_not_leaked(pool):
    for i in range(30):
        a = pool.apply(make, (2 * N, float(i)))
        assert a[1] == float(i)
        del a
        released(pool)
    used = [brk for use, _, brk, *_ in pool._core.arena_info()
            if isinstance(use, int)]
    assert max(used) <= 40 * MiB


def test_turned_off(monkeypatch):
    from cpool import Pool
    monkeypatch.setenv("CPOOL_ARENA_NUMPY", "0")
    with Pool(1) as p:
        assert p.apply(handler_name) == "default_allocator"


def test_numpy_imported_by_a_task_is_handled_from_the_next_task(tmp_path):
    script = tmp_path / "late.py"
    script.write_text(textwrap.dedent("""
        import sys
        from cpool import Pool

        def load():
            import numpy
            return numpy.__name__

        def name():
            try:
                from numpy._core.multiarray import get_handler_name
            except ImportError:
                from numpy.core.multiarray import get_handler_name
            return get_handler_name()

        if __name__ == "__main__":
            assert "numpy" not in sys.modules
            with Pool(1) as p:
                print(p.apply(load), p.apply(name))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["numpy", "cpool_arena"]
