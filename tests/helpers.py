"""Task functions and helper objects for the cpool test suite.

Tasks are pickled *by reference* (module + qualified name), so everything a
worker has to run lives here, at module level, in a module importable as
``helpers`` (conftest.py puts this directory on sys.path and PYTHONPATH).

Cross-process synchronisation uses files (``Gate``): a gated task blocks
until the parent creates the gate file, so tests never rely on sleeping for
a "long enough" time.  Every gated task has a fallback deadline
(GATE_TIMEOUT) so a broken implementation fails a test instead of hanging
the run.
"""
import collections
import copyreg
import dataclasses
import datetime
import enum
import functools
import itertools
import multiprocessing
import os
import sys
import threading
import time

# A gated task that nobody opens gives up after this many seconds.  In a
# passing run gates are always opened (or the worker is terminated), so
# this is never waited for.
GATE_TIMEOUT = 20.0
# How long the *parent* waits for a worker to report that it started.
START_TIMEOUT = 20.0
_POLL = 0.002


# ---------------------------------------------------------------- plain tasks

#: A multiprocessing.sharedctypes array a test sets before making its pool,
#: so that forked workers share it (set_flag).
FLAGS = None


def set_flag(i):
    FLAGS[i] = 1
    return i


def square(x):
    return x * x


def mul(x, y):
    return x * y


def identity(x):
    return x


_counter = None


def set_counter(value):
    """Initializer: the multiprocessing.Value that counted_square counts in."""
    global _counter
    _counter = value


def counted_square(x):
    with _counter.get_lock():
        _counter.value += 1
    return x * x


def records(n):
    return [{"name": "item", "value": i, "kind": "a"} for i in range(n)]


def echo_args(*args, **kwds):
    return args, kwds


def append_one(seq, *more):
    """Mutates its argument: shows whether items of a chunk arrive shared."""
    seq.append(1)
    return len(seq)


def const_42():
    return 42


def power(base, exp):
    return base ** exp


def getpid(_=None):
    return os.getpid()


def array_total(a):
    return float(a.sum())


def ones(n, value=1.0):
    import numpy
    return numpy.full(n, float(value))


def first_and_last(buf):
    time.sleep(0.002)       # let the input run ahead of the worker
    return buf[0], buf[-1]


def read_only_ones(n, value=1.0):
    a = ones(n, value)
    a.flags.writeable = False
    return a


def square_and_pid(x):
    return x * x, os.getpid()


def raise_value_error(x=None):
    raise ValueError("bad value", x)


def square_unless(x, bad):
    if x == bad:
        raise ValueError("bad item", x)
    return x * x


def fail_at(x, bad=5):
    """Single-argument task usable with map(): fails for x == bad."""
    if x == bad:
        raise KeyError(x)
    return x * x


def raise_key_error():
    raise KeyError("key")


def raise_runtime_error_with_comment():
    raise RuntimeError(123)  # marker-comment-in-worker-source


# ------------------------------------------------------- picklable "callables"

class Multiplier:
    """Picklable object whose bound method is used as a task."""

    def __init__(self, factor):
        self.factor = factor

    def mul(self, x):
        return x * self.factor

    @classmethod
    def cls_name(cls, x):
        return "%s:%s" % (cls.__name__, x)

    @staticmethod
    def negate(x):
        return -x


# --------------------------------------------------------------- initializer

_init_calls = 0
_init_tag = None


class KeysMapping:
    """A mapping that is not a dict: keys() and [] only, as ** needs."""

    def __init__(self, **items):
        self.items = items

    def keys(self):
        return self.items.keys()

    def __getitem__(self, key):
        return self.items[key]


def init_worker(*args):
    global _init_calls, _init_tag
    _init_calls += 1
    _init_tag = args


def init_state(_=None):
    """Return what the initializer left in this worker."""
    return os.getpid(), _init_calls, _init_tag


def init_state_gated(gate_path, started_path):
    gated(None, gate_path, started_path)
    return init_state()


# ------------------------------------------------------------------- errors

class SayWhenError(ValueError):
    pass


def exception_throwing_generator(total, when):
    """Yield 0..total-1, raising SayWhenError at position `when` (-1: at once)."""
    if when == -1:
        raise SayWhenError("Somebody said when")
    for i in range(total):
        if i == when:
            raise SayWhenError("Somebody said when", i)
        yield i


def generator_raising(exc, total, when):
    """Yield 0..total-1 and raise the given exception *object* at `when`."""
    for i in range(total):
        if i == when:
            raise exc
        yield i


class SizedRaisingIterable:
    """An iterable *with* __len__ whose iteration raises at position `when`."""

    def __init__(self, length, when):
        self.length = length
        self.when = when

    def __len__(self):
        return self.length

    def __iter__(self):
        for i in range(self.length):
            if i == self.when:
                raise SayWhenError("sized iterable said when", i)
            yield i


# Objects the plain-data encoding carries (csrc/codec.c: enc_object), and
# look-alikes it must leave to pickle.  Module level, so that both pickle
# and the encoding find them by name in a worker too.
Pair = collections.namedtuple("Pair", "a b")


@dataclasses.dataclass
class Rec:
    name: str
    value: float
    tags: list


@dataclasses.dataclass(frozen=True)
class FrozenRec:
    x: int
    y: object = None


class Plain:
    """A plain class: pickle rebuilds it with object.__new__ and its dict."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __eq__(self, other):
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None


class Restored(Plain):
    """Rebuilt through its __setstate__, which marks what it rebuilt."""

    def __setstate__(self, state):
        self.__dict__.update(state, restored=True)


class TenfoldPair(Pair):
    """A namedtuple whose __new__ is its own: pickle calls it on loading."""
    __slots__ = ()

    def __new__(cls, a, b):
        return super().__new__(cls, a, b * 10)


class Slotted:
    __slots__ = ("a",)

    def __init__(self, a=1):
        self.a = a

    def __eq__(self, other):
        return type(other) is type(self) and other.a == self.a


class Reduced(Plain):
    def __reduce__(self):
        return (Reduced, (), {"via": "reduce"})


class WithGetstate(Plain):
    def __getstate__(self):
        return {"via": "getstate"}


class Lazy(Plain):
    def __getattr__(self, name):
        raise AttributeError(name)


class InCopyreg(Plain):
    pass


copyreg.pickle(InCopyreg, lambda o: (InCopyreg, (), {"via": "copyreg"}))


class WithNew(Plain):
    def __new__(cls, *args, **kw):
        return super().__new__(cls)


class Outer:
    class Inner(Plain):
        pass


class ErrorRecord(Exception):
    pass


def make_objects(i):
    """One of each kind of object the encoding carries, nested, and dates,
    times, sets and enum members."""
    return [Pair(i, -i), Rec("r%d" % i, i / 2, [i, Pair(1, 2)]),
            FrozenRec(i, (i, "y")), Plain(n=i, inner=Plain(s="x"), d={"k": [i]}),
            TenfoldPair(i, 1), Restored(v=i), Plain(),
            {"at": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
                   + datetime.timedelta(seconds=i),
             "day": datetime.date(2026, 1, 1 + i % 28), "t": datetime.time(i % 24),
             "tags": {i, "t"}, "frozen": frozenset({(i, i)}),
             "enums": [Color.GREEN, Level.HIGH, Perm.R | Perm.X]}]


class MisSized:
    """An iterable whose __len__ says `length` while it yields `items` items
    (0, 1, 2, ...; endless if items is None), as pairs if `pairs`."""

    def __init__(self, length, items, pairs=False):
        self.length = length
        self.items = items
        self.pairs = pairs

    def __len__(self):
        return self.length

    def __iter__(self):
        it = itertools.count() if self.items is None else range(self.items)
        return ((i, i) for i in it) if self.pairs else iter(it)


class TwoArgError(Exception):
    """Exception with a custom two-argument __init__ that calls super()."""

    def __init__(self, a, b):
        super().__init__(a, b)
        self.a = a
        self.b = b


class AttrOnlyError(Exception):
    """Custom __init__ that never calls super().__init__ (args come from __new__)."""

    def __init__(self, code, detail):
        self.code = code
        self.detail = detail

    def __str__(self):
        return "code=%s detail=%s" % (self.code, self.detail)


def raise_two_arg_error(a, b):
    raise TwoArgError(a, b)


def raise_attr_only_error(code, detail):
    raise AttrOnlyError(code, detail)


class LockedError(Exception):
    """An exception whose instance cannot be pickled (holds a lock)."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_locked_error(msg):
    raise LockedError(msg)


class Unpicklable:
    """Instances refuse to be pickled with a distinctive RuntimeError."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle Unpicklable")


def return_lambda():
    return lambda: 42


def return_lock():
    return threading.Lock()


def return_unpicklable_in_list(x):
    """Fine for most x, unpicklable result for x == 3."""
    if x == 3:
        return threading.Lock()
    return x


# ---------------------------------------------------------------- gating

def _write_atomically(path, text):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def wait_for_path(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("%s did not appear within %.1fs" % (path, timeout))
        time.sleep(_POLL)


def gated(value, gate_path, started_path=None):
    """Report start (pid) to `started_path`, block until `gate_path` exists,
    then return `value`."""
    if started_path is not None:
        _write_atomically(started_path, str(os.getpid()))
    wait_for_path(gate_path, GATE_TIMEOUT)
    return value


def maybe_gated(value, gate_path=None):
    """Return immediately unless a gate is given."""
    if gate_path is not None:
        wait_for_path(gate_path, GATE_TIMEOUT)
    return value


class HoldOnDelete:
    """A task's value: pickled as the worker's pid; when the worker lets it
    go (after it sent the result), it waits for `gate_path` first."""

    def __init__(self, gate_path):
        self.gate_path = gate_path
        self.pid = os.getpid()

    def __reduce__(self):
        return (int, (self.pid,))

    def __del__(self):
        wait_for_path(self.gate_path, GATE_TIMEOUT)


def hold_after_result(gate_path):
    return HoldOnDelete(gate_path)


def gated_item(item):
    """Single-argument form for map/imap: item is (value, gate_path_or_None)."""
    value, gate_path = item
    return maybe_gated(value, gate_path)


class Gate:
    """Parent-side handle for a file gate in a temporary directory."""

    def __init__(self, directory, name="gate"):
        self.path = os.path.join(str(directory), name)
        self._started_count = 0
        self._dir = str(directory)
        self._name = name

    def started_path(self, n=None):
        if n is None:
            n = self._started_count
            self._started_count += 1
        return os.path.join(self._dir, "%s.started.%d" % (self._name, n))

    def open(self):
        if not os.path.exists(self.path):
            _write_atomically(self.path, "open")

    def wait_started(self, started_path, timeout=START_TIMEOUT):
        """Block until the gated task has started; return its worker pid."""
        wait_for_path(started_path, timeout)
        with open(started_path) as f:
            return int(f.read())


# -------------------------------------------------------------- nested pools

def nested_cpool_map(n):
    import cpool
    with cpool.Pool(2) as p:
        return p.map(square, range(n)), os.getpid()


def nested_names(path):
    """In a worker: this worker's name, and those of a pool's workers made
    here, as they call themselves and as the pool lists them."""
    import cpool
    import multiprocessing
    with cpool.Pool(2) as p:
        inner = p.map(functools.partial(met_name, path), range(2), chunksize=1)
        listed = [w.name for w in p._pool]
    return multiprocessing.current_process().name, sorted(inner), sorted(listed)


def met_name(path, _item=None):
    """meet(path), then the name of the worker it ran in."""
    import multiprocessing
    meet(path)
    return multiprocessing.current_process().name


# ------------------------------------------------------- parent-side helpers

def call_within(fn, timeout, *args):
    """Run fn(*args) in a helper thread; fail if it does not finish in time.

    Used for blocking calls that have no timeout parameter (e.g. next() on
    the generator imap returns for chunksize > 1).  Returns fn's result or
    re-raises its exception.
    """
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError("%r did not finish within %.1fs" % (fn, timeout))
    if "error" in box:
        raise box["error"]
    return box["value"]


def process_gone(pid):
    """True if no process (not even a zombie) with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def touch(item):
    """Leave a trace of item: (directory, i) makes directory/i."""
    directory, i = item
    open(os.path.join(directory, str(i)), "w").close()
    return i


SHARED_QUEUE = None     # a multiprocessing.Queue a test makes before its pool


def put_in_shared_queue(x):
    SHARED_QUEUE.put(x)
    return x


def whoami(_=None):
    """How multiprocessing sees this process."""
    import multiprocessing
    import sys
    me = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    return (me.name, me.daemon, len(me._identity),
            parent.pid if parent is not None else None,
            parent.is_alive() if parent is not None else None,
            sys.stdin.read())


def name_and_pid(_=None):
    import multiprocessing
    return multiprocessing.current_process().name, os.getpid()


def register_exit_finalizer(path):
    """A multiprocessing finalizer that leaves a file when this process
    exits normally."""
    from multiprocessing import util

    def leave_trace():
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    util.Finalize(None, leave_trace, exitpriority=10)
    return os.getpid()


def send_hi(sock):
    sock.sendall(b"hi")
    return "sent"


class Registered:
    """A type a test registers a ForkingPickler reducer for."""

    def __init__(self, v):
        self.v = v


def rebuild_registered(v):
    return Registered(("rebuilt", v))


def reduce_registered(obj):
    return rebuild_registered, (obj.v,)


def registered_value(obj):
    return obj.v


def rebuild_registered_again(v):
    return Registered(("again", v))


def reduce_registered_again(obj):
    return rebuild_registered_again, (obj.v,)


def _write_later(path):
    time.sleep(0.1)
    with open(path, "w") as f:
        f.write("done")


def start_writer_thread(path):
    """A task that leaves a non-daemon thread behind, writing path later."""
    threading.Thread(target=_write_later, args=(path,)).start()
    return path


_executor = None


def submit_writer(path):
    """A task that leaves work queued in a concurrent.futures executor."""
    global _executor
    if _executor is None:
        from concurrent.futures import ThreadPoolExecutor
        _executor = ThreadPoolExecutor(1)
    _executor.submit(_write_later, path)
    return path


class WeakDict(dict):
    """A dict that can be weakly referenced."""


def child_gets_ctrl_c(_=None):
    """Whether a program this task runs gets SIGINT's default disposition
    (Python then raises KeyboardInterrupt on Ctrl-C)."""
    import subprocess
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60)
    return out.stdout.strip()


def pipe_handshake(w, r):
    """Say the task runs (a byte on fd w), then wait for one on fd r.  The
    pipes are made before the pool, so its workers have them."""
    os.write(w, b"x")
    os.read(r, 1)
    return 1


def meet(path, _item=None, n=2):
    """Wait (up to 60 s) until n tasks run at once, each in its own worker:
    map(functools.partial(meet, path), range(n), chunksize=1) returns once
    n workers have started.  path: an empty directory."""
    open(os.path.join(path, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(path)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("only %d of %d workers met" % (len(os.listdir(path)), n))
        time.sleep(0.001)
    return os.getpid()


def signal_parent(sig, then_exit=False):
    """Send sig to os.getppid(), as a task tells the program that started
    it; with then_exit, the worker ends right after."""
    os.kill(os.getppid(), sig)
    if then_exit:
        os._exit(0)
    return os.getpid()


class NoDaemonProcess(multiprocessing.Process):
    """The "non-daemonic pool" recipe: a Process whose daemon flag stays
    False, so that pool workers may start processes of their own."""

    @property
    def daemon(self):
        return False

    @daemon.setter
    def daemon(self, value):
        pass


class NoDaemonContext(type(multiprocessing.get_context("fork"))):
    Process = NoDaemonProcess


def start_a_process(_=None):
    """Start and join a multiprocessing.Process from a worker: what a
    daemonic worker may not do.  Returns what the worker is, and the
    child's exit code."""
    me = multiprocessing.current_process()
    child = multiprocessing.Process(target=square, args=(2,))
    child.start()
    child.join(60)
    return type(me).__name__, me.daemon, me.name.rsplit("-", 1)[0], child.exitcode


def fork_to_check_later(check):
    """Fork a child that waits, then runs check() and reports its verdict.
    Returns go(): lets the child run, and returns True if check() was true
    there and the child exited cleanly."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.read(go_r, 1)
            os.write(w, b"1" if check() else b"0")
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)

    def go():
        os.write(go_w, b"x")
        seen = os.read(r, 1)
        status = os.waitpid(pid, 0)[1]
        os.close(r)
        os.close(go_w)
        return seen == b"1" and status == 0
    return go



def pyheap_after_churn(n):
    """In a worker: make and free n ints, then say what the worker keeps of
    the freed object arenas (cpool._core.pyheap_info())."""
    from cpool import _core
    xs = list(range(10**9, 10**9 + n))
    assert len(xs) == n
    del xs
    return _core.pyheap_info()


class Color(enum.Enum):
    RED = 1
    GREEN = "green"
    TUPLE = (1, "a")


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


def _reduce_by_name(member, proto):
    return getattr, (type(member), member._name_)


class ByName(enum.Enum):
    """Pickled by name (a __reduce_ex__ of its own): through pickle."""
    __reduce_ex__ = _reduce_by_name
    A = 1
