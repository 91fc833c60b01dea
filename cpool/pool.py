"""cpool.Pool: multiprocessing.Pool's API over the C core (cpool._core).

The C core forks the workers (through a fork server), moves pickled tasks and
results through shared-memory rings and runs one collector thread that hands
results to the result objects.  The result objects are multiprocessing's own
classes (subclassed only so that a raising callback cannot leave a result
unset), so get/wait/ready/successful/next behave exactly as there.
"""
import atexit
import collections
import errno
import functools
import itertools
import operator
import os
import signal
import sys
import threading
import time
import warnings
import weakref
import multiprocessing
import multiprocessing.connection
from multiprocessing import TimeoutError
from multiprocessing import pool as _mp

from . import _core
from . import _pickling, _worker  # noqa: F401 (before any fork: the workers
                                  # use them, and inherit them imported)
from .errors import (PoolBrokenError, PoolTerminatedError, WorkerLostError,
                     describe_status)

__all__ = ["Pool"]

INIT = "INIT"
RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

#: Bytes per ring (one task ring and one result ring per worker).
RING_BYTES = int(os.environ.get("CPOOL_RING_BYTES", 1 << 20))
#: imap/imap_unordered without buffersize read their whole input ahead of the
#: consumer, as multiprocessing's do (its task handler feeds every task, so
#: the work runs in the background whether or not results are read yet).
UNBOUNDED = sys.maxsize
MAX_IDLE_FEEDERS = 4     # imap feeder threads kept waiting for the next call
#: map/starmap without chunksize: at most this many items per chunk.
DEFAULT_CHUNK_MAX = 4096


def _default_spin_ns(processes):
    env = os.environ.get("CPOOL_SPIN_NS")
    if env is not None:
        return int(env)
    # How long a worker waiting for its next task spins (yielding the CPU
    # between checks) before it sleeps: long enough to catch the next task of
    # a caller in a loop, which saves a futex wake-up per call.
    return 50_000


def _task_name(func):
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is None:
        return repr(func)
    mod = getattr(func, "__module__", None)
    return "%s.%s" % (mod, name) if mod else name


_SYNC_JOB = 1 << 63     # csrc: CP_SYNC_JOB, apply()'s own calls
_APPLY_JOB = 1 << 62    # csrc: CP_APPLY_JOB, apply() through a result object


def _make_error(kind, pid, status, job, index, func):
    """Build the exception for a task the C core could not finish."""
    if job & (_SYNC_JOB | _APPLY_JOB):
        task = "%s (an apply() call)" % _task_name(func)
    else:
        task = "%s (job %d, chunk %d)" % (_task_name(func), job, index)
    if kind == _core.E_LOST:
        how, exitcode, hint = describe_status(status)
        return WorkerLostError(
            "worker process %d %s while running task %s%s" % (pid, how, task, hint),
            pid=pid, exitcode=exitcode, task=task)
    if kind == _core.E_STARTUP:
        how, exitcode, hint = describe_status(status)
        return WorkerLostError(
            "worker process %d %s while starting up (its fork hooks or initializer), "
            "before it could run task %s%s" % (pid, how, task, hint),
            pid=pid, exitcode=exitcode, task=task)
    if kind == _core.E_TERMINATED:
        return PoolTerminatedError(
            "the pool was terminated before task %s finished" % task)
    if kind == _core.E_BROKEN:
        return PoolBrokenError(
            "the pool's fork server died; task %s cannot run" % task)
    return WorkerLostError("protocol error on task %s" % task, pid=pid, task=task)


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass        # None, or closed


def _waits_for_itself(pool, timeout):
    """A wait with no timeout, for a result of `pool`, in the pool's own
    collector thread (a callback, or the loader of a result being
    unpickled, that waits for another result) would never end: that thread
    is the one that completes results.  It raises instead (multiprocessing
    hangs there)."""
    if timeout is None and pool is not None and \
            pool._collector is threading.current_thread():
        raise RuntimeError(
            "a pool's callbacks run on the thread that completes its results: "
            "one cannot wait there for a result of the same pool (it would "
            "never come); hand the wait to another thread")


def _not_the_owner():
    return RuntimeError(
        "cpool: a pool can only be used by the process that created it")


def _report_callback_error():
    """A callback raised: report it like an exception in a thread would be,
    and go on (the result still completes)."""
    exc = sys.exc_info()
    threading.excepthook(threading.ExceptHookArgs(
        (exc[0], exc[1], exc[2], threading.current_thread())))


class ApplyResult(_core.ResultBase, _mp.ApplyResult):
    """multiprocessing's ApplyResult, lighter: a single lock stands for the
    Event, and _set always completes, even when a callback raises
    (multiprocessing would leave get() waiting forever).

    _core.ResultBase holds multiprocessing's attributes (_pool, _ready,
    _job, _value, ...) in C fields and provides ready() and get(), which
    calls wait() below only if the result is not there yet.
    Pool.apply_async() makes and completes these objects in C (see
    csrc/result.c).

    The lock (_done) is made only when someone waits before the result is
    there (most results are ready by the time get() is called):
    _core.done_lock() makes it, held, unless the result is ready (it runs
    under the GIL, so it cannot interleave with _set, which sets _ready and
    then releases the lock if there is one)."""

    # The instance dict through ResultBase's descriptor, which makes the
    # garbage collector track the result first (see csrc/result.c).
    __dict__ = vars(_core.ResultBase)["__dict__"]

    def __init__(self, pool, callback, error_callback, _next=next,
                 _counter=_mp.job_counter):
        self._pool = pool
        self._ready = False
        self._done = None
        self._job = job = _next(_counter)
        self._cache = pool._cache
        self._callback = callback
        self._error_callback = error_callback
        self._cache[job] = self

    def wait(self, timeout=None, _done_lock=_core.done_lock):
        if self._ready:
            return
        pool = self._pool
        if pool is not None and pool._owner != os.getpid():
            # A forked child: nothing here will ever complete it (and the
            # locks may have been inherited held).
            raise _not_the_owner()
        done = self._done
        if done is None:
            done = _done_lock(self)
            if done is None:
                return          # ready meanwhile
        _waits_for_itself(pool, timeout)
        if timeout is None:
            got = done.acquire()
        elif not timeout > 0:          # NaN too, as threading's wait
            got = done.acquire(False)
        else:
            got = done.acquire(True, timeout)
        if got:
            # Pass it on: every waiter gets through, one after another.
            done.release()

    def __reduce__(self):
        # As multiprocessing's: a pending result pickles its pool, which
        # refuses; a finished one its lock, which cannot be pickled.
        if self._pool is not None:
            return self._pool.__reduce__()
        raise TypeError("cannot pickle %r object" % type(self).__name__)

    def _set(self, i, obj):
        self._success, self._value = obj
        try:
            if self._callback and self._success:
                self._callback(self._value)
            if self._error_callback and not self._success:
                self._error_callback(self._value)
        except Exception:
            _report_callback_error()
        finally:
            self._ready = True
            done = self._done
            if done is not None:
                done.release()
            self._cache.pop(self._job, None)
            self._pool = None


class MapResult(_mp.MapResult):
    """multiprocessing's MapResult with the same guarantee as ApplyResult."""

    _quiet = False      # failed by a quiet terminate (_fail_quietly)

    def ready(self):
        return self._quiet or self._event.is_set()

    def _fail_quietly(self, exc):
        # At interpreter exit (see _finalize): failed for whoever asks from
        # now on; those already waiting are not woken, callbacks do not run.
        if self._success:
            self._success = False
            self._value = exc
        self._quiet = True
        self._cache.pop(self._job, None)
        self._pool = None

    def wait(self, timeout=None):
        if self._quiet:
            return
        if not self._event.is_set():
            pool = self._pool
            if pool is not None and pool._owner != os.getpid():
                raise _not_the_owner()
            _waits_for_itself(pool, timeout)
        self._event.wait(timeout)

    def _finish(self, callback):
        try:
            if callback:
                callback(self._value)
        except Exception:
            _report_callback_error()
        finally:
            self._cache.pop(self._job, None)
            self._event.set()
            self._pool = None

    def _set(self, i, success_result):
        self._number_left -= 1
        success, result = success_result
        if success and self._success:
            self._value[i * self._chunksize:(i + 1) * self._chunksize] = result
            if self._number_left == 0:
                self._finish(self._callback)
        else:
            if not success and self._success:
                # only the first exception is kept, as in multiprocessing
                self._success = False
                self._value = result
            if self._number_left == 0:
                self._finish(self._error_callback)


class IMapIterator(_mp.IMapIterator):
    """multiprocessing's IMapIterator, with a bound on how far the feeder may
    read the input ahead of the consumer.

    While the pool runs, room is given back when the consumer takes a
    result, so an endless input with a slow consumer uses constant memory.
    Once the pool is closed, room is given back as tasks complete instead, so
    close(); join() finishes all the work even if nobody iterates (as with
    multiprocessing).  One lock guards items and room alike.

    The consumer takes results a few at a time: under the lock, next() moves
    up to 1/16 of the bound (at most 64) of the results that are there into
    _taken, a deque only consumers pop from, and the next calls pop from it
    without the lock (popleft is atomic).  Their room is given back at the
    next round under the lock (_account_taken: moved - still in _taken), so
    the feeder may run ahead by at least 15/16 of the bound meanwhile."""

    _by_consumer = True
    _quiet_exc = None   # failed by a quiet terminate (_fail_quietly)
    _in_input = False   # its feeder is reading the input
    _cut = None         # the item terminate() ended it at (_cut_input)
    _feeder = None      # the thread that reads its input
    _chunked = False    # chunksize > 1: the consumer reads a generator

    def _init_bound(self, n):
        # The conditions' lock itself: `with self._lock` is what `with
        # self._cond` does, without two Python-level calls.
        self._lock = self._cond._lock
        self._owner = self._pool._owner
        self._room_cond = threading.Condition(self._lock)
        self._room = n
        self._n_done = 0
        self._n_taken = 0
        self._n_moved = 0       # results moved to _taken (or returned at once)
        self._taken = collections.deque()
        self._move_most = min(64, n // 16)
        self._stopped = False

    # -- feeder side
    def _take_room(self, most):
        """Wait for room and take up to `most` places; 0 means stop."""
        with self._lock:
            while self._room <= 0 and not self._stopped:
                self._room_cond.wait()
            if self._stopped:
                return 0
            n = min(self._room, most)
            self._room -= n
            return n

    def _give_room(self, n):
        # self._cond's lock held
        self._room += n
        if self._room_cond._waiters:
            self._room_cond.notify()

    def _release_on_completion(self):
        with self._lock:
            self._account_taken()
            if self._by_consumer:
                self._by_consumer = False
                owed = self._n_done - self._n_taken
                if owed > 0:
                    self._give_room(owed)

    def _fail_quietly(self, exc):
        """At interpreter exit (see _finalize): a consumer that comes from
        now on gets `exc` once the results that are there are taken; one
        that waits already is not woken.  The feeder stops, and what it
        would still report is dropped."""
        with self._lock:
            if self._quiet_exc is None:
                self._quiet_exc = exc
            self._stopped = True
            self._room_cond.notify_all()     # the feeder, not the consumers
            self._cache.pop(self._job, None)

    def _cut_input(self):
        """terminate(): the feeder stops.  If it is in the input, which may
        wait for items that will never come (a generator reading a queue),
        the call ends there rather than leave its consumer waiting: the
        item it waits for fails, and the feeder drops whatever it gets
        (see _feed_items)."""
        with self._lock:
            self._stopped = True
            self._room_cond.notify_all()
            if not self._in_input or self._cut is not None:
                return
            self._cut = n = self._n_read
        self._set(n, (False, PoolTerminatedError(
            "the pool was terminated while item %d was being read" % n)))
        self._set_length(n + 1)

    def _input_failed(self, i, obj):
        """The input raised after i items: the consumer gets the error as
        item i, after those before it."""
        self._set(i, obj)

    # -- collector side
    def _arrived(self, obj):
        # self._cond's lock held: one more result can be consumed.
        self._items.append(obj)
        self._index += 1

    def _set(self, i, obj):
        with self._lock:
            if self._quiet_exc is not None:
                return
            if self._index == i:
                self._arrived(obj)
                unsorted = self._unsorted
                while self._index in unsorted:
                    self._arrived(unsorted.pop(self._index))
                if self._cond._waiters:
                    self._cond.notify()
            else:
                self._unsorted[i] = obj
            self._completed()

    def _set_many(self, items):
        """Several (index, result) pairs at once (the collector batches the
        results of one job that arrive together)."""
        with self._lock:
            unsorted = self._unsorted
            arrived = self._items.append
            before = index = self._index
            for i, obj in items:
                if index == i:
                    # _arrived(), inline: this runs once per result
                    arrived(obj)
                    index += 1
                    while index in unsorted:
                        arrived(unsorted.pop(index))
                        index += 1
                else:
                    unsorted[i] = obj
            self._index = index
            # Wake the consumer only if it has something to take: next()
            # treats a wake-up without an item as its timeout.
            if index != before and self._cond._waiters:
                self._cond.notify()
            self._completed_many(len(items))

    def _completed_many(self, n):
        # self._cond's lock held: n more tasks are done.
        self._n_done += n
        if not self._by_consumer:
            self._give_room(n)
        if self._index == self._length:
            self._cache.pop(self._job, None)
            self._pool = None

    def _completed(self):
        # self._cond's lock held: one more task is done.
        self._n_done += 1
        if not self._by_consumer:
            self._give_room(1)
        if self._index == self._length:
            self._cache.pop(self._job, None)
            self._pool = None

    def _set_length(self, length):
        with self._lock:
            if self._quiet_exc is not None:
                return
            self._length = length
            if self._index == self._length:
                self._cond.notify()
                self._cache.pop(self._job, None)
                self._pool = None

    # -- consumer side
    def _account_taken(self):
        # self._cond's lock held: results popped from _taken since the last
        # round count as taken now.
        taken = self._n_moved - len(self._taken)
        new = taken - self._n_taken
        if new:
            self._n_taken = taken
            if self._by_consumer:
                self._give_room(new)

    def _next_locked(self, timeout):
        if self._owner != os.getpid():
            # before the lock, which a forked child may have inherited held
            raise _not_the_owner()
        with self._lock:
            taken = self._taken
            items = self._items
            deadline = None
            # Several threads may consume one iterator: a wake-up that finds
            # nothing (another consumer came first) waits again, so only
            # `timeout` running out raises TimeoutError.
            while not taken and not items:
                if self._index == self._length:
                    self._pool = None
                    self._cond.notify_all()     # other consumers stop too
                    raise StopIteration from None
                if self._quiet_exc is not None:
                    raise self._quiet_exc
                if timeout is None:
                    _waits_for_itself(self._pool, None)
                    if self._in_input and not self._chunked and \
                            self._feeder is threading.current_thread():
                        # The call's own input (a feedback loop) waits for
                        # its results: only for those it has sent.  Another
                        # consumer may take them first, so it looks again
                        # now and then.  (Not with chunksize > 1: the input
                        # reads the consumer's own generator, which an error
                        # raised in it would end for the consumer too, its
                        # results lost without a word.)
                        if self._index >= self._n_read:
                            raise RuntimeError(
                                "the input of an imap call waits for a result "
                                "of the same call that needs more of that "
                                "input (it would never come)")
                        self._cond.wait(0.05)
                        continue
                    self._cond.wait()
                    continue
                if deadline is None:
                    deadline = time.monotonic() + timeout
                left = deadline - time.monotonic()
                if not left > 0:        # NaN too: no wait, as multiprocessing
                    raise TimeoutError
                self._cond.wait(left)
            if taken:
                # another consumer thread moved some meanwhile
                item = taken.popleft()
            else:
                item = items.popleft()
                self._n_moved += 1
                n = min(len(items), self._move_most)
                if n:
                    move = taken.append
                    pop = items.popleft
                    for _ in range(n):
                        move(pop())
                    self._n_moved += n
            self._account_taken()
            if (taken or items) and self._cond._waiters:
                self._cond.notify()     # more for another waiting consumer
        return item

    def _abandon(self):
        """The consumer is gone (its iterator was collected): results are
        dropped from now on, and the call goes on as after close(), room
        given back as tasks complete, so every item is still run, as
        multiprocessing runs every task of an abandoned imap().  The results
        and the feeder thread are let go of when the input is done."""
        with self._lock:
            self._items = collections.deque(maxlen=0)
            self._taken.clear()
        self._release_on_completion()


class _Consumer(_core.ConsumerBase):
    """What imap() and imap_unordered() return: the consumer's end of the
    call.  The pool's cache and the feeder thread hold the call itself (the
    IMapIterator), never this, so that when the caller lets go of it (a
    loop that breaks early) the call learns it and keeps nothing for it.
    Results are taken a few at a time (see IMapIterator); iterating is
    _core.ConsumerBase's C __next__, which does what next() below does
    without a timeout."""

    def next(self, timeout=None):
        if timeout is None:
            return self.__next__()
        try:
            success, value = self._taken.popleft()
        except IndexError:
            success, value = self._results._next_locked(timeout)
        if success:
            return value
        if isinstance(value, StopIteration):
            # as is, it would end the caller's loop as if the results had
            # run out (PEP 479's reasoning)
            raise RuntimeError("a task raised StopIteration") from value
        raise value

    def __getattr__(self, name):
        # multiprocessing's attributes (_job, _length, ...) are the call's.
        results = self._results
        if results is None:
            raise AttributeError(name)
        return getattr(results, name)

    def __del__(self):
        results = self._results
        if results is None:
            return
        try:
            if results._lock.acquire(False):
                results._lock.release()
                results._abandon()
            else:
                # Held, maybe by this very thread: a garbage collection can
                # run this while the collector or the feeder holds the lock.
                # Never wait for it here.
                threading.Thread(target=results._abandon, daemon=True).start()
        except Exception:
            pass                # interpreter shutdown


class IMapUnorderedIterator(IMapIterator, _mp.IMapUnorderedIterator):
    """Results in the order they complete."""

    _held = None    # (i, the input's error), until the i items before it are done

    def _input_failed(self, i, obj):
        # As multiprocessing's error, sent as a task behind the items read
        # before it, it comes after their results, not ahead of them.
        with self._lock:
            if self._n_done < i:
                self._held = (i, obj)
                return
        self._set(i, obj)

    def _set(self, i, obj):
        with self._lock:
            if self._quiet_exc is not None:
                return
            self._arrived_done(obj)
            if self._held is not None:
                self._let_held_go()

    def _arrived_done(self, obj):
        # self._cond's lock held: one more result, of a task now done
        self._arrived(obj)
        if self._cond._waiters:
            self._cond.notify()
        self._completed()

    def _set_many(self, items):
        with self._lock:
            self._items.extend([obj for _, obj in items])
            self._index += len(items)
            if self._cond._waiters:
                self._cond.notify()
            self._completed_many(len(items))
            if self._held is not None:
                self._let_held_go()

    def _let_held_go(self):
        # self._cond's lock held
        i, obj = self._held
        if self._n_done >= i:
            self._held = None
            self._arrived_done(obj)


class _IMapConsumer(_Consumer, IMapIterator):
    pass


class _IMapUnorderedConsumer(_Consumer, IMapUnorderedIterator):
    pass


_core.set_result_type(ApplyResult, _mp.job_counter, threading.Lock,
                      TimeoutError)


def _sliced(seq, size, n):
    """Chunks of a sized input.  A range is cut into ranges and a list or
    tuple into slices (C speed, and a range chunk pickles in a few bytes);
    the worker iterates each chunk the same way, so the function sees the
    same items as with multiprocessing's tuples.  Anything else, subclasses
    included, is iterated, as multiprocessing iterates it, and checked
    against its len(): see _counted_chunks."""
    if type(seq) in (range, list, tuple):
        return (seq[k:k + size] for k in range(0, n, size))
    return _counted_chunks(seq, size, n)


def _counted_chunks(iterable, size, n):
    """Chunks of an input whose len() said n, as tuples.  map() cuts its
    result into len()'s chunks before reading the input, so an input with
    more or fewer items cannot be mapped: the chunk that shows it, at the
    latest the last one, raises ValueError instead of being sent
    (multiprocessing waits forever for the missing items, or returns a list
    of the wrong length)."""
    it = iter(iterable)
    for start in range(0, n, size):
        want = min(size, n - start)
        chunk = tuple(itertools.islice(it, want))
        if len(chunk) < want:
            raise ValueError(
                "map() input has %d items where its len() is %d"
                % (start + len(chunk), n))
        if start + want == n and next(it, _NO_ITEM) is not _NO_ITEM:
            raise ValueError(
                "map() input has more items than its len(), %d" % n)
        yield chunk


_NO_ITEM = object()


# Iterators whose length hint is exact (and runs no user code).
_EXACT_LENGTH_ITERATORS = frozenset(
    type(iter(x)) for x in ([], (), range(0), range(1 << 64)))


def _may_have_more(it):
    """False if the iterator is known to be exhausted, without reading it:
    only built-in list, tuple and range iterators say so exactly."""
    if type(it) in _EXACT_LENGTH_ITERATORS:
        return operator.length_hint(it) != 0
    return True


def _raising(exc):
    """An iterator whose first next() raises exc."""
    raise exc
    yield   # noqa: unreachable (makes this a generator)


# Inputs whose iterators cannot block or run code of the caller's: imap may
# read several of their items before it sends them.  Any other input (a
# generator, a file, a queue's iterator) has each item sent before the next
# is read, as multiprocessing's task thread does: its next item may wait for
# the results of those before it (a feedback loop), or for input that comes
# over time.
_PLAIN_INPUTS = (list, tuple, range, str, bytes, bytearray, dict, set,
                 frozenset, collections.deque, type({}.keys()),
                 type({}.values()), type({}.items()))


def _plain_input(iterable):
    if type(iterable) in _PLAIN_INPUTS:
        return True
    np = sys.modules.get("numpy")
    return np is not None and type(iterable) is np.ndarray


def _chunks(iterable, size):
    it = iter(iterable)
    while True:
        x = tuple(itertools.islice(it, size))
        if not x:
            return
        yield x


def _wait_os_exit(threads, timeout=5.0):
    """AddressSanitizer builds only: wait until joined threads are gone from
    the OS too.  A thread still exiting after join() drains its allocator
    cache under a lock of the sanitizer's allocator, which (unlike glibc's
    malloc) is not held across fork(): a pool forked at that moment would
    hand its workers the lock held.  (tests/conftest.py does the same
    between tests for every thread.)"""
    deadline = time.monotonic() + timeout
    for t in threads:
        tid = t.native_id
        while (tid is not None and os.path.exists("/proc/self/task/%d" % tid)
               and time.monotonic() < deadline):
            time.sleep(0.001)


class _Feeder:
    """A feeder thread's mailbox: its next imap call, and the lock it waits
    on (held while there is nothing to do)."""
    __slots__ = ("job", "thread", "wake")

    def __init__(self, job):
        self.job = job
        self.thread = None
        self.wake = threading.Lock()
        self.wake.acquire()


def _feeder_main(pool_ref, feeder):
    """A feeder thread: feeds one imap call after another, waiting idle in
    between while the pool runs (at most MAX_IDLE_FEEDERS wait).  While idle
    it holds no reference to the pool (nor to a result, which holds one), so
    an abandoned pool is still collected; its finalizer dismisses them."""
    while feeder.job is not None:
        job, feeder.job = feeder.job, None
        pool = pool_ref()
        if pool is None:
            return
        pool._feed(*job)
        del job
        with pool._feed_lock:
            if (pool._state != RUN or
                    len(pool._idle_feeders) >= MAX_IDLE_FEEDERS):
                return
            pool._idle_feeders.append(feeder)
        del pool
        feeder.wake.acquire()    # a job, or None: the pool is going away


def _dismiss_feeders(lock, idle):
    with lock:
        feeders = idle[:]
        del idle[:]
    for feeder in feeders:
        feeder.job = None
        feeder.wake.release()


def _finalize(core, owner, feed_lock, idle_feeders, quiet=None):
    # Runs when the Pool is garbage collected, at interpreter exit
    # (_exit_pools), or from terminate() (quiet=False).  At exit the threads
    # that may still wait for results are daemon threads: an error would only
    # wake them to print a traceback during shutdown (and error callbacks
    # would run then), so the termination is quiet: unfinished results fail
    # only for whoever asks from now on (say, a later atexit function), as
    # multiprocessing leaves them pending and its waiters waiting.
    if os.getpid() == owner:
        core.terminate(_exiting if quiet is None else quiet)
        _dismiss_feeders(feed_lock, idle_feeders)


class WorkerProcess:
    """An entry of Pool._pool: one live worker, described as
    multiprocessing's pool describes its workers with their Process objects,
    for code that reads their pids, polls is_alive() or exitcode, joins them
    or signals them.  The same object stands for a worker as long as it
    lives; a replacement gets a new one.

    The workers are the fork server's children, not this process's, so this
    is not a multiprocessing.Process (it cannot be started, and is not among
    multiprocessing.active_children()).  A pidfd tells whether it runs and
    carries its signals (so that they cannot reach another process that
    reuses the pid); its exit code is the one the fork server records when
    it reaps it (-signal if killed, as multiprocessing's: terminate() sends
    SIGTERM), read from the pool's shared memory: neither depends on
    the pool's threads."""

    __slots__ = ("pid", "_name", "_number", "_exitcode", "_pidfd", "_closer",
                 "_core", "_slot", "_parent_pid", "_doomed", "__weakref__")
    daemon = True

    def __init__(self, pid, number, slot, ident, core, pidfd=True,
                 cls_name="ForkProcess"):
        self.pid = pid
        # As the worker calls itself (see _worker.become_worker).
        self._name = _worker.worker_name(
            multiprocessing.current_process()._identity + (ident or number,),
            cls_name)
        self._number = number
        self._exitcode = None
        self._core = weakref.ref(core)
        self._slot = slot
        self._parent_pid = os.getpid()
        # Made once the pool is terminated (pidfd=False): no pidfd and no
        # signals, the worker has ended and its record tells how.
        self._doomed = not pidfd
        try:
            fd = os.pidfd_open(pid) if pidfd else None
        except AttributeError:
            fd = None                   # no pidfds: the record only
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
                fd = -1                 # gone (its pid may be a thread's now)
            else:
                fd = None               # no pidfd to be had (EMFILE, EPERM...)
        self._closer = None
        self._set_fd(fd)
        # The fork server records a worker's end before it reaps it, and so
        # before its pid can be reused: recorded now, the pidfd may be some
        # other process's, and is not kept.
        if self._code() is not None:
            self._set_fd(-1)

    def _set_fd(self, fd):
        if self._closer is not None:
            self._closer()              # closes the one held, once
        self._pidfd = fd
        self._closer = None
        if fd is not None and fd >= 0:
            self._closer = weakref.finalize(self, os.close, fd)

    name = property(lambda self: self._name)
    ident = property(lambda self: self.pid)

    def _code(self):
        if self._exitcode is None:
            core = self._core()
            if core is not None:
                self._exitcode = core.exit_code(self._slot, self._number)
        return self._exitcode

    def _ended(self, timeout=0.0):
        """Has the process ended (waiting up to timeout seconds, None: for
        ever)?  Its exit code may not be recorded yet."""
        if self._code() is not None:
            return True
        fd = self._pidfd
        if fd is not None and fd >= 0:
            return bool(multiprocessing.connection.wait([fd], timeout))
        return fd is not None        # -1: it was gone when this was made

    @property
    def exitcode(self):
        """None while the worker runs, then its exit code."""
        return self._code()

    def is_alive(self):
        assert self._parent_pid == os.getpid(), 'can only test a child process'
        return not self._ended()

    def join(self, timeout=None):
        assert self._parent_pid == os.getpid(), 'can only join a child process'
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pidfd is not None and not self._ended(timeout):
            return
        # Ended (with a pidfd), the fork server records its exit code as it
        # reaps it, at once: it runs no Python, and waits for nothing else.
        # Without one, the record is all there is to wait for.
        pause = 0.005 if self._pidfd is None else 0.0002
        while self._code() is None and (
                deadline is None or time.monotonic() < deadline):
            time.sleep(pause)

    @property
    def sentinel(self):
        """A file descriptor that is readable once the worker has ended (its
        pidfd)."""
        if self._pidfd is None and not self._ended():
            raise ValueError("no sentinel for worker %d: no pidfd could be "
                             "opened for it" % self.pid)
        if self._pidfd is None or self._pidfd < 0:
            # Gone before it was asked about: a pipe at end of file is as
            # readable as the pidfd of an ended process.
            r, w = os.pipe()
            os.close(w)
            self._set_fd(r)
        return self._pidfd

    def _signal(self, sig):
        if self._ended() or self._doomed:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self):
        """SIGTERM, as multiprocessing's Process.terminate(); the pool
        replaces the worker, and the task it ran fails (WorkerLostError)."""
        self._signal(signal.SIGTERM)

    def kill(self):
        self._signal(signal.SIGKILL)

    def _let_go(self):
        if self._code() is not None and self._pidfd is not None:
            self._set_fd(-1)

    def close(self):
        """Let go of its pidfd, as multiprocessing's Process.close(); the
        object can only tell its pid, name and exit code after that."""
        if self._exitcode is None and not self._ended():
            raise ValueError("Cannot close a process while it is still "
                             "running. You should first call join() or "
                             "terminate().")
        self._code()
        if self._pidfd is not None:
            self._set_fd(-1)

    def __repr__(self):
        code = self._code()
        if code is not None:
            status = "stopped exitcode=%d" % code
        else:
            status = "stopped" if self._ended() else "started"
        return "<WorkerProcess name=%r pid=%d parent=%d %s daemon>" % (
            self._name, self.pid, self._parent_pid, status)


_exiting = False                # _exit_pools() has run
_live_pools = weakref.WeakSet()


def _exit_pools():
    """Terminate the pools still open, quietly.  Registered when this module
    is imported, as multiprocessing registers its own exit function, so that
    atexit functions registered after `import cpool` run while the pools
    still work, as they do with multiprocessing."""
    global _exiting
    _exiting = True
    # Only this process's own pools: a forked child's copies are not its to
    # end, and their locks may have been held by threads it does not have.
    me = os.getpid()
    pools = [pool for pool in list(_live_pools) if pool._owner == me]
    for pool in pools:
        # imap calls first: one whose feeder is reading its input is not
        # among the core's tasks, and it must stop before the core refuses
        # its next items (their error would wake its consumer).
        with pool._feed_lock:
            feeding = list(pool._feeders.values())
        for result in feeding:
            result._fail_quietly(PoolTerminatedError(
                "the pool was terminated at interpreter exit"))
        pool._finalize_now(quiet=True)
    # The collectors fail the unfinished results: let them, so that a wait
    # that starts after this finds them failed rather than waits forever
    # (within one deadline for all: a callback may be blocked).
    deadline = time.monotonic() + 5
    for pool in pools:
        if pool._collector is not threading.current_thread():
            pool._collector.join(max(0.0, deadline - time.monotonic()))


atexit.register(_exit_pools)


def _start_method(context):
    """The start method multiprocessing.Pool would use with `context`."""
    if context is None:
        return multiprocessing.get_start_method(allow_none=True) or "fork"
    return context.get_start_method()


_STOCK_PROCESS = _mp.Pool.Process
_STOCK_PROCESS_CLASSES = (multiprocessing.context.Process,
                          multiprocessing.context.ForkProcess)


def _worker_process(pool):
    """What the workers' multiprocessing process objects are made from.

    multiprocessing's Pool makes each with Pool.Process(ctx, ...) (a
    staticmethod a subclass may replace; ctx.Process by default) and sets
    its daemon flag.  None for the stock classes: a daemonic ForkProcess.
    For another class (the "non-daemonic pool" recipe: a context whose
    Process ignores daemon = True, so that tasks may start processes), its
    class and the daemon flag its config ends up with, from one object made
    as multiprocessing makes them and never started (so not counted: the
    process counter is set aside meanwhile)."""
    make = type(pool).Process
    ctx = pool._ctx
    if make is _STOCK_PROCESS and \
            getattr(ctx, "Process", None) in _STOCK_PROCESS_CLASSES:
        return None
    process = multiprocessing.process
    counter = process._process_counter
    process._process_counter = itertools.count(1)
    try:
        w = make(ctx, target=None)
        w.daemon = True
    finally:
        process._process_counter = counter
    if not isinstance(w, process.BaseProcess):
        return None
    return (type(w), w._config.get("daemon"))


def _apply_via_async(self, func, args=(), kwds={}):
    """Equivalent of `func(*args, **kwds)`."""
    self._check_running()
    return self.apply_async(func, args, kwds).get()


class Pool(_core.PoolBase, _mp.Pool):
    """A drop-in replacement for multiprocessing.Pool.

    An instance of multiprocessing.pool.Pool, for code that checks what it
    was given; every public method, and the internals that matter, are
    cpool's own (multiprocessing's task and result threads are not used)."""

    _collector = None   # its collector thread (see _waits_for_itself)

    def __new__(cls, *args, **kwargs):
        # cpool forks its workers.  Asked for another start method (a
        # "spawn" or "forkserver" context, or multiprocessing's default set
        # so), Pool(...) hands over to multiprocessing.Pool with it, which
        # gives what was asked for: fresh interpreters, not copies of this
        # one.  (A subclass, whose own methods would be lost, is checked in
        # __init__ instead, against the context it passes.)
        if cls is Pool:
            context = kwargs.get("context", args[4] if len(args) > 4 else None)
            if _start_method(context) != "fork":
                return _mp.Pool(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, processes=None, initializer=None, initargs=(),
                 maxtasksperchild=None, context=None):
        self._state = INIT
        self._cache = {}
        method = context.get_start_method() if context is not None else "fork"
        if method != "fork":
            raise ValueError("%s forks its workers: start method %r is not "
                             "supported" % (type(self).__name__, method))
        self._ctx = context or multiprocessing.get_context()
        self._feeders = {}      # feeder thread -> its imap result
        self._mapping = {}      # map calls submitting: token -> their thread's id
        self._idle_feeders = []  # feeder threads waiting for their next call
        self._feed_threads = []  # every feeder thread started (join() joins them)
        # Reentrant: a signal handler may close() or terminate() the pool
        # while its thread holds it (in map_async(), say).
        self._feed_lock = threading.RLock()
        self._kept_workers = []  # _pool once closed or terminated
        if processes is None:
            try:
                processes = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')
        self._processes = processes
        self._maxtasksperchild = maxtasksperchild
        self._initializer = initializer
        self._initargs = initargs
        _worker.prepare()
        # What the parent printed and its buffers still hold would otherwise
        # be copied into the fork server, and each worker would print it
        # again when it exits (multiprocessing flushes before each fork).
        _flush_std_streams()
        # initargs only matter with an initializer (multiprocessing takes
        # initargs=None without one).
        initargs = tuple(initargs) if initializer is not None else ()
        process = _worker_process(self)
        self._worker_class_name = (process[0] if process else
                                   multiprocessing.context.ForkProcess).__name__
        self._core = _core.Core(processes, initializer, initargs,
                                maxtasksperchild or 0, RING_BYTES, self._cache,
                                _make_error, _default_spin_ns(processes),
                                process)
        self._owner = os.getpid()
        self._terminate = weakref.finalize(self, _finalize, self._core,
                                           self._owner, self._feed_lock,
                                           self._idle_feeders)
        # _exit_pools() terminates it at exit; one made after that (by a
        # later atexit function) is left to weakref's own exit function.
        self._terminate.atexit = _exiting
        self._collector = threading.Thread(target=self._core.collect,
                                           name="cpool-collector", daemon=True)
        try:
            self._collector.start()
        except BaseException:
            # A Ctrl-C while it starts (or no thread to be had): the pool
            # is not made, and its processes end now.  (The collector, if
            # it started, keeps the core alive: no garbage collection would
            # end them.)
            self._finalize_now(quiet=False)
            raise
        _live_pools.add(self)
        self._state = RUN

    @property
    def _pool(self, _make=WorkerProcess):
        """The workers, as multiprocessing's list of its workers' processes
        (WorkerProcess objects).  While the pool runs, the live ones: a
        worker is listed once the fork server has forked it (a worker just
        asked for, within milliseconds).  Once the pool is closed or
        terminated, also those it had then, ended or not."""
        core = getattr(self, "_core", None)     # None: __init__ failed
        if core is None:
            return []
        # (Terminated: the workers have ended, no pidfds are needed.)
        make = functools.partial(_make, core=core,
                                 cls_name=self._worker_class_name,
                                 pidfd=self._state != TERMINATE)
        deadline = time.monotonic() + 1.0
        while True:
            procs, unknown = core.workers(make)
            if (not unknown or self._state == TERMINATE
                    or time.monotonic() > deadline):
                break
            time.sleep(0.0002)
        if self._state == RUN:
            return procs
        return self._keep(procs)

    def _keep(self, procs):
        # Closed or terminated, the list is multiprocessing's: the workers
        # the pool had then, ended or not, and any started since.
        kept = self._kept_workers
        for w in procs:
            if not any(w._number == k._number for k in kept):
                kept.append(w)
        return list(kept)

    # Globals bound as defaults: __del__ may run during interpreter shutdown.
    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if self._state == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}",
                  ResourceWarning, source=self)

    def __repr__(self):
        cls = self.__class__
        return (f'<{cls.__module__}.{cls.__qualname__} '
                f'state={self._state} pool_size={self._processes if self._state != INIT else 0}>')

    def __reduce__(self):
        raise NotImplementedError(
            'pool objects cannot be passed between processes or pickled')

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    # ------------------------------------------------------------ submit

    def _submit(self, result, index, mode, func, body, *bounds):
        # With bounds (start, stop), the chunk is body[start:stop] of a list
        # or tuple, encoded without making the slice.
        try:
            if bounds:
                self._core.submit_slice(result._job, index, mode, func, body,
                                        *bounds)
            else:
                self._core.submit(result._job, index, mode, func, body)
        except Exception as e:
            # As in multiprocessing, a task that cannot be sent fails its
            # result; the pool is untouched.
            if self._state == TERMINATE:
                raise ValueError("Pool not running") from None
            if result._callback is None and result._error_callback is None:
                result._set(index, (False, e))
            else:
                # its callbacks run in the collector thread, not in this
                # caller's, which may hold locks they take
                self._core.fail_unsent(result._job, index, e)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.apply_async is not Pool.apply_async and cls.apply is Pool.apply:
            # multiprocessing's apply() is apply_async().get(), and a
            # subclass's apply_async() (logging, say) sees those calls too
            cls.apply = _apply_via_async

    def apply(self, func, args=(), kwds={}):
        """Equivalent of `func(*args, **kwds)`."""
        self._check_running()
        # Fast path: an idle worker runs it and this thread reads the result
        # itself, with no result object and no hand-off between threads.
        done = self._core.call(func, args, kwds)
        if done is None:
            return self._apply_result(func, args, kwds).get()
        if done[0]:
            return done[1]
        raise done[1]

    # apply_async() is _core.PoolBase's: the ApplyResult is made, and
    # without callbacks completed, in C (csrc/result.c).

    def map(self, func, iterable, chunksize=None):
        """Apply `func` to each element of `iterable`; a list of results."""
        return self._map_async(func, iterable, _core.MODE_MAP, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None,
                  error_callback=None):
        """Asynchronous version of `map()`."""
        return self._map_async(func, iterable, _core.MODE_MAP, chunksize,
                               callback, error_callback)

    def starmap(self, func, iterable, chunksize=None):
        """Like `map()`, with each element unpacked: func(*element)."""
        return self._map_async(func, iterable, _core.MODE_STARMAP, chunksize).get()

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None):
        """Asynchronous version of `starmap()`."""
        return self._map_async(func, iterable, _core.MODE_STARMAP, chunksize,
                               callback, error_callback)

    def _default_chunksize(self, n):
        """map/starmap's chunk size when none is given.

        multiprocessing makes 4 chunks per worker, to spread the cost of
        sending each one.  A chunk costs cpool a few microseconds, so it
        makes 16 per worker of at most DEFAULT_CHUNK_MAX items: the workers
        stay busy to the end instead of one finishing a long last chunk
        alone, results come back while others are computed, and a chunk's
        messages fit in one ring record.  With maxtasksperchild a chunk is
        the task a worker counts, so there multiprocessing's size is kept."""
        per = 4 if self._maxtasksperchild else 16
        chunksize, extra = divmod(n, self._processes * per)
        chunksize += bool(extra)
        if not self._maxtasksperchild:
            chunksize = min(chunksize, DEFAULT_CHUNK_MAX)
        return chunksize

    def _map_async(self, func, iterable, mode, chunksize=None, callback=None,
                   error_callback=None):
        if os.getpid() != self._owner:
            raise _not_the_owner()      # (see _imap)
        token = object()
        try:
            with self._feed_lock:
                # Registered, then checked: once past the check, the call
                # is sent whole even if another thread (or a signal handler)
                # closes the pool meanwhile; close() leaves the core open
                # until it is done, as for an imap call's feeder.
                self._mapping[token] = threading.get_ident()
                self._check_running()
            return self._map_submit(func, iterable, mode, chunksize, callback,
                                    error_callback)
        finally:
            self._call_sent(self._mapping, token)

    def _call_sent(self, calls, key):
        """A map or imap call (calls[key]) has sent all it will: once the
        pool is closed, the last such call closes the core."""
        with self._feed_lock:
            calls.pop(key, None)
            done = not self._feeders and not self._mapping
        if done and self._state == CLOSE:
            self._core.close()

    def _map_submit(self, func, iterable, mode, chunksize, callback,
                    error_callback):
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)
        n = len(iterable)
        if chunksize is None:
            chunksize = self._default_chunksize(n)
        if n == 0:
            chunksize = 0
        elif chunksize < 1:
            # multiprocessing returns [None] * len(iterable) without running
            # anything
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        elif type(chunksize) is not int and hasattr(chunksize, "__index__"):
            chunksize = operator.index(chunksize)      # numpy's integers
        if chunksize > n:
            chunksize = n               # the same chunks, in a machine word
        result = MapResult(self, chunksize, n, callback,
                           error_callback=error_callback)
        if chunksize > 0:
            nchunks = result._number_left
            sent = 0
            try:
                if type(iterable) is list or type(iterable) is tuple:
                    for i, k in enumerate(range(0, n, chunksize)):
                        self._submit(result, i, mode, func, iterable, k,
                                     k + chunksize)
                        sent = i + 1
                else:
                    for i, chunk in enumerate(_sliced(iterable, chunksize, n)):
                        self._submit(result, i, mode, func, chunk)
                        sent = i + 1
            except Exception as e:
                # Iterating the input failed: the map fails with that error
                # (multiprocessing would wait forever for the missing chunks).
                for k in range(sent, nchunks):
                    result._set(k, (False, e))
            except BaseException:
                # Ctrl-C while pickling a chunk: the call is abandoned, and
                # its result must not stay in the cache holding the pool
                # (results of chunks already sent find no one and are
                # dropped).
                self._cache.pop(result._job, None)
                result._pool = None
                raise
        return result

    # -------------------------------------------------------------- imap

    def imap(self, func, iterable, chunksize=1, buffersize=None):
        """Lazy `map()`: results in order, each as soon as it and those
        before it are done.  The whole input is read and run in the
        background, as with multiprocessing, unless `buffersize` bounds the
        tasks in flight (at most that many results not yet taken by the
        consumer), as in Python 3.14's multiprocessing."""
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return self._imap(IMapIterator, func, iterable, chunksize, buffersize)

    def imap_unordered(self, func, iterable, chunksize=1, buffersize=None):
        """Like `imap()`, results in completion order."""
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize,
                          buffersize)

    def _imap(self, cls, func, iterable, chunksize, buffersize):
        if os.getpid() != self._owner:
            # before any of the pool's locks, which a forked child may have
            # inherited held by a thread it does not have
            raise _not_the_owner()
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        result = cls(self)
        result._init_bound(buffersize or UNBOUNDED)
        job = (result, func, iterable, chunksize)
        with self._feed_lock:
            if self._state != RUN:
                # closed by another thread since imap()'s check: as if
                # before it (once registered, the call is fed whole)
                self._cache.pop(result._job, None)
                result._pool = None
                raise ValueError("Pool not running")
            if self._idle_feeders:
                # A feeder thread from an earlier call: starting a thread
                # costs most of a millisecond here.
                feeder = self._idle_feeders.pop()
                self._feeders[feeder.thread] = result
                feeder.job = job
                go = feeder.wake.release
            else:
                feeder = _Feeder(job)
                feeder.thread = threading.Thread(
                    target=_feeder_main, args=(weakref.ref(self), feeder),
                    name="cpool-feeder", daemon=True)
                self._feeders[feeder.thread] = result
                self._feed_threads = [t for t in self._feed_threads
                                      if t.is_alive()]
                self._feed_threads.append(feeder.thread)
                go = feeder.thread.start
        # Outside the lock: the feeder runs the input at once, and a fork
        # there must not copy the lock held (a child that then stops the
        # feeder's code would wait for it forever).
        go()
        consumer = (_IMapUnorderedConsumer if cls is IMapUnorderedIterator
                    else _IMapConsumer)(result)
        if chunksize == 1:
            return consumer
        return (item for chunk in consumer for item in chunk)

    def _dismiss_idle_feeders(self):
        _dismiss_feeders(self._feed_lock, self._idle_feeders)

    def _feed(self, result, func, iterable, chunksize):
        """Feeder thread of one imap call (multiprocessing's task handler
        does this for all calls, one after another).  Reads a plain input (a
        list, a range, an array: see _PLAIN_INPUTS) in batches that grow
        while it is quick to produce (one C call per batch) and shrink when
        it is slow; any other input item by item, each sent before the next
        is read, since reading it may wait for those results."""
        i = 0
        try:
            try:
                i = self._feed_items(result, func, iterable, chunksize)
            except Exception as e:
                # Whatever went wrong here, the consumer gets it rather than
                # waiting for results that will not come.
                result._input_failed(result._n_read, (False, e))
                i = result._n_read + 1
            result._set_length(i)
        finally:
            self._call_sent(self._feeders, threading.current_thread())

    def _feed_items(self, result, func, iterable, chunksize):
        """_feed()'s loop; returns the number of results the call has."""
        result._n_read = i = 0      # items read so far (for _feed's errors)
        result._feeder = threading.current_thread()
        result._chunked = chunksize != 1
        batch = 1
        most = 256 if _plain_input(iterable) else 1   # see _PLAIN_INPUTS
        ended = False               # the input ran out, or raised
        try:
            if chunksize == 1:
                mode, tasks = _core.MODE_CALL1, iter(iterable)
            else:
                mode, tasks = _core.MODE_MAP, _chunks(iterable, chunksize)
        except Exception as e:
            # Not iterable: the consumer gets the TypeError, as with
            # multiprocessing.
            mode, tasks = _core.MODE_CALL1, _raising(e)
        while True:
            room = result._take_room(batch)
            if self._state == TERMINATE or room == 0:
                break
            t0 = time.perf_counter()
            bodies = []
            failed = None
            result._in_input = True     # (join() after terminate())
            try:
                for _ in range(room):
                    bodies.append(next(tasks))
            except StopIteration:
                pass
            except Exception as e:
                failed = e
            finally:
                with result._lock:
                    result._in_input = False
                    cut = result._cut
            if cut is not None:
                return cut + 1          # terminate() ended the call there
            if bodies:
                slow = time.perf_counter() - t0 > 20e-6 * len(bodies)
                batch = max(1, batch // 2) if slow else min(batch * 2, most)
                self._submit_batch(result, i, mode, func, bodies)
                result._n_read = i = i + len(bodies)
            if failed is not None:
                # The input iterable raised: the consumer gets it,
                # unchanged, after the items read before it.
                result._input_failed(i, (False, failed))
                return i + 1
            if len(bodies) < room:
                ended = True
                break
        if self._state == TERMINATE and not ended and _may_have_more(tasks):
            # Input was left unread: the consumer learns why it stops here.
            self._fail_unsent(result, i, 1)
            i += 1
        return i

    def _submit_batch(self, result, first, mode, func, bodies):
        try:
            self._core.submit_many(result._job, first, mode, func, bodies)
            return
        except Exception:
            # submit_many() queues all of them or none
            if self._state == TERMINATE:
                self._fail_unsent(result, first, len(bodies))
                return
        # Find the item(s) that cannot be sent: as with multiprocessing,
        # they fail and the rest go on.
        for k, body in enumerate(bodies):
            try:
                self._core.submit(result._job, first + k, mode, func, body, True)
            except Exception as e:
                if self._state == TERMINATE:
                    self._fail_unsent(result, first + k, len(bodies) - k)
                    return
                result._set(first + k, (False, e))

    @staticmethod
    def _fail_unsent(result, first, n):
        """Items read but never queued, the pool terminated meanwhile (by
        another thread, or by pickling them): each gets the error, so the
        consumer never waits for them."""
        for i in range(first, first + n):
            result._set(i, (False, PoolTerminatedError(
                "the pool was terminated before item %d was sent" % i)))

    # ---------------------------------------------------------- lifetime

    def close(self):
        """Accept no more tasks; the workers exit once all work is done."""
        if os.getpid() != self._owner:
            # A forked child's copy: the pool is the parent's; only the copy
            # closes (as multiprocessing's does, touching no lock).
            if self._state == RUN:
                self._state = CLOSE
            return
        with self._feed_lock:
            # Under the lock that map and imap calls register under, so that
            # each is either refused or sent whole.
            if self._state != RUN:
                return
            self._state = CLOSE
            feeding = list(self._feeders.values())
            busy = feeding or self._mapping
        self._pool              # noqa: B018 (kept: see _keep())
        self._dismiss_idle_feeders()
        for result in feeding:
            result._release_on_completion()
        if not busy:
            # else the last of those calls closes the core when it is done
            self._core.close()

    def terminate(self):
        """Stop the workers now.  Unfinished results fail with
        PoolTerminatedError."""
        self._state = TERMINATE
        if os.getpid() != self._owner:
            return          # a forked child's copy (see close())
        core = getattr(self, "_core", None)
        if core is not None:
            # The workers' objects made so far are kept (see _keep()); the
            # others are made when the list is read.
            self._keep(core.workers(None)[0])
        self._dismiss_idle_feeders()
        self._finalize_now(quiet=False)
        with self._feed_lock:
            waiting = list(self._feeders.values())
        for result in waiting:
            # Its feeder may wait for room (woken: it sees TERMINATE and
            # stops) or in the input, for items that may never come: the
            # consumer is not left waiting for them.
            result._cut_input()

    def _finalize_now(self, quiet):
        # The finalizer, run now if it has not run.  Not by calling it: once
        # weakref's own exit function has started, that does nothing.
        finalizer = self._terminate.detach()
        if finalizer is not None:
            _, func, args, _ = finalizer
            func(*args, quiet=quiet)

    def join(self):
        """Wait for the workers to exit (after close() or terminate())."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        if os.getpid() != self._owner:
            return          # a forked child has no workers to wait for
        with self._feed_lock:
            me = threading.current_thread()
            if me in self._feeders or me.ident in self._mapping.values():
                # multiprocessing hangs here
                raise RuntimeError(
                    "join() in the input of one of the pool's own map or imap "
                    "calls would wait for itself: the call ends only once its "
                    "input has")
            feeders = list(self._feed_threads)
            reading = {t for t, r in self._feeders.items() if r._in_input}
        for f in feeders:
            # Once terminated, not a feeder waiting in its input, which may
            # never give it back (it stops once it does).  Nor one not
            # started yet (its imap() call is between registering and
            # starting it): the core stays open until its call is fed, and
            # waiting for the collector below covers it.
            if f is not threading.current_thread() and f.ident is not None \
                    and not (self._state == TERMINATE and f in reading):
                f.join()
        if self._collector is not threading.current_thread():
            self._collector.join()
        if _core.SANITIZED:
            me = threading.current_thread()
            _wait_os_exit([t for t in [self._collector] + feeders if t is not me])
        # The workers' objects kept in the list hold no pidfds once ended.
        for w in self._kept_workers:
            w._let_go()


# What inspect.signature(Pool) tells (help(), IDEs): __init__'s parameters,
# not __new__'s (*args, **kwargs).  A subclass's own __init__ still wins.
Pool.__new__.__wrapped__ = Pool.__init__
