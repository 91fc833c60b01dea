"""``python -m cpool``: the classic Pool examples, then a quick timing table
against multiprocessing.Pool.  Runs in well under 30 s on two slow cores.

The full, more careful side-by-side benchmarks are in benchmarks/run.py.
CPOOL_BENCH_FAKE=1 stands multiprocessing.Pool in for cpool.Pool (harness
development only).
"""

import multiprocessing
import os
import platform
import statistics
import sys
import time

from cpool import _demo_tasks as tasks

WORKERS = 2
FAKE = os.environ.get("CPOOL_BENCH_FAKE") == "1"
MP_POOL = multiprocessing.get_context("fork").Pool

if FAKE:
    CPOOL_POOL = MP_POOL
else:
    from cpool import Pool as CPOOL_POOL


def show(call, result, note=""):
    text = repr(result)
    if len(text) > 44:
        text = text[:41] + "..."
    print(f"  {call:<44} {text}{note}")


def examples():
    print(f"Classic Pool examples (cpool.Pool, {WORKERS} workers)")
    with CPOOL_POOL(WORKERS) as pool:
        show("pool.map(square, range(10))", pool.map(tasks.square, range(10)))
        show("pool.apply_async(cube, (7,)).get()", pool.apply_async(tasks.cube, (7,)).get())
        pairs = [(1, 2), (3, 4), (5, 6)]
        show(f"pool.starmap(add, {pairs})", pool.starmap(tasks.add, pairs))
        for method in ("imap", "imap_unordered"):
            t0 = time.perf_counter()
            out = list(getattr(pool, method)(tasks.slow_square, range(8)))
            ms = (time.perf_counter() - t0) * 1e3
            show(f"pool.{method}(slow_square, range(8))", out, f"  ({ms:.0f} ms)")
    print("  (slow_square sleeps 20 ms: 8 items on 2 workers take about 80 ms)")
    print()


# ---------------------------------------------------------------- timing
# Each function times one run on a warm pool and returns a value in the
# row's unit; start-up makes its own pool.


def t_apply(pool, n=300):
    t0 = time.perf_counter()
    for i in range(n):
        pool.apply(tasks.square, (i,))
    return (time.perf_counter() - t0) / n * 1e6


def t_apply_async(pool, n=20000):
    t0 = time.perf_counter()
    results = [pool.apply_async(tasks.square, (i,)) for i in range(n)]
    for r in results:
        r.get()
    return (time.perf_counter() - t0) * 1e3


def t_map(pool, n=10**6):
    t0 = time.perf_counter()
    pool.map(tasks.square, range(n))
    return (time.perf_counter() - t0) * 1e3


def t_imap(pool, n=10000):
    t0 = time.perf_counter()
    for _ in pool.imap(tasks.square, range(n), chunksize=1):
        pass
    return (time.perf_counter() - t0) * 1e3


def t_startup(pool_class):
    t0 = time.perf_counter()
    pool = pool_class(WORKERS)
    try:
        pool.apply(tasks.square, (3,))
        return (time.perf_counter() - t0) * 1e3
    finally:
        pool.terminate()
        pool.join()


ROWS = [  # label, function, repetitions (median taken)
    ("apply round trip (µs)", t_apply, 5),
    ("apply_async x 20000 (ms)", t_apply_async, 3),
    ("map 10^6 ints (ms)", t_map, 3),
    ("imap chunksize=1 x 10000 (ms)", t_imap, 3),
    ("start-up to first result (ms)", None, 5),
]


def timing_table():
    print(f"Timing: multiprocessing.Pool (fork) vs cpool.Pool, {WORKERS} workers each, "
          "median of 3-5 interleaved runs")
    header = f"  {'':<32}{'multiprocessing':>16}{'cpool':>11}{'speed-up':>11}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    with MP_POOL(WORKERS) as mp_pool, CPOOL_POOL(WORKERS) as c_pool:
        for pool in (mp_pool, c_pool):  # start every worker before timing
            pool.map(tasks.square, range(4 * WORKERS), chunksize=1)
        for label, func, reps in ROWS:
            samples = {"mp": [], "cpool": []}
            for _ in range(reps):
                if func is None:
                    samples["mp"].append(t_startup(MP_POOL))
                    samples["cpool"].append(t_startup(CPOOL_POOL))
                else:
                    samples["mp"].append(func(mp_pool))
                    samples["cpool"].append(func(c_pool))
            mp, cp = (statistics.median(samples[k]) for k in ("mp", "cpool"))
            ratio = mp / cp
            ratio = f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"
            print(f"  {label:<32}{mp:>16.1f}{cp:>11.1f}{ratio:>11}", flush=True)


def main():
    t0 = time.perf_counter()
    print(f"cpool demo: Python {platform.python_version()}, {platform.system()} "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    if FAKE:
        print("CPOOL_BENCH_FAKE=1: 'cpool' below is multiprocessing.Pool")
    print()
    examples()
    timing_table()
    print(f"\nDone in {time.perf_counter() - t0:.1f} s. "
          "Full side-by-side benchmarks: python benchmarks/run.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
