"""Quick correctness pass over every benchmark workload and pool.

    python -m pytest benchmarks -q

Small sizes, one run each; asserts that results are right, never timings.
Not part of ``python -m pytest tests``.  Optional pools (loky, mpire) and
numpy workloads are skipped when not installed; cpool must import.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402

CASES = [
    pytest.param(wl, pool, id=f"{wl.name}-{pool}")
    for wl in W.WORKLOADS
    for pool in W.POOL_NAMES + ["serial", "fork floor"]
    if wl.supports(pool)
]


@pytest.mark.parametrize("workload, pool", CASES)
def test_workload(workload, pool):
    if workload.needs_numpy:
        pytest.importorskip("numpy")
    if pool in W.OPTIONAL_POOLS:
        pytest.importorskip(pool)
    backend = W.make_backend(pool)
    value, ok = W.measure(workload, backend, workload.small)
    assert ok, f"{pool} returned a wrong result for {workload.name}"
    assert value >= 0



def test_records_script():
    """benchmarks/records.py runs both pools over every kind, small."""
    import subprocess
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records.py")
    out = subprocess.run([sys.executable, script, "--repeat", "1", "--items", "300"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.endswith("x |")]
    assert len(rows) == 5, out.stdout


def test_steal_share():
    """The CPU steal the results page reports: a share of ticks between two
    /proc/stat readings, or nothing where there is no reading."""
    import run as R
    assert R.steal_share((10, 1000), (20, 1100)) == 10.0
    assert R.steal_share((10, 1000), (10, 1000)) is None
    assert R.steal_share(None, (20, 1100)) is None
    ticks = R.cpu_ticks()
    if os.path.exists("/proc/stat"):
        assert ticks is not None and 0 <= ticks[0] <= ticks[1]
