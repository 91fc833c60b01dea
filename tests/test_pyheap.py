"""Freed object arenas kept for reuse once a pool is made (csrc/pyheap.c).
Python also takes its threads' frame stack chunks (16 KiB and up) from the
arena allocator, so "kept" may hold a few of those too.

Each check runs in a new interpreter, which has made no pool yet, so that its
arena allocator is known when it starts."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

MiB = 1 << 20
KEEP = 64 * MiB         # CP_PYHEAP_KEEP

PRELUDE = """
import gc, json, os, sys
sys.path.insert(0, {tests!r})
import cpool, cpool._core as core

def info():
    return core.pyheap_info()

def churn(n):
    # n ints of 32 bytes each: n / 32768 arenas, freed on return
    xs = list(range(10**9, 10**9 + n))
    assert sum(xs) == n * 10**9 + n * (n - 1) // 2
"""


def run(code, **env):
    """Run code after PRELUDE in a new interpreter; its last stdout line is
    JSON, returned decoded."""
    src = PRELUDE.format(tests=os.path.dirname(__file__)) + textwrap.dedent(code)
    e = dict(os.environ)
    e.pop("CPOOL_PYHEAP_KEEP", None)
    e.update(env)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True,
                         text=True, timeout=120, env=e)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_from_the_first_pool_on():
    r = run("""
        out = {"before": info()}
        churn(10**6)
        out["before_churn"] = info()
        pool = cpool.Pool(2)
        out["with_pool"] = info()
        churn(3 * 10**6)              # 92 arenas freed: more than keep
        out["after_free"] = info()
        xs = list(range(10**9, 10**9 + 10**6))   # takes 31 of them back
        out["reused"] = info()
        out["squares"] = pool.map(abs, xs[:5]) == xs[:5]
        pool.terminate()
        pool.join()
        del pool
        gc.collect()
        out["gone"] = info()
        del xs                        # a result dropped after its pool
        out["gone_free"] = info()
        with cpool.Pool(1) as pool:   # the next pool finds them
            ys = list(range(10**9, 10**9 + 10**6))
            out["next"] = info()
        print(json.dumps(out))
    """)
    nothing = {"installed": False, "active": False, "keep": 0, "kept": 0,
               "arenas": 0}
    assert r["before"] == r["before_churn"] == nothing
    assert r["with_pool"] == {"installed": True, "active": True, "keep": KEEP,
                              "kept": 0, "arenas": 0}
    after = r["after_free"]
    assert KEEP - MiB < after["kept"] <= KEEP
    assert 0 < r["reused"]["kept"] <= after["kept"] - 28 * MiB
    assert r["squares"]
    gone, gone_free = r["gone"], r["gone_free"]
    assert gone["installed"] and gone["active"] and gone["keep"] == KEEP
    assert gone_free["kept"] >= gone["kept"] + 28 * MiB
    assert gone_free["kept"] <= KEEP
    assert r["next"]["kept"] <= gone_free["kept"] - 28 * MiB


def test_a_fork_shares_no_kept_arena():
    """Kept arenas are not inherited (MADV_DONTFORK): a child has none, and
    the parent reuses them without a copy-on-write fault while the child
    lives.  Faults are counted, not timed: 10^6 ints fill 31 arenas, 7,900
    pages, and their list 2,000 more."""
    r = run("""
        import resource
        pool = cpool.Pool(1)
        churn(2 * 10**6)
        out = {"kept": info()["kept"]}
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(wr)
            ok = info()["kept"] == 0
            churn(10**6)
            ok = ok and info()["kept"] > 0
            os.read(rd, 1)            # until the parent has allocated
            os._exit(0 if ok else 3)
        os.close(rd)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = list(range(10**9, 10**9 + 10**6))
        out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        out["kept_after"] = info()["kept"]
        os.write(wr, b"x")
        out["child"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(json.dumps(out))
    """)
    assert r["kept"] > 40 * MiB
    assert r["kept_after"] <= r["kept"] - 28 * MiB       # they were reused
    assert r["faults"] < 5000, r
    assert r["child"] == 0


@pytest.mark.parametrize("setting, keep", [("0", 0), ("8388608", 8 * MiB),
                                           ("junk", KEEP),
                                           (str(1 << 40), 256 * MiB)])
def test_the_setting(setting, keep):
    r = run("""
        pool = cpool.Pool(1)
        churn(4 * 10**6)              # 122 arenas freed
        print(json.dumps(info()))
    """, CPOOL_PYHEAP_KEEP=setting)
    assert r["installed"] == (keep > 0)
    assert r["keep"] == keep
    assert min(keep, 120 * MiB) - MiB < r["kept"] <= keep or keep == 0 == r["kept"]


def test_workers_keep_theirs():
    r = run("""
        import helpers
        with cpool.Pool(2) as pool:
            out = pool.apply(helpers.pyheap_after_churn, (10**6,))
        print(json.dumps(out))
    """)
    assert r["installed"] and r["keep"] == KEEP
    assert 16 * MiB < r["kept"] <= KEEP


def test_forked_children_allocate_and_free():
    """os.fork() while a pool exists, from a thread, with another thread
    churning arenas: every child can use the cache (its lock is not
    inherited held) and exits."""
    r = run("""
        import threading
        pool = cpool.Pool(1)
        stop = threading.Event()
        def churner():
            while not stop.is_set():
                churn(10**5)
        t = threading.Thread(target=churner)
        t.start()
        codes = []
        def forker():
            for _ in range(20):
                pid = os.fork()
                if pid == 0:
                    churn(10**6)
                    churn(10**6)
                    os._exit(0 if info()["kept"] > 0 else 3)
                codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        f = threading.Thread(target=forker)
        f.start(); f.join(); stop.set(); t.join()
        print(json.dumps(codes))
    """)
    assert r == [0] * 20
