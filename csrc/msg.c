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
#define OOB_MAGIC 0x424f5043u    /* "CPOB": a message with out-of-band buffers */

typedef struct {
    PyObject_HEAD
    PyObject *oob;       /* list of out-of-band PickleBuffers */
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
    Py_XDECREF(w->oob);
    Py_XDECREF(w->segs);
    Py_XDECREF(w->cur);
    tp->tp_free(w);
    Py_DECREF(tp);
}

static PyObject *SegWriter_oob(SegWriter *w, PyObject *pb);
static uint64_t seg_len(PyObject *o);

static PyMethodDef SegWriter_methods[] = {
    {"write", (PyCFunction)SegWriter_write, METH_O, NULL},
    {"oob", (PyCFunction)SegWriter_oob, METH_O, NULL},
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

/* Pickle obj (protocol 5).  With big_hint, through a SegWriter: large
 * PickleBuffers go out of band (*oob is set) and large in-band parts are
 * referenced; the result is a tuple of segments.  Without, pickle.dumps (a
 * bytes object).  New reference, or NULL with the pickling error set. */
PyObject *
cp_msg_dumps(PyObject *obj, int big_hint, int *oob)
{
    *oob = 0;
    if (!big_hint)
        return PyObject_CallFunctionObjArgs(cp_state->dumps, obj,
                                            cp_state->protocol, NULL);
    SegWriter *w = PyObject_New(SegWriter, cp_state->segwriter_type);
    if (w == NULL)
        return NULL;
    w->segs = PyList_New(0);
    w->oob = PyList_New(0);
    w->cur = NULL;
    w->total = 0;
    PyObject *res = NULL, *p = NULL, *r = NULL, *args = NULL, *kw = NULL,
             *cb = NULL, *name = NULL;
    if (w->segs == NULL || w->oob == NULL)
        goto done;
    args = PyTuple_Pack(2, (PyObject *)w, cp_state->protocol);
    cb = PyObject_GetAttrString((PyObject *)w, "oob");
    kw = cb ? Py_BuildValue("{sO}", "buffer_callback", cb) : NULL;
    if (args == NULL || kw == NULL)
        goto done;
    p = PyObject_Call(cp_state->pickler, args, kw);
    name = PyUnicode_FromString("dump");
    if (p == NULL || name == NULL)
        goto done;
    r = PyObject_CallMethodOneArg(p, name, obj);
    if (r == NULL || seg_flush(w) < 0)
        goto done;
    Py_ssize_t nbuf = PyList_GET_SIZE(w->oob);
    if (nbuf == 0) {
        res = PyList_AsTuple(w->segs);
        goto done;
    }
    /* Prefix, pickle segments, then the buffers themselves. */
    Py_ssize_t npre = 16 + 8 * nbuf;
    PyObject *pre = PyBytes_FromStringAndSize(NULL, npre);
    if (pre == NULL)
        goto done;
    uint8_t *q = (uint8_t *)PyBytes_AS_STRING(pre);
    uint32_t magic = OOB_MAGIC, nb = (uint32_t)nbuf;
    uint64_t plen = (uint64_t)w->total;
    memcpy(q, &magic, 4);
    memcpy(q + 4, &nb, 4);
    memcpy(q + 8, &plen, 8);
    for (Py_ssize_t i = 0; i < nbuf; i++) {
        uint64_t n = seg_len(PyList_GET_ITEM(w->oob, i));
        memcpy(q + 16 + 8 * i, &n, 8);
    }
    Py_ssize_t nseg = PyList_GET_SIZE(w->segs);
    res = PyTuple_New(1 + nseg + nbuf);
    if (res == NULL) {
        Py_DECREF(pre);
        goto done;
    }
    PyTuple_SET_ITEM(res, 0, pre);
    for (Py_ssize_t i = 0; i < nseg; i++)
        PyTuple_SET_ITEM(res, 1 + i, Py_NewRef(PyList_GET_ITEM(w->segs, i)));
    for (Py_ssize_t i = 0; i < nbuf; i++)
        PyTuple_SET_ITEM(res, 1 + nseg + i, Py_NewRef(PyList_GET_ITEM(w->oob, i)));
    *oob = 1;
done:
    Py_XDECREF(name);
    Py_XDECREF(r);
    Py_XDECREF(p);
    Py_XDECREF(kw);
    Py_XDECREF(cb);
    Py_XDECREF(args);
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

/* ------------------------------------------------ out-of-band buffers */

/*
 * A message with CP_F_OOB is
 *     [u32 magic][u32 nbuf][u64 pickle_len][u64 len[nbuf]] pickle buf0 buf1 ...
 * where buf_i are the large PickleBuffers (numpy arrays, bytearrays) the
 * pickler handed to buffer_callback.  The receiver gathers each straight into
 * the bytearray that will back the rebuilt object, and the pickle into its
 * warm scratch buffer: one copy per side, none through a pickle.
 */

static PyObject *
SegWriter_oob(SegWriter *w, PyObject *pb)
{
    Py_buffer v;
    if (PyObject_GetBuffer(pb, &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();          /* not contiguous: leave it in-band */
        Py_RETURN_TRUE;
    }
    Py_ssize_t n = v.len;
    PyBuffer_Release(&v);
    if (n < SEG_MIN || PyList_GET_SIZE(w->oob) >= CP_MAX_OOB)
        Py_RETURN_TRUE;
    if (PyList_Append(w->oob, pb) < 0)
        return NULL;
    Py_RETURN_FALSE;
}

/* ------------------------------------------------------------- gather */

/* Start gathering a message of `total` bytes (oob: CP_F_OOB format).  The
 * pickle part goes into *scratch (kept for reuse when the policy allows),
 * each out-of-band buffer into its own bytearray. */
int
cp_gather_init(cp_gather *g, uint64_t total, int oob, PyObject **scratch)
{
    memset(g, 0, sizeof *g);
    g->total = total;
    g->oob = oob;
    g->scratch = scratch;
    g->pre_need = oob ? 16 : 0;
    if (!oob)
        return cp_gather_begin_pickle(g, total);
    return 0;
}

int
cp_gather_begin_pickle(cp_gather *g, uint64_t n)
{
    PyObject *b = *g->scratch;
    if (b == NULL || n > CP_SCRATCH_KEEP)
        b = PyByteArray_FromStringAndSize(NULL, 0);
    else
        Py_INCREF(b);
    if (b == NULL)
        return -1;
    if ((uint64_t)PyByteArray_GET_SIZE(b) < n &&
        PyByteArray_Resize(b, (Py_ssize_t)n) < 0) {
        Py_DECREF(b);
        return -1;
    }
    if (*g->scratch == NULL && n <= CP_SCRATCH_KEEP)
        *g->scratch = Py_NewRef(b);
    g->pickle = b;
    g->pickle_len = n;
    g->cur = 0;
    g->cur_off = 0;
    return 0;
}

static int
bad_message(void)
{
    PyErr_SetString(PyExc_RuntimeError, "cpool: malformed message");
    return -1;
}

/* Feed the next n bytes of the message.  -1 with an exception set on a
 * malformed message or no memory. */
int
cp_gather_feed(cp_gather *g, const uint8_t *p, uint64_t n)
{
    if (g->off + n > g->total)
        return bad_message();
    g->off += n;
    while (n > 0) {
        if (g->pre_have < g->pre_need) {
            uint64_t k = g->pre_need - g->pre_have;
            if (k > n)
                k = n;
            memcpy(g->pre + g->pre_have, p, k);
            g->pre_have += (uint32_t)k;
            p += k;
            n -= k;
            if (g->pre_have == 16 && g->pre_need == 16) {
                uint32_t magic, nb;
                memcpy(&magic, g->pre, 4);
                memcpy(&nb, g->pre + 4, 4);
                if (magic != OOB_MAGIC || nb == 0 || nb > CP_MAX_OOB)
                    return bad_message();
                g->nbuf = nb;
                g->pre_need = 16 + 8 * nb;
            }
            if (g->pre_have == g->pre_need) {
                uint64_t plen, sum;
                memcpy(&plen, g->pre + 8, 8);
                sum = g->pre_need + plen;
                for (uint32_t i = 0; i < g->nbuf; i++) {
                    memcpy(&g->lens[i], g->pre + 16 + 8 * i, 8);
                    sum += g->lens[i];
                    if (g->lens[i] > g->total)
                        return bad_message();
                }
                if (plen > g->total || sum != g->total)
                    return bad_message();
                if (cp_gather_begin_pickle(g, plen) < 0)
                    return -1;
                for (uint32_t i = 0; i < g->nbuf; i++) {
                    g->bufs[i] = PyByteArray_FromStringAndSize(NULL, 0);
                    if (g->bufs[i] == NULL ||
                        PyByteArray_Resize(g->bufs[i], (Py_ssize_t)g->lens[i]) < 0)
                        return -1;
                }
            }
            continue;
        }
        /* Destination cur: 0 is the pickle, i + 1 is buffer i. */
        while (g->cur <= g->nbuf) {
            uint64_t cap = g->cur == 0 ? g->pickle_len : g->lens[g->cur - 1];
            if (g->cur_off < cap)
                break;
            g->cur++;
            g->cur_off = 0;
        }
        if (g->cur > g->nbuf)
            return bad_message();
        PyObject *dst = g->cur == 0 ? g->pickle : g->bufs[g->cur - 1];
        uint64_t cap = g->cur == 0 ? g->pickle_len : g->lens[g->cur - 1];
        uint64_t k = cap - g->cur_off;
        if (k > n)
            k = n;
        memcpy(PyByteArray_AS_STRING(dst) + g->cur_off, p, k);
        g->cur_off += k;
        p += k;
        n -= k;
    }
    return 0;
}

/* The message is complete: unpickle it.  New reference or NULL. */
PyObject *
cp_gather_finish(cp_gather *g)
{
    if (g->off != g->total || g->pickle == NULL)
        return bad_message(), NULL;
    PyObject *mv = PyMemoryView_FromMemory(PyByteArray_AS_STRING(g->pickle),
                                           (Py_ssize_t)g->pickle_len, PyBUF_READ);
    if (mv == NULL)
        return NULL;
    PyObject *obj;
    if (g->nbuf == 0) {
        obj = PyObject_CallOneArg(cp_state->loads, mv);
    } else {
        PyObject *bufs = PyList_New((Py_ssize_t)g->nbuf);
        for (uint32_t i = 0; bufs != NULL && i < g->nbuf; i++)
            PyList_SET_ITEM(bufs, i, Py_NewRef(g->bufs[i]));
        PyObject *args = bufs ? PyTuple_Pack(1, mv) : NULL;
        PyObject *kw = args ? Py_BuildValue("{sO}", "buffers", bufs) : NULL;
        obj = kw ? PyObject_Call(cp_state->loads, args, kw) : NULL;
        Py_XDECREF(kw);
        Py_XDECREF(args);
        Py_XDECREF(bufs);
    }
    Py_DECREF(mv);
    return obj;
}

void
cp_gather_clear(cp_gather *g)
{
    Py_CLEAR(g->pickle);
    for (uint32_t i = 0; i < CP_MAX_OOB; i++)
        Py_CLEAR(g->bufs[i]);
}
