/*
 * worker.c - the worker loop.
 *
 * Runs in a process forked by the zygote (see proc.c), which has run
 * PyOS_AfterFork_Child() on the parent's snapshot, so Python is usable: this
 * thread holds the GIL and is the only thread.  It never returns: it leaves with
 * _exit() after flushing sys.stdout and sys.stderr.
 *
 * Protocol, per task record (CP_K_TASK):
 *   1. ctl->running = seq, before the record is released, so that a parent
 *      that finds this process dead knows which task it held;
 *   2. unpickle the payload (in place in the ring when it is one fragment);
 *   3. run it; pickle (ok, value); publish a CP_K_RESULT record;
 *   4. ctl->results counts the result, right after publishing it (the
 *      parent's measure of what is still queued here: unfinished() in
 *      core.c), then ctl->running = 0.
 * Every failure inside 2-3 becomes an error result for that task; only a
 * death of the process loses the task, and the parent reports that one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "cpool.h"

typedef struct {
    Core *c;
    PyObject *scratch;   /* bytearray reused to gather messages */
    int slot;
    int part;       /* arena partition for results, or -1 */
    uint64_t args_mapped;   /* of the arguments partition (premapping) */
    cp_ctl *ctl;
    cp_ring tq;     /* consumer end of the task ring */
    cp_ring rq;     /* producer end of the result ring */
    uint64_t results;   /* results published (ctl->results) */
    long spin_ns;
} wctx;

static void
flush_std(void)
{
    const char *names[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *f = PySys_GetObject(names[i]);  /* borrowed */
        if (f == NULL || f == Py_None)
            continue;
        PyObject *r = PyObject_CallMethod(f, "flush", NULL);
        if (r == NULL)
            PyErr_Clear();
        Py_XDECREF(r);
    }
}

/*
 * The heap.  glibc serves blocks over 32 MiB with fresh mmap()s, whose first
 * touch costs more than the copy into them; from the heap, a task's large
 * arguments and results reuse the memory the previous one freed.  So the
 * worker turns mmap off and lets free() keep up to `keep` bytes at the top
 * of the heap (cp_warm_share: 256 MiB in a pool of up to 4 workers, less in
 * larger ones).  What free() keeps is bounded only at the top, though: a
 * freed block under one still in use stays, however large (a task's 1 GiB
 * temporary, allocated before something the worker keeps), where
 * multiprocessing's worker would have had it mmap()ed and given it back.
 * So once the worker has been idle for HEAP_IDLE_NS, if tasks ran since it
 * last looked and its heap is larger than `keep`, it looks at what is free
 * (mallinfo2) and, if that is more than `keep`, gives back the pages of
 * every free block (malloc_trim; the top keeps `keep`).  Only when idle: a
 * worker kept busy reuses what its tasks free (giving it back after every
 * task would make a task that churns through more than `keep` fault it all
 * in again each time), and a trim, which may take tens of ms, delays a task
 * only if one comes right then.
 * (This process is ours; the parent's malloc is left alone.  Python's
 * freed object arenas are kept in both: pyheap.c.)
 */
#define HEAP_IDLE_NS (UINT64_C(1000) * 1000 * 1000)

static struct {
    uintptr_t base;         /* the program break when the worker started */
    size_t keep;
    unsigned long tasks;    /* tasks done */
    unsigned long seen;     /* ... at the last look */
    uint64_t idle_ns;       /* when the worker went idle, or 0 */
} heap;

static void
heap_setup(int nworkers)
{
    heap.keep = (size_t)cp_warm_share(nworkers);
    cp_pyheap_limit(heap.keep);
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, (int)heap.keep);
    heap.base = (uintptr_t)sbrk(0);
}

static size_t
heap_free_bytes(void)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    return mallinfo2().fordblks;
#else
    return (size_t)(unsigned)mallinfo().fordblks;
#endif
}

/* The worker is idle (no task to read): look at the heap if that is due
 * (see above).  Returns how long until it is (ns), or -1 if no look is
 * pending.  Needs no GIL. */
static long
heap_idle(void)
{
    if (heap.tasks == heap.seen || (uintptr_t)sbrk(0) - heap.base <= heap.keep)
        return -1;
    uint64_t now = cp_now_ns();
    if (heap.idle_ns == 0)
        heap.idle_ns = now;
    if (now - heap.idle_ns < HEAP_IDLE_NS)
        return (long)(HEAP_IDLE_NS - (now - heap.idle_ns));
    heap.seen = heap.tasks;
    if (heap_free_bytes() > heap.keep)
        malloc_trim(heap.keep);
    return -1;
}

static volatile int forked_copy;
static cp_ctl *my_ctl;     /* this worker's control block */

static void __attribute__((noreturn))
worker_exit(int code)
{
    flush_std();
    if (my_ctl != NULL && !forked_copy) {
        /* terminate() may be waiting for this (see let_idle_workers_leave) */
        cp_store_release(&my_ctl->state, CP_W_LEFT);
        cp_futex_wake(&my_ctl->state);
    }
    _exit(code);
}

/* Call cpool._worker.<name>(a, b, o), or with no arguments if fmt is NULL;
 * an error there is reported, not fatal (the worker can run tasks without
 * it). */
static void
call_worker_hook(const char *name, const char *fmt, int a, int b, PyObject *o)
{
    PyObject *mod = PyImport_ImportModule("cpool._worker");
    PyObject *r = mod ? (fmt ? PyObject_CallMethod(mod, name, fmt, a, b, o)
                             : PyObject_CallMethod(mod, name, NULL))
                      : NULL;
    if (r == NULL)
        PyErr_WriteUnraisable(mod);
    Py_XDECREF(r);
    Py_XDECREF(mod);
}

/* Leave normally: multiprocessing's exit finalizers run first. */
static void __attribute__((noreturn))
worker_leave(void)
{
    call_worker_hook("exiting", NULL, 0, 0, NULL);
    worker_exit(0);
}

/* A task (or the initializer) may fork.  A child that returns from the
 * function instead of exiting would go on as a second copy of this worker,
 * taking tasks and publishing results (or arena blocks) beside it: it exits
 * here, before it touches anything shared.  The atfork hook (which
 * os.fork() and libc's fork() run) marks such a child. */
static void
mark_forked_copy(void)
{
    forked_copy = 1;
}

static void
exit_if_forked_copy(void)
{
    if (forked_copy)
        _exit(0);
}

/* Send a whole message, waiting for room.  The parent never stops reading,
 * so this only blocks while the parent is busy or while its own death is
 * about to kill us (PR_SET_PDEATHSIG). */
static void
send_msg(wctx *w, const cp_rec *tmpl, PyObject *msg)
{
    exit_if_forked_copy();
    uint64_t off = 0, total = cp_msg_size(msg);
    for (;;) {
        int rc = cp_msg_send_some(&w->rq, tmpl, msg, &off, NULL, NULL);
        if (rc < 0)
            worker_exit(78);   /* our own result's buffer vanished */
        if (rc)
            break;
        cp_ring_flush(&w->rq);
        uint64_t need = cp_ring_next_need(&w->rq, total - off);
        Py_BEGIN_ALLOW_THREADS
        while (cp_ring_wait_space(&w->rq, need, w->spin_ns, -1) != 0)
            ;
        Py_END_ALLOW_THREADS
    }
    cp_ring_flush(&w->rq);
}

/* Wait for the next record; returns 1 with it, or exits on a corrupt ring. */
static void
next_record(wctx *w, cp_rec *hdr, const uint8_t **payload)
{
    exit_if_forked_copy();
    for (;;) {
        int rc = cp_ring_peek(&w->tq, hdr, payload);
        if (rc == 1)
            return;
        if (rc < 0)
            worker_exit(72);   /* cannot happen with a sane parent */
        cp_arena *a = w->c->arena;
        Py_BEGIN_ALLOW_THREADS
        /* Idle: map a chunk of its own partition's pages or of the
         * arguments', then look again. */
        if (a == NULL || !(cp_arena_premap_own(a, w->part) ||
                           cp_arena_premap_args(a, &w->args_mapped)))
            cp_ring_wait_data(&w->tq, w->spin_ns, heap_idle());
        Py_END_ALLOW_THREADS
    }
}

/*
 * Read a message whose first fragment is *hdr and unpickle it.  A single
 * fragment is unpickled in place in the ring; larger messages, and messages
 * with out-of-band buffers, are gathered first (cp_gather).  Returns a new
 * reference, or NULL with an exception set; the message has been consumed
 * either way.
 */
static PyObject *
read_message(wctx *w, const cp_rec *hdr, const uint8_t *payload)
{
    PyObject *obj;
    if (!(hdr->flags & (CP_F_MORE | CP_F_OOB))) {
        obj = cp_loads(payload, hdr->size);
        cp_ring_release(&w->tq, hdr, 1);
        return obj;
    }
    cp_gather g;
    int ok = cp_gather_init(&g, hdr->total, (hdr->flags & CP_F_OOB) != 0,
                            &w->scratch, heap.keep,
                            &(cp_arena_use){w->c->arena, 0, 0}) == 0;
    PyObject *err = ok ? NULL : cp_err_take();
    cp_rec h = *hdr;
    for (;;) {
        if (ok && cp_gather_feed(&g, payload, h.size) < 0) {
            ok = 0;
            err = cp_err_take();
        }
        int more = h.flags & CP_F_MORE;
        cp_ring_release(&w->tq, &h, 1);
        if (!more)
            break;
        next_record(w, &h, &payload);
    }
    obj = ok ? cp_gather_finish(&g) : NULL;
    cp_gather_clear(&g);
    if (err != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(err), err);
        Py_DECREF(err);
    }
    return obj;
}

/* Wrap the current exception the way multiprocessing's workers do, so that
 * the parent re-raises it with a RemoteTraceback as __cause__.  Returns a new
 * reference; never fails (falls back to the bare exception). */
static PyObject *
wrap_exception(void)
{
    PyObject *exc = cp_err_take();
    PyObject *mod = PyImport_ImportModule("cpool._worker");
    PyObject *name = PyUnicode_InternFromString("wrap_exception");
    PyObject *w = mod && name ? PyObject_CallMethodOneArg(mod, name, exc) : NULL;
    Py_XDECREF(name);
    Py_XDECREF(mod);
    if (w == NULL) {
        PyErr_Clear();
        return exc;
    }
    Py_DECREF(exc);
    return w;
}

/* Pickling `value` (the result if ok, else the wrapped exception) failed
 * with the error set now: the pickled MaybeEncodingError that tells so, as
 * in multiprocessing, or else a RuntimeError saying `last_resort`, which the
 * parent can always unpickle.  NULL only if even that cannot be pickled. */
static PyObject *
dumps_encoding_error(PyObject *value, int ok, const char *last_resort)
{
    PyObject *data = NULL;
    PyObject *err = cp_err_take();
    PyObject *mod = PyImport_ImportModule("cpool._worker");
    PyObject *wrapped = mod ? PyObject_CallMethod(mod, "encoding_error", "OOO",
                                                  err, value ? value : Py_None,
                                                  ok ? Py_True : Py_False)
                            : NULL;
    Py_XDECREF(mod);
    Py_DECREF(err);
    if (wrapped != NULL) {
        data = PyObject_CallFunctionObjArgs(cp_state->dumps, wrapped,
                                            cp_state->protocol, NULL);
        Py_DECREF(wrapped);
    }
    if (data == NULL) {
        PyErr_Clear();
        PyObject *msg = PyUnicode_FromString(last_resort);
        PyObject *exc = msg ? PyObject_CallOneArg(PyExc_RuntimeError, msg)
                            : NULL;
        data = exc ? PyObject_CallFunctionObjArgs(cp_state->dumps, exc,
                                                  cp_state->protocol, NULL)
                   : NULL;
        Py_XDECREF(msg);
        Py_XDECREF(exc);
        PyErr_Clear();
    }
    return data;
}

/* Pickle and publish a result (the value: a reference the call takes), and
 * count it for the parent before letting go of the value (whose __del__ may
 * take any time).  Unless it holds arrays the worker made in the arena and
 * letting go of it runs no Python code (npalloc.c: cp_np_plain): then it is
 * let go of once pickled, to see whether those arrays' blocks can go to the
 * parent as they are (msg.c).  A result that cannot be pickled becomes a
 * MaybeEncodingError, as in multiprocessing. */
static void
publish(wctx *w, const cp_rec *task, int ok, PyObject *value, uint32_t run_us)
{
    exit_if_forked_copy();
    int oob;
    PyObject *data = cp_dumps(value, ok && cp_msg_has_big_buffer(value, 2),
                              w->rq.max_frag, &oob,
                              &(cp_arena_use){w->c->arena, w->part, 0,
                                              ok ? &value : NULL});
    if (data == NULL) {
        data = dumps_encoding_error(value, ok,
                                    "cpool: the task's result and its error "
                                    "could not be pickled");
        if (data == NULL)
            worker_exit(73);
        ok = 0;
    }
    cp_rec r = {.kind = CP_K_RESULT,
                .flags = (uint16_t)((ok ? 0 : CP_F_ERR) | (oob ? CP_F_OOB : 0)),
                .aux = run_us, .seq = task->seq, .job = task->job,
                .index = task->index};
    send_msg(w, &r, data);
    Py_DECREF(data);
    cp_store_release(&w->ctl->results, ++w->results);
    Py_XDECREF(value);
}

/* The TypeError Python's func(*args) or func(**kwds) raises for an
 * argument of the wrong kind ("mod.f() argument after * must be an
 * iterable, not int"): the function named as CPython names it there. */
static void
bad_call_argument(PyObject *func, const char *stars, const char *what,
                  PyObject *arg)
{
    PyObject *qualname = PyObject_GetAttrString(func, "__qualname__");
    PyObject *module = qualname ? PyObject_GetAttrString(func, "__module__") : NULL;
    PyObject *name;
    PyErr_Clear();
    if (qualname == NULL)
        name = PyObject_Str(func);
    else if (module != NULL && PyUnicode_Check(module) &&
             PyUnicode_CompareWithASCIIString(module, "builtins") != 0)
        name = PyUnicode_FromFormat("%U.%S()", module, qualname);
    else
        name = PyUnicode_FromFormat("%S()", qualname);
    Py_XDECREF(qualname);
    Py_XDECREF(module);
    if (name == NULL)
        return;
    PyErr_Format(PyExc_TypeError, "%U argument after %s must be %s, not %.200s",
                 name, stars, what, Py_TYPE(arg)->tp_name);
    Py_DECREF(name);
}

/* func(*args, **kwds)'s positional arguments as a tuple.  New reference. */
static PyObject *
call_args(PyObject *func, PyObject *args)
{
    if (PyTuple_CheckExact(args))
        return Py_NewRef(args);
    if (Py_TYPE(args)->tp_iter == NULL && !PySequence_Check(args)) {
        bad_call_argument(func, "*", "an iterable", args);
        return NULL;
    }
    return PySequence_Tuple(args);
}

/* func(*args, **kwds)'s keywords: kwds itself if it is a dict (None if it is
 * empty), a dict made from any other mapping, or a TypeError as Python's **
 * gives.  New reference. */
static PyObject *
call_kwds(PyObject *func, PyObject *kwds)
{
    if (PyDict_Check(kwds))
        return Py_NewRef(PyDict_GET_SIZE(kwds) ? kwds : Py_None);
    PyObject *keys = PyObject_GetAttrString(kwds, "keys");
    if (keys == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        bad_call_argument(func, "**", "a mapping", kwds);
        return NULL;
    }
    Py_DECREF(keys);
    PyObject *d = PyDict_New();
    if (d != NULL && PyDict_Merge(d, kwds, 1) < 0)
        Py_CLEAR(d);
    return d;
}

/* Run one task.  Returns the result (new reference) or NULL with an
 * exception set.  `obj` is the unpickled payload:
 *   fid != 0: APPLY (args, kwds); MAP/STARMAP items
 *   fid == 0: (func, <the above>)                                     */
static PyObject *
run_task(wctx *w, const cp_rec *h, PyObject *obj)
{
    PyObject *func, *body;
    if (h->fid == 0) {
        if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) {
            PyErr_SetString(PyExc_RuntimeError, "cpool: malformed task");
            return NULL;
        }
        func = PyTuple_GET_ITEM(obj, 0);
        body = PyTuple_GET_ITEM(obj, 1);
    } else {
        PyObject *key = PyLong_FromUnsignedLong(h->fid);
        func = key ? PyDict_GetItemWithError(w->c->wfuncs, key) : NULL;
        Py_XDECREF(key);
        if (func == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "cpool: unknown function id");
            return NULL;
        }
        body = obj;
    }
    Py_INCREF(func);
    PyObject *res = NULL;
    if (h->aux == CP_MODE_APPLY) {
        if (!PyTuple_Check(body) || PyTuple_GET_SIZE(body) != 2) {
            PyErr_SetString(PyExc_RuntimeError, "cpool: malformed task");
        } else {
            PyObject *args = call_args(func, PyTuple_GET_ITEM(body, 0));
            PyObject *kw = args ? call_kwds(func, PyTuple_GET_ITEM(body, 1)) : NULL;
            if (kw != NULL)
                res = PyObject_Call(func, args, kw == Py_None ? NULL : kw);
            Py_XDECREF(args);
            Py_XDECREF(kw);
        }
    } else if (h->aux == CP_MODE_CALL1) {
        res = PyObject_CallOneArg(func, body);
    } else {
        PyObject *items = PySequence_Fast(body, "cpool: malformed chunk");
        if (items != NULL) {
            Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
            res = PyList_New(n);
            for (Py_ssize_t i = 0; res != NULL && i < n; i++) {
                PyObject *x = PySequence_Fast_GET_ITEM(items, i), *v;
                if (h->aux == CP_MODE_MAP) {
                    v = PyObject_CallOneArg(func, x);
                } else {
                    PyObject *a = PySequence_Tuple(x);
                    v = a ? PyObject_Call(func, a, NULL) : NULL;
                    Py_XDECREF(a);
                }
                if (v == NULL)
                    Py_CLEAR(res);
                else
                    PyList_SET_ITEM(res, i, v);
            }
            Py_DECREF(items);
        }
    }
    Py_DECREF(func);
    return res;
}

/* A BaseException that is not an Exception (SystemExit, KeyboardInterrupt,
 * GeneratorExit) ends the worker, as it ends a multiprocessing worker; the
 * parent then reports the task as lost with this exit code.  Raised by the
 * initializer, the worker does not say it left (a normal leave, after which
 * its tasks would go to a replacement that fails the same way, forever):
 * the parent sees a death during start-up. */
static void
exit_if_base_exception(int in_initializer)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        int code = 1;
        if (PyErr_ExceptionMatches(PyExc_SystemExit)) {
            PyObject *e = cp_err_take();
            PyObject *c = PyObject_GetAttrString(e, "code");
            if (c == NULL)
                PyErr_Clear();
            else if (c == Py_None)
                code = 0;
            else if (PyLong_Check(c))
                code = (int)PyLong_AsLong(c) & 0xff;
            Py_XDECREF(c);
            Py_DECREF(e);
            PyErr_Clear();
        }
        if (in_initializer) {
            flush_std();
            _exit(code);
        }
        worker_exit(code);
    }
}

static void
run_initializer(wctx *w)
{
    Core *c = w->c;
    if (c->initializer == NULL || c->initializer == Py_None)
        return;
    PyObject *r = PyObject_Call(c->initializer, c->initargs, NULL);
    if (r != NULL) {
        Py_DECREF(r);
        return;
    }
    exit_if_base_exception(1);
    PyObject *exc = wrap_exception();
    PyObject *data = PyObject_CallFunctionObjArgs(cp_state->dumps, exc,
                                                  cp_state->protocol, NULL);
    if (data == NULL)
        data = dumps_encoding_error(exc, 0, "cpool: the initializer's error "
                                            "could not be pickled");
    Py_DECREF(exc);
    if (data == NULL)
        _exit(74);      /* a death in start-up: the parent says so */
    cp_rec rec = {.kind = CP_K_INITERR, .flags = CP_F_ERR};
    send_msg(w, &rec, data);
    Py_DECREF(data);
    worker_exit(3);
}

void
cp_worker_main(void *arg, int slot)
{
    wctx w = {.c = (Core *)arg, .slot = slot};
    Core *c = w.c;

    /* This process may itself come from a worker's fork (a pool made in a
     * task: its fork server was forked from that worker). */
    forked_copy = 0;
    if (pthread_atfork(NULL, NULL, mark_forked_copy) != 0)
        _exit(76);
    w.ctl = my_ctl = cp_shm_ctl(&c->shm, slot);
    w.part = c->arena ? cp_load_acquire(&w.ctl->arena_part) : -1;
    if (c->arena != NULL)
        cp_arena_worker_start(c->arena);
    cp_np_setup(c->arena, w.part);
    /* Pools made in tasks carry nothing over unless asked to: every worker
     * of a pool would keep its own. */
    cp_arena_carry_default(0);
    w.spin_ns = c->spin_ns;
    cp_ring_set_spin_yields(c->nslots);
    /* The worker wakes the parent through the eventfd, never a futex: the
     * parent's collector sleeps in poll() on it. */
    if (cp_ring_attach(&w.tq, cp_shm_task_ring(&c->shm, slot), c->efd) < 0 ||
        cp_ring_attach(&w.rq, cp_shm_result_ring(&c->shm, slot), c->efd) < 0)
        _exit(75);
    c->wfuncs = PyDict_New();
    if (c->wfuncs == NULL)
        _exit(76);
    heap_setup(c->nslots);
    cp_store_relaxed(&w.ctl->pid, (uint32_t)getpid());
    cp_store_release(&w.ctl->state, CP_W_STARTING);

    uint32_t ident = cp_load_relaxed(&w.ctl->ident);
    call_worker_hook("become_worker", "iiO",
                     ident ? (int)ident : cp_proc_worker_number(), (int)c->owner,
                     c->process);
    run_initializer(&w);
    cp_store_release(&w.ctl->state, CP_W_READY);

    unsigned long done = 0;
    for (;;) {
        cp_rec h;
        const uint8_t *payload;
        next_record(&w, &h, &payload);
        if (h.kind == CP_K_STOP) {
            cp_ring_release(&w.tq, &h, 1);
            worker_leave();
        }
        if (h.kind == CP_K_FUNC) {
            PyObject *f = read_message(&w, &h, payload);
            PyObject *key = PyLong_FromUnsignedLong(h.fid);
            if (f == NULL) {
                /* Remember the failure: the task that uses it reports it. */
                PyObject *err = wrap_exception();
                f = Py_BuildValue("(O)", err);   /* a tuple marks an error */
                Py_DECREF(err);
            }
            if (key == NULL || f == NULL || PyDict_SetItem(c->wfuncs, key, f) < 0)
                worker_exit(77);
            Py_DECREF(key);
            Py_DECREF(f);
            continue;
        }
        if (h.kind != CP_K_TASK)
            worker_exit(72);

        /* Claim it, unless the parent took it back for an idle worker. */
        cp_rec *shared = (cp_rec *)(payload - sizeof(cp_rec));
        uint32_t expect = CP_T_QUEUED;
        if (!__atomic_compare_exchange_n(&shared->state, &expect, CP_T_CLAIMED,
                                         0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            for (;;) {
                int more = h.flags & CP_F_MORE;
                cp_ring_release(&w.tq, &h, 1);
                if (!more)
                    break;
                next_record(&w, &h, &payload);
            }
            continue;
        }

        /* Whoever finds us dead from here on knows which task we held. */
        cp_store_release(&w.ctl->running, h.seq);
        uint64_t t0 = cp_now_ns();
        PyObject *obj = read_message(&w, &h, payload);
        PyObject *res = NULL;
        if (obj != NULL) {
            if (h.fid != 0) {
                /* A function that failed to unpickle is stored as a tuple. */
                PyObject *key = PyLong_FromUnsignedLong(h.fid);
                PyObject *f = key ? PyDict_GetItemWithError(c->wfuncs, key) : NULL;
                Py_XDECREF(key);
                if (f != NULL && PyTuple_Check(f)) {
                    Py_DECREF(obj);
                    obj = NULL;
                    publish(&w, &h, 0, Py_NewRef(PyTuple_GET_ITEM(f, 0)), 0);
                    goto done;
                }
            }
            cp_np_poll();      /* numpy may have come with the task */
            res = run_task(&w, &h, obj);
            Py_DECREF(obj);
        }
        uint64_t us = (cp_now_ns() - t0) / 1000;
        /* Letting go of the value may run anything (__del__), and of an
         * error its task's frames, through its traceback. */
        if (res != NULL) {
            publish(&w, &h, 1, res, us > UINT32_MAX ? UINT32_MAX : (uint32_t)us);
        } else {
            exit_if_base_exception(0);
            publish(&w, &h, 0, wrap_exception(),
                    (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us));
        }
    done:
        cp_store_release(&w.ctl->running, 0);
        done++;
        heap.tasks++;
        heap.idle_ns = 0;
        if (c->maxtasks > 0 && done >= (unsigned long)c->maxtasks)
            worker_leave();
    }
}
