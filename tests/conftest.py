"""Fixtures for the cpool test suite.

``Pool``       -- the pool class under test, parametrized over ``cpool.Pool``
                  (id "cpool") and ``multiprocessing.Pool`` bound to the fork
                  context (id "mp"): conformance tests run against both.
``cpool_Pool`` -- ``cpool.Pool`` only, for cpool-specific behaviour.
``impl``       -- "cpool" or "mp": the implementation actually behind ``Pool``.

Environment:
  CPOOL_TEST_ONLY_MP=1   both params of ``Pool`` use multiprocessing.Pool and
                         every cpool-only test is skipped (lets the suite be
                         validated before cpool exists).
  CPOOL_TEST_TIMEOUT=s   per-test watchdog (default 120 s): on expiry all
                         thread tracebacks are dumped and the run aborts,
                         so a hanging pool never blocks CI forever.

Under AddressSanitizer (libasan in LD_PRELOAD, for a CPOOL_SANITIZE=1 build)
each test waits, after it ends, for the threads it joined to be gone from the
OS as well.  GCC 12's libasan does not hold its allocator's locks across
fork() the way glibc's malloc does, and a thread that is still exiting
(after join() has returned) drains its allocator cache under such a lock:
a process forked at that moment -- the next test's fork server -- inherits
the lock held, and its workers hang in their first malloc().  That is an
artefact of the sanitizer's allocator; with glibc's malloc the fork is safe.
"""
import faulthandler
import multiprocessing
import os
import sys
import threading
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Tasks are pickled by reference, so `helpers` (and the test modules) must be
# importable in the workers: forked workers inherit sys.path; anything that
# starts a fresh interpreter gets PYTHONPATH.
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
_pp = os.environ.get("PYTHONPATH", "")
if TESTS_DIR not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = TESTS_DIR + (os.pathsep + _pp if _pp else "")

UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
ONLY_MP = os.environ.get("CPOOL_TEST_ONLY_MP", "") == "1"
TEST_TIMEOUT = float(os.environ.get("CPOOL_TEST_TIMEOUT", "120"))

# One object, so `Pool is MP_POOL` identifies the multiprocessing flavour.
MP_POOL = multiprocessing.get_context("fork").Pool


def _cpool_class():
    import cpool
    return cpool.Pool


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpool_only: behaviour specific to cpool (skipped under "
        "CPOOL_TEST_ONLY_MP=1)")


def pytest_collection_modifyitems(config, items):
    if not ONLY_MP:
        return
    skip = pytest.mark.skip(reason="cpool-only test (CPOOL_TEST_ONLY_MP=1)")
    for item in items:
        if item.get_closest_marker("cpool_only") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpool", "mp"])
def Pool(request):
    if request.param == "mp" or ONLY_MP:
        return MP_POOL
    return _cpool_class()


@pytest.fixture
def impl(Pool):
    return "mp" if Pool is MP_POOL else "cpool"


@pytest.fixture
def cpool_Pool():
    if ONLY_MP:
        pytest.skip("cpool-only test (CPOOL_TEST_ONLY_MP=1)")
    return _cpool_class()


@pytest.fixture
def cpool_module():
    if ONLY_MP:
        pytest.skip("cpool-only test (CPOOL_TEST_ONLY_MP=1)")
    import cpool
    return cpool


@pytest.fixture
def gate(tmp_path):
    import helpers
    g = helpers.Gate(tmp_path)
    yield g
    # Never leave a worker blocked on a gate past the test.
    g.open()


def _watchdog_fd(config):
    # pytest captures fd 2; its faulthandler plugin keeps a dup of the real
    # stderr, which is where a hang report has to go.
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        return config.stash[fault_handler_stderr_fd_key]
    except Exception:
        return sys.__stderr__.fileno()


@pytest.fixture(autouse=True)
def _watchdog(request):
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True,
                                      file=_watchdog_fd(request.config))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if UNDER_ASAN:
            _settle_threads()


def _settle_threads():
    """Wait until no thread is still exiting (see the module docstring)."""
    deadline = time.monotonic() + 5
    while (len(os.listdir("/proc/self/task")) > threading.active_count()
           and time.monotonic() < deadline):
        time.sleep(0.001)

