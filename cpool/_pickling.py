"""multiprocessing's pickling reducers for cpool's messages.

multiprocessing pickles with ForkingPickler: copyreg's dispatch table with
the reducers registered through ForkingPickler.register() over it (sockets,
connections, and whatever libraries register, e.g. for their tensors).
cpool pickles with plain pickle where that gives the same bytes (no such
reducer for anything in the message) and with this table otherwise: the C
core uses dumps() below when a library registered reducers of its own, or
when plain pickle refused an object (a socket, say), and gives the table to
the pickler of large messages."""
import copyreg
import importlib
import io
import pickle

from multiprocessing.reduction import ForkingPickler

EXTRA_REDUCERS = ForkingPickler._extra_reducers      # changed in place
BASELINE = len(EXTRA_REDUCERS)   # multiprocessing's own (sockets, connections)

def dispatch_table():
    """copyreg's table with multiprocessing's reducers over it, made anew
    for each pickler as ForkingPickler makes it (a reducer registered again
    for the same type replaces the old one)."""
    table = dict(copyreg.dispatch_table)
    table.update(EXTRA_REDUCERS)
    return table


def dumps(obj, protocol=5):
    f = io.BytesIO()
    p = pickle.Pickler(f, protocol)
    p.dispatch_table = dispatch_table()
    p.dump(obj)
    return f.getvalue()


def named_global(module, name):
    """module.name: what cpool hands numpy in place of its _frombuffer while
    unpickling pickles as (the C core's FromBuffer), so that the function
    itself still arrives as numpy's."""
    return getattr(importlib.import_module(module), name)
