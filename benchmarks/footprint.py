"""Memory footprint of a pool: its shared memory and its workers' own memory,
cpool beside multiprocessing.Pool (2 workers, after 1000 tiny tasks).

    python benchmarks/footprint.py

USS (unique set size) is the memory a process does not share with any other:
what killing it would give back.  Shared copy-on-write pages of the parent
are not counted.
"""
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_tasks as T  # noqa: E402
import cpool  # noqa: E402
from cpool.pool import RING_BYTES  # noqa: E402


def uss_kib(pid):
    """Private_Clean + Private_Dirty from /proc/PID/smaps_rollup, in KiB."""
    total = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def worker_pids(pool):
    if isinstance(pool, cpool.Pool):
        return pool._core.pids()
    return [p.pid for p in pool._pool]


def measure(make):
    pool = make(2)
    try:
        pool.map(T.square, range(1000), chunksize=1)
        pids = worker_pids(pool)
        extra = [uss_kib(pool._core.zygote_pid)] if isinstance(pool, cpool.Pool) else []
        return [uss_kib(p) for p in pids], extra
    finally:
        pool.terminate()
        pool.join()


def main():
    mp, _ = measure(multiprocessing.get_context("fork").Pool)
    cp, zyg = measure(cpool.Pool)
    print("| | multiprocessing | cpool |")
    print("|---|---:|---:|")
    print("| worker USS, KiB (each) | %s | %s |" % (
        ", ".join(map(str, mp)), ", ".join(map(str, cp))))
    print("| shared memory per worker (rings), KiB | 0 (pipes) | %d |"
          % (2 * RING_BYTES // 1024 + 4))
    print("| extra processes | none | the fork server, USS %d KiB |" % zyg[0])


if __name__ == "__main__":
    main()
