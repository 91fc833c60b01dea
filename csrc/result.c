/*
 * result.c - apply_async() in C: the method (PoolBase, the C base of
 * cpool.Pool, at the end of this file) and its result objects (ResultBase).
 *
 * cpool.pool.ApplyResult derives from ResultBase (this file) and from
 * multiprocessing.pool.ApplyResult, so its instances are multiprocessing's
 * ApplyResult objects.  ResultBase holds the attributes that class's
 * __init__ and _set give an instance in C fields, exposed under the same
 * names (_pool, _ready, _done, _job, _cache, _callback, _error_callback,
 * _success, _value): making, completing and reading a result touch no
 * instance dict, and ready() and get() of a finished result run no Python
 * frame.
 *
 *   made:       _pool, _ready = False, _job = next(job_counter), _cache,
 *               _callback, _error_callback; cache[_job] = the result
 *   completed:  _success, _value, _ready = True, _done released if there
 *               is one, cache.pop(_job), _pool = None
 *
 * _done, a Lock held until the result is set, is made only for a waiter
 * that comes before the result (done_lock()); the wait itself is
 * ApplyResult.wait() in Python.
 *
 * The garbage collector tracks a result made by apply_async() without
 * callbacks only from its completion on, and then only if it can be part of
 * a reference cycle.  In a burst of apply_async() calls most results are
 * pending when a collection runs, and walking them at every collection was
 * most of the collector's cost (4 of 26 ms in a burst of 2*10^4); the
 * finished ones, held in a list by the caller, made most of the rest (3 of
 * 4 ms in another such burst).
 *   - Pending and untracked, a result only keeps what it holds alive, which
 *     is alive anyway: the result is in its pool's cache, which the pool's
 *     Core and collector thread hold until the result completes.
 *   - At completion it lets go of the pool and the cache, and what it
 *     still holds is its lock, its job number, True or False, and its
 *     value.  If the value cannot lead back to anything (None, a number, a
 *     string, bytes: no object the collector tracks or may track later),
 *     the result cannot be in a cycle, and it stays untracked; otherwise it
 *     is tracked (set_result()).
 *   - Anything that could later give it a way back tracks it first:
 *     setting any attribute (Result_setattro, which multiprocessing's
 *     ApplyResult.__init__ and _set go through too, and the setters of the
 *     C fields, for their descriptors called directly) and reaching its
 *     instance dict (the __dict__ descriptor, which pool.py's ApplyResult
 *     takes from here).  A result handed to its Python _set() because a
 *     callback was set after all is tracked too (cp_result_complete()).
 *     Not covered: multiprocessing's own __dict__ descriptor (its class
 *     still has one) called directly on a finished result, and the dict
 *     gc.get_referents() hands out; a cycle made through those is not
 *     collected.
 *
 * A result with a callback or an error callback is completed by its Python
 * _set() (which runs the callback and reports what it raises).  pool.py
 * registers the class, the job counter, the lock type and
 * multiprocessing.TimeoutError (set_result_type).
 *
 * Needs the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

#include "cpool.h"

typedef struct {
    PyObject_HEAD
    PyObject *pool;
    PyObject *done;
    PyObject *job;
    PyObject *cache;
    PyObject *callback;
    PyObject *error_callback;
    PyObject *success;
    PyObject *value;
    char ready;
} Result;

static PyTypeObject *result_type;   /* cpool.pool.ApplyResult */
static PyObject *job_counter;       /* multiprocessing.pool.job_counter */
static PyObject *lock_type;         /* threading.Lock */
static PyObject *timeout_error;     /* multiprocessing.TimeoutError */
static PyObject *str_acquire, *str_release, *str_wait;
static PyObject *str_next_locked, *str_taken, *str_popleft;   /* Consumer */
static PyObject *str_run;   /* "RUN", interned as pool.py's constant is */
static PyObject *no_args;   /* () */
static PyObject *no_kwds;   /* {}, never modified */

PyObject *
cp_result_set_type(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], cp_state->result_base)) {
        PyErr_SetString(PyExc_TypeError,
                        "set_result_type(ApplyResult, job_counter, Lock, "
                        "TimeoutError), ApplyResult deriving from ResultBase");
        return NULL;
    }
    if ((str_acquire == NULL &&
         (str_acquire = PyUnicode_InternFromString("acquire")) == NULL) ||
        (str_release == NULL &&
         (str_release = PyUnicode_InternFromString("release")) == NULL) ||
        (str_wait == NULL &&
         (str_wait = PyUnicode_InternFromString("wait")) == NULL) ||
        (str_next_locked == NULL &&
         (str_next_locked = PyUnicode_InternFromString("_next_locked")) == NULL) ||
        (str_taken == NULL &&
         (str_taken = PyUnicode_InternFromString("_taken")) == NULL) ||
        (str_popleft == NULL &&
         (str_popleft = PyUnicode_InternFromString("popleft")) == NULL))
        return NULL;
    Py_XSETREF(result_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(job_counter, Py_NewRef(args[1]));
    Py_XSETREF(lock_type, Py_NewRef(args[2]));
    Py_XSETREF(timeout_error, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

void
cp_result_clear_types(void)
{
    Py_CLEAR(result_type);
    Py_CLEAR(job_counter);
    Py_CLEAR(lock_type);
    Py_CLEAR(timeout_error);
    Py_CLEAR(str_acquire);
    Py_CLEAR(str_release);
    Py_CLEAR(str_wait);
    Py_CLEAR(str_next_locked);
    Py_CLEAR(str_taken);
    Py_CLEAR(str_popleft);
    Py_CLEAR(str_run);
    Py_CLEAR(no_args);
    Py_CLEAR(no_kwds);
}

/* A new ApplyResult of `pool`, registered in `cache`; its job in *job. */
PyObject *
cp_result_new(PyObject *pool, PyObject *cache, PyObject *callback,
              PyObject *error_callback, uint64_t flags, uint64_t *job)
{
    if (result_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cpool: result type not registered");
        return NULL;
    }
    Result *r = (Result *)result_type->tp_alloc(result_type, 0);
    if (r == NULL)
        return NULL;
    r->job = PyIter_Next(job_counter);
    if (r->job == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "cpool: job counter exhausted");
        Py_DECREF(r);
        return NULL;
    }
    *job = PyLong_AsUnsignedLongLong(r->job);
    if (flags != 0 && !PyErr_Occurred()) {
        /* The flag is part of the job number: the key in the cache, _job,
         * and what the worker sends back. */
        *job |= flags;
        Py_SETREF(r->job, PyLong_FromUnsignedLongLong(*job));
        if (r->job == NULL) {
            Py_DECREF(r);
            return NULL;
        }
    }
    r->pool = Py_NewRef(pool);
    r->cache = Py_NewRef(cache);
    r->callback = Py_NewRef(callback);
    r->error_callback = Py_NewRef(error_callback);
    if (PyErr_Occurred() || PyDict_SetItem(cache, r->job, (PyObject *)r) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    if (callback == Py_None && error_callback == Py_None)
        PyObject_GC_UnTrack(r);     /* until completion: see the top */
    return (PyObject *)r;
}

static PyObject *
or_none(PyObject *o)
{
    return o != NULL ? o : Py_None;
}

/* done_lock(result) -> its _done lock, made (held) if it has none yet, or
 * None if the result is ready and has none.  Under the GIL, with no Python
 * code run between the checks and the store, so it cannot interleave with
 * the completion (_ready set, then _done released if there is one). */
PyObject *
cp_result_done_lock(PyObject *Py_UNUSED(m), PyObject *obj)
{
    if (lock_type == NULL || !PyObject_TypeCheck(obj, cp_state->result_base)) {
        PyErr_SetString(PyExc_TypeError, "done_lock() takes a registered ApplyResult");
        return NULL;
    }
    Result *r = (Result *)obj;
    if (r->done != NULL && r->done != Py_None)
        return Py_NewRef(r->done);
    if (r->ready)
        Py_RETURN_NONE;
    /* A fresh lock is free: acquiring it does not wait (nor release the
     * GIL), and no Python code runs in between. */
    PyObject *lock = PyObject_CallNoArgs(lock_type);
    PyObject *got = lock ? PyObject_CallMethodNoArgs(lock, str_acquire) : NULL;
    Py_XDECREF(got);
    if (got == NULL) {
        Py_XDECREF(lock);
        return NULL;
    }
    Py_XSETREF(r->done, Py_NewRef(lock));
    return lock;
}

/* Hand a result (left untracked, see the top) to the garbage collector. */
static void
track(PyObject *obj)
{
    if (!PyObject_GC_IsTracked(obj))
        PyObject_GC_Track(obj);
}

/* Whether `v` holds no reference the garbage collector follows, now or
 * later: not a container, or a tuple the collector found holds none (the
 * test CPython applies before it stops tracking a tuple). */
static int
cannot_lead_back(PyObject *v)
{
    if (!PyObject_IS_GC(v))
        return 1;
    return PyTuple_CheckExact(v) && !PyObject_GC_IsTracked(v);
}

/* Set r's outcome (stealing `value`), mark it ready, release its _done lock
 * if `wake` and it has one, and take it out of the cache; as _set's
 * finally: clause, every step is attempted. */
static void
set_result(Result *r, int ok, PyObject *value, int wake)
{
    PyObject *obj = (PyObject *)r;
    Py_INCREF(obj);       /* the cache, which we remove it from below, may
                           * hold the only reference */
    Py_XSETREF(r->success, Py_NewRef(ok ? Py_True : Py_False));
    Py_XSETREF(r->value, value);
    /* Untracked while pending, and from now on too if nothing it keeps can
     * lead back to it (see the top). */
    if (!PyObject_GC_IsTracked(obj) &&
        (!cannot_lead_back(r->value) || or_none(r->callback) != Py_None ||
         or_none(r->error_callback) != Py_None))
        PyObject_GC_Track(obj);
    r->ready = 1;
    if (wake && r->done != NULL && r->done != Py_None) {
        PyObject *res = PyObject_CallMethodNoArgs(r->done, str_release);
        if (res == NULL)
            PyErr_WriteUnraisable(obj);
        Py_XDECREF(res);
    }
    PyObject *cache = or_none(r->cache), *job = or_none(r->job);
    if ((PyDict_CheckExact(cache) ? PyDict_DelItem(cache, job)
                                  : PyObject_DelItem(cache, job)) < 0) {
        if (PyErr_ExceptionMatches(PyExc_KeyError))
            PyErr_Clear();
        else
            PyErr_WriteUnraisable(obj);
    }
    Py_CLEAR(r->cache);
    Py_CLEAR(r->pool);    /* last: dropping the pool may run anything */
    Py_DECREF(obj);
}

/* Complete r as ApplyResult._set(0, (ok, value)) does, when r is one of ours
 * without callbacks.  Returns 1 if done (and steals `value`), 0 if r needs
 * its _set() (value not stolen). */
int
cp_result_complete(PyObject *obj, int ok, PyObject *value)
{
    Result *r = (Result *)obj;
    if (Py_TYPE(obj) != result_type ||
        or_none(r->callback) != Py_None || or_none(r->error_callback) != Py_None) {
        /* Its _set() completes it.  It may have been made without callbacks
         * (and so left untracked) and been given one since. */
        if (PyObject_TypeCheck(obj, cp_state->result_base))
            track(obj);
        return 0;
    }
    set_result(r, ok, value, 1);
    return 1;
}

/* At interpreter exit (a quiet terminate): the result fails with `exc` for
 * whoever asks from now on, but the threads already waiting for it are not
 * woken (_done stays held) and no callback runs; see Core.terminate().
 * obj must be a ResultBase.  Steals `exc`. */
void
cp_result_fail_quietly(PyObject *obj, PyObject *exc)
{
    set_result((Result *)obj, 0, exc, 0);
}

/* A result whose task was never queued, dropped by its caller (the error
 * is raised instead): out of the cache, and its pool let go, so that
 * neither keeps the other. */
void
cp_result_forget(PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, cp_state->result_base))
        return;
    Result *r = (Result *)obj;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);   /* the caller's error, kept as is */
    if (r->cache != NULL && r->job != NULL && PyDict_Check(r->cache) &&
        PyDict_GetItemWithError(r->cache, r->job) == obj)
        PyDict_DelItem(r->cache, r->job);
    PyErr_Clear();
    Py_CLEAR(r->pool);
    PyErr_Restore(type, value, tb);
}

/* ------------------------------------------------------ the base type */

/* tp_dealloc of this file's types (heap types, with the GC): untrack, drop
 * the fields with `clear`, free, and let go of the type. */
static void
dealloc_gc(PyObject *o, inquiry clear)
{
    PyTypeObject *tp = Py_TYPE(o);
    PyObject_GC_UnTrack(o);
    clear(o);
    tp->tp_free(o);
    Py_DECREF(tp);
}

static int
Result_traverse(Result *r, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(r));
    Py_VISIT(r->pool);
    Py_VISIT(r->done);
    Py_VISIT(r->job);
    Py_VISIT(r->cache);
    Py_VISIT(r->callback);
    Py_VISIT(r->error_callback);
    Py_VISIT(r->success);
    Py_VISIT(r->value);
    return 0;
}

static int
Result_clear(Result *r)
{
    Py_CLEAR(r->pool);
    Py_CLEAR(r->done);
    Py_CLEAR(r->job);
    Py_CLEAR(r->cache);
    Py_CLEAR(r->callback);
    Py_CLEAR(r->error_callback);
    Py_CLEAR(r->success);
    Py_CLEAR(r->value);
    return 0;
}

static void
Result_dealloc(Result *r)
{
    dealloc_gc((PyObject *)r, (inquiry)Result_clear);
}

static PyObject *
Result_ready(Result *r, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(r->ready);
}

/* `raise value`, for a failed call's value. */
static void
raise_value(PyObject *value)
{
    if (PyExceptionInstance_Check(value))
        PyErr_SetObject((PyObject *)Py_TYPE(value), value);
    else if (PyExceptionClass_Check(value))
        PyErr_SetNone(value);
    else
        PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
}

/* get(timeout=None), as multiprocessing's: wait (ApplyResult.wait, in
 * Python) unless the result is there, then return the value or raise the
 * exception. */
static PyObject *
Result_get(Result *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                     "timeout") != 0)) {
        PyErr_SetString(PyExc_TypeError,
                        "get() takes one optional argument, timeout");
        return NULL;
    }
    if (!r->ready) {
        PyObject *timeout = nargs + nkw ? args[0] : Py_None;
        PyObject *res = PyObject_CallMethodOneArg((PyObject *)r, str_wait, timeout);
        if (res == NULL)
            return NULL;
        Py_DECREF(res);
        if (!r->ready) {
            PyErr_SetNone(timeout_error);
            return NULL;
        }
    }
    PyObject *value = or_none(r->value);
    int ok = PyObject_IsTrue(or_none(r->success));
    if (ok < 0)
        return NULL;
    if (ok)
        return Py_NewRef(value);
    raise_value(value);      /* raise self._value */
    return NULL;
}

/* Setting an attribute, and reaching the instance dict, may give a result
 * a way back to itself: it is tracked first (see the top). */
static int
Result_setattro(PyObject *obj, PyObject *name, PyObject *value)
{
    track(obj);
    return PyObject_GenericSetAttr(obj, name, value);
}

static PyObject *
Result_get_dict(PyObject *obj, void *Py_UNUSED(closure))
{
    track(obj);
    return PyObject_GenericGetDict(obj, NULL);
}

static int
Result_set_dict(PyObject *obj, PyObject *value, void *Py_UNUSED(closure))
{
    track(obj);
    return PyObject_GenericSetDict(obj, value, NULL);
}

static PyMethodDef Result_methods[] = {
    {"ready", (PyCFunction)Result_ready, METH_NOARGS,
     "Whether the result is there (the call completed)."},
    {"get", (PyCFunction)(void (*)(void))Result_get, METH_FASTCALL | METH_KEYWORDS,
     "get(timeout=None): the result when it arrives; raises its exception, or\n"
     "multiprocessing.TimeoutError if it is not there in time."},
    {NULL, NULL, 0, NULL},
};

/* multiprocessing's attributes, as C fields.  Setting one may give a
 * finished, untracked result a way back to itself: the setters track it
 * first, as Result_setattro does (a member descriptor's __set__, called
 * directly, would bypass that). */
static PyObject *
Result_get_field(PyObject *obj, void *offset)
{
    PyObject *v = *(PyObject **)((char *)obj + (size_t)offset);
    return Py_NewRef(v != NULL ? v : Py_None);
}

static int
Result_set_field(PyObject *obj, PyObject *value, void *offset)
{
    track(obj);
    Py_XSETREF(*(PyObject **)((char *)obj + (size_t)offset), Py_XNewRef(value));
    return 0;
}

static PyObject *
Result_get_ready(Result *r, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(r->ready);
}

static int
Result_set_ready(Result *r, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "can't delete _ready");
        return -1;
    }
    int v = PyObject_IsTrue(value);
    if (v < 0)
        return -1;
    r->ready = (char)v;
    return 0;
}

#define RESULT_FIELD(name, field) \
    {name, Result_get_field, Result_set_field, NULL, (void *)offsetof(Result, field)}

static PyGetSetDef Result_getset[] = {
    {"__dict__", Result_get_dict, Result_set_dict, NULL, NULL},
    RESULT_FIELD("_pool", pool),
    RESULT_FIELD("_done", done),
    RESULT_FIELD("_job", job),
    RESULT_FIELD("_cache", cache),
    RESULT_FIELD("_callback", callback),
    RESULT_FIELD("_error_callback", error_callback),
    RESULT_FIELD("_success", success),
    RESULT_FIELD("_value", value),
    {"_ready", (getter)Result_get_ready, (setter)Result_set_ready, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Result_slots[] = {
    {Py_tp_dealloc, Result_dealloc},
    {Py_tp_traverse, Result_traverse},
    {Py_tp_clear, Result_clear},
    {Py_tp_methods, Result_methods},
    {Py_tp_getset, Result_getset},
    {Py_tp_setattro, Result_setattro},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "The C part of cpool.pool.ApplyResult: its fields, ready() and get()."},
    {0, NULL},
};

PyType_Spec cp_result_base_spec = {
    .name = "cpool._core.ResultBase",
    .basicsize = sizeof(Result),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Result_slots,
};

/* ------------------------------------ imap()'s consumer end, in C */

/*
 * ConsumerBase: the C base of pool.py's _Consumer, what imap() and
 * imap_unordered() return.  Iterating it is one C call per result: the
 * results the consumer takes come a few at a time from the call's _taken
 * deque (IMapIterator._next_locked moves them there under its lock); only
 * when that is empty does it call _next_locked() (in Python), which waits.
 * This is what _Consumer.next(timeout) does in Python, without a frame per
 * result.
 */
typedef struct {
    PyObject_HEAD
    PyObject *results;   /* _results: the call (an IMapIterator) */
    PyObject *taken;     /* _taken: its deque of results moved for us */
    PyObject *popleft;   /* _taken.popleft */
} Consumer;

static int
Consumer_init(Consumer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"results", NULL};
    PyObject *results;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:ConsumerBase", kwlist,
                                     &results))
        return -1;
    PyObject *taken = PyObject_GetAttr(results, str_taken);
    PyObject *popleft = taken ? PyObject_GetAttr(taken, str_popleft) : NULL;
    if (popleft == NULL) {
        Py_XDECREF(taken);
        return -1;
    }
    Py_XSETREF(self->results, Py_NewRef(results));
    Py_XSETREF(self->taken, taken);
    Py_XSETREF(self->popleft, popleft);
    return 0;
}

static PyObject *
Consumer_iternext(Consumer *self)
{
    PyObject *pair;
    if (self->results == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cpool: consumer not initialised");
        return NULL;
    }
    /* Under the GIL, and no Python code runs between the two calls: another
     * consumer thread cannot empty the deque in between. */
    Py_ssize_t n = PyObject_Size(self->taken);
    if (n < 0)
        return NULL;
    if (n > 0)
        pair = PyObject_CallNoArgs(self->popleft);
    else
        pair = PyObject_CallMethodOneArg(self->results, str_next_locked, Py_None);
    if (pair == NULL)
        return NULL;          /* StopIteration included */
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        Py_DECREF(pair);
        PyErr_SetString(PyExc_RuntimeError, "cpool: malformed imap result");
        return NULL;
    }
    PyObject *value = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
    int ok = PyObject_IsTrue(PyTuple_GET_ITEM(pair, 0));
    Py_DECREF(pair);
    if (ok > 0)
        return value;
    if (ok == 0) {
        if (PyObject_TypeCheck(value, (PyTypeObject *)PyExc_StopIteration)) {
            /* Raised as is, it would end the caller's loop as if the
             * results had run out (PEP 479's reasoning). */
            PyObject *exc = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                                  "a task raised StopIteration");
            if (exc != NULL) {
                PyException_SetCause(exc, Py_NewRef(value));
                PyErr_SetObject(PyExc_RuntimeError, exc);
                Py_DECREF(exc);
            }
        }
        else
            raise_value(value);
    }
    Py_DECREF(value);
    return NULL;
}

static int
Consumer_traverse(Consumer *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->results);
    Py_VISIT(self->taken);
    Py_VISIT(self->popleft);
    return 0;
}

static int
Consumer_clear(Consumer *self)
{
    Py_CLEAR(self->results);
    Py_CLEAR(self->taken);
    Py_CLEAR(self->popleft);
    return 0;
}

static void
Consumer_dealloc(Consumer *self)
{
    dealloc_gc((PyObject *)self, (inquiry)Consumer_clear);
}

static PyMemberDef Consumer_members[] = {
    {"_results", T_OBJECT, offsetof(Consumer, results), READONLY, NULL},
    {"_taken", T_OBJECT, offsetof(Consumer, taken), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Consumer_slots[] = {
    {Py_tp_init, Consumer_init},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, Consumer_iternext},
    {Py_tp_dealloc, Consumer_dealloc},
    {Py_tp_traverse, Consumer_traverse},
    {Py_tp_clear, Consumer_clear},
    {Py_tp_members, Consumer_members},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "The C part of cpool.pool._Consumer: iterating it."},
    {0, NULL},
};

PyType_Spec cp_consumer_base_spec = {
    .name = "cpool._core.ConsumerBase",
    .basicsize = sizeof(Consumer),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Consumer_slots,
};

/* ------------------------------------------- Pool.apply_async() in C */

/* The C part of cpool.Pool: _core and _state in fields, and apply_async(),
 * so that the most called method of a pool runs no Python frame. */
typedef struct {
    PyObject_HEAD
    PyObject *core;    /* _core: the pool's Core */
    PyObject *state;   /* _state: "INIT", "RUN", "CLOSE" or "TERMINATE" */
} PoolBase;

static const char *const apply_async_names[] = {
    "func", "args", "kwds", "callback", "error_callback",
};
enum { APPLY_ASYNC_NARGS = 5 };

/* apply_async(func, args=(), kwds={}, callback=None, error_callback=None)'s
 * arguments into v[]. */
static int
apply_async_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 PyObject **v)
{
    if (nargs > APPLY_ASYNC_NARGS) {
        PyErr_Format(PyExc_TypeError,
                     "apply_async() takes at most %d arguments (%zd given)",
                     APPLY_ASYNC_NARGS, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        v[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int i = 0;
        while (i < APPLY_ASYNC_NARGS &&
               PyUnicode_CompareWithASCIIString(name, apply_async_names[i]) != 0)
            i++;
        if (i == APPLY_ASYNC_NARGS) {
            PyErr_Format(PyExc_TypeError,
                         "apply_async() got an unexpected keyword argument '%U'",
                         name);
            return -1;
        }
        if (v[i] != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "apply_async() got multiple values for argument '%s'",
                         apply_async_names[i]);
            return -1;
        }
        v[i] = args[nargs + k];
    }
    if (v[0] == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "apply_async() missing required argument 'func'");
        return -1;
    }
    return 0;
}

/* apply_async() of the parsed arguments v[], its job number or'ed with
 * `flags`. */
static PyObject *
pool_apply_async(PoolBase *self, PyObject *const *v, uint64_t flags)
{
    if (self->state != str_run) {
        int run = self->state != NULL &&
                  PyObject_RichCompareBool(self->state, str_run, Py_EQ);
        if (run < 0)
            return NULL;
        if (!run) {
            PyErr_SetString(PyExc_ValueError, "Pool not running");
            return NULL;
        }
    }
    if (self->core == NULL) {
        PyErr_SetString(PyExc_ValueError, "Pool not running");
        return NULL;
    }
    PyObject *call[6] = {(PyObject *)self, v[0], v[1] ? v[1] : no_args,
                         v[2] ? v[2] : no_kwds, v[3] ? v[3] : Py_None,
                         v[4] ? v[4] : Py_None};
    return cp_core_apply_async(self->core, call, flags);
}

static PyObject *
PoolBase_apply_async(PoolBase *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    PyObject *v[APPLY_ASYNC_NARGS] = {NULL};
    if (apply_async_args(args, nargs, kwnames, v) < 0)
        return NULL;
    return pool_apply_async(self, v, 0);
}

/* _apply_result(func, args, kwds): apply()'s way when no worker is idle,
 * an ApplyResult whose errors name an apply() call. */
static PyObject *
PoolBase_apply_result(PoolBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_apply_result(func, args, kwds)");
        return NULL;
    }
    PyObject *v[APPLY_ASYNC_NARGS] = {args[0], args[1], args[2], NULL, NULL};
    return pool_apply_async(self, v, CP_APPLY_JOB);
}

static int
PoolBase_traverse(PoolBase *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->core);
    Py_VISIT(self->state);
    return 0;
}

static int
PoolBase_clear(PoolBase *self)
{
    Py_CLEAR(self->core);
    Py_CLEAR(self->state);
    return 0;
}

static void
PoolBase_dealloc(PoolBase *self)
{
    dealloc_gc((PyObject *)self, (inquiry)PoolBase_clear);
}

static PyObject *
PoolBase_new(PyTypeObject *type, PyObject *Py_UNUSED(args),
             PyObject *Py_UNUSED(kwds))
{
    if ((str_run == NULL && (str_run = PyUnicode_InternFromString("RUN")) == NULL) ||
        (no_args == NULL && (no_args = PyTuple_New(0)) == NULL) ||
        (no_kwds == NULL && (no_kwds = PyDict_New()) == NULL))
        return NULL;
    return type->tp_alloc(type, 0);
}

static PyMethodDef PoolBase_methods[] = {
    {"apply_async", (PyCFunction)(void (*)(void))PoolBase_apply_async,
     METH_FASTCALL | METH_KEYWORDS,
     "apply_async($self, func, args=(), kwds={}, callback=None, error_callback=None)\n"
     "--\n\n"
     "Asynchronous version of apply(): an ApplyResult for func(*args, **kwds)."},
    {"_apply_result", (PyCFunction)(void (*)(void))PoolBase_apply_result,
     METH_FASTCALL,
     "_apply_result($self, func, args, kwds)\n--\n\n"
     "apply()'s result object when no worker is idle: apply_async(), with\n"
     "errors that name an apply() call."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef PoolBase_members[] = {
    {"_core", T_OBJECT, offsetof(PoolBase, core), 0, NULL},
    {"_state", T_OBJECT, offsetof(PoolBase, state), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot PoolBase_slots[] = {
    {Py_tp_dealloc, PoolBase_dealloc},
    {Py_tp_traverse, PoolBase_traverse},
    {Py_tp_clear, PoolBase_clear},
    {Py_tp_methods, PoolBase_methods},
    {Py_tp_members, PoolBase_members},
    {Py_tp_new, PoolBase_new},
    {Py_tp_doc, "The C part of cpool.Pool: _core, _state and apply_async()."},
    {0, NULL},
};

PyType_Spec cp_pool_base_spec = {
    .name = "cpool._core.PoolBase",
    .basicsize = sizeof(PoolBase),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = PoolBase_slots,
};
