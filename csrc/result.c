/*
 * result.c - apply_async()'s result objects, made and completed in C.
 *
 * They are cpool.pool.ApplyResult instances (a subclass of
 * multiprocessing.pool.ApplyResult), with exactly the attributes that
 * class's __init__ and _set give them; only the Python frames are skipped:
 *
 *   made:       _pool, _ready = False, _done = None, _job =
 *               next(job_counter), _cache, _callback, _error_callback;
 *               cache[_job] = the result
 *   completed:  _success, _value, _ready = True, _done released if there
 *               is one, cache.pop(_job), _pool = None
 *
 * _done, a Lock held until the result is set, is made only for a waiter
 * that comes before the result (done_lock()).
 *
 * A result with a callback or an error callback is completed by its Python
 * _set() (which runs the callback and reports what it raises).  pool.py
 * registers the class, the job counter and the lock type (set_result_type).
 *
 * Needs the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cpool.h"

enum { A_POOL, A_READY, A_DONE, A_JOB, A_CACHE, A_CALLBACK, A_ERROR_CALLBACK,
       A_SUCCESS, A_VALUE, A_ACQUIRE, A_RELEASE, A_COUNT };

static const char *const attr_names[A_COUNT] = {
    "_pool", "_ready", "_done", "_job", "_cache", "_callback",
    "_error_callback", "_success", "_value", "acquire", "release",
};

static PyObject *attr[A_COUNT];
static PyTypeObject *result_type;   /* cpool.pool.ApplyResult */
static PyObject *job_counter;       /* multiprocessing.pool.job_counter */
static PyObject *lock_type;         /* threading.Lock */
static PyObject *no_args;           /* () */

PyObject *
cp_result_set_type(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "set_result_type(ApplyResult, job_counter, Lock)");
        return NULL;
    }
    for (int i = 0; i < A_COUNT; i++) {
        if (attr[i] == NULL && (attr[i] = PyUnicode_InternFromString(attr_names[i])) == NULL)
            return NULL;
    }
    if (no_args == NULL && (no_args = PyTuple_New(0)) == NULL)
        return NULL;
    Py_XSETREF(result_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(job_counter, Py_NewRef(args[1]));
    Py_XSETREF(lock_type, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

void
cp_result_clear_types(void)
{
    Py_CLEAR(result_type);
    Py_CLEAR(job_counter);
    Py_CLEAR(lock_type);
    Py_CLEAR(no_args);
    for (int i = 0; i < A_COUNT; i++)
        Py_CLEAR(attr[i]);
}

static int
set_attrs(PyObject *r, const int *which, PyObject *const *values, int n)
{
    for (int i = 0; i < n; i++)
        if (PyObject_SetAttr(r, attr[which[i]], values[i]) < 0)
            return -1;
    return 0;
}

/* A new ApplyResult of `pool`, registered in `cache`; its job in *job. */
PyObject *
cp_result_new(PyObject *pool, PyObject *cache, PyObject *callback,
              PyObject *error_callback, uint64_t *job)
{
    if (result_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cpool: result type not registered");
        return NULL;
    }
    PyObject *r = result_type->tp_new(result_type, no_args, NULL);
    if (r == NULL)
        return NULL;
    PyObject *jobno = PyIter_Next(job_counter);
    if (jobno != NULL) {
        *job = PyLong_AsUnsignedLongLong(jobno);
        /* _success and _value too (None until it is ready): set later,
         * they would make CPython give every instance a dict of its own. */
        static const int which[] = {A_POOL, A_READY, A_DONE, A_JOB, A_CACHE,
                                    A_CALLBACK, A_ERROR_CALLBACK, A_SUCCESS,
                                    A_VALUE};
        PyObject *values[] = {pool, Py_False, Py_None, jobno, cache, callback,
                              error_callback, Py_None, Py_None};
        if (!PyErr_Occurred() && set_attrs(r, which, values, 9) == 0 &&
            PyDict_SetItem(cache, jobno, r) == 0) {
            Py_DECREF(jobno);
            return r;
        }
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_RuntimeError, "cpool: job counter exhausted");
    }
    Py_XDECREF(jobno);
    Py_DECREF(r);
    return NULL;
}

/* done_lock(result) -> its _done lock, made (held) if it has none yet, or
 * None if the result is ready and has none.  Under the GIL, with no Python
 * code run between the checks and the store, so it cannot interleave with
 * the completion (_ready set, then _done released if there is one). */
PyObject *
cp_result_done_lock(PyObject *Py_UNUSED(m), PyObject *r)
{
    if (attr[A_DONE] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cpool: result type not registered");
        return NULL;
    }
    PyObject *done = PyObject_GetAttr(r, attr[A_DONE]);
    if (done == NULL || done != Py_None)
        return done;
    Py_DECREF(done);
    PyObject *ready = PyObject_GetAttr(r, attr[A_READY]);
    if (ready == NULL)
        return NULL;
    int is_ready = PyObject_IsTrue(ready);
    Py_DECREF(ready);
    if (is_ready != 0)
        return is_ready < 0 ? NULL : Py_NewRef(Py_None);
    /* A fresh lock is free: acquiring it does not wait (nor release the
     * GIL). */
    PyObject *lock = PyObject_CallNoArgs(lock_type);
    PyObject *got = lock ? PyObject_CallMethodNoArgs(lock, attr[A_ACQUIRE]) : NULL;
    Py_XDECREF(got);
    if (got == NULL || PyObject_SetAttr(r, attr[A_DONE], lock) < 0) {
        Py_XDECREF(lock);
        return NULL;
    }
    return lock;
}

/* Complete r as ApplyResult._set(0, (ok, value)) does, when r is one of ours
 * without callbacks.  Returns 1 if done (and steals `value`), 0 if r needs
 * its _set(), -1 with an exception set (value not stolen). */
int
cp_result_complete(PyObject *r, uint64_t job, int ok, PyObject *value)
{
    if (Py_TYPE(r) != result_type)
        return 0;
    PyObject *cb = PyObject_GetAttr(r, attr[A_CALLBACK]);
    PyObject *ecb = cb ? PyObject_GetAttr(r, attr[A_ERROR_CALLBACK]) : NULL;
    int plain = ecb != NULL && cb == Py_None && ecb == Py_None;
    Py_XDECREF(cb);
    Py_XDECREF(ecb);
    if (ecb == NULL)
        return -1;
    if (!plain)
        return 0;
    static const int which[] = {A_SUCCESS, A_VALUE, A_READY};
    PyObject *values[] = {ok ? Py_True : Py_False, value, Py_True};
    if (set_attrs(r, which, values, 3) < 0)
        return -1;
    Py_DECREF(value);
    /* From here on, as _set's finally: clause, every step is attempted. */
    PyObject *done = PyObject_GetAttr(r, attr[A_DONE]);
    PyObject *res = done == Py_None ? Py_NewRef(Py_None)
                  : done ? PyObject_CallMethodNoArgs(done, attr[A_RELEASE]) : NULL;
    Py_XDECREF(done);
    if (res == NULL)
        PyErr_WriteUnraisable(r);
    Py_XDECREF(res);
    PyObject *cache = PyObject_GetAttr(r, attr[A_CACHE]);
    PyObject *key = PyLong_FromUnsignedLongLong(job);
    if (cache == NULL || key == NULL ||
        (PyDict_Check(cache) ? PyDict_DelItem(cache, key) : PyObject_DelItem(cache, key)) < 0) {
        if (PyErr_ExceptionMatches(PyExc_KeyError))
            PyErr_Clear();
        else
            PyErr_WriteUnraisable(r);
    }
    Py_XDECREF(key);
    Py_XDECREF(cache);
    if (PyObject_SetAttr(r, attr[A_POOL], Py_None) < 0)
        PyErr_WriteUnraisable(r);
    return 1;
}
