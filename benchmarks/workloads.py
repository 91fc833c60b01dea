"""Pools under test and the benchmark workloads.

Every pool is wrapped in a small adapter exposing the same operations, so a
workload is written once and run against each pool that supports the
operations it needs.  Task functions live in ``bench_tasks`` (importable,
since tasks are pickled by reference).

Set CPOOL_BENCH_FAKE=1 to stand multiprocessing.Pool in for cpool.Pool (only
useful to exercise the harness before cpool builds).
"""

import functools
import gc
import importlib.util
import multiprocessing
import os
import pickle
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import bench_tasks as T

# Workers started as fresh interpreters rather than forked must be able to
# import bench_tasks too.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_HERE, os.environ.get("PYTHONPATH")) if p)

WORKERS = 2
FAKE_CPOOL = os.environ.get("CPOOL_BENCH_FAKE") == "1"
MIB = 1 << 20


def load_cpool_pool():
    """Return cpool.Pool (or multiprocessing's fork Pool with CPOOL_BENCH_FAKE=1)."""
    if FAKE_CPOOL:
        return multiprocessing.get_context("fork").Pool
    try:
        import cpool
    except ModuleNotFoundError as exc:
        if exc.name != "cpool":
            raise
        # Not installed: fall back to a source checkout built in place.  The
        # repository root goes last so that an installed cpool always wins.
        sys.path.append(os.path.dirname(_HERE))
        import cpool
    return cpool.Pool


def mp_default_chunksize(n, workers=WORKERS):
    """The chunksize multiprocessing.Pool.map picks for n items."""
    chunksize, extra = divmod(n, workers * 4)
    return chunksize + 1 if extra else chunksize


# ---------------------------------------------------------------- adapters
#
# Operation names (each workload times one of them):
#   apply(f, *args) -> result        submit(f, *args) -> zero-arg getter
#   imap / imap_unordered(f, items)  chunksize=1, return an iterator
#   map(f, items) -> list            the pool's default chunksize
#   starmap(f, pairs) -> list        map_each(f, items): chunksize=1 map


class PoolBackend:
    """multiprocessing.Pool and anything with the same API (cpool.Pool)."""

    ops = {"apply", "submit", "imap", "imap_unordered", "map", "starmap", "map_each"}

    def __init__(self, name, factory):
        self.name = name
        self.factory = factory
        self.pool = None

    def start(self, workers):
        self.pool = self.factory(workers)

    def stop(self):
        self.pool.terminate()
        self.pool.join()
        self.pool = None

    def apply(self, f, *args):
        return self.pool.apply(f, args)

    def submit(self, f, *args):
        return self.pool.apply_async(f, args).get

    def imap(self, f, items):
        return self.pool.imap(f, items, chunksize=1)

    def imap_unordered(self, f, items):
        return self.pool.imap_unordered(f, items, chunksize=1)

    def map(self, f, items):
        return self.pool.map(f, items)

    def starmap(self, f, pairs):
        return self.pool.starmap(f, pairs)

    def map_each(self, f, items):
        return self.pool.map(f, items, chunksize=1)


class FuturesBackend:
    """concurrent.futures.ProcessPoolExecutor and loky's executor.

    Their map() defaults to chunksize=1, which would make "map with default
    chunksize" a different workload; map/starmap therefore use the chunksize
    multiprocessing.Pool would pick.
    """

    ops = {"apply", "submit", "imap", "map", "starmap", "map_each"}

    def __init__(self, name, factory, stop_kwargs):
        self.name = name
        self.factory = factory
        self.stop_kwargs = stop_kwargs
        self.ex = None

    def start(self, workers):
        self.ex = self.factory(workers)

    def stop(self):
        self.ex.shutdown(wait=True, **self.stop_kwargs)
        self.ex = None

    def apply(self, f, *args):
        return self.ex.submit(f, *args).result()

    def submit(self, f, *args):
        return self.ex.submit(f, *args).result

    def imap(self, f, items):
        return self.ex.map(f, items)

    def map(self, f, items):
        return list(self.ex.map(f, items, chunksize=mp_default_chunksize(len(items))))

    def starmap(self, f, pairs):
        chunksize = mp_default_chunksize(len(pairs))
        return list(self.ex.map(f, *zip(*pairs), chunksize=chunksize))

    def map_each(self, f, items):
        return list(self.ex.map(f, items))


class MpireBackend(PoolBackend):
    """mpire.WorkerPool (fork, workers kept alive between calls): the Pool
    API with other keyword names."""

    def __init__(self, name, worker_pool):
        super().__init__(name, None)
        self.worker_pool = worker_pool

    def start(self, workers):
        self.pool = self.worker_pool(n_jobs=workers, start_method="fork", keep_alive=True)

    def stop(self):
        self.pool.terminate()
        self.pool = None

    def imap(self, f, items):
        return self.pool.imap(f, items, chunk_size=1)

    def imap_unordered(self, f, items):
        return self.pool.imap_unordered(f, items, chunk_size=1)

    def starmap(self, f, pairs):
        return self.pool.map(f, pairs)  # mpire unpacks tuple items into arguments

    def map_each(self, f, items):
        return self.pool.map(f, items, chunk_size=1)


class SerialBackend:
    """Plain in-process loop: the baseline for the CPU-bound speed-up."""

    name = "serial"
    ops = {"map_each"}

    def start(self, workers):
        pass

    def stop(self):
        pass

    def map_each(self, f, items):
        return [f(x) for x in items]


class ForkFloorBackend:
    """No pool at all: ``os.fork()`` a child that runs the one task and
    writes its pickled result to a pipe.  The start-up workload runs it
    beside the pools as a floor: any pool that forks its workers pays at
    least this before its first result (one fork, the child's after-fork
    hooks, one task, one hand-off), and nothing for a pool's own work.
    The child is reaped in stop(), outside the timed region, as a pool's
    workers go on living after the first result."""

    name = "fork floor"
    ops = {"apply"}

    def __init__(self):
        self.children = []

    def start(self, workers):
        pass

    def stop(self):
        for pid in self.children:
            os.waitpid(pid, 0)
        self.children = []

    def apply(self, f, *args):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                # the child
            status = 1
            try:
                os.close(r)
                data = pickle.dumps(f(*args))
                os.write(w, struct.pack("=Q", len(data)) + data)
                status = 0
            finally:
                os._exit(status)
        self.children.append(pid)
        os.close(w)
        with open(r, "rb") as pipe:
            head = pipe.read(8)
            if len(head) != 8:
                raise RuntimeError("the forked child sent no result")
            (n,) = struct.unpack("=Q", head)
            return pickle.loads(pipe.read(n))


POOL_NAMES = ["multiprocessing", "cpool", "concurrent.futures", "loky", "mpire"]
OPTIONAL_POOLS = {"loky", "mpire"}  # skipped when not installed
POOL_OPS = {  # what each pool supports, known without importing it
    "multiprocessing": PoolBackend.ops, "cpool": PoolBackend.ops,
    "concurrent.futures": FuturesBackend.ops, "loky": FuturesBackend.ops,
    "mpire": MpireBackend.ops, "serial": SerialBackend.ops,
    "fork floor": ForkFloorBackend.ops,
}


def make_backend(name):
    """The adapter for one pool; ImportError if it is not installed."""
    fork = multiprocessing.get_context("fork")
    if name == "multiprocessing":
        return PoolBackend(name, fork.Pool)
    if name == "cpool":
        return PoolBackend(name, load_cpool_pool())
    if name == "concurrent.futures":
        return FuturesBackend(name, lambda n: ProcessPoolExecutor(n, mp_context=fork),
                              {"cancel_futures": True})
    if name == "loky":
        import loky

        return FuturesBackend(name, loky.ProcessPoolExecutor, {"kill_workers": True})
    if name == "mpire":
        import mpire

        return MpireBackend(name, mpire.WorkerPool)
    if name == "serial":
        return SerialBackend()
    if name == "fork floor":
        return ForkFloorBackend()
    raise ValueError(f"unknown pool {name!r}")


def make_backends(names=None):
    """Adapters for the pools in ``names`` (default: all) that are installed.

    Returns (backends, skipped) where skipped maps a missing optional pool to
    the reason; a failing cpool import is raised, never skipped.
    """
    backends, skipped = [], {}
    for name in POOL_NAMES:
        if names is not None and name not in names:
            continue
        try:
            backends.append(make_backend(name))
        except ImportError as exc:
            if name not in OPTIONAL_POOLS:
                raise
            skipped[name] = f"not installed ({exc})"
    return backends, skipped


def warm_up(backend, op):
    """Start every worker, through the operation about to be timed.

    (Warming up through the same operation also sidesteps mpire's keep_alive
    pools failing on the first call of a different kind, e.g. map after
    apply_async.)
    """
    items = range(2 * WORKERS)
    if op == "apply":
        results = [backend.apply(T.square, i) for i in items]
    elif op == "submit":
        results = [get() for get in [backend.submit(T.square, i) for i in items]]
    elif op == "starmap":
        results = [x * x for x in backend.starmap(T.add, [(i, 0) for i in items])]
    else:
        results = list(getattr(backend, op)(T.square, items))
    if sorted(results) != [i * i for i in items]:
        raise AssertionError(f"{backend.name}: warm-up returned {results!r}")


# ---------------------------------------------------------------- inputs
# Built outside the timed region and cached, so repetitions share them.


@functools.lru_cache(maxsize=2)
def _bytes_payload(nbytes):
    return bytes(range(256)) * (nbytes // 256)


@functools.lru_cache(maxsize=2)
def _array_payload(nbytes):
    import numpy as np

    return np.arange(nbytes // 8, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def _squares(n):
    return [i * i for i in range(n)]


@functools.lru_cache(maxsize=2)
def _pairs(n):
    return [(i, 2 * i) for i in range(n)]


@functools.lru_cache(maxsize=1)
def burn_iterations(target=0.05):
    """Iterations of bench_tasks.burn that take about ``target`` seconds here."""
    probe = 20000
    best = min(_timed(T.burn, probe) for _ in range(3))
    return max(1, int(probe * target / best))


@functools.lru_cache(maxsize=1)
def _burn_result():
    return T.burn(burn_iterations())


def _timed(f, *args):
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def numpy_available():
    return importlib.util.find_spec("numpy") is not None


# ---------------------------------------------------------------- workloads
# Each run(backend, size) returns (seconds, result); check(result, size) -> bool.


def run_startup(b, _size):
    t0 = time.perf_counter()
    b.start(WORKERS)
    try:
        result = b.apply(T.square, 7)
        return time.perf_counter() - t0, result
    finally:
        b.stop()


def run_terminate(b, _size):
    b.start(WORKERS)
    try:
        warm_up(b, "submit")
    except BaseException:
        b.stop()
        raise
    t0 = time.perf_counter()
    b.stop()
    return time.perf_counter() - t0, None


def run_apply(b, n):
    t0 = time.perf_counter()
    out = [b.apply(T.square, i) for i in range(n)]
    return (time.perf_counter() - t0) / n, out


LOAD_PROCESSES = 3      # CPU-bound processes beside the pool in apply_loaded


def run_apply_loaded(b, n):
    """apply() round trips on a loaded machine: LOAD_PROCESSES processes
    that are not the pool's spin on the CPUs meanwhile (the mean, which a
    few very slow calls move)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(LOAD_PROCESSES)]
    try:
        time.sleep(0.05)
        return run_apply(b, n)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def run_apply_async(b, n):
    t0 = time.perf_counter()
    getters = [b.submit(T.square, i) for i in range(n)]
    out = [get() for get in getters]
    return time.perf_counter() - t0, out


def run_imap(b, n):
    t0 = time.perf_counter()
    out = list(b.imap(T.square, range(n)))
    return time.perf_counter() - t0, out


def run_imap_unordered(b, n):
    t0 = time.perf_counter()
    out = list(b.imap_unordered(T.square, range(n)))
    return time.perf_counter() - t0, sorted(out)


def run_map(b, n):
    t0 = time.perf_counter()
    out = b.map(T.square, range(n))
    return time.perf_counter() - t0, out


def run_records(b, n):
    t0 = time.perf_counter()
    out = b.map(T.make_record, range(n))
    return time.perf_counter() - t0, out


def run_starmap(b, n):
    pairs = _pairs(n)
    t0 = time.perf_counter()
    out = b.starmap(T.add, pairs)
    return time.perf_counter() - t0, out


def run_bytes_arg(b, nbytes):
    data = _bytes_payload(nbytes)
    t0 = time.perf_counter()
    out = b.apply(T.length, data)
    return time.perf_counter() - t0, out


def run_bytes_echo(b, nbytes):
    data = _bytes_payload(nbytes)
    t0 = time.perf_counter()
    out = b.apply(T.echo, data)
    return time.perf_counter() - t0, out


def run_numpy_arg(b, nbytes):
    arr = _array_payload(nbytes)
    t0 = time.perf_counter()
    out = b.apply(T.slice_sum, arr)
    return time.perf_counter() - t0, out


def run_numpy_result(b, nbytes):
    t0 = time.perf_counter()
    out = b.apply(T.make_array, nbytes // 8)
    return time.perf_counter() - t0, out


def run_cpu(b, ntasks):
    items = [burn_iterations()] * ntasks
    t0 = time.perf_counter()
    out = b.map_each(T.burn, items)
    return time.perf_counter() - t0, out


def second_transfer(run):
    """The same workload, timing the second of two runs in one pool: the
    steady state of a pool that moves large data repeatedly (its buffers and
    its workers' heaps have been used once).  The first run is not timed."""
    def run_second(b, size):
        run(b, size)
        return run(b, size)
    return run_second


def _check_array(out, nbytes):
    n = nbytes // 8
    return len(out) == n and out[0] == 0 and out[-1] == n - 1


@dataclass
class Workload:
    name: str                # id for --only
    label: str               # row label
    run: object              # run(backend, size) -> (seconds, result)
    check: object            # check(result, size) -> bool
    size: int                # full benchmark size
    small: int               # quick size (pytest)
    op: str = "apply"        # the adapter operation it times
    unit: str = "ms"
    scale: float = 1e3       # seconds -> unit
    manages_pool: bool = False   # run() starts/stops the pool itself
    with_serial: bool = False    # also run the serial baseline
    with_floor: bool = False     # also run a bare fork (ForkFloorBackend)
    needs_numpy: bool = False
    isolated: bool = False       # each repetition in a fresh process
    cold: bool = False           # ...whose untimed first run moves no large data

    def supports(self, pool_name):
        if pool_name == "serial":
            return self.with_serial
        if pool_name == "fork floor":
            return self.with_floor
        return self.op in POOL_OPS[pool_name]


WORKLOADS = [
    Workload("startup", "start-up to first result", run_startup,
             lambda out, _: out == 49, 1, 1, "apply", manages_pool=True,
             isolated=True, with_floor=True),
    Workload("terminate", "terminate a warm pool", run_terminate,
             lambda out, _: True, 1, 1, "submit", manages_pool=True,
             isolated=True),
    Workload("apply", "apply() round trip, tiny task", run_apply,
             lambda out, n: out == _squares(n), 2000, 50, "apply",
             unit="µs/call", scale=1e6),
    Workload("apply_loaded", "apply() round trip, 3 CPU-bound processes beside",
             run_apply_loaded, lambda out, n: out == _squares(n), 2000, 50, "apply",
             unit="µs/call", scale=1e6),
    Workload("apply_async", "apply_async x 2*10^4 tiny tasks", run_apply_async,
             lambda out, n: out == _squares(n), 20000, 500, "submit"),
    Workload("imap", "imap chunksize=1 x 10^4", run_imap,
             lambda out, n: out == _squares(n), 10000, 300, "imap"),
    Workload("imap_unordered", "imap_unordered chunksize=1 x 10^4", run_imap_unordered,
             lambda out, n: out == _squares(n), 10000, 300, "imap_unordered"),
    Workload("map", "map 10^6 ints, default chunksize", run_map,
             lambda out, n: list(out) == _squares(n), 10**6, 10**4, "map"),
    Workload("records", "map 10^5 ints to dataclass records", run_records,
             lambda out, n: list(out) == [T.make_record(i) for i in range(n)],
             10**5, 10**3, "map"),
    Workload("starmap", "starmap 2*10^5 pairs", run_starmap,
             lambda out, n: list(out) == [3 * i for i in range(n)], 200000, 2000, "starmap"),
    Workload("bytes_arg", "64 MiB bytes argument", run_bytes_arg,
             lambda out, n: out == len(_bytes_payload(n)), 64 * MIB, MIB, "apply"),
    Workload("bytes_echo", "64 MiB bytes echoed back", run_bytes_echo,
             lambda out, n: out == _bytes_payload(n), 64 * MIB, MIB, "apply"),
    Workload("numpy_arg", "64 MiB numpy argument", run_numpy_arg,
             lambda out, n: out == T.slice_sum(_array_payload(n)), 64 * MIB, MIB,
             "apply", needs_numpy=True),
    Workload("numpy_result", "64 MiB numpy result", run_numpy_result,
             _check_array, 64 * MIB, MIB, "apply", needs_numpy=True),
    Workload("numpy_arg_cold", "64 MiB numpy argument, first pool of a process",
             run_numpy_arg,
             lambda out, n: out == T.slice_sum(_array_payload(n)), 64 * MIB, MIB,
             "apply", needs_numpy=True, isolated=True, cold=True),
    Workload("numpy_result_cold", "64 MiB numpy result, first pool of a process",
             run_numpy_result, _check_array, 64 * MIB, MIB, "apply",
             needs_numpy=True, isolated=True, cold=True),
    Workload("bytes_arg_2nd", "64 MiB bytes argument, 2nd in a pool",
             second_transfer(run_bytes_arg),
             lambda out, n: out == len(_bytes_payload(n)), 64 * MIB, MIB, "apply"),
    Workload("bytes_echo_2nd", "64 MiB bytes echoed back, 2nd in a pool",
             second_transfer(run_bytes_echo),
             lambda out, n: out == _bytes_payload(n), 64 * MIB, MIB, "apply"),
    Workload("numpy_arg_2nd", "64 MiB numpy argument, 2nd in a pool",
             second_transfer(run_numpy_arg),
             lambda out, n: out == T.slice_sum(_array_payload(n)), 64 * MIB, MIB,
             "apply", needs_numpy=True),
    Workload("numpy_result_2nd", "64 MiB numpy result, 2nd in a pool",
             second_transfer(run_numpy_result),
             _check_array, 64 * MIB, MIB, "apply", needs_numpy=True),
    Workload("cpu", "CPU-bound 16 x ~50 ms tasks", run_cpu,
             lambda out, n: len(out) == n and all(x == _burn_result() for x in out),
             16, 4, "map_each", with_serial=True),
]

WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}


def drop_inputs():
    """Forget the cached inputs and expected results of earlier workloads, so
    that a workload is not timed while the process holds another one's large
    lists (every full garbage collection would walk them)."""
    for f in (_bytes_payload, _array_payload, _squares, _pairs):
        f.cache_clear()
    gc.collect()


ISOLATED_SCRIPT = """
import json, sys
sys.path.insert(0, %(here)r)
import numpy                     # a process with numpy loaded, for every pool
import workloads as W
b = W.make_backend(%(pool)r)
wl = W.WORKLOADS_BY_NAME[%(workload)r]
first = W.WORKLOADS_BY_NAME["apply"] if wl.cold else wl
W.measure(first, b, first.small, fresh=False)   # first use of the library
print(json.dumps(W.measure(wl, b, %(size)d, fresh=False)))
"""


def measure_fresh(workload, backend, size):
    """One repetition in a new Python process (with numpy imported and one
    untimed run first): pool start-up and shutdown depend on what else the
    process holds, e.g. threads and memory that other pools' libraries
    leave behind in this one.  A cold workload's untimed run is a few tiny
    apply() calls, so that the timed one is the first large transfer of the
    process (nothing warm is carried over from an earlier pool)."""
    import json
    import subprocess
    script = ISOLATED_SCRIPT % {"here": os.path.dirname(os.path.abspath(__file__)),
                                "pool": backend.name, "workload": workload.name,
                                "size": size}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else
                           "exit code %d" % out.returncode)
    value, ok = json.loads(out.stdout.strip().splitlines()[-1])
    return value, ok


def measure(workload, backend, size, fresh=True):
    """Run one timed repetition; returns (value in workload.unit, result ok).

    Each repetition starts from a collected heap, so that whether the
    collector's full pass falls inside a timed run does not depend on what
    the previous repetitions left behind.  (Collection is not disabled: the
    garbage a pool makes is part of its cost.)"""
    if workload.isolated and fresh:
        return measure_fresh(workload, backend, size)
    gc.collect()
    if workload.manages_pool:
        seconds, out = workload.run(backend, size)
    else:
        backend.start(WORKERS)
        try:
            if backend.name != "serial":
                warm_up(backend, workload.op)
            seconds, out = workload.run(backend, size)
        finally:
            backend.stop()
    return seconds * workload.scale, bool(workload.check(out, size))
