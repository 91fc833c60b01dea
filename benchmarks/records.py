"""map() returning records of several kinds: cpool beside multiprocessing.Pool.

    python benchmarks/records.py [--repeat N] [--items N]

Each kind is a map of 10^5 items with the default chunksize, both pools
alive in this process (2 workers each, started and warmed up beforehand),
calls interleaved; the table gives medians and multiprocessing's time over
cpool's.  The kinds are what the plain-data encoding carries without pickle
(docs/ARCHITECTURE.md, "Small messages"): dataclass records of an int, a str
and a float; the same with a datetime field; records holding an enum member;
sets of three ints; datetimes alone.
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_tasks as T  # noqa: E402
import cpool  # noqa: E402

KINDS = [
    ("dataclass records (int, str, float)", T.make_record),
    ("records with a datetime field", T.make_stamped_record),
    ("records with an enum member", T.make_coloured_record),
    ("sets of three ints", T.make_set),
    ("datetimes", T.make_datetime),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--items", type=int, default=10 ** 5)
    args = ap.parse_args()
    n = args.items
    ctx = multiprocessing.get_context("fork")
    print("| map of %d items returning |" % n + " multiprocessing, ms | cpool, ms | mp/cpool |")
    print("|---|---:|---:|---:|")
    with ctx.Pool(2) as mp_pool, cpool.Pool(2) as cp_pool:
        for name, f in KINDS:
            want = [f(i) for i in range(n)]
            times = {"mp": [], "cpool": []}
            for rep in range(args.repeat):
                order = [("mp", mp_pool), ("cpool", cp_pool)]
                for key, pool in order[rep % 2:] + order[:rep % 2]:
                    t0 = time.perf_counter()
                    out = pool.map(f, range(n))
                    times[key].append(time.perf_counter() - t0)
                    if out != want:
                        raise SystemExit("%s: %s returned a wrong result" % (name, key))
                    del out
            mp_ms = statistics.median(times["mp"]) * 1e3
            cp_ms = statistics.median(times["cpool"]) * 1e3
            print("| %s | %.0f | %.0f | %.2fx |" % (name, mp_ms, cp_ms, mp_ms / cp_ms))


if __name__ == "__main__":
    main()
