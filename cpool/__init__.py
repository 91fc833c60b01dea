"""cpool: a drop-in ``multiprocessing.Pool`` with a C core.

    from cpool import Pool
    with Pool() as p:
        print(p.map(abs, range(-5, 5)))
"""
from multiprocessing import TimeoutError
from multiprocessing.pool import (ApplyResult, AsyncResult, MapResult,
                                  MaybeEncodingError, RemoteTraceback)

from .errors import PoolBrokenError, PoolTerminatedError, WorkerLostError
from .pool import Pool

__version__ = "0.1.0"

__all__ = [
    "Pool", "WorkerLostError", "PoolTerminatedError", "PoolBrokenError",
    "TimeoutError", "MaybeEncodingError", "RemoteTraceback", "ApplyResult",
    "AsyncResult", "MapResult",
]
