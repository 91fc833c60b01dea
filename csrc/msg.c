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
 * What the parent may change before the task is sent: see snapshot().
 *
 * Needs the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>     /* first: it defines _GNU_SOURCE */

#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpool.h"

#define SEG_MIN (256 * 1024)     /* writes this large become segments */
#define MAX_SEGS 1024            /* beyond that, copy (keeps iovecs small) */
#define OOB_MAGIC 0x424f5043u    /* "CPOB": a message with out-of-band buffers */

#define OOB_ARENA (UINT64_C(1) << 63)  /* prefix length flag: in the arena */
#define OOB_BYTES (UINT64_C(1) << 62)  /* prefix length flag: a bytes object */
#define OOB_FLAGS (OOB_ARENA | OOB_BYTES)
#define DESC_BYTES 16                   /* an arena buffer in the stream */

typedef struct {
    PyObject_HEAD
    PyObject *oob;       /* list of out-of-band PickleBuffers (or descriptors) */
    PyObject *segs;      /* list of finished segments */
    PyObject *cur;       /* bytearray gathering small writes, or NULL */
    PyObject *pids;      /* id of a large bytes object -> its index in oob */
    Py_ssize_t total;
    cp_arena_use au;
    uint64_t alen[CP_MAX_OOB];  /* oob[i] went to the arena: its length */
    uint8_t isbytes[CP_MAX_OOB];/* oob[i] is a bytes object's buffer */
    int nown;                   /* oob[] ArenaRefs to the worker's own arrays */
} SegWriter;

typedef struct {
    PyObject_HEAD
    cp_arena *a;
    cp_blk *b;
    pid_t pid;
    int args;           /* an argument's block (else a result's) */
    int own;            /* the worker's own array's block, not settled yet */
    int inband;         /* exports the block's data, not its descriptor */
    uint64_t desc[2];   /* arena offset, length */
} ArenaRef;

static int
seg_flush(SegWriter *w)
{
    if (w->cur == NULL)
        return 0;
    int rc = PyList_Append(w->segs, w->cur);
    Py_CLEAR(w->cur);
    return rc;
}

/*
 * What a large buffer of the message is sent from.  The ring copies it when
 * it has room, maybe long after the call that made the task returned.
 *
 * - A bytes object cannot change: the object itself.
 * - A worker's result: the object itself, since the worker sends it before
 *   it runs any more of the task's code.
 * - An imap input's items (`snapshot`): a copy, made now.  multiprocessing
 *   pickles each item before it reads the next, and an input that refills
 *   one buffer for every item (readinto() in a loop) relies on that.
 * - Else (apply_async, map...): a view of it, which holds an export of the
 *   buffer until the task is done, so that resizing it meanwhile raises
 *   BufferError (as with any buffer a view holds) instead of the ring
 *   reading past its end.  The buffer is read when the task is sent, as
 *   multiprocessing's task handler pickles a task some time after
 *   apply_async() returned; if its send begins but cannot end at once, the
 *   rest is copied then (cp_msg_settle), so that it is all read at one
 *   moment.  A PickleBuffer holds an export of its own.
 *
 * Arrays of 1 MiB and more are copied into the arena instead (to_arena).
 */
static PyObject *
snapshot(SegWriter *w, PyObject *obj, const Py_buffer *v)
{
    if (PyBytes_CheckExact(obj) || !w->au.args)
        return Py_NewRef(obj);
    if (w->au.snapshot)
        return PyBytes_FromStringAndSize(v->buf, v->len);
    if (PyPickleBuffer_Check(obj))
        return Py_NewRef(obj);
    return PyMemoryView_FromObject(obj);
}

static PyObject *
SegWriter_write(SegWriter *w, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = v.len;
    if (n >= SEG_MIN && PyList_GET_SIZE(w->segs) < MAX_SEGS) {
        PyObject *seg = snapshot(w, arg, &v);
        PyBuffer_Release(&v);
        int rc = seg == NULL || seg_flush(w) < 0 || PyList_Append(w->segs, seg) < 0;
        Py_XDECREF(seg);
        if (rc)
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
    Py_XDECREF(w->pids);
    tp->tp_free(w);
    Py_DECREF(tp);
}

static PyObject *SegWriter_oob(SegWriter *w, PyObject *pb);
static PyObject *SegWriter_pid(SegWriter *w, PyObject *obj);
static uint64_t seg_len(PyObject *o);

static PyMethodDef SegWriter_methods[] = {
    {"write", (PyCFunction)SegWriter_write, METH_O, NULL},
    {"oob", (PyCFunction)SegWriter_oob, METH_O, NULL},
    {"pid", (PyCFunction)SegWriter_pid, METH_O, NULL},
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
    /* Checks that read type flags first: PyByteArray_Check() and
     * PyFloat_Check() walk the MRO of every other type. */
    if (PyBytes_CheckExact(obj))
        return PyBytes_GET_SIZE(obj) >= SEG_MIN;
    if (PyUnicode_Check(obj) || PyLong_Check(obj) || PyFloat_CheckExact(obj))
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
    if (PyByteArray_Check(obj))
        return PyByteArray_GET_SIZE(obj) >= SEG_MIN;
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
static PyObject *dumps_segmented(PyObject *obj, int *oob, const cp_arena_use *au);
static void commit_results(SegWriter *w);
static void settle_own(SegWriter *w);

/* multiprocessing's reducers (cpool/_pickling.py), imported once: 1 when
 * they can be used, else 0 (plain pickle then; no exception left set). */
static int
fp_ready(void)
{
    if (cp_state->fp_dumps != NULL)
        return 1;
    PyObject *m = PyImport_ImportModule("cpool._pickling");
    PyObject *red = m ? PyObject_GetAttrString(m, "EXTRA_REDUCERS") : NULL;
    PyObject *base = m ? PyObject_GetAttrString(m, "BASELINE") : NULL;
    PyObject *dumps = m ? PyObject_GetAttrString(m, "dumps") : NULL;
    PyObject *table = m ? PyObject_GetAttrString(m, "dispatch_table") : NULL;
    Py_ssize_t n = base ? PyLong_AsSsize_t(base) : -1;
    Py_XDECREF(m);
    Py_XDECREF(base);
    if (red == NULL || !PyDict_Check(red) || n < 0 || dumps == NULL ||
        table == NULL) {
        PyErr_Clear();
        Py_XDECREF(red);
        Py_XDECREF(dumps);
        Py_XDECREF(table);
        return 0;
    }
    cp_state->fp_reducers = red;
    cp_state->fp_baseline = n;
    cp_state->fp_dumps = dumps;
    cp_state->fp_table = table;
    return 1;
}

/* ForkingPickler's reducers by type (a dict, borrowed), or NULL if they
 * cannot be had (no exception left set).  Imports them the first time. */
PyObject *
cp_fp_reducers(void)
{
    return fp_ready() ? cp_state->fp_reducers : NULL;
}

PyObject *
cp_msg_dumps(PyObject *obj, int big_hint, int *oob, const cp_arena_use *au)
{
    *oob = 0;
    if (big_hint)
        return dumps_segmented(obj, oob, au);
    /* Plain pickle.dumps gives multiprocessing's bytes unless a library
     * registered reducers with ForkingPickler (then they may apply to
     * anything) or plain pickle refuses an object that multiprocessing's own
     * reducers know (a socket): multiprocessing's table is used then. */
    int fp = fp_ready();
    if (fp && PyDict_GET_SIZE(cp_state->fp_reducers) > cp_state->fp_baseline)
        return PyObject_CallFunctionObjArgs(cp_state->fp_dumps, obj,
                                            cp_state->protocol, NULL);
    PyObject *b = PyObject_CallFunctionObjArgs(cp_state->dumps, obj,
                                               cp_state->protocol, NULL);
    if (b != NULL || !fp || !PyErr_ExceptionMatches(PyExc_Exception))
        return b;
    PyObject *refused = cp_err_take();
    b = PyObject_CallFunctionObjArgs(cp_state->fp_dumps, obj,
                                     cp_state->protocol, NULL);
    Py_DECREF(refused);
    return b;
}

static PyObject *
dumps_segmented(PyObject *obj, int *oob, const cp_arena_use *au)
{
    SegWriter *w = PyObject_New(SegWriter, cp_state->segwriter_type);
    if (w == NULL)
        return NULL;
    w->segs = PyList_New(0);
    w->oob = PyList_New(0);
    w->cur = NULL;
    w->pids = NULL;
    w->total = 0;
    w->au = au ? *au : (cp_arena_use){.part = -1};
    memset(w->alen, 0, sizeof w->alen);
    memset(w->isbytes, 0, sizeof w->isbytes);
    w->nown = 0;
    PyObject *res = NULL, *p = NULL, *r = NULL, *args = NULL, *kw = NULL,
             *cb = NULL, *pid = NULL;
    if (w->segs == NULL || w->oob == NULL)
        goto done;
    args = PyTuple_Pack(2, (PyObject *)w, cp_state->protocol);
    cb = PyObject_GetAttr((PyObject *)w, cp_state->str_oob);
    kw = cb ? Py_BuildValue("{sO}", "buffer_callback", cb) : NULL;
    if (args == NULL || kw == NULL)
        goto done;
    p = PyObject_Call(cp_state->pickler, args, kw);
    if (p == NULL)
        goto done;
    if (fp_ready()) {
        /* multiprocessing's reducers (see cp_msg_dumps) */
        PyObject *table = PyObject_CallNoArgs(cp_state->fp_table);
        int rc = table ? PyObject_SetAttr(p, cp_state->str_dispatch_table, table)
                       : -1;
        Py_XDECREF(table);
        if (rc < 0)
            goto done;
    }
    pid = PyObject_GetAttr((PyObject *)w, cp_state->str_pid);
    if (pid == NULL || PyObject_SetAttr(p, cp_state->str_persistent_id, pid) < 0)
        goto done;
    r = PyObject_CallMethodOneArg(p, cp_state->str_dump, obj);
    if (r == NULL || seg_flush(w) < 0)
        goto done;
    if (w->nown > 0) {
        /* The pickler's memo and the caller's reference go first (obj with
         * them, maybe), if that runs no code: what then still holds the
         * arrays is the worker's. */
        if (cp_np_plain(obj)) {
            Py_CLEAR(p);
            Py_CLEAR(*w->au.value);
        }
        settle_own(w);
    }
    commit_results(w);
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
        uint64_t n = w->alen[i] ? w->alen[i] | OOB_ARENA
                                : seg_len(PyList_GET_ITEM(w->oob, i)) |
                                      (w->isbytes[i] ? OOB_BYTES : 0);
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
    Py_XDECREF(pid);
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

/*
 * The message (a new reference), its segments that the caller may still
 * change (views held by an export, PickleBuffers: see snapshot) replaced by
 * copies.  The parent calls it when a task's send has begun but could not
 * end: what went into the ring and the rest are then read at one moment, as
 * multiprocessing reads a task when it pickles it.  One task per worker at a
 * time is sent so, so there are at most that many such copies.
 */
PyObject *
cp_msg_settle(PyObject *msg)
{
    if (!PyTuple_Check(msg))
        return Py_NewRef(msg);
    Py_ssize_t n = PyTuple_GET_SIZE(msg), i;
    for (i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(msg, i);
        if (PyMemoryView_Check(o) || PyPickleBuffer_Check(o))
            break;
    }
    if (i == n)
        return Py_NewRef(msg);
    PyObject *out = PyTuple_New(n);
    for (i = 0; out != NULL && i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(msg, i), *c;
        c = PyMemoryView_Check(o) || PyPickleBuffer_Check(o) ? PyBytes_FromObject(o)
                                                             : Py_NewRef(o);
        if (c == NULL)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, i, c);
    }
    return out;
}

/* cp_ring_send_iov() for a message.  A segment whose buffer can no longer be
 * had, or has shrunk (a worker's result changed by a thread of the task
 * while it was sent), is a hard error: -1 with an exception set. */
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
    if (*off > total) {     /* a segment shrank since the first fragment */
        PyErr_SetString(PyExc_RuntimeError, "cpool: a buffer changed size "
                                            "while its message was being sent");
        goto done;
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

/* The descriptor of block b (holding len bytes) as a message segment,
 * taking over the caller's hold on b (dropped if this fails). */
static ArenaRef *
arena_ref(SegWriter *w, cp_blk *b, uint64_t len)
{
    ArenaRef *r = PyObject_New(ArenaRef, cp_state->arenaref_type);
    if (r == NULL) {
        cp_arena_drop(b, 0);
        return NULL;
    }
    cp_arena_ref(w->au.a);
    r->a = w->au.a;
    r->b = b;
    r->pid = getpid();
    r->args = w->au.args;
    r->own = r->inband = 0;
    r->desc[0] = cp_arena_offset(w->au.a, b);
    r->desc[1] = len;
    return r;
}

/* Copy a large buffer into an arena block; its descriptor (new reference)
 * goes into the message instead.  NULL without an exception: no room (it
 * stays an ordinary out-of-band buffer). */
static PyObject *
to_arena(SegWriter *w, Py_buffer *v)
{
    cp_arena *a = w->au.a;
    cp_blk *b = cp_arena_alloc(a, w->au.part, (uint64_t)v->len);
    if (b == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    cp_arena_fill(a, b, v->buf, (uint64_t)v->len);
    Py_END_ALLOW_THREADS
    ArenaRef *r = arena_ref(w, b, (uint64_t)v->len);
    if (r == NULL)
        return NULL;
    /* An argument's block is on offer from now on: the task holds it (via
     * this ArenaRef) and withdraws it if no worker took it.  A result's is
     * offered only once the whole result is pickled (commit_results()):
     * if pickling fails, it is simply freed with this ArenaRef. */
    if (w->au.args)
        cp_store_release(&b->lent, CP_LENT_OUT);
    return (PyObject *)r;
}

/* The result pickled: offer its blocks to the parent.  The ArenaRefs still
 * drop the worker's own hold when the message goes. */
static void
commit_results(SegWriter *w)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(w->oob); i++) {
        PyObject *o = PyList_GET_ITEM(w->oob, i);
        if (Py_IS_TYPE(o, cp_state->arenaref_type) && !((ArenaRef *)o)->args &&
            !((ArenaRef *)o)->inband)
            cp_store_release(&((ArenaRef *)o)->b->lent, CP_LENT_OUT);
    }
}

/*
 * A worker's own arrays (npalloc.c), once the result is pickled and the
 * worker has let go of it: an array's block goes to the parent as it is if
 * nothing else holds it (numpy freed the array: only the ArenaRef's hold is
 * left), else its data is copied into a block of its own, as any other
 * array's (or, with no room for that, sent through the ring).  The worker
 * can then change or reuse what it kept without the parent seeing it.
 */
static void
settle_own(SegWriter *w)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(w->oob); i++) {
        ArenaRef *r = (ArenaRef *)PyList_GET_ITEM(w->oob, i);
        if (!Py_IS_TYPE(r, cp_state->arenaref_type) || !r->own)
            continue;
        r->own = 0;
        cp_blk *b = r->b;
        uint64_t len = r->desc[1];
        if (cp_arena_only_holder(b) && b->len == len) {
            cp_np_given(len);
            continue;
        }
        cp_blk *c = cp_arena_alloc(w->au.a, w->au.part, len);
        if (c == NULL) {
            r->inband = 1;
            w->alen[i] = 0;
            continue;
        }
        Py_BEGIN_ALLOW_THREADS
        cp_arena_fill(w->au.a, c, cp_blk_data(b), len);
        Py_END_ALLOW_THREADS
        cp_arena_drop(b, 0);
        r->b = c;
        r->desc[0] = cp_arena_offset(w->au.a, c);
    }
}

static PyObject *
SegWriter_oob(SegWriter *w, PyObject *pb)
{
    Py_buffer v;
    if (PyObject_GetBuffer(pb, &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();          /* not contiguous: leave it in-band */
        Py_RETURN_TRUE;
    }
    Py_ssize_t n = v.len;
    Py_ssize_t i = PyList_GET_SIZE(w->oob);
    if (n < SEG_MIN || i >= CP_MAX_OOB) {
        PyBuffer_Release(&v);
        Py_RETURN_TRUE;
    }
    PyObject *item = NULL;
    if (w->au.a != NULL && w->au.part >= 0 && (uint64_t)n >= CP_ARENA_MIN) {
        /* A worker's own array: its block is settled once the result is
         * pickled and let go of (settle_own). */
        cp_blk *b = w->au.value != NULL && !w->au.args
                        ? cp_np_block(w->au.a, w->au.part, v.buf, (uint64_t)n)
                        : NULL;
        if (b != NULL) {
            cp_arena_hold(b);
            ArenaRef *r = arena_ref(w, b, (uint64_t)n);
            if (r == NULL) {
                PyBuffer_Release(&v);
                return NULL;
            }
            r->own = 1;
            w->nown++;
            item = (PyObject *)r;
        } else {
            item = to_arena(w, &v);
        }
        if (item == NULL && PyErr_Occurred()) {
            PyBuffer_Release(&v);
            return NULL;
        }
    }
    if (item == NULL)
        item = snapshot(w, pb, &v);
    else
        w->alen[i] = (uint64_t)n;
    PyBuffer_Release(&v);
    if (item == NULL)
        return NULL;
    int rc = PyList_Append(w->oob, item);
    Py_DECREF(item);
    if (rc < 0)
        return NULL;
    Py_RETURN_FALSE;
}

/*
 * The pickler's persistent_id: a large bytes object travels out of band too,
 * named in the pickle by its index among the buffers.  The receiver gathers
 * it straight into a new bytes object and persistent_load hands that back:
 * one copy, where pickling it in band costs a gather and a copy by loads().
 * Every reference to one object gets the same index, so the receiver gets
 * one object too, as with pickle.  None (pickle it as usual) for the rest.
 */
static PyObject *
SegWriter_pid(SegWriter *w, PyObject *obj)
{
    if (!PyBytes_CheckExact(obj) || PyBytes_GET_SIZE(obj) < SEG_MIN)
        Py_RETURN_NONE;
    if (w->pids == NULL && (w->pids = PyDict_New()) == NULL)
        return NULL;
    PyObject *key = PyLong_FromVoidPtr(obj);
    if (key == NULL)
        return NULL;
    PyObject *idx = PyDict_GetItemWithError(w->pids, key);
    if (idx != NULL || PyErr_Occurred()) {
        Py_DECREF(key);
        return Py_XNewRef(idx);
    }
    Py_ssize_t i = PyList_GET_SIZE(w->oob);
    if (i >= CP_MAX_OOB) {
        Py_DECREF(key);
        Py_RETURN_NONE;
    }
    idx = PyLong_FromSsize_t(i);
    if (idx == NULL || PyList_Append(w->oob, obj) < 0 ||
        PyDict_SetItem(w->pids, key, idx) < 0) {
        Py_DECREF(key);
        Py_XDECREF(idx);
        return NULL;
    }
    Py_DECREF(key);
    w->isbytes[i] = 1;
    return idx;
}

/* ------------------------------------------------- arena buffer objects */

/*
 * ArenaRef: the descriptor of an arena block, as a 16-byte buffer (a segment
 * of the message), holding the sender's claim on the block.  An argument's:
 * the task holds the block while it holds this; when it goes, a descriptor
 * no worker took is withdrawn.  A result's: dropped once the message is
 * sent (the parent frees the block when done with it).  A worker's own
 * array that goes through the ring (`inband`, see settle_own) is exported
 * as the block's data instead.
 */
static void
ArenaRef_dealloc(ArenaRef *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    if (r->a != NULL) {
        if (r->pid == getpid())
            cp_arena_drop(r->b, r->args);
        cp_arena_unref(r->a);
    }
    tp->tp_free(r);
    Py_DECREF(tp);
}

static int
ArenaRef_getbuffer(ArenaRef *r, Py_buffer *view, int flags)
{
    if (r->inband)
        return PyBuffer_FillInfo(view, (PyObject *)r, cp_blk_data(r->b),
                                 (Py_ssize_t)r->desc[1], 1, flags);
    return PyBuffer_FillInfo(view, (PyObject *)r, r->desc, sizeof r->desc, 1,
                             flags);
}

static PyType_Slot ArenaRef_slots[] = {
    {Py_tp_dealloc, ArenaRef_dealloc},
    {Py_bf_getbuffer, ArenaRef_getbuffer},
    {0, NULL},
};

PyType_Spec cp_arenaref_spec = {
    .name = "cpool._core.ArenaRef",
    .basicsize = sizeof(ArenaRef),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = ArenaRef_slots,
};

/*
 * ShmBuf: a borrowed arena block, exported as a writable buffer: what an
 * array rebuilt from a message wraps in place.  When the last view of it
 * goes, the block goes back to its owner.
 */
typedef struct ShmBuf {
    PyObject_HEAD
    cp_arena *a;
    cp_blk *b;
    uint64_t len, size;   /* as checked when taken (the header may change) */
    int part;
    pid_t pid;
    struct ShmBuf *prev, *next;   /* live ones of this process (fork) */
} ShmBuf;

/*
 * Forks.  A ShmBuf's memory is shared with the pool's processes; a child
 * forked from its process (os.fork(), multiprocessing, or the fork server of
 * another pool, whose workers inherit the user's arrays) gets a copy of it
 * as it is at the fork, as of any other memory, not a window onto the
 * parent's (cp_fork_stage).
 */
static ShmBuf *live_bufs;     /* GIL, and bufs_lock (forks) */
/* A fork may come from a thread without the GIL (a C library's own): the
 * list is walked under this lock then, held until the fork is done so
 * that no array is wrapped between the copy and the fork. */
static pthread_mutex_t bufs_lock = PTHREAD_MUTEX_INITIALIZER;

static void
before_fork(void)
{
    pthread_mutex_lock(&bufs_lock);
    pid_t self = getpid();
    for (ShmBuf *s = live_bufs; s != NULL; s = s->next)
        if (s->pid == self)     /* else a copy already, from our own fork */
            cp_fork_stage(s->b, ((size_t)(sizeof(cp_blk) + s->len) + 4095) &
                                    ~(size_t)4095);
}

static void
after_fork(void)
{
    pthread_mutex_unlock(&bufs_lock);
}

void
cp_msg_fork_hooks(void)
{
    static int done;
    if (!done && cp_fork_stage_hooks() == 0 &&
        pthread_atfork(before_fork, after_fork, after_fork) == 0)
        done = 1;
}

static PyObject *
shmbuf_new(const cp_arena_use *au, cp_blk *b, uint64_t len, uint64_t size)
{
    ShmBuf *s = PyObject_New(ShmBuf, cp_state->shmbuf_type);
    if (s == NULL) {
        cp_arena_give_back(au->a, au->part, b, size);
        return NULL;
    }
    cp_arena_ref(au->a);
    s->a = au->a;
    s->b = b;
    s->len = len;
    s->size = size;
    s->part = au->part;
    s->pid = getpid();
    s->prev = NULL;
    /* Complete before it is listed: a fork's prepare handler reads it. */
    pthread_mutex_lock(&bufs_lock);
    s->next = live_bufs;
    if (live_bufs != NULL)
        live_bufs->prev = s;
    live_bufs = s;
    pthread_mutex_unlock(&bufs_lock);
    if (s->pid == au->a->pid)
        au->a->part_live[au->part]++;
    return (PyObject *)s;
}

static void
ShmBuf_dealloc(ShmBuf *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    pthread_mutex_lock(&bufs_lock);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        live_bufs = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    pthread_mutex_unlock(&bufs_lock);
    /* Not in a process forked from the one that took it: there the block
     * is not ours to give back (and its pages are a private copy). */
    if (s->pid == getpid()) {
        cp_arena_give_back(s->a, s->part, s->b, s->size);
        if (s->pid == s->a->pid)
            cp_arena_unlive(s->a, s->part);
    }
    cp_arena_unref(s->a);
    tp->tp_free(s);
    Py_DECREF(tp);
}

static int
ShmBuf_getbuffer(ShmBuf *s, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)s, cp_blk_data(s->b),
                             (Py_ssize_t)s->len, 0, flags);
}

static PyType_Slot ShmBuf_slots[] = {
    {Py_tp_dealloc, ShmBuf_dealloc},
    {Py_bf_getbuffer, ShmBuf_getbuffer},
    {0, NULL},
};

PyType_Spec cp_shmbuf_spec = {
    .name = "cpool._core.ShmBuf",
    .basicsize = sizeof(ShmBuf),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = ShmBuf_slots,
};

/* ------------------------------------------------------------- gather */

/* Start gathering a message of `total` bytes (oob: CP_F_OOB format).  The
 * pickle part goes into *scratch (kept for reuse when the policy allows),
 * each out-of-band buffer into its own bytearray. */
int
cp_gather_init(cp_gather *g, uint64_t total, int oob, PyObject **scratch,
               uint64_t keep, const cp_arena_use *au)
{
    memset(g, 0, sizeof *g);
    g->total = total;
    g->oob = oob;
    g->au = au ? *au : (cp_arena_use){.part = -1};
    g->scratch = scratch;
    g->keep = keep;
    g->pre_need = oob ? 16 : 0;
    if (!oob)
        return cp_gather_begin_pickle(g, total);
    return 0;
}

int
cp_gather_begin_pickle(cp_gather *g, uint64_t n)
{
    PyObject *b = *g->scratch;
    if (b == NULL || n > g->keep)
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
    if (*g->scratch == NULL && n <= g->keep)
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

/* Buffer i's descriptor is in: wrap the block it names. */
static int
take_block(cp_gather *g, uint32_t i)
{
    uint64_t off, len;
    memcpy(&off, g->desc, 8);
    memcpy(&len, g->desc + 8, 8);
    if (len != g->alen[i])
        return bad_message();
    uint64_t size;
    cp_blk *b = cp_arena_take(g->au.a, g->au.part, off, len, getpid(), &size);
    if (b == NULL)
        return bad_message();
    g->bufs[i] = shmbuf_new(&g->au, b, len, size);
    return g->bufs[i] == NULL ? -1 : 0;
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
                    if ((g->lens[i] & OOB_FLAGS) == OOB_FLAGS)
                        return bad_message();
                    if (g->lens[i] & OOB_BYTES) {
                        g->isbytes[i] = 1;
                        g->lens[i] &= ~OOB_BYTES;
                    } else if (g->lens[i] & OOB_ARENA) {
                        if (g->au.a == NULL || g->au.part < 0)
                            return bad_message();
                        g->alen[i] = g->lens[i] & ~OOB_ARENA;
                        g->lens[i] = DESC_BYTES;
                    }
                    sum += g->lens[i];
                    if (g->lens[i] > g->total)
                        return bad_message();
                }
                if (plen > g->total || sum != g->total)
                    return bad_message();
                if (cp_gather_begin_pickle(g, plen) < 0)
                    return -1;
                for (uint32_t i = 0; i < g->nbuf; i++) {
                    if (g->alen[i])
                        continue;    /* made when its descriptor is in */
                    if (g->isbytes[i]) {
                        g->bufs[i] = PyBytes_FromStringAndSize(
                            NULL, (Py_ssize_t)g->lens[i]);
                        if (g->bufs[i] == NULL)
                            return -1;
                        continue;
                    }
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
        uint32_t bi = g->cur - 1;
        int arena = g->cur > 0 && g->alen[bi];
        uint8_t *dst = arena ? g->desc
                       : g->cur == 0 ? (uint8_t *)PyByteArray_AS_STRING(g->pickle)
                       : g->isbytes[bi] ? (uint8_t *)PyBytes_AS_STRING(g->bufs[bi])
                                        : (uint8_t *)PyByteArray_AS_STRING(g->bufs[bi]);
        uint64_t cap = g->cur == 0 ? g->pickle_len : g->lens[bi];
        uint64_t k = cap - g->cur_off;
        if (k > n)
            k = n;
        memcpy(dst + g->cur_off, p, k);
        g->cur_off += k;
        p += k;
        n -= k;
        if (arena && g->cur_off == DESC_BYTES && take_block(g, bi) < 0)
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ unpickling */

/*
 * Read-only numpy arrays.  multiprocessing before 3.14 pickles with
 * protocol 4, under which numpy rebuilds every array as a new, writable one.
 * cpool pickles with protocol 5 (out-of-band buffers need it), which keeps a
 * buffer's read-only flag: an array its sender could not write
 * (np.asarray() of a Pillow image, np.frombuffer() of bytes, a broadcast)
 * would arrive read-only, and `a -= 1` on it would fail where it works with
 * multiprocessing.  So a message that names numpy's _frombuffer (what numpy
 * rebuilds an array with under protocol 5) is unpickled by an Unpickler
 * whose find_class() hands back a wrapper of it.  The wrapper gives numpy a
 * writable buffer in place of a read-only one: the receiver's own, when the
 * data was gathered into one (a ShmBuf or a bytearray made for this
 * message: no copy), else a copy (an in-band buffer arrives as bytes, which
 * multiprocessing copies too).  From 3.14 multiprocessing pickles with
 * protocol 5 as well, and arrays keep their flag with both.
 */
#if PY_VERSION_HEX < 0x030E0000
#define NP_WRITABLE 1
#else
#define NP_WRITABLE 0
#endif

/* Is view v all of o, a buffer the receiver made for this message? */
static int
own_buffer(PyObject *o, const Py_buffer *v)
{
    if (o == NULL)
        return 0;
    if (Py_IS_TYPE(o, cp_state->shmbuf_type))
        return cp_blk_data(((ShmBuf *)o)->b) == v->buf &&
               ((ShmBuf *)o)->len == (uint64_t)v->len;
    return PyByteArray_CheckExact(o) && PyByteArray_AS_STRING(o) == v->buf &&
           PyByteArray_GET_SIZE(o) == v->len;
}

/* The array numpy's _frombuffer made (a new reference, stolen), in native
 * byte order: protocol 4 rebuilds an array of a plain dtype of the other
 * order ('>f4' here, as FITS files hold them) in native order, a structured
 * one as it was (its byteorder is '|'). */
static PyObject *
native_order(PyObject *arr)
{
    PyObject *dtype = PyObject_GetAttr(arr, cp_state->str_dtype);
    PyObject *bo = dtype ? PyObject_GetAttr(dtype, cp_state->str_byteorder) : NULL;
    int swap = bo != NULL && PyUnicode_Check(bo) &&
               (PyUnicode_CompareWithASCIIString(bo, "<") == 0 ||
                PyUnicode_CompareWithASCIIString(bo, ">") == 0);
    PyObject *r = NULL;
    if (bo == NULL) {
        Py_DECREF(arr);
    } else if (!swap) {
        r = arr;
    } else {
        PyObject *nd = PyObject_CallMethodOneArg(dtype, cp_state->str_newbyteorder,
                                                 cp_state->str_native);
        r = nd ? PyObject_CallMethodOneArg(arr, cp_state->str_astype, nd) : NULL;
        Py_XDECREF(nd);
        Py_DECREF(arr);
    }
    Py_XDECREF(bo);
    Py_XDECREF(dtype);
    return r;
}

/*
 * FromBuffer: what the unpickler hands back for numpy's _frombuffer (`real`,
 * found in `module`): called, it makes the array protocol 4 would, writable
 * (a writable buffer in place of a read-only one) and in native byte order.
 * Pickled, it is numpy's function again (as a message's argument, say).
 */
typedef struct {
    PyObject_HEAD
    PyObject *real, *module;
} FromBuffer;

static PyObject *
FromBuffer_call(FromBuffer *f, PyObject *args, PyObject *kw)
{
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (nargs != 4 || kw != NULL)
        return PyObject_Call(f->real, args, kw);
    PyObject *buf = PyTuple_GET_ITEM(args, 0), *w = NULL;
    if (PyBytes_CheckExact(buf)) {
        if ((w = PyByteArray_FromObject(buf)) == NULL)
            return NULL;
    } else if (PyMemoryView_Check(buf) && PyMemoryView_GET_BUFFER(buf)->readonly) {
        Py_buffer v;
        if (PyObject_GetBuffer(buf, &v, PyBUF_SIMPLE) < 0)
            return NULL;
        PyObject *o = PyMemoryView_GET_BUFFER(buf)->obj;
        w = own_buffer(o, &v) ? Py_NewRef(o) : PyByteArray_FromObject(buf);
        PyBuffer_Release(&v);
        if (w == NULL)
            return NULL;
    }
    PyObject *argv[4] = {w ? w : buf, PyTuple_GET_ITEM(args, 1),
                         PyTuple_GET_ITEM(args, 2), PyTuple_GET_ITEM(args, 3)};
    PyObject *r = PyObject_Vectorcall(f->real, argv, 4, NULL);
    Py_XDECREF(w);
    return r ? native_order(r) : NULL;
}

static PyObject *
FromBuffer_reduce(FromBuffer *f, PyObject *Py_UNUSED(unused))
{
    PyObject *m = PyImport_ImportModule("cpool._pickling");
    PyObject *g = m ? PyObject_GetAttrString(m, "named_global") : NULL;
    Py_XDECREF(m);
    return g ? Py_BuildValue("N(Os)", g, f->module, "_frombuffer") : NULL;
}

static void
FromBuffer_dealloc(FromBuffer *f)
{
    PyTypeObject *tp = Py_TYPE(f);
    Py_XDECREF(f->real);
    Py_XDECREF(f->module);
    tp->tp_free(f);
    Py_DECREF(tp);
}

static PyMethodDef FromBuffer_methods[] = {
    {"__reduce__", (PyCFunction)FromBuffer_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot FromBuffer_slots[] = {
    {Py_tp_call, FromBuffer_call},
    {Py_tp_dealloc, FromBuffer_dealloc},
    {Py_tp_methods, FromBuffer_methods},
    {0, NULL},
};

static PyType_Spec FromBuffer_spec = {
    .name = "cpool._core.FromBuffer",
    .basicsize = sizeof(FromBuffer),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = FromBuffer_slots,
};

/* find_class(self, module, name) of the unpickler above: the base class's,
 * with numpy's _frombuffer wrapped. */
static PyObject *
np_find_class(PyObject *Py_UNUSED(unused), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *f = PyObject_Vectorcall(cp_state->find_class, args, (size_t)nargs, NULL);
    if (f == NULL || nargs != 3 || !PyUnicode_Check(args[1]) ||
        !PyUnicode_Check(args[2]) ||
        PyUnicode_CompareWithASCIIString(args[2], "_frombuffer") != 0 ||
        (PyUnicode_CompareWithASCIIString(args[1], "numpy._core.numeric") != 0 &&
         PyUnicode_CompareWithASCIIString(args[1], "numpy.core.numeric") != 0))
        return f;
    FromBuffer *w = PyObject_New(FromBuffer, (PyTypeObject *)cp_state->frombuffer_type);
    if (w == NULL) {
        Py_DECREF(f);
        return NULL;
    }
    w->real = f;
    w->module = Py_NewRef(args[1]);
    return (PyObject *)w;
}

static PyMethodDef np_find_class_def = {
    "find_class", (PyCFunction)(void (*)(void))np_find_class, METH_FASTCALL, NULL};

/*
 * MemReader: the file an Unpickler reads a message from.  io.BytesIO would
 * copy the message first (into fresh memory, for one of a few hundred KiB:
 * page faults costing many times the unpickling); read() hands back slices
 * of the message's memoryview instead, so cp_loads() still sees any view
 * that outlives the unpickling.
 */
typedef struct {
    PyObject_HEAD
    PyObject *mv;
    Py_ssize_t pos, len;
} MemReader;

static PyObject *
reader_take(MemReader *r, Py_ssize_t k)
{
    if (k < 0 || k > r->len - r->pos)
        k = r->len - r->pos;
    PyObject *v = PySequence_GetSlice(r->mv, r->pos, r->pos + k);
    if (v != NULL)
        r->pos += k;
    return v;
}

static PyObject *
MemReader_read(MemReader *r, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t k = -1;
    if (nargs > 1 || (nargs == 1 && args[0] != Py_None &&
                      (k = PyNumber_AsSsize_t(args[0], PyExc_OverflowError)) == -1 &&
                      PyErr_Occurred()))
        return nargs > 1 ? (PyErr_SetString(PyExc_TypeError, "read(n=-1)"), NULL)
                         : NULL;
    return reader_take(r, k);
}

static PyObject *
MemReader_readline(MemReader *r, PyObject *Py_UNUSED(unused))
{
    const char *base = PyMemoryView_GET_BUFFER(r->mv)->buf;
    const char *nl = memchr(base + r->pos, '\n', (size_t)(r->len - r->pos));
    return reader_take(r, nl ? nl - (base + r->pos) + 1 : -1);
}

static PyObject *
MemReader_readinto(MemReader *r, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t k = b.len < r->len - r->pos ? b.len : r->len - r->pos;
    memcpy(b.buf, (const char *)PyMemoryView_GET_BUFFER(r->mv)->buf + r->pos,
           (size_t)k);
    r->pos += k;
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(k);
}

static void
MemReader_dealloc(MemReader *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    Py_XDECREF(r->mv);
    tp->tp_free(r);
    Py_DECREF(tp);
}

static PyMethodDef MemReader_methods[] = {
    {"read", (PyCFunction)(void (*)(void))MemReader_read, METH_FASTCALL, NULL},
    {"readline", (PyCFunction)MemReader_readline, METH_NOARGS, NULL},
    {"readinto", (PyCFunction)MemReader_readinto, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot MemReader_slots[] = {
    {Py_tp_dealloc, MemReader_dealloc},
    {Py_tp_methods, MemReader_methods},
    {0, NULL},
};

static PyType_Spec MemReader_spec = {
    .name = "cpool._core.MemReader",
    .basicsize = sizeof(MemReader),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = MemReader_slots,
};

/* A MemReader over memoryview mv (a C-contiguous one of bytes). */
static PyObject *
mem_reader(PyObject *mv)
{
    MemReader *r = PyObject_New(MemReader, (PyTypeObject *)cp_state->mem_reader_type);
    if (r == NULL)
        return NULL;
    r->mv = Py_NewRef(mv);
    r->pos = 0;
    r->len = PyMemoryView_GET_BUFFER(mv)->len;
    return (PyObject *)r;
}

/* The module's unpickler classes: st->unpickler is set; make
 * st->np_unpickler, its subclass with the find_class() above, and the
 * MemReader type. */
int
cp_unpickle_setup(cp_module_state *st)
{
    st->find_class = PyObject_GetAttrString(st->unpickler, "find_class");
    if (st->find_class == NULL)
        return -1;
    PyObject *fn = PyCFunction_NewEx(&np_find_class_def, NULL, NULL);
    PyObject *meth = fn ? PyInstanceMethod_New(fn) : NULL;
    Py_XDECREF(fn);
    if (meth == NULL)
        return -1;
    st->np_unpickler = PyObject_CallFunction(
        (PyObject *)&PyType_Type, "s(O){s()sOss}", "Unpickler", st->unpickler,
        "__slots__", "find_class", meth, "__module__", "cpool._core");
    Py_DECREF(meth);
    st->mem_reader_type = PyType_FromSpec(&MemReader_spec);
    st->frombuffer_type = PyType_FromSpec(&FromBuffer_spec);
    return st->np_unpickler == NULL || st->mem_reader_type == NULL ||
                   st->frombuffer_type == NULL
               ? -1
               : 0;
}

/*
 * Unpickle the n bytes at p (mv: a memoryview of them), with `buffers` (a
 * list, or NULL) for its out-of-band buffers and `table` (a list, or NULL)
 * for its persistent ids.  New reference or NULL.
 */
PyObject *
cp_unpickle(PyObject *mv, const uint8_t *p, uint64_t n, PyObject *buffers,
            PyObject *table)
{
    int np = NP_WRITABLE && memmem(p, n, "_frombuffer", 11) != NULL;
    PyObject *kw = NULL, *obj = NULL;
    if (buffers != NULL && (kw = Py_BuildValue("{sO}", "buffers", buffers)) == NULL)
        return NULL;
    if (!np && table == NULL) {
        PyObject *args = PyTuple_Pack(1, mv);
        obj = args ? PyObject_Call(cp_state->loads, args, kw) : NULL;
        Py_XDECREF(args);
        Py_XDECREF(kw);
        return obj;
    }
    PyObject *file = mem_reader(mv);
    PyObject *args = file ? PyTuple_Pack(1, file) : NULL;
    PyObject *u = args ? PyObject_Call(np ? cp_state->np_unpickler : cp_state->unpickler,
                                       args, kw)
                       : NULL;
    PyObject *get = u && table ? PyObject_GetAttr(table, cp_state->str_getitem) : NULL;
#if PY_VERSION_HEX >= 0x030D0000
    /* From 3.13 the class's persistent_load is a slot of its own (module.c),
     * which load() reads: set it even without persistent ids. */
    if (u != NULL && table == NULL)
        get = Py_NewRef(Py_None);
#endif
    if (u != NULL && (get == NULL ? table == NULL
                                  : PyObject_SetAttr(u, cp_state->str_persistent_load,
                                                     get) == 0))
        obj = PyObject_CallMethodNoArgs(u, cp_state->str_load);
    Py_XDECREF(get);
    Py_XDECREF(u);
    Py_XDECREF(args);
    Py_XDECREF(file);
    Py_XDECREF(kw);
    return obj;
}

/* The message is complete: unpickle it.  New reference or NULL. */
PyObject *
cp_gather_finish(cp_gather *g)
{
    if (g->off != g->total || g->pickle == NULL)
        return bad_message(), NULL;
    const uint8_t *p = (const uint8_t *)PyByteArray_AS_STRING(g->pickle);
    if (g->nbuf == 0)   /* plain data (codec.c) or a pickle */
        return cp_loads(p, g->pickle_len);
    PyObject *mv = PyMemoryView_FromMemory((char *)p, (Py_ssize_t)g->pickle_len,
                                           PyBUF_READ);
    if (mv == NULL)
        return NULL;
    PyObject *obj = NULL;
    /* PickleBuffers come out of `buffers` in order; bytes objects by index
     * (persistent ids, see SegWriter_pid). */
    PyObject *bufs = PyList_New(0), *table = PyList_New((Py_ssize_t)g->nbuf);
    int named = 0;
    for (uint32_t i = 0; bufs != NULL && table != NULL && i < g->nbuf; i++) {
        named |= g->isbytes[i];
        PyList_SET_ITEM(table, i, Py_NewRef(g->isbytes[i] ? g->bufs[i] : Py_None));
        if (!g->isbytes[i] && PyList_Append(bufs, g->bufs[i]) < 0)
            Py_CLEAR(bufs);
    }
    if (bufs != NULL && table != NULL)
        obj = cp_unpickle(mv, p, g->pickle_len, bufs, named ? table : NULL);
    Py_XDECREF(table);
    Py_XDECREF(bufs);
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
