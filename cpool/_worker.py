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
