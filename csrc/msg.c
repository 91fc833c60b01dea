/*
 * msg.c - pickled messages without copies of their large parts.
 *
 * pickle.dumps() copies every byte of a large argument into a new bytes
 * object: 64 MiB of fresh memory whose first touch costs more than the copy.
 * Instead, a Pickler writes into a SegWriter.  The C pickler hands a buffer
 * of FRAME_SIZE_TARGET bytes or more (a bytes object's data, an in-band
 * PickleBuffer such as a numpy array's) to write() as the object itself;
 * SegWriter keeps a reference to it as a segment of its own and gathers the
 * small writes into bytearrays.  The message is the tuple of segments, and
 * the ring copies straight from the user's buffer when it is sent.
 *
 * As with multiprocessing, whose task handler pickles a task some time after
 * apply_async() returned, a buffer is read when the task is sent: arguments
 * of pending tasks must not be modified.
 *
 * Needs the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "cpool.h"

#define SEG_MIN (256 * 1024)     /* writes this large become segments */
#define MAX_SEGS 1024            /* beyond that, copy (keeps iovecs small) */

typedef struct {
    PyObject_HEAD
    PyObject *segs;      /* list of finished segments */
    PyObject *cur;       /* bytearray gathering small writes, or NULL */
    Py_ssize_t total;
} SegWriter;

static int
seg_flush(SegWriter *w)
{
    if (w->cur == NULL)
        return 0;
    int rc = PyList_Append(w->segs, w->cur);
    Py_CLEAR(w->cur);
    return rc;
}

static PyObject *
SegWriter_write(SegWriter *w, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = v.len;
    if (n >= SEG_MIN && PyList_GET_SIZE(w->segs) < MAX_SEGS) {
        PyBuffer_Release(&v);
        if (seg_flush(w) < 0 || PyList_Append(w->segs, arg) < 0)
            return NULL;
    } else {
        if (w->cur == NULL && (w->cur = PyByteArray_FromStringAndSize(NULL, 0)) == NULL) {
            PyBuffer_Release(&v);
            return NULL;
        }
        Py_ssize_t at = PyByteArray_GET_SIZE(w->cur);
        if (PyByteArray_Resize(w->cur, at + n) < 0) {
            PyBuffer_Release(&v);
            return NULL;
        }
        memcpy(PyByteArray_AS_STRING(w->cur) + at, v.buf, (size_t)n);
        PyBuffer_Release(&v);
    }
    w->total += n;
    return PyLong_FromSsize_t(n);
}

static void
SegWriter_dealloc(SegWriter *w)
{
    PyTypeObject *tp = Py_TYPE(w);
    Py_XDECREF(w->segs);
    Py_XDECREF(w->cur);
    tp->tp_free(w);
    Py_DECREF(tp);
}

static PyMethodDef SegWriter_methods[] = {
    {"write", (PyCFunction)SegWriter_write, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot SegWriter_slots[] = {
    {Py_tp_dealloc, SegWriter_dealloc},
    {Py_tp_methods, SegWriter_methods},
    {0, NULL},
};

PyType_Spec cp_segwriter_spec = {
    .name = "cpool._core.SegWriter",
    .basicsize = sizeof(SegWriter),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = SegWriter_slots,
};

/* Is there a large buffer (bytes, bytearray, an array...) in obj, looking
 * into tuples, lists and dict values down to `depth` levels?  A cheap guess
 * for choosing the segmented pickling; a wrong guess costs only speed. */
int
cp_msg_has_big_buffer(PyObject *obj, int depth)
{
    if (PyBytes_CheckExact(obj))
        return PyBytes_GET_SIZE(obj) >= SEG_MIN;
    if (PyByteArray_Check(obj))
        return PyByteArray_GET_SIZE(obj) >= SEG_MIN;
    if (PyUnicode_Check(obj) || PyLong_Check(obj) || PyFloat_Check(obj))
        return 0;
    if (PyTuple_Check(obj) || PyList_Check(obj)) {
        if (depth <= 0)
            return 0;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        for (Py_ssize_t i = 0; i < n && i < 16; i++)
            if (cp_msg_has_big_buffer(PySequence_Fast_GET_ITEM(obj, i), depth - 1))
                return 1;
        return 0;
    }
    if (PyDict_Check(obj)) {
        if (depth <= 0)
            return 0;
        Py_ssize_t pos = 0, k = 0;
        PyObject *key, *val;
        while (k++ < 16 && PyDict_Next(obj, &pos, &key, &val))
            if (cp_msg_has_big_buffer(val, depth - 1))
                return 1;
        return 0;
    }
    if (PyObject_CheckBuffer(obj)) {
        Py_buffer v;
        if (PyObject_GetBuffer(obj, &v, PyBUF_RECORDS_RO) < 0) {
            PyErr_Clear();
            return 0;
        }
        int big = v.len >= SEG_MIN;
        PyBuffer_Release(&v);
        return big;
    }
    return 0;
}

/* Pickle obj (protocol 5).  With big_hint, through a SegWriter (a tuple of
 * segments), else with pickle.dumps (a bytes object).  New reference, or
 * NULL with the pickling error set. */
PyObject *
cp_msg_dumps(PyObject *obj, int big_hint)
{
    if (!big_hint)
        return PyObject_CallFunctionObjArgs(cp_state->dumps, obj,
                                            cp_state->protocol, NULL);
    SegWriter *w = PyObject_New(SegWriter, cp_state->segwriter_type);
    if (w == NULL)
        return NULL;
    w->segs = PyList_New(0);
    w->cur = NULL;
    w->total = 0;
    PyObject *res = NULL, *p = NULL, *r = NULL;
    if (w->segs == NULL)
        goto done;
    p = PyObject_CallFunctionObjArgs(cp_state->pickler, (PyObject *)w,
                                     cp_state->protocol, NULL);
    if (p == NULL)
        goto done;
    PyObject *name = PyUnicode_FromString("dump");
    r = name ? PyObject_CallMethodOneArg(p, name, obj) : NULL;
    Py_XDECREF(name);
    if (r == NULL || seg_flush(w) < 0)
        goto done;
    res = PyList_AsTuple(w->segs);
done:
    Py_XDECREF(r);
    Py_XDECREF(p);
    Py_DECREF(w);
    return res;
}

static uint64_t
seg_len(PyObject *o)
{
    if (PyBytes_Check(o))
        return (uint64_t)PyBytes_GET_SIZE(o);
    if (PyByteArray_Check(o))
        return (uint64_t)PyByteArray_GET_SIZE(o);
    Py_buffer v;
    if (PyObject_GetBuffer(o, &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    uint64_t n = (uint64_t)v.len;
    PyBuffer_Release(&v);
    return n;
}

uint64_t
cp_msg_size(PyObject *msg)
{
    if (PyBytes_Check(msg))
        return (uint64_t)PyBytes_GET_SIZE(msg);
    uint64_t n = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(msg); i++)
        n += seg_len(PyTuple_GET_ITEM(msg, i));
    return n;
}

/* cp_ring_send_iov() for a message.  A segment whose buffer can no longer be
 * had (a resized bytearray) is a hard error: -1 with an exception set. */
int
cp_msg_send_some(cp_ring *r, const cp_rec *tmpl, PyObject *msg, uint64_t *off,
                 cp_rec **first, uint64_t *first_pos)
{
    if (PyBytes_Check(msg))
        return cp_ring_send_some(r, tmpl, (const uint8_t *)PyBytes_AS_STRING(msg),
                                 (uint64_t)PyBytes_GET_SIZE(msg), off, first,
                                 first_pos);
    Py_ssize_t n = PyTuple_GET_SIZE(msg);
    Py_buffer *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc((size_t)(n ? n : 1), sizeof(struct iovec));
    int rc = -1;
    Py_ssize_t got = 0;
    uint64_t total = 0;
    if (views == NULL || iov == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(msg, got), &views[got],
                               PyBUF_SIMPLE) < 0)
            goto done;
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
        total += (uint64_t)views[got].len;
    }
    rc = cp_ring_send_iov(r, tmpl, iov, (int)n, total, off, first, first_pos);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(iov);
    return rc;
}
