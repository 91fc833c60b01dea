"""Helpers the C worker loop calls: at start-up and exit, and on its error
paths (never on the hot path).  Imported by the parent, before any fork."""
import atexit
import itertools
import os
import signal
import sys
import multiprocessing.context          # noqa: F401 (become_worker)
import multiprocessing.process          # noqa: F401
import multiprocessing.util             # noqa: F401
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError


def wrap_exception(exc):
    """Carry the worker's formatted traceback with the exception, as
    multiprocessing's workers do; the parent re-raises it with a
    RemoteTraceback as __cause__."""
    return ExceptionWithTraceback(exc, exc.__traceback__)


def encoding_error(err, value, ok):
    """The result (ok) or the task's exception (not ok) could not be pickled.

    Either way the caller gets multiprocessing's MaybeEncodingError.  For an
    exception, it names the original exception's type and message and keeps
    the original traceback as the RemoteTraceback cause."""
    if ok or not isinstance(value, ExceptionWithTraceback):
        return MaybeEncodingError(err, value)
    wrapped = ExceptionWithTraceback(MaybeEncodingError(err, value.exc), None)
    wrapped.tb = value.tb
    return wrapped


_devnull = None


def prepare():
    """In the parent, before a pool forks: the workers' stdin (/dev/null,
    opened once per process and kept; closed at exit, so that it is not
    reported as an unclosed file when the interpreter shuts down)."""
    global _devnull
    if _devnull is None or _devnull.closed:
        try:
            _devnull = open(os.devnull, encoding="utf-8")
        except OSError:
            _devnull = None
        else:
            atexit.register(_devnull.close)


def worker_name(identity, cls_name="ForkProcess"):
    """A pool worker's name, as multiprocessing gives it from its identity
    and its process class's name ("ForkProcess" gives "ForkPoolWorker")."""
    return cls_name.replace("Process", "PoolWorker") + "-" + \
        ":".join(map(str, identity))


def become_worker(number, parent_pid, made_as=None, _modules=sys.modules):
    """Start-up of a worker, as multiprocessing's fork children start (its
    BaseProcess._bootstrap): multiprocessing sees this process as a pool
    worker ("ForkPoolWorker-<n>", n drawn from the parent's count of the
    processes it made, as multiprocessing's are; "ForkPoolWorker-<m>:<n>" in
    a pool made by a process whose identity is m; a daemon, whose
    parent_process() is the pool's process), stdin is /dev/null, the
    parent's multiprocessing finalizers and signal wake-up fd are dropped,
    and the after-fork hooks registered with
    multiprocessing.util.register_after_fork run (a multiprocessing.Queue
    inherited from the parent resets its feeder thread state there).

    Every worker runs this before its first task, so it is kept cheap: the
    modules come from sys.modules (this module and they are imported before
    the fork), and the process object is filled in directly rather than
    through BaseProcess.__init__, which this process is not starting.

    made_as: None for a daemonic ForkProcess, or (class, daemon) when the
    pool's Process is not the stock one (see pool._worker_process): the
    class, and the daemon flag of its config (None: not set)."""
    if made_as is None:
        cls, daemon = _modules["multiprocessing.context"].ForkProcess, True
    else:
        cls, daemon = made_as
    process = _modules["multiprocessing.process"]
    util = _modules["multiprocessing.util"]
    parent = process._current_process
    me = object.__new__(cls)
    me._identity = parent._identity + (number,)
    me._config = dict(parent._config, daemon=daemon)
    if daemon is None:
        del me._config["daemon"]
    me._parent_pid = parent_pid
    me._parent_name = parent._name
    me._popen = None
    me._closed = False
    me._target = None
    me._args = ()
    me._kwargs = {}
    me._name = worker_name(me._identity, cls.__name__)
    process._process_counter = itertools.count(1)
    process._children = set()
    # stdin: multiprocessing closes sys.stdin and opens /dev/null in its
    # place; the file object is made once, in the parent (prepare()), not
    # built again by every worker.
    if sys.stdin is not None:
        try:
            sys.stdin.close()
        except (OSError, ValueError):
            pass
        sys.stdin = _devnull
    process._current_process = me
    try:
        sentinel = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        sentinel = None         # parent_process() stays None
    if sentinel is not None:
        process._parent_process = process._ParentProcess(parent._name, parent_pid,
                                                         sentinel)
    util._finalizer_registry.clear()
    # The parent's signal wake-up fd (an event loop's self-pipe, as asyncio
    # sets) is not the worker's: a signal the worker gets (terminate()'s
    # SIGTERM) would otherwise wake the parent's loop as if it had got it.
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    util._run_after_forkers()


def exiting():
    """A worker that leaves normally (the pool is closing, or its task
    count is reached) ends as multiprocessing's workers do: it runs
    multiprocessing's exit finalizers, then waits for the threads its tasks
    started (non-daemon threads, and the work queued in a
    concurrent.futures executor), which would otherwise die with it."""
    try:
        sys.modules["multiprocessing.util"]._exit_function()
    finally:
        sys.modules["threading"]._shutdown()
