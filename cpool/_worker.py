"""Helpers the C worker loop calls on its error paths (never on the hot path)."""
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


def become_worker(number, parent_pid):
    """Start-up of a worker, as multiprocessing's fork children start (its
    BaseProcess._bootstrap): multiprocessing sees this process as a pool
    worker ("ForkPoolWorker-<n>", a daemon, whose parent_process() is the
    pool's process), stdin is /dev/null, the parent's multiprocessing
    finalizers are dropped, and the after-fork hooks registered with
    multiprocessing.util.register_after_fork run (a multiprocessing.Queue
    inherited from the parent resets its feeder thread state there)."""
    import itertools
    import os
    from multiprocessing import context, process, util

    parent = process.current_process()
    me = context.ForkProcess(name="ForkPoolWorker-%d" % number, daemon=True)
    me._identity = parent._identity + (number,)
    me._parent_pid = parent_pid
    process._process_counter = itertools.count(1)
    process._children = set()
    util._close_stdin()
    process._current_process = me
    try:
        sentinel = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        sentinel = None         # parent_process() stays None
    if sentinel is not None:
        process._parent_process = process._ParentProcess(parent.name, parent_pid,
                                                         sentinel)
    util._finalizer_registry.clear()
    util._run_after_forkers()


def exiting():
    """A worker that leaves normally (the pool is closing, or its task
    count is reached) runs multiprocessing's exit finalizers, as
    multiprocessing's workers do."""
    from multiprocessing import util
    util._exit_function()
