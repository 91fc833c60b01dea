"""Task functions for test_crash.py (importable: tasks are pickled by name)."""
import os
import random
import signal
import threading
import time

PARENT = os.getpid()


def square(x):
    return x * x


def exit_with(code):
    os._exit(code)


def kill_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(5)


def die_on(x, bad, code=9):
    if x in bad:
        os._exit(code)
    return x


def log_and_return(path, x, bad=()):
    with open(path, "a") as f:
        f.write("%d\n" % x)
    if x in bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


class ExitOnUnpickle:
    """Unpickling this in a worker ends the worker."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (os._exit, (self.code,))


def _raise_value_error(msg):
    raise ValueError(msg)


class RaiseOnUnpickle:
    def __reduce__(self):
        return (_raise_value_error, ("cannot unpickle me",))


class ExitOnPickle:
    """Pickling this (the worker sending it as a result) ends the worker."""

    def __reduce__(self):
        os._exit(11)


def return_exit_on_pickle():
    return ExitOnPickle()


def _fail_in_parent():
    if os.getpid() == PARENT:
        raise ValueError("result cannot be rebuilt in the parent")
    return "rebuilt"


class BadInParent:
    def __reduce__(self):
        return (_fail_in_parent, ())


def return_bad_in_parent():
    return BadInParent()


class LockedError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_locked_error():
    raise LockedError("the lock went with it")


def init_exit():
    os._exit(4)


def init_raise():
    raise RuntimeError("initializer refused")


def init_raise_base(kind):
    if kind == "SystemExit":
        raise SystemExit(5)
    raise {"KeyboardInterrupt": KeyboardInterrupt,
           "GeneratorExit": GeneratorExit}[kind]()


def init_stall_first(path):
    """The first worker to start stalls here (writing its pid to `path`),
    until it is killed; the others go on."""
    tmp = "%s.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return
    finally:
        os.unlink(tmp)
    time.sleep(60)


def init_raise_locked():
    raise LockedError("the initializer's lock went with it")


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def c_sleep(seconds):
    # time.sleep releases the GIL and sits in C: the worker is "stuck in C".
    time.sleep(seconds)


def started_then_sleep(started_dir, seconds):
    # Say so (a file named after this worker's pid), then sleep in C.
    open(os.path.join(started_dir, str(os.getpid())), "w").close()
    time.sleep(seconds)


def ignore_sigterm_then_wait(started_path, seconds):
    # A task that shrugs off SIGTERM: multiprocessing's terminate() would
    # wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(started_path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(started_path + ".tmp", started_path)
    time.sleep(seconds)


def big_result_then_die(n):
    # Start writing a result far larger than a ring and get killed midway.
    t = threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL))
    t.start()
    return b"z" * n


def pid():
    return os.getpid()


_first_random = None


def first_random(delay):
    """(pid, the first number this process drew from random) after delay."""
    global _first_random
    if _first_random is None:
        _first_random = random.getrandbits(64)
    time.sleep(delay)
    return os.getpid(), _first_random


def fork_and_return(x):
    """Fork; both processes return x into the worker (a buggy task).  The
    worker's copy returns its child's pid."""
    child = os.fork()
    return child if child else x


def append_line(path, i):
    with open(path, "a") as f:
        f.write("%d\n" % i)
    return i


def reuse_doorbell_fd(path):
    """Close this worker's eventfd (its doorbell to the parent) and let a
    file take its number: the worker's wake-ups now land in that file."""
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if target == "anon_inode:[eventfd]":
            f = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(f, int(name))       # the eventfd's number is the file's now
            os.close(f)
            return True
    return None


def close_all_fds(x):
    os.closerange(3, 1 << 16)
    return x


class TwoArgError(Exception):
    """Pickles as TwoArgError(*args) with one arg: rebuilding it raises
    TypeError (multiprocessing's result thread dies of that)."""

    def __init__(self, a, b):
        super().__init__(a)


def raise_two_arg_error(x):
    raise TwoArgError(x, "b")


def stop_at_2(x):
    if x == 2:
        raise StopIteration("stop at", x)
    return x


def print_line(x):
    print("line from task", x)
    return x


def register_teardown(path):
    """Initializer: a multiprocessing Finalize callback (a worker teardown
    idiom) that appends this worker's pid to `path` when it exits."""
    import os
    from multiprocessing import util
    util.Finalize(None, _append_pid, (path, os.getpid()), exitpriority=10)


def _append_pid(path, pid):
    with open(path, "a") as f:
        f.write("%d\n" % pid)


def start_endless_thread(x):
    """Start a non-daemon thread that never ends: the worker's normal exit
    would wait for it forever."""
    import threading
    threading.Thread(target=threading.Event().wait).start()
    return x
