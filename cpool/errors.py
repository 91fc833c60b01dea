"""Exceptions cpool adds to multiprocessing's.

Both derive from multiprocessing.ProcessError, so an ``except
multiprocessing.ProcessError`` (or ``except Exception``) written for
multiprocessing catches them too."""
import os
import signal as _signal
from multiprocessing import ProcessError

__all__ = ["WorkerLostError", "PoolTerminatedError", "PoolBrokenError"]


class WorkerLostError(ProcessError):
    """A worker process died (a signal such as SIGKILL from the OOM killer or
    SIGSEGV from a C extension, os._exit, sys.exit) while it held a task.

    Only that task fails; the pool starts a replacement worker and goes on.
    Attributes: ``pid``, ``exitcode`` (like Process.exitcode: negative for a
    signal), ``signal`` (the signal number or None) and ``task`` (a short
    description of the lost task)."""

    def __init__(self, message, pid=None, exitcode=None, task=None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.task = task

    @property
    def signal(self):
        if self.exitcode is not None and self.exitcode < 0:
            return -self.exitcode
        return None

    def __reduce__(self):
        return (type(self), (self.args[0], self.pid, self.exitcode, self.task))


class PoolTerminatedError(ProcessError):
    """The pool was terminated before this task finished.

    multiprocessing leaves such results pending forever; cpool fails them."""


class PoolBrokenError(ProcessError):
    """The pool's process manager (the fork server) died, so the pool can make
    no more workers; its unfinished tasks fail with this error."""


def describe_status(status):
    """(text, exitcode, hint) for a wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = _signal.Signals(sig).name
        except ValueError:
            name = "signal %d" % sig
        hint = ""
        if sig == _signal.SIGKILL:
            hint = " (the out-of-memory killer sends SIGKILL: memory may have run out)"
        return "was killed by %s (signal %d)" % (name, sig), -sig, hint
    code = os.WEXITSTATUS(status)
    return "exited with code %d" % code, code, ""
