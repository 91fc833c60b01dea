/*
 * npalloc.c - a worker's large numpy arrays, made in its arena partition.
 *
 * A task that returns a large array would have it copied into the worker's
 * arena partition for the parent to wrap (msg.c).  Instead, a worker hands
 * numpy a memory handler (numpy >= 1.22: PyDataMem_SetHandler) that makes
 * arrays of CP_ARENA_MIN bytes and more in blocks of that partition, on
 * pages that exist already (below its warm mark: no fresh memory, which is
 * what makes large transfers slow here), and everything else as numpy
 * would.  When such an array is returned, the block itself goes to the
 * parent: no copy, and no second set of pages for the worker to fault in.
 *
 * Only if nothing in the worker holds the array any more: the worker pickles
 * the result, lets go of it if that runs no Python code (cp_np_plain), and
 * the block goes if numpy freed the array meanwhile (its hold, `oref`, gone:
 * see cp_np_block).  Otherwise (a global cache, a view kept elsewhere, a
 * result with a __del__) the array is copied as before, so that the
 * worker's later changes never reach the parent's result.
 *
 * The handler is a context variable of numpy's; it is set on the worker's
 * main thread, where tasks run, once numpy is imported there (at start, or
 * after the task that imported it).  Arrays made on other threads, or too
 * large for the warm pages, or in a worker without a partition, are numpy's
 * own.  A process forked from the worker (os.fork() in a task) gets copies
 * of the worker's arrays as they are at the fork (arena.c: cp_fork_stage),
 * and its allocations are numpy's.
 *
 * CPOOL_ARENA_NUMPY=0 leaves numpy's allocator alone.
 */
#include <Python.h>     /* first: it defines _GNU_SOURCE */

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpool.h"

/* numpy's PyDataMem_Handler, version 1 (numpy/ndarraytypes.h), declared here
 * so that cpool builds without numpy. */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator allocator;
} np_handler;

/* Slots of numpy's C-API table (the _ARRAY_API capsule), the same in numpy
 * 1.x and 2.x. */
#define API_ABI_VERSION 0        /* PyArray_GetNDArrayCVersion */
#define API_ARRAY_TYPE 2         /* &PyArray_Type */
#define API_FEATURE_VERSION 211  /* PyArray_GetNDArrayCFeatureVersion */
#define API_SET_HANDLER 304      /* PyDataMem_SetHandler */
#define API_GET_HANDLER 305      /* PyDataMem_GetHandler */
#define FEATURE_1_22 0x0000000fu
#define ABI_1 0x01000009u
#define ABI_2 0x02000000u

static struct {
    cp_arena *a;
    int part;
    pid_t pid;            /* the worker */
    int state;            /* NP_* */
    Py_ssize_t nmods;     /* sys.modules' size when last looked at */
    np_allocator prev;    /* numpy's own allocator */
    PyTypeObject *ndarray;
    uint8_t *lo, *hi;     /* the partition */
} np;

enum { NP_OFF = 0, NP_WAITING = 1, NP_ON = 2 };

/* A block of ours (the data at ptr is in the partition), or NULL. */
static cp_blk *
ours(void *ptr)
{
    uint8_t *p = ptr;
    if (p < np.lo || p >= np.hi)
        return NULL;
    return (cp_blk *)(p - sizeof(cp_blk));
}

/*
 * Whether it pays.  Shared memory gets no transparent huge pages here
 * (shmem_enabled is `never` by default), and numpy asks for them on its own
 * large arrays, so a pass over an array in the arena runs slower than over
 * one on the heap (measured here: np.add over 64 MiB, 5.9 ms against 4.1 ms:
 * TLB misses, dear under a hypervisor's nested paging).  That is worth it
 * for an array that goes to the parent without a copy, and a loss for a
 * temporary the task frees.  So a worker makes arrays in the arena only
 * while the arena memory numpy freed in it (`temp`, bytes) stays within
 * twice what went to the parent without a copy (`given`), plus a start.
 */
#define TEMP_START (UINT64_C(64) << 20)
static uint64_t given, temp;

static int
pays(void)
{
    return temp <= 2 * given + TEMP_START;
}

/* msg.c: a block of the worker's own went to the parent without a copy. */
void
cp_np_given(uint64_t len)
{
    given += len;
}

/* In the worker, holding the GIL (the partition's layout is changed under
 * it): an array's data on warm pages of the partition, or NULL. */
static void *
arena_malloc(size_t size)
{
    if (size < CP_ARENA_MIN || np.state != NP_ON || getpid() != np.pid ||
        !PyGILState_Check() || !pays())
        return NULL;
    cp_blk *b = cp_arena_alloc_warm(np.a, np.part, size);
    if (b == NULL)
        return NULL;
    b->kind = CP_BLK_NUMPY;
    cp_arena_map(np.a, b);
    return cp_blk_data(b);
}

static void *
np_malloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = arena_malloc(size);
    return p != NULL ? p : np.prev.malloc(np.prev.ctx, size);
}

static void *
np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    size_t size;
    void *p = __builtin_mul_overflow(nelem, elsize, &size) ? NULL
                                                           : arena_malloc(size);
    if (p == NULL)
        return np.prev.calloc(np.prev.ctx, nelem, elsize);
    memset(p, 0, size);     /* reused pages */
    return p;
}

static void
np_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    cp_blk *b = ours(ptr);
    if (b == NULL) {
        np.prev.free(np.prev.ctx, ptr, size);
    } else if (getpid() == np.pid) {
        /* Held by nothing else (a result being sent holds it too): a
         * temporary. */
        if (cp_load_relaxed(&b->oref) == 1)
            temp += b->size;
        cp_arena_drop(b, 0);
    }
    /* else a forked child's copy of the worker's array, which stays until
     * the child exits: its header may be the worker's, if there was no
     * memory for the copy at the fork, and so is not to be trusted. */
}

static void *
np_realloc(void *ctx, void *ptr, size_t size)
{
    cp_blk *b = ours(ptr);
    if (b == NULL)
        return np.prev.realloc(np.prev.ctx, ptr, size);
    if (getpid() == np.pid && size >= CP_ARENA_MIN &&
        size <= b->size - sizeof(cp_blk)) {
        b->len = size;      /* fits where it is */
        return ptr;
    }
    /* The old data: its length as the header says, within the partition
     * (in a forked child the header may be the worker's: see np_free). */
    size_t old = (size_t)b->len, room = (size_t)(np.hi - (uint8_t *)ptr);
    void *q = np_malloc(ctx, size);
    if (q != NULL) {
        memcpy(q, ptr, size < old ? (size < room ? size : room)
                                  : (old < room ? old : room));
        np_free(ctx, ptr, old);
    }
    return q;
}

static np_handler handler = {
    "cpool_arena", 1, {NULL, np_malloc, np_calloc, np_realloc, np_free},
};

/* A fork of the worker: the child gets copies of the worker's arrays as
 * they are now (cp_fork_stage).  Only in the worker: a child's are copies
 * already. */
static void
before_fork(void)
{
    /* Held until the fork is done: no array is made or moved meanwhile (the
     * fork may come from a thread without the GIL). */
    cp_arena_layout_lock();
    if (np.state == NP_ON && getpid() == np.pid)
        cp_arena_stage_numpy(np.a, np.part);
}

static void
after_fork(void)
{
    cp_arena_layout_unlock();
}

/* numpy is imported: hand it our handler, if it is a numpy that has them and
 * its allocator is its own (a program's own handler is left alone).  Tried
 * once. */
static void
install(PyObject *umath)
{
    np.state = NP_OFF;
    PyObject *cap = PyObject_GetAttrString(umath, "_ARRAY_API");
    void **api = cap != NULL && PyCapsule_CheckExact(cap)
                     ? PyCapsule_GetPointer(cap, NULL) : NULL;
    Py_XDECREF(cap);      /* the table is static in numpy's module */
    if (api == NULL) {
        PyErr_Clear();
        return;
    }
    unsigned abi = ((unsigned (*)(void))api[API_ABI_VERSION])();
    if ((abi != ABI_1 && abi != ABI_2) ||
        ((unsigned (*)(void))api[API_FEATURE_VERSION])() < FEATURE_1_22)
        return;
    PyObject *cur = ((PyObject * (*)(void)) api[API_GET_HANDLER])();
    np_handler *h = cur ? PyCapsule_GetPointer(cur, "mem_handler") : NULL;
    if (h == NULL || h->version != 1 || strcmp(h->name, "default_allocator") != 0) {
        PyErr_Clear();
        Py_XDECREF(cur);
        return;
    }
    np.prev = h->allocator;   /* numpy's default handler is static too */
    np.ndarray = (PyTypeObject *)api[API_ARRAY_TYPE];
    Py_DECREF(cur);
    PyObject *mine = PyCapsule_New(&handler, "mem_handler", NULL);
    PyObject *old = mine ? ((PyObject * (*)(PyObject *)) api[API_SET_HANDLER])(mine)
                         : NULL;
    Py_XDECREF(mine);
    if (old == NULL) {
        PyErr_Clear();
        return;
    }
    Py_DECREF(old);
    if (cp_fork_stage_hooks() < 0 ||
        pthread_atfork(before_fork, after_fork, after_fork) != 0) {
        /* Without it a fork in a task would share the arrays: undo. */
        old = ((PyObject * (*)(PyObject *)) api[API_SET_HANDLER])(NULL);
        Py_XDECREF(old);
        PyErr_Clear();
        return;
    }
    np.state = NP_ON;
}

/* On the worker's main thread, before a task: hand numpy our handler once
 * it is imported (looked for only when sys.modules has changed). */
void
cp_np_poll(void)
{
    if (np.state != NP_WAITING)
        return;
    PyObject *mods = PyImport_GetModuleDict();
    if (mods == NULL || !PyDict_Check(mods) || PyDict_GET_SIZE(mods) == np.nmods)
        return;
    np.nmods = PyDict_GET_SIZE(mods);
    PyObject *m = PyDict_GetItemString(mods, "numpy._core._multiarray_umath");
    if (m == NULL)
        m = PyDict_GetItemString(mods, "numpy.core._multiarray_umath");
    if (m != NULL)
        install(m);
}

/* A worker starting, with its result partition (if any). */
void
cp_np_setup(cp_arena *a, int part)
{
    const char *env = getenv("CPOOL_ARENA_NUMPY");
    /* A worker of a pool made in a task: the handler it inherited is that
     * task's worker's, whose arrays (copies here) it still frees.  Its own
     * are numpy's. */
    if (np.state == NP_ON)
        return;
    np.state = NP_OFF;
    if (a == NULL || part < 0 || (env != NULL && strcmp(env, "0") == 0))
        return;
    np.a = a;
    np.part = part;
    np.pid = getpid();
    np.lo = a->base + (size_t)part * a->part_size;
    np.hi = np.lo + a->part_size;
    np.nmods = -1;
    np.state = NP_WAITING;
    cp_np_poll();
}

/* The block whose data is exactly the buffer (buf, len), if it is one of
 * this worker's arrays made here; else NULL. */
cp_blk *
cp_np_block(cp_arena *a, int part, const void *buf, uint64_t len)
{
    if (np.state != NP_ON || a != np.a || part != np.part || getpid() != np.pid)
        return NULL;
    cp_blk *b = cp_arena_block_at(a, part, buf);
    if (b == NULL || b->kind != CP_BLK_NUMPY || b->len != len ||
        cp_load_relaxed(&b->oref) == 0 ||
        cp_load_acquire(&b->lent) != CP_LENT_NO)
        return NULL;
    return b;
}

/*
 * Can letting go of v run Python code?  0 if surely not, else 1.  A
 * worker lets go of a result between pickling and sending it only if not
 * (msg.c): a __del__, a weakref callback or an object array's items freed
 * then could change the result's arrays after they were pickled, or the
 * message, or leave the worker.  Plain is: exact tuples, lists and dicts
 * (a few levels, a few thousand objects), exact arrays of numbers, booleans
 * or times (no objects, fields or dtype metadata, no weak references) whose
 * bases are such arrays, and exact ints, floats, complex numbers, bools,
 * None, strs, bytes and numpy's number scalars.
 */
static PyObject *plain_scalars;     /* numpy's number scalar types */

static int
plain_scalar(PyTypeObject *tp)
{
    if (tp == &PyLong_Type || tp == &PyFloat_Type || tp == &PyComplex_Type ||
        tp == &PyBool_Type || tp == Py_TYPE(Py_None) || tp == &PyUnicode_Type ||
        tp == &PyBytes_Type)
        return 1;
    if (plain_scalars == NULL) {
        static const char *names[] = {
            "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16",
            "uint32", "uint64", "float16", "float32", "float64", "longdouble",
            "complex64", "complex128", "clongdouble", "datetime64",
            "timedelta64"};
        PyObject *mods = PyImport_GetModuleDict();
        PyObject *numpy = PyDict_GetItemString(mods, "numpy");
        PyObject *l = numpy ? PyList_New(0) : NULL;
        for (size_t i = 0; l != NULL && i < sizeof names / sizeof *names; i++) {
            PyObject *t = PyObject_GetAttrString(numpy, names[i]);
            if (t != NULL && PyType_Check(t) && PyList_Append(l, t) < 0)
                Py_CLEAR(l);
            Py_XDECREF(t);
        }
        PyErr_Clear();
        if (l == NULL)
            return 0;
        plain_scalars = l;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(plain_scalars); i++)
        if ((PyObject *)tp == PyList_GET_ITEM(plain_scalars, i))
            return 1;
    return 0;
}

/* An array's dtype is of numbers, booleans or times, without metadata. */
static int
plain_dtype(PyObject *arr)
{
    PyObject *dt = PyObject_GetAttrString(arr, "dtype");
    PyObject *kind = dt ? PyObject_GetAttrString(dt, "kind") : NULL;
    PyObject *meta = dt ? PyObject_GetAttrString(dt, "metadata") : NULL;
    PyObject *names = dt ? PyObject_GetAttrString(dt, "names") : NULL;
    const char *k = kind && PyUnicode_Check(kind) ? PyUnicode_AsUTF8(kind) : NULL;
    int ok = k != NULL && k[0] != '\0' && k[1] == '\0' &&
             strchr("biufcmM", k[0]) != NULL && meta == Py_None && names == Py_None;
    Py_XDECREF(dt);
    Py_XDECREF(kind);
    Py_XDECREF(meta);
    Py_XDECREF(names);
    PyErr_Clear();
    return ok;
}

static int
runs_code(PyObject *v, int depth, int *budget)
{
    if (--*budget < 0 || depth > 4)
        return 1;
    PyTypeObject *tp = Py_TYPE(v);
    if (tp == &PyTuple_Type || tp == &PyList_Type) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
        PyObject **items = PySequence_Fast_ITEMS(v);
        for (Py_ssize_t i = 0; i < n; i++)
            if (runs_code(items[i], depth + 1, budget))
                return 1;
        return 0;
    }
    if (tp == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *k, *x;
        while (PyDict_Next(v, &pos, &k, &x))
            if (runs_code(k, depth + 1, budget) || runs_code(x, depth + 1, budget))
                return 1;
        return 0;
    }
    if (tp == np.ndarray) {
        if (tp->tp_weaklistoffset > 0 &&
            *(PyObject **)((char *)v + tp->tp_weaklistoffset) != NULL)
            return 1;
        if (!plain_dtype(v))
            return 1;
        PyObject *base = PyObject_GetAttrString(v, "base");
        int bad = base == NULL ||
                  (base != Py_None && runs_code(base, depth + 1, budget));
        Py_XDECREF(base);
        PyErr_Clear();
        return bad;
    }
    return !plain_scalar(tp);
}

int
cp_np_plain(PyObject *v)
{
    int budget = 4096;
    return np.state == NP_ON && !runs_code(v, 0, &budget);
}
