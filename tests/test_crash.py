"""Never hang, never lose a task: worker deaths, failures at every step of a
task's trip, parent death, Ctrl-C, terminate, lazy imap (cpool only)."""
import functools
import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import logging

import pytest

import crash_tasks as T
import helpers

pytestmark = pytest.mark.cpool_only
from cpool import Pool, PoolBrokenError, PoolTerminatedError, WorkerLostError
from multiprocessing import ProcessError
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def pool():
    p = Pool(2)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


def wait_for_size(p, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(p._core.pids()) == n:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("how, exitcode, words", [
    ("exit", 7, ["exited with code 7"]),
    ("sigkill", -signal.SIGKILL, ["SIGKILL", "out-of-memory"]),
    ("sigsegv", -signal.SIGSEGV, ["SIGSEGV"]),
])
def test_death_fails_only_that_task(pool, how, exitcode, words):
    calls = []
    func, args = {"exit": (T.exit_with, (7,)),
                  "sigkill": (T.kill_self, (signal.SIGKILL,)),
                  "sigsegv": (T.kill_self, (signal.SIGSEGV,))}[how]
    others = [pool.apply_async(T.sleep_then, (i, 0.05)) for i in range(4)]
    r = pool.apply_async(func, args, error_callback=calls.append)
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError) as ei:
        r.get(timeout=10)
    assert time.monotonic() - t0 < 2.0
    e = ei.value
    assert isinstance(e, ProcessError)
    assert e.exitcode == exitcode
    assert e.signal == (-exitcode if exitcode < 0 else None)
    msg = str(e)
    assert str(e.pid) in msg and func.__name__ in msg
    for w in words:
        assert w in msg
    assert len(calls) == 1 and calls[0] is e
    assert [o.get(timeout=10) for o in others] == [0, 1, 2, 3]
    # The pool has its size back and works.
    assert wait_for_size(pool, 2)
    assert e.pid not in pool._core.pids()
    assert pool.map(T.square, range(20)) == [x * x for x in range(20)]


def test_map_raises_worker_lost_and_pool_goes_on(pool):
    with pytest.raises(WorkerLostError, match="die_on"):
        pool.map(T.die_on, [(i) for i in range(10)], chunksize=1) if False else \
            pool.starmap(T.die_on, [(i, {3}) for i in range(10)], chunksize=1)
    assert list(pool.imap(T.square, range(10))) == [x * x for x in range(10)]
    it = pool.imap(T.die_on, [1, 2, 3], chunksize=1) if False else \
        pool.imap(T.exit_with, [5])
    with pytest.raises(WorkerLostError):
        next(it)


def test_nothing_lost_or_run_twice(pool, tmp_path):
    log = str(tmp_path / "log")
    bad = {17, 55, 120}
    rs = [pool.apply_async(T.log_and_return, (log, i, bad)) for i in range(150)]
    for i, r in enumerate(rs):
        if i in bad:
            with pytest.raises(WorkerLostError):
                r.get(timeout=20)
        else:
            assert r.get(timeout=20) == i
    with open(log) as f:
        started = [int(x) for x in f.read().split()]
    assert sorted(started) == list(range(150))   # each exactly once


def test_death_while_unpickling_the_task(pool):
    with pytest.raises(WorkerLostError, match="code 5"):
        pool.apply(T.square, (T.ExitOnUnpickle(5),))
    assert pool.apply(T.square, (3,)) == 9


def test_error_while_unpickling_the_task(pool):
    with pytest.raises(ValueError, match="cannot unpickle me") as ei:
        pool.apply(T.square, (T.RaiseOnUnpickle(),))
    assert isinstance(ei.value.__cause__, RemoteTraceback)
    assert pool.apply(T.square, (4,)) == 16


def test_death_while_pickling_the_result(pool):
    with pytest.raises(WorkerLostError, match="code 11"):
        pool.apply(T.return_exit_on_pickle)
    assert pool.apply(T.square, (5,)) == 25


def test_parent_cannot_unpickle_result(pool):
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        pool.apply(T.return_bad_in_parent)
    # The collector is alive and well.
    assert pool.map(T.square, range(5)) == [0, 1, 4, 9, 16]


def test_exception_that_cannot_be_rebuilt_fails_its_result(pool):
    # multiprocessing's result thread dies of the rebuild error and every
    # later result waits forever; here the result fails with that error.
    rs = [pool.apply_async(T.raise_two_arg_error, (i,)) for i in range(4)]
    for r in rs:
        with pytest.raises(TypeError, match="__init__"):
            r.get(timeout=helpers.START_TIMEOUT)
    assert pool.map(T.square, range(5)) == [0, 1, 4, 9, 16]


def test_stop_iteration_in_map_fails_the_call(pool):
    # multiprocessing's worker calls list(map(func, chunk)), where the
    # StopIteration ends the chunk early: a silently shorter list.
    for chunksize in (1, 5):
        with pytest.raises(StopIteration) as ei:
            pool.map(T.stop_at_2, range(5), chunksize=chunksize)
        assert ei.value.args == ("stop at", 2)
    assert pool.map(T.stop_at_2, [0, 1, 3]) == [0, 1, 3]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_stop_iteration_in_imap_is_not_the_end_of_the_results(method):
    # Raised as is by next(), a task's StopIteration would end the caller's
    # loop as if the results had run out (multiprocessing's does: the items
    # after it are lost without a word).  It comes as a RuntimeError from it.
    with Pool(1) as p:
        it = getattr(p, method)(T.stop_at_2, range(5))
        got = []
        with pytest.raises(RuntimeError, match="a task raised StopIteration") as ei:
            for x in it:
                got.append(x)
        assert got == [0, 1]
        assert isinstance(ei.value.__cause__, StopIteration)
        assert ei.value.__cause__.args == ("stop at", 2)
        assert list(it) == [3, 4]
        # next(timeout) too
        it = getattr(p, method)(T.stop_at_2, [2, 3])
        with pytest.raises(RuntimeError, match="StopIteration"):
            it.next(timeout=helpers.START_TIMEOUT)
        assert it.next(timeout=helpers.START_TIMEOUT) == 3
        # a chunk that holds it fails as a whole, and, as any error in a
        # chunked imap, ends the generator (multiprocessing's: [0, 1])
        it = getattr(p, method)(T.stop_at_2, range(6), chunksize=3)
        with pytest.raises(RuntimeError, match="StopIteration"):
            list(it)


def test_unpicklable_exception_names_type_and_message(pool):
    with pytest.raises(MaybeEncodingError) as ei:
        pool.apply(T.raise_locked_error)
    msg = str(ei.value)
    assert "LockedError" in msg and "the lock went with it" in msg
    assert "raise_locked_error" in str(ei.value.__cause__)


def test_initializer_that_raises_fails_tasks_without_hanging():
    with Pool(2, initializer=T.init_raise) as p:
        with pytest.raises(RuntimeError, match="initializer refused"):
            p.apply(T.square, (2,), )
        with pytest.raises(RuntimeError, match="initializer refused"):
            p.map(T.square, range(6), chunksize=1)


def test_initializer_that_exits_fails_tasks_without_hanging():
    with Pool(2, initializer=T.init_exit) as p:
        with pytest.raises(WorkerLostError, match="initializer"):
            p.apply(T.square, (2,))


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt",
                                  "GeneratorExit"])
def test_initializer_that_raises_a_base_exception_fails_tasks(kind):
    # It ends the worker, as a task's would; that is a death in start-up,
    # not a worker leaving normally (whose tasks would go to a replacement
    # that fails the same way, forever: multiprocessing hangs there too).
    with Pool(2, initializer=T.init_raise_base, initargs=(kind,)) as p:
        for _ in range(2):
            r = p.apply_async(T.square, (2,))
            with pytest.raises(WorkerLostError, match="starting up") as ei:
                r.get(timeout=helpers.START_TIMEOUT)
            assert ei.value.exitcode == (5 if kind == "SystemExit" else 1)


def test_a_worker_killed_once_while_starting_loses_no_task(tmp_path):
    # The OOM killer, say: its task goes to the replacement, as with
    # multiprocessing.  (Two deaths in a row there fail it: above.)
    started = str(tmp_path / "started")
    with Pool(1, initializer=T.init_stall_first, initargs=(started,)) as p:
        r = p.apply_async(T.square, (7,))
        helpers.wait_for_path(started, helpers.START_TIMEOUT)
        with open(started) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        assert r.get(timeout=helpers.START_TIMEOUT) == 49
        assert p.map(T.square, range(4)) == [0, 1, 4, 9]


def test_initializer_error_that_cannot_be_pickled_names_it():
    with Pool(1, initializer=T.init_raise_locked) as p:
        with pytest.raises(MaybeEncodingError) as ei:
            p.apply_async(T.square, (2,)).get(timeout=helpers.START_TIMEOUT)
    msg = str(ei.value)
    assert "LockedError" in msg and "the initializer's lock went" in msg


def test_terminate_is_prompt_with_stuck_workers_and_many_pending():
    p = Pool(2)
    stuck = [p.apply_async(T.c_sleep, (60,)) for _ in range(2)]
    pending = [p.apply_async(T.square, (i,)) for i in range(5000)]
    time.sleep(0.1)
    t0 = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - t0 < 1.0
    for r in stuck + pending[-3:]:
        with pytest.raises(PoolTerminatedError):
            r.get(timeout=1)


def test_terminate_kills_a_worker_that_ignores_sigterm(tmp_path):
    # terminate() sends SIGTERM, as multiprocessing's does, then SIGKILL to a
    # worker still there a moment later; the idle worker leaves with 0.
    p = Pool(2)
    try:
        met = tmp_path / "met"
        met.mkdir()
        # both workers up and through a task, so the idle one is ready
        assert len(set(p.map(functools.partial(helpers.meet, str(met)), range(2),
                             chunksize=1))) == 2
        started = str(tmp_path / "started")
        r = p.apply_async(T.ignore_sigterm_then_wait, (started, 60))
        helpers.wait_for_path(started, 30)
        with open(started) as f:
            stubborn = int(f.read())
        procs = list(p._pool)
        assert len(procs) == 2
        assert stubborn in [w.pid for w in procs]
        t0 = time.monotonic()
        p.terminate()
        p.join()
        took = time.monotonic() - t0
    finally:
        p.terminate()
        p.join()
    assert took < 1.0, took
    codes = {w.pid: w.exitcode for w in procs}
    assert codes.pop(stubborn) == -signal.SIGKILL
    assert list(codes.values()) == [0]
    with pytest.raises(PoolTerminatedError):
        r.get(timeout=1)


def test_terminate_right_after_start_with_hundreds_of_workers():
    # More workers than the fork server's reports fit in its socket (~280):
    # the terminating parent reads them meanwhile, and the fork server
    # looks for the kill between its first forks, so it acts on it and
    # records the end of every worker it made.  (It used to finish its
    # forks, then wait on the full socket until the parent killed it a
    # second later, its workers' ends unrecorded: -SIGKILL for all.)  The
    # list holds the workers it made; the others were never forked.  The
    # kill is sent once the first one is there (sent at once, it can come
    # before any fork, and the list is empty).
    p = Pool(320)
    z = p._core.zygote_pid
    deadline = time.monotonic() + 30
    while not open("/proc/%d/task/%d/children" % (z, z)).read().split():
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    p.terminate()
    p.join()
    codes = [w.exitcode for w in p._pool]
    assert 0 < len(codes) <= 320
    assert set(codes) <= {0, -signal.SIGTERM}, sorted(set(codes))


def test_terminate_while_the_fork_servers_reports_fill_its_socket():
    # 390 workers die while a callback holds the collector: the fork
    # server's reports of their ends fill its socket (~280) and it waits to
    # send the rest.  terminate() reads them meanwhile, so the fork server
    # gets to the kill and records every end.  (It used to be killed a
    # second later, with the ends it had not reported unrecorded: the
    # workers left alive were given -SIGKILL.)
    code = """
        import os, signal, threading, time
        from cpool import Pool
        import crash_tasks as T
        n = 400
        p = Pool(n)
        deadline = time.monotonic() + 60
        while len(p._core.pids()) < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        procs = p._pool
        release, held = threading.Event(), threading.Event()
        def hold(_):
            held.set()
            release.wait(60)
        p.apply_async(T.square, (1,), callback=hold)
        assert held.wait(60)
        victims, rest = procs[:n - 10], procs[n - 10:]
        for w in victims:
            os.kill(w.pid, signal.SIGKILL)
        def recorded():
            return sum(p._core.exit_code(w._slot, w._number) is not None
                       for w in victims)
        while recorded() < 270:     # its socket is full by then
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stopper = threading.Thread(target=p.terminate)
        stopper.start()
        stopper.join(60)
        release.set()
        p.join()
        print(sorted(set(w.exitcode for w in victims)),
              sorted(set(w.exitcode for w in rest)))
    """
    out = _run(code, timeout=120)
    assert out.returncode == 0, out.stderr
    victims, rest = out.stdout.split("] [")
    assert victims == "[-9"
    assert set(rest.strip(" ]\n").split(", ")) <= {"0", "-15"}, out.stdout


def test_terminate_while_the_collector_reaps_after_close():
    # After close(), once the workers are gone, the collector reaps the
    # fork server; a terminate() from another thread meanwhile waits for
    # that, and reaps nothing itself.  (It used to wait for the fork server
    # too, and the second of the two to wake called waitpid(0), which waited
    # for any child of the process and took its exit status.)
    other = subprocess.Popen(["sleep", "60"])
    try:
        for _ in range(10):
            p = Pool(1)
            assert p.apply(T.square, (3,)) == 9
            p.close()
            deadline = time.monotonic() + 10
            while p._core.pids():
                assert time.monotonic() < deadline
                time.sleep(0)
            stopper = threading.Thread(target=p.terminate)
            stopper.start()
            stopper.join(10)
            assert not stopper.is_alive()       # it did not wait for `other`
            p.join()
            assert other.poll() is None         # nor reap it
    finally:
        other.kill()
    assert other.wait() == -signal.SIGKILL


def test_terminate_does_not_wake_the_parents_event_loop(tmp_path):
    # A parent with a Python SIGTERM handler and a signal wake-up fd (what
    # asyncio's add_signal_handler sets up): the workers inherit the
    # handler, as multiprocessing's do, but not the wake-up fd, so the
    # SIGTERM terminate() sends them does not look like the parent's own.
    # (They shrug it off through the handler and are killed.)
    code = f"""
        import os, signal, socket, time
        from cpool import Pool
        import crash_tasks as T
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        signal.set_wakeup_fd(w.fileno())
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(os.getpid()))
        p = Pool(2)
        rs = [p.apply_async(T.started_then_sleep, ({str(tmp_path)!r}, 30))
              for _ in range(2)]
        deadline = time.monotonic() + 30
        while len(os.listdir({str(tmp_path)!r})) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        procs = p._pool
        p.terminate()
        p.join()
        time.sleep(0.05)
        try:
            data = r.recv(100)
        except BlockingIOError:
            data = b""
        print(repr(data), got, sorted(w.exitcode for w in procs))
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["b''", "[]", "[-9,", "-9]"], out.stdout


def test_death_mid_write_does_not_disturb_other_workers(pool):
    others = pool.imap(T.square, range(3000))
    lost = pool.apply_async(T.big_result_then_die, (400 << 20,))
    assert list(others) == [x * x for x in range(3000)]
    with pytest.raises(WorkerLostError):
        lost.get(timeout=20)
    assert pool.apply(T.square, (9,)) == 81


def test_replacements_forked_while_parent_threads_log(pool, tmp_path):
    logger = logging.getLogger("cpool-test-busy")
    logger.addHandler(logging.FileHandler(tmp_path / "busy.log"))
    logger.setLevel(logging.INFO)
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            logger.info("busy %s", "x" * 100)

    threads = [threading.Thread(target=chatter) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            with pytest.raises(WorkerLostError):
                pool.apply(T.exit_with, (3,))
            assert pool.apply(T.square, (2,)) == 4
    finally:
        stop.set()
        for t in threads:
            t.join()


class Counter:
    def __init__(self):
        self.n = 0

    def __iter__(self):
        for i in itertools.count():
            self.n += 1
            yield i


def test_imap_reads_an_endless_input_lazily(pool):
    src = Counter()
    it = pool.imap(T.square, src, buffersize=8)
    for i in range(200):
        assert next(it) == i * i
    time.sleep(0.05)
    assert src.n <= 200 + 8 + 1


def test_imap_buffersize_keeps_memory_constant(pool):
    src = Counter()
    it = pool.imap_unordered(T.square, src, buffersize=1024)
    got = [next(it) for _ in range(3000)]
    assert len(set(got)) == 3000
    assert src.n <= 3000 + 1024 + 1


def _run(code, timeout=30, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in pids:
            try:
                with open("/proc/%d/stat" % p) as f:
                    if f.read().split(")")[-1].split()[0] != "Z":
                        alive.append(p)
            except (FileNotFoundError, ProcessLookupError):
                pass   # gone (reaped), or gone while we read
        if not alive:
            return True
        time.sleep(0.02)
    return False


def test_parent_sigkill_takes_every_helper_process_with_it():
    code = """
        import sys, time
        from cpool import Pool
        import crash_tasks as T
        p = Pool(3)
        pids = [p.apply(T.pid) for _ in range(30)]
        deadline = time.monotonic() + 10
        while len(p._core.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)   # the zygote's reports may still be on their way
        print(p._core.zygote_pid, *sorted(set(p._core.pids())), flush=True)
        time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            cwd=HERE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    pids = [int(x) for x in line]
    assert len(pids) == 4
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(pids, 2.0)


def test_interpreter_exit_with_open_pool_is_clean():
    code = """
        from cpool import Pool
        import crash_tasks as T
        p = Pool(2)
        print(p._core.zygote_pid, *p._core.pids(), flush=True)
        r = p.apply_async(T.c_sleep, (30,))
        print(p.apply(T.square, (3,)))
    """
    t0 = time.monotonic()
    out = _run(code)
    assert time.monotonic() - t0 < 10
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[1] == "9"
    assert _gone([int(x) for x in lines[0].split()], 2.0)


@pytest.mark.parametrize("module", ["cpool", "multiprocessing"])
def test_daemon_threads_waiting_at_interpreter_exit_are_left_waiting(module):
    # As multiprocessing does: the pool goes at exit, and what daemon threads
    # still wait for stays unfinished; no error wakes them to print a
    # traceback during shutdown, and no error callback runs then.
    code = """
        import atexit, threading, time
        atexit.register(time.sleep, 0.6)   # exit work after the pools are gone
        from %s import Pool
        import crash_tasks as T
        p = Pool(2)
        pids = [p._core.zygote_pid] + p._core.pids() if hasattr(p, "_core") else []
        print(*pids, flush=True)
        r = p.apply_async(T.c_sleep, (30,),
                          error_callback=lambda e: print("error_callback", e))
        def wait(call):
            print("woke", call(), flush=True)
        calls = [lambda: p.apply(T.c_sleep, (30,)),
                 lambda: p.map(T.c_sleep, [30] * 3),
                 lambda: list(p.imap(T.c_sleep, [30, 30])),
                 r.get]
        for call in calls:
            threading.Thread(target=wait, args=(call,), daemon=True).start()
        # An imap call with nothing queued at exit: its input is slow.
        q = Pool(1)
        first = []
        def slow_input():
            yield 1
            time.sleep(0.3)
            yield 2
        def consume():
            it = q.imap(T.square, slow_input())
            first.append(next(it))
            print("woke", list(it), flush=True)
        threading.Thread(target=consume, daemon=True).start()
        deadline = time.monotonic() + 10
        while (len(p._cache) < 3 or not first) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)        # apply() has no result object on its fast path
        print("exit", len(p._cache) >= 3, first, flush=True)
    """ % module
    t0 = time.monotonic()
    out = _run(code)
    assert time.monotonic() - t0 < 10
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[1] == "exit True [1]", out.stdout
    assert "woke" not in out.stdout and "error_callback" not in out.stdout
    assert "Traceback" not in out.stderr and "Exception in thread" not in out.stderr
    if module == "cpool":
        assert _gone([int(x) for x in lines[0].split()], 2.0)


@pytest.mark.parametrize("module", ["cpool", "multiprocessing.pool"])
def test_atexit_functions_registered_after_import_still_have_the_pool(module):
    # multiprocessing ends its pools from an exit function registered when
    # it is imported; cpool too, so those registered later find them working.
    code = """
        import atexit
        from %s import Pool
        import crash_tasks as T
        results = []
        atexit.register(lambda: print("at exit", results[0].get(timeout=10),
                                      results[1].get(timeout=10), flush=True))
        p = Pool(2)
        # still running when the main thread ends
        results.append(p.apply_async(T.sleep_then, (7, 0.3)))
        results.append(p.starmap_async(T.sleep_then, [(k, 0.1) for k in range(3)]))
        print("main", results[0].ready(), results[1].ready(), flush=True)
    """ % module
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "main False False\nat exit 7 [0, 1, 2]\n"


def test_waits_that_start_after_the_exit_termination_raise_instead_of_hanging():
    # An exit function registered before cpool was imported runs after its
    # pools are gone (multiprocessing would wait forever there).
    code = """
        import atexit, time
        def late():
            for name, wait in [("apply", lambda: r.get()),
                               ("map", lambda: m.get()),
                               ("imap", lambda: list(it))]:
                t0 = time.monotonic()
                try:
                    wait()
                except Exception as e:
                    print(name, type(e).__name__, "%.1f" % (time.monotonic() - t0))
        atexit.register(late)
        from cpool import Pool
        import crash_tasks as T
        p = Pool(2)
        r = p.apply_async(T.c_sleep, (30,))
        m = p.map_async(T.c_sleep, [30] * 4, chunksize=1)
        it = p.imap(T.c_sleep, [30] * 4)
    """
    t0 = time.monotonic()
    out = _run(code)
    assert time.monotonic() - t0 < 10
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == [
        "apply PoolTerminatedError 0.0", "map PoolTerminatedError 0.0",
        "imap PoolTerminatedError 0.0", ""]
    assert "Traceback" not in out.stderr


def test_apply_callers_left_waiting_by_the_exit_termination_do_not_spin():
    # A synchronous apply() caller whose worker had sent its result when the
    # pool was ended quietly waits (asleep) like the others, not on the CPU.
    code = """
        import os, threading, time
        from cpool import Pool
        callers = []
        def loop(p):
            try:
                while True:
                    p.apply(abs, (1,))
            except Exception:
                pass
        for attempt in range(12):
            p = Pool(1)
            t = threading.Thread(target=loop, args=(p,), daemon=True)
            t.start()
            time.sleep(0.02)
            p._core.terminate(True)      # what the exit function does
            callers.append(t)
        def cpu():
            total = 0
            for t in callers:
                try:
                    with open("/proc/self/task/%d/stat" % t.native_id) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except FileNotFoundError:
                    continue             # it ended (raised, and returned)
                total += int(fields[11]) + int(fields[12])
            return total / os.sysconf("SC_CLK_TCK")
        time.sleep(0.1)
        c0 = cpu()
        time.sleep(0.5)
        print("%.2f" % (cpu() - c0))
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0.15, out.stdout


def test_an_imap_feeding_at_exit_stops_before_the_pool_refuses_its_items():
    # Its feeder is stopped before the pool is ended: an item it sent in
    # between was refused, and that error woke the consumer (a daemon
    # thread) during shutdown.  (A consumer that asks for its next item
    # after the end gets PoolTerminatedError, as any later wait does.)
    code = """
        import threading, time
        from cpool import Pool
        import crash_tasks as T
        def endless():
            i = 0
            while True:
                time.sleep(0.001)
                yield i
                i += 1
        p = Pool(2)
        def consume():
            for _ in p.imap(T.square, endless()):
                pass
        threading.Thread(target=consume, daemon=True).start()
        time.sleep(0.2)
    """
    for _ in range(5):
        out = _run(code)
        assert out.returncode == 0, out.stderr
        assert "Pool not running" not in out.stderr, out.stderr


def test_forked_children_exit_while_the_parents_threads_use_the_pool():
    # A child's exit must not touch its copies of the parent's pools: their
    # locks may have been held, at the fork, by threads it does not have.
    code = """
        import os, sys, threading, time
        from cpool import Pool
        import crash_tasks as T
        p = Pool(2)
        stop = False
        def consumer():
            while not stop:
                for _ in p.imap(T.square, range(50)):
                    pass
        threads = [threading.Thread(target=consumer, daemon=True)
                   for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        hung = 0
        for k in range(20):
            pid = os.fork()
            if pid == 0:
                sys.exit(0)             # a normal exit: atexit functions run
            deadline = time.monotonic() + 5
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    hung += 1
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
        stop = True
        print("hung", hung)
    """
    out = _run(code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hung", "0"], out.stdout + out.stderr


def test_ctrl_c_while_waiting_is_prompt_and_quiet():
    code = """
        import os, signal, threading, time
        from cpool import Pool
        import crash_tasks as T
        t0 = None
        try:
            with Pool(2) as p:
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
                t0 = time.monotonic()
                p.apply(T.c_sleep, (30,))
        except KeyboardInterrupt:
            print("interrupted after %.2f" % (time.monotonic() - t0))
    """
    t0 = time.monotonic()
    out = _run(code)
    assert time.monotonic() - t0 < 10
    assert "interrupted after" in out.stdout, out.stderr
    assert float(out.stdout.split()[-1]) < 1.5
    assert "Traceback" not in out.stderr


def test_ctrl_c_to_the_process_group_does_not_spray_worker_tracebacks():
    code = """
        import os, signal, time
        from cpool import Pool
        import crash_tasks as T
        os.setpgrp()
        try:
            with Pool(2) as p:
                rs = [p.apply_async(T.sleep_then, (i, 0.5)) for i in range(4)]
                time.sleep(0.2)
                os.killpg(0, signal.SIGINT)
                time.sleep(2)
        except KeyboardInterrupt:
            print("main interrupted")
    """
    out = _run(code)
    assert "main interrupted" in out.stdout
    assert "Traceback" not in out.stderr


def _buffered_env():
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)      # stdout to a pipe: block-buffered
    return env


def test_a_parent_that_ignores_sigchld():
    # SIGCHLD set to SIG_IGN (a common way to avoid zombies) makes the kernel
    # reap a process's children itself: the fork server, which inherits it,
    # must still see its workers end.  The workers get the setting back.
    code = """
        import os, signal
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        from cpool import Pool
        import helpers
        p = Pool(2, maxtasksperchild=2)     # workers that leave, replaced
        assert p.map(helpers.square, range(20), chunksize=1) == [i * i for i in range(20)]
        p.close()
        p.join()
        p = Pool(2)
        assert p.map(helpers.square, range(20), chunksize=1) == [i * i for i in range(20)]
        w = p._pool[0]
        w.kill()
        w.join(30)
        assert w.exitcode == -signal.SIGKILL, w.exitcode
        assert p.map(helpers.square, range(8), chunksize=1) == [i * i for i in range(8)]
        assert p.apply(signal.getsignal, (signal.SIGCHLD,)) == signal.SIG_IGN
        p.close()
        p.join()
        print("ok")
    """
    out = _run(code)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


@pytest.mark.parametrize("how", ["with", "terminate", "exit"])
def test_idle_workers_leave_normally_when_the_pool_is_terminated(how, tmp_path):
    # A worker that runs no task when the pool is terminated (a with block
    # left, terminate(), interpreter exit) leaves as after close(): what its
    # tasks printed is written out, and multiprocessing's exit functions
    # run in it (here a Finalize callback from the initializer).
    marks = tmp_path / "teardown"
    code = f"""
        import time
        from cpool import Pool
        import crash_tasks as T
        p = Pool(2, T.register_teardown, ({str(marks)!r},))
        assert p.map(T.print_line, range(6), chunksize=1) == list(range(6))
        # the workers, from the fork server (the parent may not have read
        # their pids from its reports yet)
        z = p._core.zygote_pid
        with open("/proc/%d/task/%d/children" % (z, z)) as f:
            pids = sorted(f.read().split())
        assert len(pids) == 2, pids
        if {how!r} == "with":
            with p:
                pass
        elif {how!r} == "terminate":
            p.terminate()
            p.join()
        print("pids", *pids)
    """
    out = _run(code, env=_buffered_env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sorted(l for l in lines if l.startswith("line")) == \
        ["line from task %d" % i for i in range(6)]
    pids = [l for l in lines if l.startswith("pids")][0].split()[1:]
    assert sorted(marks.read_text().split()) == sorted(pids)


def test_terminate_waits_only_briefly_for_an_idle_worker_that_cannot_leave():
    # Its exit would wait for a thread its task started that never ends:
    # terminate() gives up on it after a moment and kills it.
    code = """
        import time
        from cpool import Pool
        import crash_tasks as T
        p = Pool(1)
        assert p.apply(T.start_endless_thread, (1,)) == 1
        while not p._core.pids():   # (the pool may read its pid after the task)
            time.sleep(0.001)
        pid = p._core.pids()[0]
        t0 = time.monotonic()
        p.terminate()
        p.join()
        print("took", time.monotonic() - t0, "pid", pid)
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    took, pid = out.stdout.split()[1], int(out.stdout.split()[3])
    assert float(took) < 2.0
    assert _gone([pid], 5)


def test_a_thousand_pools_leave_nothing_behind():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    def children():
        me, n = os.getpid(), 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % pid) as f:
                    stat = f.read()
            except OSError:     # gone meanwhile
                continue
            # Field 4 (ppid) follows the ")" that ends the command name.
            n += int(stat.rsplit(")", 1)[1].split()[1]) == me
        return n

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    for _ in range(20):    # warm up allocator and caches
        with Pool(1) as p:
            p.apply(T.square, (1,))
    gc.collect()
    base = (fds(), threading.active_count(), children(), rss_kb())
    for i in range(1000):
        p = Pool(1)
        if i % 2:
            p.close()
        else:
            p.terminate()
        p.join()
    gc.collect()
    after = (fds(), threading.active_count(), children(), rss_kb())
    assert after[:3] == base[:3]
    assert after[3] - base[3] < 20_000     # kB


def test_pool_in_a_forked_child_refuses_and_parent_goes_on(pool):
    assert pool.apply(T.square, (3,)) == 9
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: the pool is its parent's
        try:
            pool.apply(T.square, (2,))
            os.write(w, b"used")
        except RuntimeError:
            os.write(w, b"refused")
        except BaseException:
            os.write(w, b"other")
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said == b"refused"
    # The child closed nothing of ours; the pool still works.
    assert pool.map(T.square, range(5)) == [0, 1, 4, 9, 16]


class TerminateWhilePickled:
    """Pickling this terminates the pool it is sent to (a pool can be
    terminated by another thread at any moment, pickling included)."""

    def __init__(self, pool):
        self.pool = pool

    def __reduce__(self):
        self.pool.terminate()
        return (int, (0,))


@pytest.mark.parametrize("how", ["apply", "apply_async", "map", "imap"])
def test_terminate_during_pickling_raises_instead_of_hanging(how):
    p = Pool(2)
    try:
        arg = TerminateWhilePickled(p)
        with pytest.raises((ValueError, PoolTerminatedError)):
            if how == "apply":
                p.apply(T.square, (arg,))
            elif how == "apply_async":
                p.apply_async(T.square, (arg,)).get(timeout=10)
            elif how == "map":
                p.map(T.square, [arg], chunksize=1)
            else:
                list(p.imap(T.square, [1, arg, 3]))
    finally:
        p.terminate()
        p.join()
    assert p._core.unfinished == 0


def _results_and_errors(it):
    """Everything an imap iterator yields, PoolTerminatedErrors included."""
    got = []
    while True:
        try:
            got.append(helpers.call_within(next, helpers.START_TIMEOUT, it))
        except StopIteration:
            return got
        except PoolTerminatedError as e:
            got.append(e)


def test_terminate_while_pickling_the_last_item_adds_no_result():
    # The whole input was read: the items get their results (the one being
    # pickled an error), and nothing is added after them.
    p = Pool(2)
    try:
        it = p.imap_unordered(T.square, [1, 2, TerminateWhilePickled(p)])
        got = _results_and_errors(it)
        assert len(got) == 3, got
        assert any(isinstance(g, PoolTerminatedError) for g in got)
    finally:
        p.terminate()
        p.join()


class _NoLengthHint:
    """An iterator whose length hint says 0 while items are left (hints may
    be wrong)."""

    def __init__(self, items):
        self.it = iter(items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)

    def __length_hint__(self):
        return 0


class _SlowFirst(_NoLengthHint):
    """Its first item comes slowly: the feeder then (unless it is held up
    itself) reads the next ones in a batch of one and then two, so the item
    after the one that terminates the pool is read with it."""

    first = True

    def __next__(self):
        if self.first:
            self.first = False
            time.sleep(0.002)
        return next(self.it)


@pytest.mark.parametrize("kind", [_NoLengthHint, _SlowFirst])
def test_terminate_with_input_left_ends_with_the_error_whatever_the_hint(kind):
    # Items after the batch being pickled are never read: the consumer is
    # told why it stops there, even though the input's length hint claims it
    # is exhausted.
    p = Pool(2)
    try:
        it = p.imap(T.square, kind([1, 2, TerminateWhilePickled(p), 4, 5, 6]))
        got = _results_and_errors(it)
        # The feeder reads in batches sized by how fast the input comes: the
        # item being pickled (index 2) may share its batch with the next one,
        # which then fails with it.  Either way the input left unread ends
        # the results with an error naming the first index not read.
        assert len(got) in (4, 5), got
        assert all(isinstance(g, PoolTerminatedError) for g in got[2:]), got
        assert "before item %d was sent" % (len(got) - 1) in str(got[-1]), got
    finally:
        p.terminate()
        p.join()


def test_join_from_a_callback_in_a_sanitizer_build_does_not_wait(monkeypatch):
    # In sanitizer builds join() waits for the pool's threads to leave the
    # OS, but never for the thread it runs in (a callback runs in the
    # collector).
    import cpool.pool
    monkeypatch.setattr(cpool.pool._core, "SANITIZED", 1)
    p = Pool(1)
    done = threading.Event()

    def stop(_):
        t0 = time.monotonic()
        p.terminate()
        p.join()
        done.took = time.monotonic() - t0
        done.set()

    p.apply_async(T.square, (2,), callback=stop)
    assert done.wait(helpers.START_TIMEOUT)
    assert done.took < 2.0
    p.join()


def test_imap_in_a_forked_child_raises_instead_of_hanging(pool):
    # After an imap call the parent keeps its feeder thread idle; a child
    # forked then has no such thread, and using the pool there fails as
    # every other call does (the pool belongs to its parent).
    assert list(pool.imap(T.square, range(3))) == [0, 1, 4]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            list(pool.imap(T.square, range(3)))
        except RuntimeError:
            code = 0
        except BaseException:
            code = 2
        finally:
            os.write(w, b"%d" % code)
            os._exit(code)
    os.close(w)
    try:
        import select
        ready, _, _ = select.select([r], [], [], helpers.START_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, "imap in the forked child hung"
        assert os.read(r, 16) == b"0"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_terminate_while_pickling_an_imap_batch_fails_its_items(method):
    # The first item's result is in before the feeder reads the next ones,
    # and pickling one of those terminates the pool: every item read but
    # never queued gets PoolTerminatedError, so the consumer, which took the
    # first result, does not wait for them forever.
    p = Pool(2)
    first_taken = threading.Event()

    def items():
        yield 1
        first_taken.wait(helpers.START_TIMEOUT)
        yield TerminateWhilePickled(p)
        yield 3

    try:
        it = getattr(p, method)(T.square, items())
        assert helpers.call_within(next, helpers.START_TIMEOUT, it) == 1
        first_taken.set()
        with pytest.raises(PoolTerminatedError):
            helpers.call_within(list, helpers.START_TIMEOUT, it)
    finally:
        p.terminate()
        p.join()
    assert p._core.unfinished == 0


def test_hundreds_of_workers():
    with Pool(300) as p:
        assert p.map(T.square, range(600)) == [x * x for x in range(600)]


def test_workers_that_hang_starting_up_break_the_pool_and_leave_nothing():
    # An "after in child" fork hook that never returns stands for a lock
    # another thread held when the pool was made: no worker can start.
    code = """
        import os, time
        from cpool import Pool, PoolBrokenError
        import crash_tasks as T
        os.register_at_fork(after_in_child=lambda: time.sleep(3600))
        p = Pool(2)
        deadline = time.monotonic() + 10
        while len(p._core.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(p._core.zygote_pid, *p._core.pids(), flush=True)
        t0 = time.monotonic()
        try:
            p.apply_async(T.square, (3,)).get(timeout=20)
        except PoolBrokenError:
            print("broken after %.2f" % (time.monotonic() - t0), flush=True)
        p.terminate()
        p.join()
    """
    out = _run(code, env=dict(os.environ, CPOOL_START_TIMEOUT_MS="500"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    pids = [int(x) for x in lines[0].split()]
    assert len(pids) == 3
    assert lines[1].startswith("broken after"), out.stdout
    assert float(lines[1].split()[-1]) < 5
    assert _gone(pids, 2.0)


def test_slow_initializer_is_not_a_start_up_hang():
    # The deadline covers getting through the fork, not the initializer.
    code = """
        from cpool import Pool
        import crash_tasks as T
        with Pool(1, initializer=T.sleep_then, initargs=(0, 1.0)) as p:
            print(p.apply(T.square, (3,)))
    """
    out = _run(code, env=dict(os.environ, CPOOL_START_TIMEOUT_MS="200"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9"]


def test_fork_hooks_run_in_every_worker_and_replacement(pool):
    # os.register_at_fork(after_in_child=...) hooks run in each worker, as in
    # the child of os.fork(): random is reseeded, so no two workers (first
    # ones or replacements) draw the same numbers.
    assert wait_for_size(pool, 2)
    seen = dict(pool.map(T.first_random, [0.05] * 6, chunksize=1))
    assert len(seen) == 2
    with pytest.raises(WorkerLostError):
        pool.apply(T.exit_with, (3,))
    assert wait_for_size(pool, 2)
    seen.update(pool.map(T.first_random, [0.05] * 6, chunksize=1))
    assert len(seen) == 3
    assert len(set(seen.values())) == 3


def _in_child(fn, timeout=20.0):
    """fn() in a forked child; returns what it printed (its outcome), or
    'HANG' if it did not finish within timeout (the child is then killed)."""
    import select
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                out = fn()
            except BaseException as e:
                out = type(e).__name__
            os.write(w, str(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "HANG"
        return os.read(r, 1000).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_forked_child_may_close_terminate_and_join_its_copy(pool, gate):
    pending = pool.apply_async(helpers.gated, (1, gate.path))
    mapping = pool.map_async(helpers.gated_item, [(2, gate.path)] * 3)
    it = pool.imap(helpers.gated_item, [(3, gate.path)] * 3)
    # A lock of the pool held at the fork (as a feeder thread may hold it):
    # the child's copy of it stays held forever.
    with pool._feed_lock:
        def child():
            outcomes = []
            for call in (pending.get, mapping.get, it.next):
                try:
                    call()
                    outcomes.append("got")
                except RuntimeError:
                    outcomes.append("refused")
            with pool:
                pass                    # leaving the block terminates the copy
            pool.close()
            pool.join()
            return ",".join(outcomes) + ";" + str(pool._state)
        said = _in_child(child)
    assert said == "refused,refused,refused;TERMINATE"
    # The parent's pool is untouched.
    gate.open()
    assert pending.get(timeout=30) == 1
    assert mapping.get(timeout=30) == [2, 2, 2]
    assert list(it) == [3, 3, 3]
    assert pool.apply(T.square, (4,)) == 16


def test_forked_child_leaving_a_with_block_does_not_stop_the_parents_pool():
    with Pool(2) as p:
        assert _in_child(lambda: p.__exit__(None, None, None)) == "None"
        assert p.map(T.square, range(4)) == [0, 1, 4, 9]


def test_a_task_whose_fork_returns_into_the_worker_runs_nothing_twice(pool, tmp_path):
    child = pool.apply(T.fork_and_return, (-1,))
    assert child > 0                    # the worker's copy answered
    log = str(tmp_path / "log")
    n = 300
    assert pool.starmap(T.append_line, [(log, i) for i in range(n)],
                        chunksize=1) == list(range(n))
    with open(log) as f:
        assert sorted(int(x) for x in f.read().split()) == list(range(n))
    assert _gone([child], 5.0)          # the forked copy exited


def test_a_task_that_closes_its_doorbell_loses_no_result(pool):
    assert pool.map(T.square, range(4)) == [0, 1, 4, 9]
    time.sleep(0.1)                     # the collector asleep, pool idle
    r = pool.apply_async(T.close_all_fds, (7,))
    assert r.get(timeout=10) == 7
    # Its worker exited (it could not wake the parent again); the pool goes on.
    assert pool.map(T.square, range(6)) == [0, 1, 4, 9, 16, 25]


@pytest.fixture
def looks_twice_a_second(monkeypatch):
    """The collector's periodic look at the rings at its default (500 ms),
    whatever CPOOL_RING_CHECK_MS the suite runs with: a test that relies on
    it requests this before its pool."""
    monkeypatch.setenv("CPOOL_RING_CHECK_MS", "500")


def test_a_task_that_reuses_its_doorbell_fd_loses_no_result(
        looks_twice_a_second, pool, tmp_path):
    # Its worker's wake-ups go to a file: its results are seen by the
    # collector's periodic look (see looks_twice_a_second).
    assert pool.map(T.square, range(4)) == [0, 1, 4, 9]
    time.sleep(0.1)
    for k in range(2):                  # the second lands on a worker whose
        r = pool.apply_async(T.reuse_doorbell_fd,   # wake-ups go to a file
                             (str(tmp_path / ("f%d" % k)),))
        assert r.get(timeout=10) in (True, None)
        time.sleep(0.1)
    assert pool.map(T.square, range(6)) == [0, 1, 4, 9, 16, 25]
    # The first task's worker did ring its doorbell, into the file.
    assert os.path.getsize(str(tmp_path / "f0")) >= 8


def test_worker_lost_in_apply_names_the_call(pool):
    # A worker is up and most likely idle: apply() usually takes its own
    # path, without a result object; either way the error names the call.
    assert pool.apply(T.square, (2,)) == 4
    with pytest.raises(WorkerLostError) as info:
        pool.apply(T.kill_self, (signal.SIGKILL,))
    message = str(info.value)
    assert "an apply() call" in message and "(job " not in message
    assert pool.apply(T.square, (3,)) == 9


def test_worker_lost_in_apply_names_the_call_when_no_worker_is_idle(pool, gate):
    held = [pool.apply_async(helpers.gated, (k, gate.path)) for k in range(2)]
    errors = []

    def call():
        try:
            pool.apply(T.kill_self, (signal.SIGKILL,))
        except WorkerLostError as e:
            errors.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    # Both workers are held: the call waits in the pool's cache, as a result
    # object whose job number carries apply()'s flag.
    apply_flag = 1 << 62
    deadline = time.monotonic() + 10
    while not any(job & apply_flag for job in list(pool._cache)):
        assert time.monotonic() < deadline, "apply() never queued its task"
        time.sleep(0.005)
    gate.open()
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1
    message = str(errors[0])
    assert "an apply() call" in message and "(job " not in message
    assert "crash_tasks.kill_self" in message
    assert [r.get(timeout=10) for r in held] == [0, 1]
    assert pool.apply(T.square, (3,)) == 9


def test_a_pool_whose_fork_server_died_says_so():
    # Its workers die with it (their parent-death signal); what they ran
    # fails with PoolBrokenError (or WorkerLostError, if the worker's end
    # is seen first), and later work is refused with multiprocessing's
    # ValueError, which says why.
    p = Pool(1)
    try:
        assert p.apply(T.square, (3,)) == 9
        os.kill(p._core.zygote_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                p.apply(T.square, (2,))
            except ValueError as e:
                assert "broken" in str(e) and "fork server" in str(e), e
                assert str(e).startswith("Pool not running")
                break
            except (PoolBrokenError, WorkerLostError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        p.terminate()
        p.join()


def test_an_interrupted_pool_construction_leaves_no_processes(monkeypatch):
    # A Ctrl-C while the collector thread starts: Pool() raises it, and the
    # fork server and its workers end (the started collector would keep
    # them alive, with nothing left to end them).
    start = threading.Thread.start
    made = []

    def interrupted_start(self):
        if self.name == "cpool-collector":
            start(self)
            made.append(self)
            raise KeyboardInterrupt
        start(self)

    def children():
        with open("/proc/%d/task/%d/children" % (os.getpid(), os.getpid())) as f:
            return set(f.read().split())

    before = children()
    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        Pool(2)
    monkeypatch.undo()
    assert len(made) == 1
    made[0].join(10)
    assert not made[0].is_alive()
    deadline = time.monotonic() + 10
    while children() - before:
        assert time.monotonic() < deadline, children() - before
        time.sleep(0.01)


def test_a_process_forked_by_an_imap_input_can_exit():
    # The input runs in the feeder thread, which starts right away: a child
    # forked there, which leaves by raising SystemExit through the feeder's
    # code, must not find the pool's feeder lock held by the thread that
    # started the feeder (it would wait for it forever).
    code = """
        import os, sys
        from cpool import Pool
        import crash_tasks as T

        def gen():
            pid = os.fork()
            if pid == 0:
                sys.exit(0)
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status), flush=True)
            yield 1
            yield 2

        with Pool(2) as p:
            print(list(p.imap(T.square, gen())))
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["child 0", "[1, 4]"], out.stdout


@pytest.mark.parametrize("how", ["apply", "get", "map", "imap"])
def test_a_callback_that_waits_for_the_pool_gets_an_error(pool, how, tmp_path):
    # Callbacks run on the thread that completes results: a wait there for
    # another result of the pool would never end (multiprocessing hangs).
    # It raises; a result that is ready already can still be read there.
    import helpers
    gate = helpers.Gate(tmp_path)
    done_before = pool.apply_async(T.square, (5,))
    assert done_before.get(timeout=10) == 25
    pending = pool.apply_async(helpers.gated, (7, gate.path))
    got = []

    def callback(value):
        try:
            got.append(done_before.get())
            if how == "apply":
                pool.apply(T.square, (value,))
            elif how == "get":
                pending.get()
            elif how == "map":
                pool.map(T.square, [value])
            else:
                list(pool.imap(T.square, [value]))
        except RuntimeError as e:
            got.append(e)

    try:
        r = pool.apply_async(T.square, (3,), callback=callback)
        assert r.get(timeout=10) == 9
        assert got[0] == 25
        assert len(got) == 2 and isinstance(got[1], RuntimeError), got
        assert "would never come" in str(got[1])
    finally:
        gate.open()
    assert pending.get(timeout=10) == 7
    assert pool.apply(T.square, (4,)) == 16
