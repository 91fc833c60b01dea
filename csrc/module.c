/*
 * module.c - cpool._core: the Core type (core.c) and Ring, a one-process
 * view of the shared-memory ring used by the tests (wrap-around, full ring,
 * fragmented messages, corrupt input).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "structmember.h"
#include "cpool.h"

#ifndef CPOOL_SANITIZED
#define CPOOL_SANITIZED 0   /* 1 in a CPOOL_SANITIZE=1 build (setup.py) */
#endif

cp_module_state *cp_state;

/* ------------------------------------------------------------ test ring */

typedef struct {
    PyObject_HEAD
    void *mem;
    cp_ring prod;
    cp_ring cons;
} Ring;

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long cap;
    static char *kwlist[] = {"capacity", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K", kwlist, &cap))
        return NULL;
    if (cap < 4096 || (cap & (cap - 1)) || cap > (1ull << 34)) {
        PyErr_SetString(PyExc_ValueError,
                        "capacity must be a power of two from 4096 to 2**34");
        return NULL;
    }
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    if (posix_memalign(&r->mem, 4096, cp_ring_bytes(cap)) != 0) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    cp_ring_format(r->mem, cap);
    cp_ring_attach(&r->prod, r->mem, -1);
    cp_ring_attach(&r->cons, r->mem, -1);
    return (PyObject *)r;
}

static void
Ring_dealloc(Ring *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    free(r->mem);
    tp->tp_free(r);
    Py_DECREF(tp);
}

/* push(data, kind=TASK) -> bool: one record, committed and flushed. */
static PyObject *
Ring_push(Ring *r, PyObject *args)
{
    Py_buffer b;
    int kind = CP_K_TASK;
    if (!PyArg_ParseTuple(args, "y*|i", &b, &kind))
        return NULL;
    if ((uint64_t)b.len > r->prod.max_frag) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "record larger than max_frag");
        return NULL;
    }
    cp_rec *rec = cp_ring_reserve(&r->prod, (uint32_t)b.len);
    if (rec == NULL) {
        PyBuffer_Release(&b);
        Py_RETURN_FALSE;
    }
    memset((uint8_t *)rec + 4, 0, sizeof *rec - 4);
    rec->kind = (uint16_t)kind;
    rec->total = (uint64_t)b.len;
    memcpy((uint8_t *)rec + sizeof *rec, b.buf, (size_t)b.len);
    cp_ring_commit(&r->prod, rec);
    cp_ring_flush(&r->prod);
    PyBuffer_Release(&b);
    Py_RETURN_TRUE;
}

/* send(data, offset) -> new offset: as much of a message as fits. */
static PyObject *
Ring_send(Ring *r, PyObject *args)
{
    Py_buffer b;
    unsigned long long off;
    if (!PyArg_ParseTuple(args, "y*K", &b, &off))
        return NULL;
    if (off > (uint64_t)b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "offset past the end");
        return NULL;
    }
    cp_rec tmpl = {.kind = CP_K_RESULT};
    uint64_t o = off;
    if (o < (uint64_t)b.len || b.len == 0)
        cp_ring_send_some(&r->prod, &tmpl, b.buf, (uint64_t)b.len, &o, NULL, NULL);
    cp_ring_flush(&r->prod);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(o);
}

/* pop() -> (kind, flags, total, payload) or None; ValueError if corrupt. */
static PyObject *
Ring_pop(Ring *r, PyObject *Py_UNUSED(ignored))
{
    cp_rec h;
    const uint8_t *p;
    int rc = cp_ring_peek(&r->cons, &h, &p);
    if (rc == 0)
        Py_RETURN_NONE;
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, "corrupt ring");
        return NULL;
    }
    PyObject *res = Py_BuildValue("iiKy#", h.kind, h.flags,
                                  (unsigned long long)h.total, p,
                                  (Py_ssize_t)h.size);
    cp_ring_release(&r->cons, &h, 1);
    return res;
}

/* raw(data): write arbitrary bytes at the producer position and publish
 * them, as a corrupt or hostile producer would. */
static PyObject *
Ring_raw(Ring *r, PyObject *args)
{
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b))
        return NULL;
    uint64_t n = (uint64_t)b.len;
    if (n > cp_ring_free_bytes(&r->prod)) {
        PyBuffer_Release(&b);
        Py_RETURN_FALSE;
    }
    for (uint64_t i = 0; i < n; i++)
        r->prod.data[(r->prod.pos + i) & r->prod.mask] = ((uint8_t *)b.buf)[i];
    r->prod.pos += n;
    cp_ring_flush(&r->prod);
    PyBuffer_Release(&b);
    Py_RETURN_TRUE;
}

/* resync(): drop everything unread (after a corrupt read). */
static PyObject *
Ring_resync(Ring *r, PyObject *Py_UNUSED(ignored))
{
    r->cons.pos = r->prod.pos;
    cp_ring_release_flush(&r->cons);
    /* Keep the producer 8-byte aligned for the next records. */
    uint64_t a = CP_REC_ALIGN(r->prod.pos);
    r->prod.pos = r->cons.pos = a;
    cp_store_release(&r->cons.h->tail, a);
    cp_store_release(&r->cons.h->head, a);
    r->prod.other = r->cons.other = a;
    Py_RETURN_NONE;
}

/* wait(timeout) -> bool: the consumer's wait for data (no spin), without
 * the GIL; False if it timed out (or a signal came) with the ring empty. */
static PyObject *
Ring_wait(Ring *r, PyObject *arg)
{
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(t >= 0.0 && t <= 3600.0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be 0 to 3600 seconds");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cp_ring_wait_data(&r->cons, 0, (long)(t * 1e9));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc == 0);
}

/* wait_space(size, timeout) -> bool: the producer's wait for room for a
 * record of size payload bytes (no spin), without the GIL. */
static PyObject *
Ring_wait_space(Ring *r, PyObject *args)
{
    unsigned int size;
    double t;
    if (!PyArg_ParseTuple(args, "Id", &size, &t))
        return NULL;
    if (!(t >= 0.0 && t <= 3600.0) || size > r->prod.max_frag) {
        PyErr_SetString(PyExc_ValueError,
                        "size must be at most max_frag, timeout 0 to 3600 s");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cp_ring_wait_space(&r->prod, cp_ring_need(&r->prod, size), 0,
                            (long)(t * 1e9));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc == 0);
}

/* release(): the consumer hands back its space again with nothing new,
 * waking a producer that sleeps for room (see flush()). */
static PyObject *
Ring_release(Ring *r, PyObject *Py_UNUSED(ignored))
{
    cp_ring_release_flush(&r->cons);
    Py_RETURN_NONE;
}

/* flush(): publish again with nothing new, waking a sleeping consumer: what
 * the consumer sees from a producer whose wake-up comes after the consumer
 * has taken the records it was for. */
static PyObject *
Ring_flush(Ring *r, PyObject *Py_UNUSED(ignored))
{
    cp_ring_flush(&r->prod);
    Py_RETURN_NONE;
}

static PyObject *
Ring_get_free(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(cp_ring_free_bytes(&r->prod));
}

static PyObject *
Ring_get_max_frag(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->prod.max_frag);
}

static PyObject *
Ring_get_positions(Ring *r, void *Py_UNUSED(c))
{
    return Py_BuildValue("KK", (unsigned long long)r->cons.h->head,
                         (unsigned long long)r->cons.h->tail);
}

static PyMethodDef Ring_methods[] = {
    {"push", (PyCFunction)Ring_push, METH_VARARGS, "push(data, kind=3) -> bool"},
    {"send", (PyCFunction)Ring_send, METH_VARARGS, "send(data, offset) -> offset"},
    {"pop", (PyCFunction)Ring_pop, METH_NOARGS, "pop() -> (kind, flags, total, payload) | None"},
    {"raw", (PyCFunction)Ring_raw, METH_VARARGS, "raw(data) -> bool"},
    {"resync", (PyCFunction)Ring_resync, METH_NOARGS, "drop unread bytes"},
    {"wait", (PyCFunction)Ring_wait, METH_O, "wait(timeout) -> bool: data came"},
    {"flush", (PyCFunction)Ring_flush, METH_NOARGS, "publish nothing new; wake"},
    {"wait_space", (PyCFunction)Ring_wait_space, METH_VARARGS,
     "wait_space(size, timeout) -> bool: room came"},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, "free nothing new; wake"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"free", (getter)Ring_get_free, NULL, NULL, NULL},
    {"max_frag", (getter)Ring_get_max_frag, NULL, NULL, NULL},
    {"positions", (getter)Ring_get_positions, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Ring_slots[] = {
    {Py_tp_new, Ring_new},
    {Py_tp_dealloc, Ring_dealloc},
    {Py_tp_methods, Ring_methods},
    {Py_tp_getset, Ring_getset},
    {Py_tp_doc, "A ring in private memory, for tests of the ring code."},
    {0, NULL},
};

static PyType_Spec Ring_spec = {
    .name = "cpool._core.Ring",
    .basicsize = sizeof(Ring),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Ring_slots,
};

/* --------------------------------------------------------------- module */

/* decode_message(data, oob, chunk): run the receive path (cp_gather) on a
 * message fed in pieces of `chunk` bytes; for tests of the decoder. */
static PyObject *
decode_message(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer v;
    int oob;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "y*pn", &v, &oob, &chunk))
        return NULL;
    if (chunk < 1)
        chunk = 1;
    PyObject *scratch = NULL, *obj = NULL;
    cp_gather g;
    if (cp_gather_init(&g, (uint64_t)v.len, oob, &scratch, CP_WARM_MAX, NULL) == 0) {
        const uint8_t *p = v.buf;
        Py_ssize_t off = 0;
        int ok = 1;
        while (ok && off < v.len) {
            Py_ssize_t n = v.len - off < chunk ? v.len - off : chunk;
            ok = cp_gather_feed(&g, p + off, (uint64_t)n) == 0;
            off += n;
        }
        if (ok)
            obj = cp_gather_finish(&g);
    }
    cp_gather_clear(&g);
    Py_XDECREF(scratch);
    PyBuffer_Release(&v);
    return obj;
}


#if PY_VERSION_HEX >= 0x030D0000
/* type(name, (base,), {"__slots__": (slot,)}); steals base. */
static PyObject *
subclass_with_slot(PyObject *base, const char *name, const char *slot)
{
    if (base == NULL)
        return NULL;
    PyObject *sub = PyObject_CallFunction((PyObject *)&PyType_Type, "s(O){s(s)s s}",
                                          name, base, "__slots__", slot,
                                          "__module__", "cpool._core");
    Py_DECREF(base);
    return sub;
}
#endif

static int
module_exec(PyObject *m)
{
    cp_module_state *st = PyModule_GetState(m);
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (pickle == NULL)
        return -1;
    st->dumps = PyObject_GetAttrString(pickle, "dumps");
    st->loads = PyObject_GetAttrString(pickle, "loads");
    st->pickler = PyObject_GetAttrString(pickle, "Pickler");
    st->unpickler = PyObject_GetAttrString(pickle, "Unpickler");
    Py_DECREF(pickle);
#if PY_VERSION_HEX >= 0x030D0000
    /* From 3.13 a pickler's persistent_id (an unpickler's persistent_load)
     * is a method, which an instance of the C classes cannot override; an
     * instance of a subclass can, by an attribute of its own. */
    st->pickler = subclass_with_slot(st->pickler, "Pickler", "persistent_id");
    st->unpickler = subclass_with_slot(st->unpickler, "Unpickler",
                                       "persistent_load");
#endif
    if (st->unpickler == NULL || cp_unpickle_setup(st) < 0 || cp_codec_setup() < 0)
        return -1;
    st->protocol = PyLong_FromLong(5);
    st->str_set = PyUnicode_InternFromString("_set");
    st->str_set_many = PyUnicode_InternFromString("_set_many");
    st->str_fail_quietly = PyUnicode_InternFromString("_fail_quietly");
    st->str_release = PyUnicode_InternFromString("release");
    static const struct { size_t off; const char *name; } names[] = {
        {offsetof(cp_module_state, str_oob), "oob"},
        {offsetof(cp_module_state, str_pid), "pid"},
        {offsetof(cp_module_state, str_dump), "dump"},
        {offsetof(cp_module_state, str_load), "load"},
        {offsetof(cp_module_state, str_getitem), "__getitem__"},
        {offsetof(cp_module_state, str_persistent_id), "persistent_id"},
        {offsetof(cp_module_state, str_persistent_load), "persistent_load"},
        {offsetof(cp_module_state, str_dispatch_table), "dispatch_table"},
        {offsetof(cp_module_state, str_byteorder), "byteorder"},
        {offsetof(cp_module_state, str_newbyteorder), "newbyteorder"},
        {offsetof(cp_module_state, str_astype), "astype"},
        {offsetof(cp_module_state, str_native), "="},
        {offsetof(cp_module_state, str_dtype), "dtype"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        PyObject *s = PyUnicode_InternFromString(names[i].name);
        if (s == NULL)
            return -1;
        *(PyObject **)((char *)st + names[i].off) = s;
    }
    if (!st->dumps || !st->loads || !st->pickler || !st->unpickler ||
        !st->protocol || !st->str_set || !st->str_set_many ||
        !st->str_fail_quietly ||
        !st->str_release)
        return -1;
    st->segwriter_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &cp_segwriter_spec, NULL);
    if (st->segwriter_type == NULL)
        return -1;
    st->shmbuf_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &cp_shmbuf_spec, NULL);
    st->arenaref_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &cp_arenaref_spec, NULL);
    if (st->shmbuf_type == NULL || st->arenaref_type == NULL)
        return -1;
    st->core_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &cp_core_spec, NULL);
    if (st->core_type == NULL || PyModule_AddType(m, st->core_type) < 0)
        return -1;
    st->result_base = (PyTypeObject *)PyType_FromModuleAndSpec(m, &cp_result_base_spec, NULL);
    if (st->result_base == NULL || PyModule_AddType(m, st->result_base) < 0)
        return -1;
    st->pool_base = (PyTypeObject *)PyType_FromModuleAndSpec(m, &cp_pool_base_spec, NULL);
    if (st->pool_base == NULL || PyModule_AddType(m, st->pool_base) < 0)
        return -1;
    PyTypeObject *ring = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Ring_spec, NULL);
    if (ring == NULL)
        return -1;
    int rc = PyModule_AddType(m, ring);
    Py_DECREF(ring);
    if (rc < 0)
        return -1;
    PyTypeObject *consumer = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &cp_consumer_base_spec, NULL);
    if (consumer == NULL)
        return -1;
    rc = PyModule_AddType(m, consumer);
    Py_DECREF(consumer);
    if (rc < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "MODE_APPLY", CP_MODE_APPLY) < 0 ||
        PyModule_AddIntConstant(m, "MODE_MAP", CP_MODE_MAP) < 0 ||
        PyModule_AddIntConstant(m, "MODE_STARMAP", CP_MODE_STARMAP) < 0 ||
        PyModule_AddIntConstant(m, "MODE_CALL1", CP_MODE_CALL1) < 0 ||
        PyModule_AddIntConstant(m, "E_LOST", CP_E_LOST) < 0 ||
        PyModule_AddIntConstant(m, "E_TERMINATED", CP_E_TERMINATED) < 0 ||
        PyModule_AddIntConstant(m, "E_BROKEN", CP_E_BROKEN) < 0 ||
        PyModule_AddIntConstant(m, "SANITIZED", CPOOL_SANITIZED) < 0 ||
        PyModule_AddIntConstant(m, "E_PROTO", CP_E_PROTO) < 0 ||
        PyModule_AddIntConstant(m, "E_STARTUP", CP_E_STARTUP) < 0 ||
        PyModule_AddIntConstant(m, "STATE_RUN", CORE_RUN) < 0 ||
        PyModule_AddIntConstant(m, "STATE_DONE", CORE_DONE) < 0 ||
        PyModule_AddIntConstant(m, "STATE_TERMINATED", CORE_TERMINATED) < 0 ||
        PyModule_AddIntConstant(m, "STATE_BROKEN", CORE_BROKEN) < 0 ||
        PyModule_AddIntConstant(m, "REC_HEADER", (long)sizeof(cp_rec)) < 0 ||
        PyModule_AddIntConstant(m, "K_PAD", CP_K_PAD) < 0 ||
        PyModule_AddIntConstant(m, "K_TASK", CP_K_TASK) < 0 ||
        PyModule_AddIntConstant(m, "K_RESULT", CP_K_RESULT) < 0 ||
        PyModule_AddIntConstant(m, "F_MORE", CP_F_MORE) < 0)
        return -1;
    cp_state = st;
    cp_msg_fork_hooks();
    return 0;
}

static int
module_traverse(PyObject *m, visitproc visit, void *arg)
{
    cp_module_state *st = PyModule_GetState(m);
    Py_VISIT(st->dumps);
    Py_VISIT(st->loads);
    Py_VISIT(st->pickler);
    Py_VISIT(st->unpickler);
    Py_VISIT(st->np_unpickler);
    Py_VISIT(st->find_class);
    Py_VISIT(st->mem_reader_type);
    Py_VISIT(st->frombuffer_type);
    Py_VISIT(st->fp_reducers);
    Py_VISIT(st->fp_dumps);
    Py_VISIT(st->fp_table);
    Py_VISIT(st->segwriter_type);
    Py_VISIT(st->shmbuf_type);
    Py_VISIT(st->arenaref_type);
    Py_VISIT(st->core_type);
    Py_VISIT(st->result_base);
    Py_VISIT(st->pool_base);
    return 0;
}

static int
module_clear(PyObject *m)
{
    cp_module_state *st = PyModule_GetState(m);
    Py_CLEAR(st->dumps);
    Py_CLEAR(st->loads);
    Py_CLEAR(st->pickler);
    Py_CLEAR(st->unpickler);
    Py_CLEAR(st->np_unpickler);
    Py_CLEAR(st->find_class);
    Py_CLEAR(st->mem_reader_type);
    Py_CLEAR(st->frombuffer_type);
    Py_CLEAR(st->fp_reducers);
    Py_CLEAR(st->fp_dumps);
    Py_CLEAR(st->fp_table);
    Py_CLEAR(st->segwriter_type);
    Py_CLEAR(st->shmbuf_type);
    Py_CLEAR(st->arenaref_type);
    Py_CLEAR(st->protocol);
    Py_CLEAR(st->str_set);
    Py_CLEAR(st->str_set_many);
    Py_CLEAR(st->str_fail_quietly);
    Py_CLEAR(st->str_release);
    Py_CLEAR(st->str_oob);
    Py_CLEAR(st->str_pid);
    Py_CLEAR(st->str_dump);
    Py_CLEAR(st->str_load);
    Py_CLEAR(st->str_getitem);
    Py_CLEAR(st->str_persistent_id);
    Py_CLEAR(st->str_persistent_load);
    Py_CLEAR(st->str_dispatch_table);
    Py_CLEAR(st->str_byteorder);
    Py_CLEAR(st->str_newbyteorder);
    Py_CLEAR(st->str_astype);
    Py_CLEAR(st->str_native);
    Py_CLEAR(st->str_dtype);
    Py_CLEAR(st->core_type);
    Py_CLEAR(st->result_base);
    Py_CLEAR(st->pool_base);
    cp_result_clear_types();
    cp_codec_clear();
    return 0;
}

static void
module_free(void *m)
{
    module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static PyObject *
arena_carried(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(arg))
{
    return PyLong_FromUnsignedLongLong(cp_arena_carried());
}

static PyObject *
drop_carried_arena(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(arg))
{
    cp_arena_drop_parked();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"drop_carried_arena", drop_carried_arena, METH_NOARGS,
     "drop_carried_arena(): give back the pages the last pool's arena keeps for\n"
     "the next pool (see arena_carried)."},
    {"arena_carried", arena_carried, METH_NOARGS,
     "arena_carried() -> the bytes of shared memory the last pool's arena keeps\n"
     "populated for the next pool of this process (0: none)."},
    {"pyheap_info", cp_pyheap_info, METH_NOARGS,
     "pyheap_info() -> {installed, active, keep, kept, arenas}: the freed object\n"
     "arenas this process keeps for reuse once it has made a pool (csrc/pyheap.c)."},
    {"encode_plain", (PyCFunction)(void (*)(void))cp_codec_encode_plain_py, METH_FASTCALL,
     "encode_plain(obj, max_bytes=2**20) -> bytes, or None if obj is not plain data\n"
     "(or its encoding exceeds max_bytes)."},
    {"pickle_plain", (PyCFunction)cp_codec_pickle, METH_O,
     "pickle_plain(obj) -> a protocol 5 pickle of plain data, without memo, or None\n"
     "if obj is not plain data."},
    {"loads", (PyCFunction)cp_codec_loads_py, METH_O,
     "loads(data) -> obj: a message as the receiving side decodes it (plain data\n"
     "or a pickle)."},
    {"decode_message", decode_message, METH_VARARGS,
     "decode_message(data, oob, chunk) -> obj: a message fed to the gathering\n"
     "receive path in pieces of chunk bytes (tests of the decoder)."},
    {"done_lock", (PyCFunction)cp_result_done_lock, METH_O,
     "done_lock(result) -> its _done lock, made (held) if it has none, or None if\n"
     "it is ready without one (see cpool.pool.ApplyResult)."},
    {"set_result_type", (PyCFunction)(void (*)(void))cp_result_set_type, METH_FASTCALL,
     "set_result_type(ApplyResult, job_counter, Lock, TimeoutError): what\n"
     "apply_async() makes (ApplyResult derives from ResultBase)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cpool._core",
    .m_doc = "The C core of cpool (private).",
    .m_size = sizeof(cp_module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&module_def);
}
