/*
 * core.c - the parent side of a pool: the Core type.
 *
 * Threads: every function here runs with the GIL held, except the waits in
 * Core.collect() and Core.terminate(), which release it.  The GIL is what
 * serialises the submitting threads and the collector on the parent's side
 * of the rings, so no parent-side lock exists; nothing here ever blocks on a
 * ring while holding the GIL.  A message too big for the room in a ring is
 * sent piecewise: the rest goes out from the collector as the worker frees
 * space (it rings the eventfd when the parent has flagged that it waits).
 *
 * Crash model: each worker has its own rings and control block, and shares
 * no lock with anyone, so a death loses at most the task it was running
 * (ctl->running) and stalls nothing else.  The zygote reports every death on
 * its socket; handle_death() drains what the worker published, fails the one
 * task it was running, gives back the ones it never started, and asks for a
 * replacement.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "structmember.h"
#include "cpool.h"

#define MAX_CACHED_FUNCS 4096
#define CREDIT_MIN 2
#define CREDIT_MAX 1024
#define CREDIT_START 4
#define QUEUED_WORK_US 2000.0   /* aim for this much queued work per worker */
#define DRAIN_BUDGET 256        /* records per slot per collector round */
#define ZCHECK_NS 1000000       /* the zygote's socket, read at least this often */
#define COLLECTOR_SPIN_NS 10000
/* The collector looks at the rings at least this often even if no doorbell
 * rang: a task that closed its worker's eventfd and let a file take its
 * number (the worker's wake-ups then land in the file) delays that worker's
 * results, it does not lose them.  (Idle, this is two wake-ups a second.)
 * Nothing else may rely on it: CPOOL_RING_CHECK_MS overrides it (tests make
 * it long, so that a missed wake-up shows as a hang, not a delay). */
#define RING_CHECK_MS 500
/* A worker's oldest task left unclaimed this long while another worker is
 * idle is given to the idle one (see steal_for_idle). */
#define STALL_NS 5000000

/* ----------------------------------------------------------------- fifo */

static int
fifo_grow(cp_fifo *f)
{
    size_t ncap = f->cap ? f->cap * 2 : 16;
    cp_task *nv = PyMem_Malloc(ncap * sizeof *nv);
    if (nv == NULL)
        return -1;
    for (size_t i = 0; i < f->len; i++)
        nv[i] = f->v[(f->head + i) % f->cap];
    PyMem_Free(f->v);
    f->v = nv;
    f->cap = ncap;
    f->head = 0;
    return 0;
}

static int
fifo_push_back(cp_fifo *f, const cp_task *t)
{
    if (f->len == f->cap && fifo_grow(f) < 0)
        return -1;
    f->v[(f->head + f->len) % f->cap] = *t;
    f->len++;
    return 0;
}

static int
fifo_push_front(cp_fifo *f, const cp_task *t)
{
    if (f->len == f->cap && fifo_grow(f) < 0)
        return -1;
    f->head = (f->head + f->cap - 1) % f->cap;
    f->v[f->head] = *t;
    f->len++;
    return 0;
}

static cp_task *
fifo_front(cp_fifo *f)
{
    return f->len ? &f->v[f->head] : NULL;
}

static cp_task *
fifo_at(cp_fifo *f, size_t i)
{
    return &f->v[(f->head + i) % f->cap];
}

/* A queue that held a burst (up to a worker's credit, 1024 tasks) gives
 * its memory back once it is empty; 64 entries (4.5 KiB) are kept. */
static void
fifo_maybe_shrink(cp_fifo *f)
{
    if (f->len == 0 && f->cap > 64) {
        PyMem_Free(f->v);
        f->v = NULL;
        f->cap = 0;
        f->head = 0;
    }
}

static cp_task
fifo_pop_front(cp_fifo *f)
{
    cp_task t = f->v[f->head];
    f->head = (f->head + 1) % f->cap;
    f->len--;
    fifo_maybe_shrink(f);
    return t;
}

static cp_task
fifo_pop_back(cp_fifo *f)
{
    f->len--;
    cp_task t = f->v[(f->head + f->len) % f->cap];
    fifo_maybe_shrink(f);
    return t;
}

static void
task_clear(cp_task *t)
{
    Py_CLEAR(t->payload);
    Py_CLEAR(t->func);
}

static void
fifo_free(cp_fifo *f)
{
    while (f->len) {
        cp_task t = fifo_pop_front(f);
        task_clear(&t);
    }
    PyMem_Free(f->v);
    f->v = NULL;
    f->cap = 0;
}

/* ------------------------------------------------------------- delivery */

/* The result object of `job` (borrowed), or NULL if it is gone. */
static PyObject *
lookup_result(Core *c, uint64_t job)
{
    PyObject *key = PyLong_FromUnsignedLongLong(job);
    PyObject *r = key ? PyDict_GetItemWithError(c->cache, key) : NULL;
    Py_XDECREF(key);
    if (r == NULL && PyErr_Occurred())
        PyErr_WriteUnraisable(c->cache);
    return r;
}

static void deliver_to(PyObject *r, uint64_t index, int ok,
                       PyObject *value);

/* Hand a result to the result object of `job`: cache[job]._set(index, (ok,
 * value)).  A result object that raises (a user callback) is reported as
 * unraisable; the collector goes on.  Steals `value`. */
static void
deliver(Core *c, uint64_t job, uint64_t index, int ok, PyObject *value)
{
    if (job & CP_SYNC_JOB) {
        for (int i = 0; i < c->ncalls; i++) {
            cp_call *k = c->calls[i];
            if (k->job == job && !k->ready) {
                k->value = value;
                k->ok = ok;
                cp_store_release(&k->ready, 1);
                cp_futex_wake(&k->ready);
                return;
            }
        }
        Py_DECREF(value);    /* its caller gave up (Ctrl-C) */
        return;
    }
    PyObject *r = lookup_result(c, job);
    if (r == NULL) {
        Py_DECREF(value);
        return;
    }
    deliver_to(r, index, ok, value);
}

/* r._set(index, (ok, value)), done in C for an apply_async() result
 * without callbacks (result.c).  A result object that raises (a user
 * callback) is reported as unraisable.  Steals `value`. */
static void
deliver_to(PyObject *r, uint64_t index, int ok, PyObject *value)
{
    if (cp_result_complete(r, ok, value) > 0)
        return;
    /* r is borrowed from the cache, which _set() removes it from. */
    Py_INCREF(r);
    PyObject *pair = PyTuple_Pack(2, ok ? Py_True : Py_False, value);
    Py_DECREF(value);
    PyObject *idx = PyLong_FromUnsignedLongLong(index);
    PyObject *res = NULL;
    if (pair != NULL && idx != NULL) {
        PyObject *args[3] = {r, idx, pair};
        res = PyObject_VectorcallMethod(cp_state->str_set, args,
                                        3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                        NULL);
    }
    if (res == NULL)
        PyErr_WriteUnraisable(r);
    Py_XDECREF(res);
    Py_XDECREF(pair);
    Py_XDECREF(idx);
    Py_DECREF(r);
}

/*
 * Results of one job that arrive together (imap's many small tasks) are
 * handed over in one call, r._set_many([(index, (ok, value)), ...]), when
 * the result object has that method: one lock round and one wake-up for the
 * lot instead of one per result.
 */
typedef struct {
    uint64_t job;
    PyObject *r;       /* the result object, or NULL: no batch open */
    PyObject *items;   /* list of (index, (ok, value)) */
} cp_batch;

/* r.name(arg), what it raises reported as unraisable.  Steals r and arg. */
static void
call_result_method(PyObject *r, PyObject *name, PyObject *arg)
{
    PyObject *res = PyObject_CallMethodOneArg(r, name, arg);
    if (res == NULL)
        PyErr_WriteUnraisable(r);
    Py_XDECREF(res);
    Py_DECREF(arg);
    Py_DECREF(r);
}

static void
batch_flush(cp_batch *b)
{
    if (b->r == NULL)
        return;
    PyObject *r = b->r, *items = b->items;
    b->r = NULL;
    b->items = NULL;
    call_result_method(r, cp_state->str_set_many, items);
}

/* Does r have _set_many?  The answer is kept per type (the last of each
 * kind seen), so the attribute lookup, which costs an exception when it
 * misses, is not paid for every result. */
static int
takes_batches(Core *c, PyObject *r)
{
    PyObject *tp = (PyObject *)Py_TYPE(r);
    if (tp == c->batch_yes)
        return 1;
    if (tp == c->batch_no)
        return 0;
    int yes = PyObject_HasAttr(tp, cp_state->str_set_many);
    if (yes)
        Py_XSETREF(c->batch_yes, Py_NewRef(tp));
    else
        Py_XSETREF(c->batch_no, Py_NewRef(tp));
    return yes;
}

/* deliver(), batched when the job's result object takes batches.  Steals
 * `value`. */
static void
deliver_batched(Core *c, cp_batch *b, uint64_t job, uint64_t index, int ok,
                PyObject *value)
{
    if (b->r != NULL && b->job != job)
        batch_flush(b);
    if (b->r == NULL) {
        if (job & CP_SYNC_JOB) {
            deliver(c, job, index, ok, value);
            return;
        }
        PyObject *r = lookup_result(c, job);
        if (r == NULL) {
            Py_DECREF(value);
            return;
        }
        if (!takes_batches(c, r) || (b->items = PyList_New(0)) == NULL) {
            PyErr_Clear();
            deliver_to(r, index, ok, value);
            return;
        }
        b->r = Py_NewRef(r);
        b->job = job;
    }
    /* (index, (ok, value)), built directly (no format string per result) */
    PyObject *idx = PyLong_FromUnsignedLongLong(index);
    PyObject *pair = PyTuple_New(2);
    PyObject *item = PyTuple_New(2);
    if (idx == NULL || pair == NULL || item == NULL) {
        Py_XDECREF(idx);
        Py_XDECREF(pair);
        Py_CLEAR(item);
        Py_DECREF(value);
    } else {
        PyTuple_SET_ITEM(pair, 0, Py_NewRef(ok ? Py_True : Py_False));
        PyTuple_SET_ITEM(pair, 1, value);
        PyTuple_SET_ITEM(item, 0, idx);
        PyTuple_SET_ITEM(item, 1, pair);
    }
    if (item == NULL || PyList_Append(b->items, item) < 0) {
        /* Out of memory: hand over what we have, then this one alone. */
        Py_XDECREF(item);
        PyErr_Clear();
        batch_flush(b);
        PyErr_NoMemory();
        deliver(c, job, index, 0, cp_err_take());
        return;
    }
    Py_DECREF(item);
}

/* A quiet terminate's deliver(): the result object fails for whoever asks
 * from now on, without waking those who wait already (at interpreter exit,
 * daemon threads: see Core.terminate).  A synchronous call's waiter is left
 * waiting.  Steals `exc`. */
static void
deliver_quietly(Core *c, uint64_t job, PyObject *exc)
{
    PyObject *r = (job & CP_SYNC_JOB) ? NULL : lookup_result(c, job);
    if (r == NULL) {
        Py_DECREF(exc);
        return;
    }
    if (PyObject_TypeCheck(r, cp_state->result_base)) {
        cp_result_fail_quietly(r, exc);
        return;
    }
    /* map and imap results (pool.py); r is borrowed from the cache, which
     * _fail_quietly() removes it from. */
    call_result_method(Py_NewRef(r), cp_state->str_fail_quietly, exc);
}

/* Fail a task with an error built by the pool's make_error(). */
static void
fail_task(Core *c, cp_task *t, int kind, pid_t pid, int status)
{
    PyObject *exc = PyObject_CallFunction(
        c->make_error, "iiiKKO", kind, (int)pid, status,
        (unsigned long long)t->job, (unsigned long long)t->index,
        t->func ? t->func : Py_None);
    if (exc == NULL)
        exc = cp_err_take();
    if (kind == CP_E_TERMINATED && c->quiet)
        deliver_quietly(c, t->job, exc);
    else
        deliver(c, t->job, t->index, 0, exc);
    task_clear(t);
}

/*
 * A task that cannot be sent (pickling failed) fails its result, and the
 * pool goes on, as with multiprocessing.  A result with a callback or an
 * error callback is failed by the collector thread, as every result is
 * completed (and as multiprocessing's task thread fails it): in the
 * caller's thread, inside apply_async() or map_async(), the callback would
 * run before the caller has the result, and while the caller holds its
 * locks.  Once the collector has ended, nothing would: the caller's thread
 * does it.  Steals exc.
 */
static void ring_doorbell(Core *c);

static void
fail_unsent(Core *c, uint64_t job, uint64_t index, PyObject *exc, int later)
{
    if (later && !c->collected) {
        PyObject *item = Py_BuildValue("(KKO)", (unsigned long long)job,
                                       (unsigned long long)index, exc);
        if (item != NULL && PyList_Append(c->late, item) == 0) {
            Py_DECREF(item);
            Py_DECREF(exc);
            ring_doorbell(c);
            return;
        }
        Py_XDECREF(item);
        PyErr_WriteUnraisable((PyObject *)c);
    }
    deliver(c, job, index, 0, exc);
}

/* The collector's side of fail_unsent().  Returns 1 if it failed any. */
static int
deliver_late(Core *c)
{
    if (PyList_GET_SIZE(c->late) == 0)
        return 0;
    PyObject *items = c->late, *fresh = PyList_New(0);
    if (fresh == NULL) {
        PyErr_WriteUnraisable((PyObject *)c);
        return 0;
    }
    c->late = fresh;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        uint64_t job = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        uint64_t index = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 1));
        PyObject *exc = Py_NewRef(PyTuple_GET_ITEM(item, 2));
        if (c->quiet)
            deliver_quietly(c, job, exc);
        else
            deliver(c, job, index, 0, exc);
    }
    Py_DECREF(items);
    return 1;
}

/* ----------------------------------------------------------------- slots */

static void
gather_drop(cp_slot *s)
{
    if (s->in_g != NULL) {
        cp_gather_clear(s->in_g);
        PyMem_Free(s->in_g);
        s->in_g = NULL;
    }
    Py_CLEAR(s->in_err);
}

static void
slot_reset(Core *c, int i)
{
    cp_slot *s = &c->slots[i];
    cp_shm_reset_slot(&c->shm, i);
    cp_ring_attach(&s->tq, cp_shm_task_ring(&c->shm, i), -1);
    cp_ring_attach(&s->rq, cp_shm_result_ring(&c->shm, i), -1);
    s->pid = 0;
    s->pid_wait = 0;
    s->retiring = 0;
    s->stopping = 0;
    s->corrupt = 0;
    s->sent = 0;
    s->results = 0;
    s->stall_seq = 0;
    s->stalled = 0;
    s->credit = CREDIT_START;
    Py_CLEAR(s->out_buf);
    s->out_off = 0;
    gather_drop(s);
    if (s->known)
        PySet_Clear(s->known);
    s->last_fid = 0;
    /* The new worker's result partition (its old one, unless the parent
     * still holds arrays in it). */
    s->part = c->arena ? cp_arena_assign(c->arena, i, s->part,
                                         c->arena->part_size)
                       : -1;
    s->ctl->arena_part = s->part;
}

/* A whole number from 1 to max in environment variable `name` (a tuning
 * knob for tests), or 0 if it is unset or anything else. */
static long long
env_number(const char *name, long long max)
{
    const char *env = getenv(name);
    if (env == NULL || *env < '0' || *env > '9')
        return 0;
    char *end;
    errno = 0;
    long long v = strtoll(env, &end, 10);
    return errno == 0 && *end == '\0' && v >= 1 && v <= max ? v : 0;
}

/* The start-up deadline (CP_START_NS), in ns. */
static uint64_t
start_timeout_ns(void)
{
    long long ms = env_number("CPOOL_START_TIMEOUT_MS", 24LL * 3600 * 1000);
    return ms > 0 ? (uint64_t)ms * 1000000 : CP_START_NS;
}

/* The collector's longest sleep (RING_CHECK_MS), in ms. */
static int
ring_check_ms(void)
{
    long long ms = env_number("CPOOL_RING_CHECK_MS", 3600000);
    return ms > 0 ? (int)ms : RING_CHECK_MS;
}

/*
 * The identity of slot i's next worker, as multiprocessing numbers the
 * processes it makes: the next value of this process's counter of child
 * processes (multiprocessing.process._process_counter), drawn by the
 * parent, which made the worker as far as that counter is concerned.  The
 * worker becomes "ForkPoolWorker-<n>" (with the identity of its parent's
 * process before it in a nested pool); 0 if there is no such counter (the
 * worker then goes by its number among the zygote's forks).
 *
 * No Python code may run here: slot_spawn() calls this between the slot's
 * reset and marking it live, and another thread that got the GIL meanwhile
 * would spawn a second worker for the slot.  So no import (an import hook
 * could run, and PyImport_GetModule() looks at the module's __spec__):
 * dict lookups, and only an itertools.count's own C iterator.
 */
static void
slot_ident(Core *c, int i)
{
    cp_slot *s = &c->slots[i];
    long n = 0;
    PyObject *t, *v0, *tb;
    PyErr_Fetch(&t, &v0, &tb);      /* (none is expected; kept if any) */
    PyObject *modules = PyImport_GetModuleDict();
    PyObject *mod = modules && PyDict_CheckExact(modules)
        ? PyDict_GetItemWithError(modules, c->str_mp_process) : NULL;
    PyObject *counter = mod && PyModule_CheckExact(mod)
        ? PyDict_GetItemWithError(PyModule_GetDict(mod), c->str_counter) : NULL;
    if (counter != NULL && Py_IS_TYPE(counter, (PyTypeObject *)c->count_type)) {
        PyObject *v = Py_TYPE(counter)->tp_iternext(counter);
        if (v != NULL && PyLong_CheckExact(v))
            n = PyLong_AsLong(v);
        Py_XDECREF(v);
    }
    if (n <= 0 || n > UINT32_MAX)
        n = 0;
    PyErr_Clear();
    PyErr_Restore(t, v0, tb);
    s->ident = (uint32_t)n;
    s->ctl->ident = s->ident;
}

static int
slot_spawn(Core *c, int i)
{
    cp_zmsg m = {.type = CP_Z_SPAWN, .slot = i};
    slot_reset(c, i);
    slot_ident(c, i);
    int rc = cp_proc_send(c->zsock, &m);
    if (rc < 0)
        return rc;
    c->slots[i].live = 1;
    c->slots[i].pid_wait = 1;
    /* No worker has started yet (they died before they could say so): this
     * one gets the whole time. */
    if (!c->started)
        c->start_by_ns = cp_now_ns() + start_timeout_ns();
    return 0;
}

/*
 * How many of the tasks sent to slot s its worker has not finished: those
 * in its fifo less the results it has published that nobody has read yet.
 * Credit counts these, not the fifo: the collector reads results only with
 * the GIL, which a thread submitting a burst holds for up to the switch
 * interval (5 ms), and the workers would otherwise run out of tasks
 * meanwhile although their results are there.
 */
static size_t
unfinished(cp_slot *s)
{
    size_t n = s->fifo.len;
    /* The worker counts a result just after publishing it: the parent may
     * have read it first, and then its own count is the one ahead. */
    uint64_t published = cp_load_acquire(&s->ctl->results);
    if (published <= s->results)
        return n;
    uint64_t unread = published - s->results;
    return unread < n ? n - (size_t)unread : 0;
}

/* unfinished(s), or less when that is below the credit anyway: a fifo
 * shorter than the credit is the common case, and it is told without
 * touching the worker's shared line. */
static size_t
backlog(cp_slot *s)
{
    return s->fifo.len < s->credit ? s->fifo.len : unfinished(s);
}

/* A worker whose oldest task was taken from it (steal_for_idle) takes no
 * more until it moves again, past that task's record: else that task, or
 * the next, would go straight back to it. */
static int
still_stalled(cp_slot *s)
{
    if (cp_load_acquire(&s->tq.h->head) <= s->stall_pos)
        return 1;
    s->stalled = 0;
    return 0;
}

/* Whether slot s takes another task now; its backlog in *bl if so. */
static int
slot_takes(Core *c, cp_slot *s, size_t *bl)
{
    return s->live && !s->owner && !s->retiring && !s->stopping && !s->corrupt &&
           s->out_buf == NULL && c->state <= CORE_CLOSING &&
           !(s->stalled && still_stalled(s)) &&
           (*bl = backlog(s)) < s->credit;
}

static int
slot_accepts(Core *c, cp_slot *s)
{
    size_t bl;
    return slot_takes(c, s, &bl);
}

static void
ring_doorbell(Core *c)
{
    uint64_t one = 1;
    ssize_t n;
    do {
        n = write(c->efd, &one, sizeof one);
    } while (n < 0 && errno == EINTR);
}

/* --------------------------------------------------------------- sending */

/* Send what fits of the slot's unfinished message.  Returns 1 on progress. */
static int
continue_send(cp_slot *s)
{
    if (s->out_buf == NULL)
        return 0;
    uint64_t before = s->out_off;
    int done = cp_msg_send_some(&s->tq, &s->out_hdr, s->out_buf, &s->out_off,
                                NULL, NULL);
    if (done < 0) {
        /* Cannot happen: a message whose send could not end at once was
         * settled (try_send: its caller-owned buffers copied), unless that
         * copy failed for want of memory.  The worker would see a
         * truncated message and fail the task. */
        PyErr_WriteUnraisable(s->out_buf);
        done = 1;
    }
    if (done)
        Py_CLEAR(s->out_buf);
    if (s->out_off != before || done)
        cp_ring_flush(&s->tq);
    return s->out_off != before || done;
}

/*
 * Put task t (with its function, if this worker lacks it) into slot s's task
 * ring.  Returns 1 if the task is now in flight (perhaps partly sent: the
 * collector finishes it), 0 if the ring has no room for it now, -1 with an
 * exception set on a Python error.
 */
static int
try_send(Core *c, cp_slot *s, cp_task *t)
{
    uint64_t saved = s->tq.pos;
    PyObject *fkey = NULL;
    int known = 1;

    /* The function of the previous task is known without a set lookup. */
    if (t->fid && t->fid != s->last_fid) {
        fkey = PyLong_FromUnsignedLong(t->fid);
        if (fkey == NULL || (known = PySet_Contains(s->known, fkey)) < 0)
            goto error;
        if (!known) {
            PyObject *fb = PyDict_GetItemWithError(c->fbytes, fkey);
            if (fb == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_RuntimeError, "cpool: lost function");
                goto error;
            }
            /* Cached functions are small: one record (see Core.submit). */
            cp_rec *rec = cp_ring_reserve(&s->tq, (uint32_t)PyBytes_GET_SIZE(fb));
            if (rec == NULL) {
                Py_DECREF(fkey);
                return 0;
            }
            rec->kind = CP_K_FUNC;
            rec->flags = 0;
            rec->fid = t->fid;
            rec->aux = 0;
            rec->seq = rec->job = rec->index = 0;
            rec->total = rec->size;
            memcpy((uint8_t *)rec + sizeof(cp_rec), PyBytes_AS_STRING(fb), rec->size);
            cp_ring_commit(&s->tq, rec);
        }
    }

    t->seq = ++c->next_seq;
    cp_rec hdr = {.kind = CP_K_TASK, .flags = (uint16_t)t->mflags,
                  .fid = t->fid, .aux = t->mode,
                  .seq = t->seq, .job = t->job, .index = t->index};
    uint64_t off = 0;
    int done = cp_msg_send_some(&s->tq, &hdr, t->payload, &off, &t->rec,
                                &t->rec_pos);
    if (done < 0) {
        s->tq.pos = saved;
        Py_XDECREF(fkey);
        return -1;
    }
    if (!done && off == 0) {
        /* Nothing of the task fits: take back the unpublished FUNC too. */
        s->tq.pos = saved;
        Py_XDECREF(fkey);
        return 0;
    }
    if (!known && PySet_Add(s->known, fkey) < 0) {
        /* The FUNC record is committed; forgetting that only costs a resend. */
        PyErr_Clear();
    }
    s->last_fid = t->fid;
    Py_XDECREF(fkey);
    if (!done) {
        /* What went into the ring was read now: so is the rest (a failure
         * to copy leaves it as it is: read when sent). */
        PyObject *settled = cp_msg_settle(t->payload);
        if (settled == NULL)
            PyErr_Clear();
        else
            Py_SETREF(t->payload, settled);
        s->out_buf = Py_NewRef(t->payload);
        s->out_off = off;
        s->out_hdr = hdr;
    }
    cp_ring_flush(&s->tq);
    return 1;

error:
    Py_XDECREF(fkey);
    s->tq.pos = saved;
    return -1;
}

/* Adapt how many tasks may queue at a worker: enough to cover the time it
 * takes the parent to notice a result and send more, few enough that a slow
 * task does not hold many others hostage behind it. */
static void
update_credit(cp_slot *s, uint32_t run_us)
{
    s->avg_us = s->avg_us == 0.0 ? run_us : 0.8 * s->avg_us + 0.2 * run_us;
    double want = QUEUED_WORK_US / (s->avg_us + 1.0);
    s->credit = want < CREDIT_MIN ? CREDIT_MIN
              : want > CREDIT_MAX ? CREDIT_MAX : (uint32_t)want;
}

/* Whether the worker of slot d has not yet read task t's record (so it can
 * still be taken back: the CAS on the record's state then decides). */
static int
record_unread(cp_slot *d, cp_task *t)
{
    return t->rec != NULL && cp_load_acquire(&d->tq.h->head) <= t->rec_pos;
}

/* Slot d's oldest task is unclaimed while another worker is idle: since
 * when?  0 if it is not unclaimed.  Its worker is between tasks, which
 * normally lasts microseconds: longer, it is held up (a long __del__ of its
 * last value, the garbage collector, no CPU) or still in its initializer. */
static uint64_t
unclaimed_since(cp_slot *d, uint64_t now)
{
    cp_task *t = fifo_front(&d->fifo);
    if (!d->live || d->owner || d->corrupt || d->out_buf != NULL ||
        t == NULL || !record_unread(d, t) ||
        cp_load_acquire(&t->rec->state) != CP_T_QUEUED)
        return 0;
    if (d->stall_seq != t->seq) {
        d->stall_seq = t->seq;
        d->stall_ns = now;
    }
    return d->stall_ns;
}

static int
idle_slots(Core *c)
{
    int idle = 0;
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        if (slot_accepts(c, s) && s->fifo.len == 0)
            idle++;
    }
    return idle;
}

/* A worker past its initializer with nothing queued, which could take a
 * task back from a held-up one. */
static int
ready_and_idle(Core *c, cp_slot *s)
{
    return s->fifo.len == 0 && slot_accepts(c, s) &&
           cp_load_acquire(&s->ctl->state) == CP_W_READY;
}

/* Whether slot s holds a task that steal_for_idle() could give a worker
 * that moves again: one queued behind another, or its oldest, unread (its
 * worker may be held up too). */
static int
takeable(cp_slot *s)
{
    return s->fifo.len > 1 ||
           (s->fifo.len == 1 && record_unread(s, fifo_front(&s->fifo)));
}

/* How long the collector may sleep (at least 1 ms), or -1 for as long as it
 * likes, given workers that may be held up:
 * - an oldest task left unclaimed while a worker is idle is due to be taken
 *   STALL_NS after it was first seen so;
 * - a worker between tasks (nothing queued) that is not waiting for one may
 *   be held up: a task given to it while the collector sleeps (apply(),
 *   apply_async() from another thread) must be seen in time, so look again
 *   within STALL_NS (a healthy one is asleep on its ring after a short spin);
 * - a worker held back after a task was taken from it (stalled) is let go
 *   only when seen to move again, and it does not say when it moves: with
 *   work pending, or a task at another worker that it could take
 *   (takeable()), look again within STALL_NS. */
static int
stall_wait_ms(Core *c)
{
    if (c->state > CORE_CLOSING)
        return -1;
    const int stall_ms = (int)(STALL_NS / 1000000);
    int wait = -1, ready_idle = 0, takes = 0;
    for (int i = 0; i < c->nslots; i++) {
        ready_idle += ready_and_idle(c, &c->slots[i]);
        takes |= takeable(&c->slots[i]);
    }
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        if (!s->live || s->owner || s->corrupt || s->stopping)
            continue;
        /* (Polling for a held-up worker helps only if another could take
         * its task; a stalled one is given nothing anyway.) */
        if ((s->fifo.len == 0 && !s->stalled &&
             !cp_load_relaxed(&s->tq.h->cons_sleep) &&
             ready_idle > ready_and_idle(c, s)) ||
            (s->stalled && (c->pending.len || takes)))
            wait = stall_ms;
    }
    if (c->pending.len || idle_slots(c) == 0)
        return wait;
    uint64_t now = cp_now_ns();
    for (int i = 0; i < c->nslots; i++) {
        uint64_t since = unclaimed_since(&c->slots[i], now);
        if (since == 0)
            continue;
        uint64_t due = since + STALL_NS;
        int ms = due > now ? (int)((due - now + 999999) / 1000000) : 1;
        if (wait < 0 || ms < wait)
            wait = ms;
    }
    return wait;
}

/*
 * Take back queued, unclaimed tasks from busy workers when others are idle
 * and nothing is pending: a task must never wait behind a long (or stuck)
 * one while a worker is free, as with multiprocessing's shared queue.  Whole
 * messages at the back of a worker's queue are taken at once; its oldest
 * task (usually running) only once it has been left unclaimed for STALL_NS.
 * The CAS on the record's state decides against the worker's own claim.
 * Returns how many were moved to pending.
 */
static int
steal_for_idle(Core *c)
{
    int idle = idle_slots(c), moved = 0;
    uint64_t now = idle ? cp_now_ns() : 0;
    for (int i = 0; i < c->nslots && moved < idle; i++) {
        cp_slot *d = &c->slots[i];
        if (!d->live || d->owner || d->corrupt || d->out_buf != NULL)
            continue;
        while (d->fifo.len >= 1 && moved < idle) {
            cp_task *t = fifo_at(&d->fifo, d->fifo.len - 1);
            int oldest = d->fifo.len == 1;
            if (oldest) {
                uint64_t since = unclaimed_since(d, now);
                if (since == 0 || now - since < STALL_NS)
                    break;
            }
            if (!record_unread(d, t))
                break;
            uint32_t expect = CP_T_QUEUED;
            if (!__atomic_compare_exchange_n(&t->rec->state, &expect,
                                             CP_T_STOLEN, 0, __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE))
                break;
            if (oldest) {
                d->stalled = 1;
                d->stall_pos = t->rec_pos;
            }
            cp_task st = fifo_pop_back(&d->fifo);
            st.rec = NULL;
            st.seq = 0;
            d->sent--;
            if (d->retiring && (uint64_t)c->maxtasks > d->sent)
                d->retiring = 0;
            if (fifo_push_front(&c->pending, &st) < 0) {
                PyErr_Clear();
                PyObject *exc = PyErr_NoMemory();
                (void)exc;
                deliver(c, st.job, st.index, 0, cp_err_take());
                task_clear(&st);
            }
            moved++;
        }
    }
    return moved;
}

/*
 * Give pending tasks to workers that have credit and room.  Starts dormant
 * slots (not live, e.g. after an initializer failure) when there is work.
 * Returns 1 if anything was sent, 0 if not, -1 with an exception set.
 */
static int
pump(Core *c)
{
    int progress = 0;
    uint64_t full = 0;   /* slots found without room this round (first 64) */

    if (c->state > CORE_CLOSING)
        return 0;
again:
    while (c->pending.len) {
        cp_slot *best = NULL;
        size_t best_bl = 0, bl;
        int bi = -1;
        for (int i = 0; i < c->nslots; i++) {
            cp_slot *s = &c->slots[i];
            if (!s->live && !s->corrupt && c->state <= CORE_CLOSING) {
                if (slot_spawn(c, i) < 0)
                    continue;
            }
            if (i < 64 && (full >> i) & 1)
                continue;
            if (!slot_takes(c, s, &bl))
                continue;
            if (best == NULL || bl < best_bl) {
                best = s;
                best_bl = bl;
                bi = i;
            }
        }
        if (best == NULL)
            break;
        /* Room to track it first: once sent, it must not be lost. */
        if (best->fifo.len == best->fifo.cap && fifo_grow(&best->fifo) < 0)
            return -1;
        cp_task *t = fifo_front(&c->pending);
        int rc = try_send(c, best, t);
        if (rc < 0)
            return -1;
        if (rc == 0) {
            if (bi < 64)
                full |= (uint64_t)1 << bi;
            else
                break;
            continue;
        }
        cp_task sent = fifo_pop_front(&c->pending);
        if (fifo_push_back(&best->fifo, &sent) < 0) {
            task_clear(&sent);
            return -1;
        }
        best->sent++;
        if (c->maxtasks > 0 && best->sent >= (uint64_t)c->maxtasks)
            best->retiring = 1;
        progress = 1;
    }
    if (c->pending.len == 0 && steal_for_idle(c) > 0)
        goto again;
    return progress;
}

/* ------------------------------------------------------------- receiving */

static void
kill_corrupt(cp_slot *s)
{
    s->corrupt = 1;
    if (s->pid > 0)
        kill(s->pid, SIGKILL);
}

/* A complete result message for the oldest task in flight on s. */
static void
on_result(Core *c, cp_batch *b, cp_slot *s, const cp_rec *h, PyObject *value,
          int ok)
{
    /* Tasks run in ring order, so the result is for the oldest one; a seq
     * that does not match is a protocol error. */
    cp_task *front = fifo_front(&s->fifo);
    if (front == NULL || front->seq != h->seq) {
        Py_XDECREF(value);
        kill_corrupt(s);
        return;
    }
    cp_task t = fifo_pop_front(&s->fifo);
    s->results++;
    update_credit(s, h->aux);
    if (value == NULL) {
        /* The parent could not unpickle it: that task gets the error. */
        value = cp_err_take();
        ok = 0;
    }
    deliver_batched(c, b, t.job, t.index, ok, value);
    task_clear(&t);
}

/*
 * Read what slot s has published, up to a budget.  Returns 1 if anything was
 * read.  Python errors are handled inside (they belong to tasks).
 */
static void handle_death(Core *c, int i, pid_t pid, int status);

static int
drain_some(Core *c, cp_slot *s, int budget)
{
    int progress = 0;
    cp_batch batch = {0};
    while (budget-- > 0 && !s->corrupt && c->state < CORE_TERMINATED) {
        cp_rec h;
        const uint8_t *p;
        int rc = cp_ring_peek(&s->rq, &h, &p);
        if (rc == 0)
            break;
        if (rc < 0 || (h.kind != CP_K_RESULT && h.kind != CP_K_INITERR)) {
            kill_corrupt(s);
            break;
        }
        progress = 1;
        PyObject *value;
        if (s->in_g == NULL && !(h.flags & (CP_F_MORE | CP_F_OOB))) {
            value = cp_loads(p, h.size);
            cp_ring_release(&s->rq, &h, 1);
        } else {
            if (s->in_g == NULL) {
                s->in_g = PyMem_Malloc(sizeof(cp_gather));
                if (s->in_g == NULL ||
                    cp_gather_init(s->in_g, h.total, (h.flags & CP_F_OOB) != 0,
                                   &s->scratch, cp_warm_share(c->nslots),
                                   &(cp_arena_use){c->arena, s->part, 0}) < 0) {
                    if (s->in_g == NULL)
                        PyErr_NoMemory();
                    else
                        cp_gather_clear(s->in_g);
                    PyMem_Free(s->in_g);
                    s->in_g = NULL;
                    /* Out of memory for this result: drop the worker. */
                    PyErr_Clear();
                    kill_corrupt(s);
                    break;
                }
                s->in_hdr = h;
            }
            if (h.seq != s->in_hdr.seq || h.total != s->in_hdr.total) {
                kill_corrupt(s);
                break;
            }
            if (s->in_err == NULL && cp_gather_feed(s->in_g, p, h.size) < 0)
                s->in_err = cp_err_take();
            cp_ring_release(&s->rq, &h, 1);
            if (h.flags & CP_F_MORE)
                continue;
            /* Take it off the slot first: loads() may run code that lets
             * another thread (terminate) clear the slot. */
            cp_gather *g = s->in_g;
            PyObject *err = s->in_err;
            s->in_g = NULL;
            s->in_err = NULL;
            value = err == NULL ? cp_gather_finish(g) : NULL;
            cp_gather_clear(g);
            PyMem_Free(g);
            if (err != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(err), err);
                Py_DECREF(err);
            }
        }
        if (h.kind == CP_K_INITERR) {
            if (value == NULL)
                value = cp_err_take();
            Py_XSETREF(s->init_exc, value);
            continue;
        }
        on_result(c, &batch, s, &h, value, !(h.flags & CP_F_ERR));
    }
    batch_flush(&batch);
    return progress;
}

/*
 * Read what slot s has published, up to a budget; returns 1 if anything was
 * read.  Unpickling and delivering run Python code, during which another
 * thread may run: a second drain of the same slot is refused (it would read
 * the same record twice), and a death reported meanwhile is handled here,
 * once the ring is no longer being read.
 */
static int
drain(Core *c, cp_slot *s, int budget)
{
    if (s->draining)
        return 0;
    s->draining = 1;
    int progress = drain_some(c, s, budget);
    s->draining = 0;
    if (s->death_pending) {
        s->death_pending = 0;
        handle_death(c, (int)(s - c->slots), s->dead_pid, s->dead_status);
        progress = 1;
    }
    return progress;
}

/* ------------------------------------------------------------ deaths */

/* Slot i's worker is gone (the zygote reaped it with wait status `status`). */
static void
handle_death(Core *c, int i, pid_t pid, int status)
{
    cp_slot *s = &c->slots[i];
    if (!s->live)
        return;
    if (s->draining) {
        s->death_pending = 1;
        s->dead_pid = pid;
        s->dead_status = status;
        return;
    }
    /* It is reaped: its pid may be anyone's now, never signal it. */
    s->pid = 0;
    /* Everything it published is complete (tail moves only after a whole
     * record): deliver that first. */
    s->draining = 1;
    while (drain_some(c, s, DRAIN_BUDGET))
        ;
    s->draining = 0;
    if (c->arena)
        cp_arena_forget_holder(c->arena, 0, pid);
    uint64_t running = cp_load_acquire(&s->ctl->running);
    PyObject *init_exc = s->init_exc;
    s->init_exc = NULL;
    /* A worker that never got through its initializer would fail the same
     * way again: blame the oldest task it was given (so that every such
     * death makes progress) and respawn only when there is work. */
    uint32_t wstate = cp_load_acquire(&s->ctl->state);
    int startup_failure = init_exc != NULL ||
                          (wstate != CP_W_READY && wstate != CP_W_LEFT);
    /* Unless the initializer raised, such a death may have come from
     * outside (the OOM killer, a kill): the first in a row puts its tasks
     * back for a replacement, as any death of a worker that ran no task;
     * the second in a row is the start-up's own failure. */
    if (!startup_failure)
        s->startup_deaths = 0;
    else if (init_exc == NULL && s->startup_deaths++ == 0)
        startup_failure = 0;

    /* Newest first, so that tasks go back to the front of pending in their
     * original order. */
    while (s->fifo.len) {
        cp_task t = fifo_pop_back(&s->fifo);
        if (running != 0 && t.seq == running) {
            fail_task(c, &t, CP_E_LOST, pid, status);
        } else if (startup_failure && s->fifo.len == 0) {
            if (init_exc != NULL) {
                deliver(c, t.job, t.index, 0, Py_NewRef(init_exc));
                task_clear(&t);
            } else {
                fail_task(c, &t, CP_E_STARTUP, pid, status);
            }
        } else if (fifo_push_front(&c->pending, &t) < 0) {
            PyErr_Clear();
            fail_task(c, &t, CP_E_LOST, pid, status);
        }
    }
    s->live = 0;
    slot_reset(c, i);
    /* Respawn at once to keep the pool's size, except after an initializer
     * failure with nothing to do (pump() starts it when work arrives), and
     * when the pool is shutting down. */
    if (c->state <= CORE_CLOSING && (!startup_failure || c->pending.len)) {
        if (slot_spawn(c, i) < 0)
            s->live = 0;
    }
    /* Last: letting go of it may run Python (a __del__), and so another
     * thread, whose pump() must not send to the slot before it is reset.
     * (While the loop above runs callbacks, what is sent to the slot lands
     * in its fifo, which the loop empties.) */
    Py_XDECREF(init_exc);
}

/* Fail every task the pool holds (terminate, or a dead zygote). */
static void
fail_all(Core *c, int kind)
{
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        Py_CLEAR(s->out_buf);
        gather_drop(s);
        while (s->fifo.len) {
            cp_task t = fifo_pop_front(&s->fifo);
            fail_task(c, &t, kind, s->pid, 0);
        }
        s->live = 0;
    }
    while (c->pending.len) {
        cp_task t = fifo_pop_front(&c->pending);
        fail_task(c, &t, kind, 0, 0);
    }
}

/* Pool._pool's object for slot s's worker `pid` learns its exit code
 * (multiprocessing's: -signal, or the status it exited with).  The slot lets
 * go of it: returns the reference, for the caller to drop once the slot no
 * longer lists the worker (dropping it may run Python). */
static PyObject *
proc_ended(cp_slot *s, pid_t pid, int code)
{
    if (s->proc == NULL || s->proc_pid != pid)
        return NULL;
    PyObject *proc = s->proc;
    s->proc = NULL;
    PyObject *v = PyLong_FromLong(code);
    if (v == NULL || PyObject_SetAttrString(proc, "_exitcode", v) < 0)
        PyErr_WriteUnraisable(proc);
    Py_XDECREF(v);
    return proc;
}

static pid_t listed_pid(cp_slot *s, int *number);

static int
wait_status_code(int status)
{
    return WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
}

/* Every worker is gone and the zygote with them.  The zygote recorded how
 * each ended (the idle workers terminate() let leave, too); one it did not
 * was killed by PR_SET_PDEATHSIG when the zygote died. */
static void
procs_killed(Core *c)
{
    /* The reports it sent are in the records as well. */
    cp_zmsg m;
    while (c->zsock >= 0 && cp_proc_recv(c->zsock, &m) > 0)
        ;
    for (int i = 0; c->slots && i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        if (s->proc == NULL)
            continue;
        uint64_t rec = cp_load_acquire(&s->ctl->exited);
        int code = CP_CTL_HIGH(rec) == s->proc_number ? CP_CTL_LOW(rec)
                                                       : -SIGKILL;
        Py_XDECREF(proc_ended(s, s->proc_pid, code));
    }
}

/* Read the zygote's messages.  Returns 1 if any was handled. */
static int
zygote_events(Core *c)
{
    int progress = 0;
    for (;;) {
        cp_zmsg m;
        int rc = cp_proc_recv(c->zsock, &m);
        if (rc == -EAGAIN || rc == -EWOULDBLOCK)
            return progress;
        if (rc <= 0) {
            /* The zygote is gone: no more workers can be made.  Its workers
             * die with it (PR_SET_PDEATHSIG). */
            if (c->state < CORE_DONE) {
                c->state = CORE_BROKEN;
                c->broken = 1;
            }
            return 1;
        }
        progress = 1;
        if (m.slot < 0 || m.slot >= c->nslots)
            continue;
        cp_slot *s = &c->slots[m.slot];
        if (m.type == CP_Z_SPAWNED) {
            s->pid = m.pid;
            s->pid_wait = 0;
            s->number = m.status;
            if (s->corrupt)
                kill(m.pid, SIGKILL);   /* found corrupt before we knew it */
        } else if (m.type == CP_Z_EXITED) {
            if (cp_load_acquire(&s->ctl->state) >= CP_W_STARTING)
                c->started = 1;
            /* Its Pool._pool object first: handle_death() runs callbacks,
             * which may read it.  It is let go of only once the slot no
             * longer lists the worker. */
            PyObject *proc = proc_ended(s, m.pid, wait_status_code(m.status));
            handle_death(c, m.slot, m.pid, m.status);
            Py_XDECREF(proc);
        } else if (m.type == CP_Z_SPAWNFAIL) {
            /* pump() may have queued tasks to the slot before the failure
             * was known: give them back (newest first keeps their order). */
            while (s->fifo.len) {
                cp_task q = fifo_pop_back(&s->fifo);
                q.rec = NULL;
                q.seq = 0;
                if (fifo_push_front(&c->pending, &q) < 0) {
                    PyErr_Clear();
                    fail_task(c, &q, CP_E_LOST, 0, 0);
                }
            }
            s->live = 0;
            slot_reset(c, m.slot);
            /* Make progress rather than retrying forever: the oldest pending
             * task gets the error. */
            if (c->pending.len) {
                cp_task t = fifo_pop_front(&c->pending);
                errno = m.status;
                PyErr_SetFromErrno(PyExc_OSError);
                deliver(c, t.job, t.index, 0, cp_err_take());
                task_clear(&t);
            }
        }
    }
}

/* Has a worker got through PyOS_AfterFork_Child() (CP_START_NS)?  Returns
 * -1 if so (or if no worker is starting), 0 if the time is up, else the ms
 * left. */
static int
start_check(Core *c)
{
    if (c->started)
        return -1;
    int starting = 0;
    for (int i = 0; i < c->nslots; i++) {
        if (cp_load_acquire(&c->slots[i].ctl->state) >= CP_W_STARTING) {
            c->started = 1;
            return -1;
        }
        starting |= c->slots[i].live;
    }
    if (!starting)
        return -1;   /* slot_spawn() sets a new deadline */
    uint64_t now = cp_now_ns();
    if (now >= c->start_by_ns)
        return 0;
    return (int)((c->start_by_ns - now) / 1000000) + 1;
}

/* ------------------------------------------------------------- shutdown */

static int
any_in_flight(Core *c)
{
    if (c->pending.len)
        return 1;
    for (int i = 0; i < c->nslots; i++)
        if (c->slots[i].fifo.len || c->slots[i].out_buf)
            return 1;
    return 0;
}

/* SIGKILL zygote z, through its pidfd when there is one (a pid could have
 * been reaped and reused meanwhile; a pidfd cannot, and if it says the
 * zygote is gone, it is). */
static void
kill_zygote(Core *c, pid_t z)
{
    if (c->zpidfd >= 0)
        syscall(SYS_pidfd_send_signal, c->zpidfd, SIGKILL, NULL, 0);
    else if (z > 0)
        kill(z, SIGKILL);
}

/* Wait up to timeout_ms for the zygote to exit; SIGKILL it after that.
 * Releases the GIL while waiting.  Meanwhile its reports are read and
 * dropped (its records in the slots tell the same, see procs_killed()):
 * with hundreds of workers, a zygote whose reports filled the socket would
 * otherwise wait to send them instead of reading the KILL, and be killed
 * itself a second later, its workers' ends unrecorded.
 *
 * One thread reaps it (the collector after close(), say, while another
 * thread calls terminate()); another that gets here meanwhile only waits
 * for it to have exited (its records are final then). */
static void
reap_zygote(Core *c, int timeout_ms)
{
    pid_t z = c->zpid;
    if (z <= 0)
        return;
    uint64_t end = cp_now_ns() + (uint64_t)timeout_ms * 1000000;
    if (c->zreaping) {
        Py_BEGIN_ALLOW_THREADS
        for (uint64_t now; cp_load_acquire(&c->zreaping) && (now = cp_now_ns()) < end;) {
            if (c->zpidfd >= 0) {
                struct pollfd p = {.fd = c->zpidfd, .events = POLLIN};
                if (poll(&p, 1, (int)((end - now + 999999) / 1000000)) > 0)
                    break;
            } else {
                usleep(1000);
            }
        }
        Py_END_ALLOW_THREADS
        return;
    }
    c->zreaping = 1;
    int st = -1;
    Py_BEGIN_ALLOW_THREADS
    if (c->zpidfd >= 0) {
        struct pollfd p[2] = {{.fd = c->zpidfd, .events = POLLIN},
                              {.fd = c->zsock, .events = POLLIN}};
        int nfds = c->zsock >= 0 ? 2 : 1;
        for (;;) {
            uint64_t now = cp_now_ns();
            if (now >= end) {
                kill_zygote(c, z);
                break;
            }
            int rc = poll(p, (nfds_t)nfds, (int)((end - now + 999999) / 1000000));
            if (rc < 0 && errno != EINTR) {
                kill_zygote(c, z);
                break;
            }
            if (rc > 0 && p[0].revents)
                break;                  /* it has exited */
            if (rc > 0 && nfds == 2 && p[1].revents) {
                cp_zmsg m;
                ssize_t k;
                while ((k = recv(c->zsock, &m, sizeof m, MSG_DONTWAIT)) > 0)
                    ;
                if (k == 0 || (p[1].revents & (POLLHUP | POLLERR)))
                    nfds = 1;           /* it closed its end */
            }
        }
    } else {
        kill_zygote(c, z);
    }
    while (waitpid(z, &st, 0) < 0 && errno == EINTR)
        ;
    Py_END_ALLOW_THREADS
    c->zpid = 0;
    /* The zygote exits 0 only once it has reaped every worker: then no
     * process of the pool is left to write to its shared memory. */
    c->all_reaped = st == 0;
    cp_store_release(&c->zreaping, 0);
}

static void
close_fds(Core *c)
{
    if (c->zsock >= 0) {
        cp_proc_unregister_fd(c->zsock);
        close(c->zsock);
        c->zsock = -1;
    }
    if (c->zpidfd >= 0) {
        cp_proc_unregister_fd(c->zpidfd);
        close(c->zpidfd);
        c->zpidfd = -1;
    }
    if (c->efd >= 0) {
        cp_proc_unregister_fd(c->efd);
        close(c->efd);
        c->efd = -1;
    }
}

/* Stop the zygote and every worker now. */
static void
kill_everything(Core *c)
{
    if (c->zpid > 0 && c->zsock >= 0) {
        cp_zmsg m = {.type = CP_Z_KILL};
        if (cp_proc_send(c->zsock, &m) < 0)
            kill_zygote(c, c->zpid);
    } else if (c->zpid > 0) {
        kill_zygote(c, c->zpid);
    }
    reap_zygote(c, 1000);
}

/* Queue a STOP record to slot s's worker: it leaves once it reads it.
 * Returns -1 if its ring has no room. */
static int
send_stop(cp_slot *s)
{
    cp_rec *rec = cp_ring_reserve(&s->tq, 0);
    if (rec == NULL)
        return -1;
    memset((uint8_t *)rec + 4, 0, sizeof *rec - 4);
    rec->kind = CP_K_STOP;
    cp_ring_commit(&s->tq, rec);
    cp_ring_flush(&s->tq);
    s->stopping = 1;
    return 0;
}

/* How long terminate() waits for idle workers to leave (see below). */
#define LEAVE_NS (UINT64_C(100) * 1000 * 1000)

/*
 * terminate(), before everything is killed: a worker that runs no task
 * leaves as after close() (multiprocessing's idle workers often get their
 * stop sentinel before its SIGTERM): what its tasks printed and its buffers
 * still hold is written, and multiprocessing's exit functions (the
 * Finalize callbacks of its tasks) run.  Tasks queued to it that it has
 * not claimed are taken back first (the compare-and-swap on the record
 * decides: they fail as terminated); a worker that claimed one is running
 * it and is killed with the rest.  Waits at most LEAVE_NS, the GIL
 * released, for the workers to say they are through (CP_W_LEFT).
 */
static void
let_idle_workers_leave(Core *c)
{
    cp_ctl **leaving = PyMem_Calloc((size_t)c->nslots, sizeof *leaving);
    int n = 0;
    if (leaving == NULL)
        return;     /* then they are killed */
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        /* Its state, not s->pid: a worker can be given tasks, and run them,
         * before the zygote's report of its pid is read. */
        if (!s->live || s->owner || s->corrupt || s->death_pending ||
            s->out_buf != NULL || cp_load_acquire(&s->ctl->state) != CP_W_READY)
            continue;
        size_t taken = 0;
        int claimed = 0;
        for (size_t j = 0; j < s->fifo.len && !claimed; j++) {
            cp_task *t = fifo_at(&s->fifo, j);
            if (!record_unread(s, t))
                continue;       /* read: unfinished() below tells */
            uint32_t expect = CP_T_QUEUED;
            if (__atomic_compare_exchange_n(&t->rec->state, &expect, CP_T_STOLEN,
                                            0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                taken++;
            else
                claimed = 1;
        }
        if (claimed || unfinished(s) > taken)
            continue;           /* running a task */
        if (!s->stopping && send_stop(s) < 0)
            continue;
        leaving[n++] = s->ctl;
    }
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        uint64_t end = cp_now_ns() + LEAVE_NS;
        for (int k = 0; k < n; k++) {
            uint32_t st;
            while ((st = cp_load_acquire(&leaving[k]->state)) != CP_W_LEFT) {
                uint64_t now = cp_now_ns();
                if (now >= end)
                    break;
                cp_futex_wait(&leaving[k]->state, st, (long)(end - now));
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(leaving);
}

/* Advance a graceful shutdown.  Returns 1 once everything is gone. */
static int
shutdown_step(Core *c)
{
    if (c->state == CORE_CLOSING && !any_in_flight(c)) {
        for (int i = 0; i < c->nslots; i++) {
            cp_slot *s = &c->slots[i];
            if (!s->live)
                continue;
            /* No room cannot happen with nothing in flight; make sure. */
            if (send_stop(s) < 0 && s->pid > 0)
                kill(s->pid, SIGKILL);
            s->stopping = 1;
        }
        c->state = CORE_STOPPING;
    }
    if (c->state == CORE_STOPPING) {
        for (int i = 0; i < c->nslots; i++)
            if (c->slots[i].live)
                return 0;
        cp_zmsg m = {.type = CP_Z_QUIT};
        cp_proc_send(c->zsock, &m);
        reap_zygote(c, 1000);
        if (c->state == CORE_STOPPING)     /* (not if terminated meanwhile) */
            c->state = CORE_DONE;
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------- collector */

/* What the collector watches while it sleeps, decided with the GIL held:
 * bit 1: the slot's results; bit 2: room in its task ring. */
enum { W_RESULTS = 1, W_SPACE = 2 };

static int
results_waiting(Core *c, const uint64_t *watch)
{
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        if ((watch[i] & W_RESULTS) &&
            cp_load_acquire(&s->rq.h->tail) != s->rq.pos)
            return 1;
        if ((watch[i] & W_SPACE) && cp_ring_free_bytes(&s->tq) >= watch[i] >> 2)
            return 1;
    }
    return 0;
}

/* Sleep until a worker publishes, frees room we wait for, the zygote
 * speaks, or someone rings the doorbell.  Called without the GIL. */
static void
collector_sleep(Core *c, const uint64_t *watch, int timeout_ms)
{
    uint64_t start = cp_now_ns();
    unsigned n = 0;
    /* A short spin: the collector is one of three parties (caller, collector,
     * workers) and there may be only two cores. */
    long spin = c->spin_ns < COLLECTOR_SPIN_NS ? c->spin_ns : COLLECTOR_SPIN_NS;
    while (spin > 0) {
        cp_cpu_relax();
        if ((++n & 15) == 0) {
            if (results_waiting(c, watch))
                return;
            if ((long)(cp_now_ns() - start) > spin)
                break;
        }
    }
    for (int i = 0; i < c->nslots; i++) {
        if (watch[i] & W_RESULTS)
            cp_store_relaxed(&c->slots[i].rq.h->cons_sleep, 1);
        if (watch[i] & W_SPACE)
            cp_store_relaxed(&c->slots[i].tq.h->prod_sleep, 1);
    }
    /* Order the flag stores before re-checking the rings (see ring.c). */
    cp_fence_full();
    if (!results_waiting(c, watch)) {
        struct pollfd p[2] = {{.fd = c->efd, .events = POLLIN},
                              {.fd = c->zsock, .events = POLLIN}};
        if (poll(p, 2, timeout_ms) > 0) {
            uint64_t v;
            if (p[0].revents)
                while (read(c->efd, &v, sizeof v) < 0 && errno == EINTR)
                    ;
            if (p[1].revents)
                c->zsock_ready = 1;
        }
    }
    for (int i = 0; i < c->nslots; i++) {
        cp_store_relaxed(&c->slots[i].rq.h->cons_sleep, 0);
        cp_store_relaxed(&c->slots[i].tq.h->prod_sleep, 0);
    }
}

static PyObject *
Core_collect(Core *c, PyObject *Py_UNUSED(ignored))
{
    if (c->owner != getpid() || c->collecting) {
        PyErr_SetString(PyExc_RuntimeError, "cpool: collector already running");
        return NULL;
    }
    uint64_t *watch = PyMem_Calloc((size_t)c->nslots, sizeof(uint64_t));
    if (watch == NULL)
        return PyErr_NoMemory();
    c->collecting = 1;
    c->collector = PyThread_get_thread_ident();
    Py_INCREF(c);
    for (;;) {
        int progress = deliver_late(c);
        if (c->state == CORE_TERMINATED || c->state == CORE_BROKEN) {
            fail_all(c, c->state == CORE_BROKEN ? CP_E_BROKEN : CP_E_TERMINATED);
            if (c->state == CORE_BROKEN) {
                kill_everything(c);
                c->state = CORE_DONE;
                procs_killed(c);
            }
            break;
        }
        if (c->state == CORE_DONE)
            break;
        /* The zygote's messages (deaths, spawns) are read when its socket
         * woke the collector's poll, and at least every ZCHECK_NS while
         * results keep it from sleeping: not a recv() per round. */
        uint64_t now = cp_now_ns();
        if (c->zsock_ready || now - c->zcheck_ns >= ZCHECK_NS) {
            c->zsock_ready = 0;
            c->zcheck_ns = now;
            progress |= zygote_events(c);
        }
        for (int i = 0; i < c->nslots && c->state < CORE_TERMINATED; i++) {
            cp_slot *s = &c->slots[i];
            if (s->live && !s->owner)
                progress |= drain(c, s, DRAIN_BUDGET);
            progress |= continue_send(s);
        }
        if (c->state >= CORE_TERMINATED)
            continue;
        int rc = pump(c);
        if (rc < 0) {
            /* A Python error while dispatching (out of memory): report it
             * and go on; the task stays pending. */
            PyErr_WriteUnraisable((PyObject *)c);
            rc = 0;
        }
        progress |= rc;
        if (shutdown_step(c))
            break;
        if (progress)
            continue;
        for (int i = 0; i < c->nslots; i++) {
            cp_slot *s = &c->slots[i];
            watch[i] = s->live && !s->corrupt && !s->owner ? W_RESULTS : 0;
            if (s->out_buf) {
                uint64_t need = cp_ring_next_need(
                    &s->tq, cp_msg_size(s->out_buf) - s->out_off);
                watch[i] |= W_SPACE | (need << 2);
            }
        }
        int timeout_ms = start_check(c);
        if (timeout_ms == 0) {
            /* No worker can start: nothing can run.  (Its workers die with
             * the zygote: PR_SET_PDEATHSIG is set before they hang.) */
            kill_zygote(c, c->zpid);
            c->state = CORE_BROKEN;
            c->broken = 1;
            continue;
        }
        if (timeout_ms < 0 || timeout_ms > c->ring_check_ms)
            timeout_ms = c->ring_check_ms;
        int stall_ms = stall_wait_ms(c);
        if (stall_ms > 0 && stall_ms < timeout_ms)
            timeout_ms = stall_ms;
        c->asleep = 1;
        Py_BEGIN_ALLOW_THREADS
        collector_sleep(c, watch, timeout_ms);
        Py_END_ALLOW_THREADS
        c->asleep = 0;
    }
    /* No thread switch between the last look at `late` and `collected`:
     * what fail_unsent() queues is either failed here or not queued. */
    while (deliver_late(c))
        ;
    c->collected = 1;
    c->collecting = 0;
    PyMem_Free(watch);
    Py_DECREF(c);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------- Python API */

/* The error for work given to a pool that no longer takes it: multiprocessing's
 * ValueError, which says why when the pool broke (its state is still RUN
 * for the Python layer: only close() or terminate() change that). */
static void
not_running(Core *c)
{
    if (c->broken)
        PyErr_SetString(PyExc_ValueError, "Pool not running: it is broken "
                        "(its fork server is gone, or its workers could not "
                        "start); terminate() it and make another");
    else
        PyErr_SetString(PyExc_ValueError, "Pool not running");
}

static int
check_owner(Core *c)
{
    if (c->owner != cp_self_pid()) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cpool: a pool can only be used by the process that created it");
        return -1;
    }
    return 0;
}

/* Functions and builtins pickle by reference, so their pickle can be sent
 * to each worker once and named by id after that.  Anything else (partial,
 * callable objects) may carry state that changes: pickle it every time. */
static int
cacheable(PyObject *f)
{
    if (PyFunction_Check(f))
        return 1;
    if (!PyCFunction_Check(f))
        return 0;
    /* A built-in function (len, math.sqrt: bound to its module) or one bound
     * to a class (bytes.fromhex) pickles as a name.  A built-in method
     * bound to an object (d.get, lst.count) pickles a copy of the object, and
     * compares equal to the same method of the same object after it
     * changed: never cached. */
    PyObject *self = PyCFunction_GET_SELF(f);
    return self == NULL || PyModule_Check(self) || PyType_Check(self);
}

static int
func_id(Core *c, PyObject *func, uint32_t *fid)
{
    *fid = 0;
    if (!cacheable(func))
        return 0;
    PyObject *v = PyDict_GetItemWithError(c->fids, func);
    if (v != NULL) {
        *fid = (uint32_t)PyLong_AsUnsignedLong(v);
        return 0;
    }
    if (PyErr_Occurred())
        return -1;
    if (PyDict_GET_SIZE(c->fids) >= MAX_CACHED_FUNCS)
        return 0;
    PyObject *b = PyObject_CallFunctionObjArgs(cp_state->dumps, func,
                                               cp_state->protocol, NULL);
    if (b == NULL)
        return -1;
    if ((uint64_t)PyBytes_GET_SIZE(b) > c->slots[0].tq.max_frag) {
        Py_DECREF(b);
        return 0;
    }
    uint32_t id = ++c->next_fid;
    PyObject *key = PyLong_FromUnsignedLong(id);
    int rc = (key == NULL || PyDict_SetItem(c->fbytes, key, b) < 0 ||
              PyDict_SetItem(c->fids, func, key) < 0) ? -1 : 0;
    Py_XDECREF(key);
    Py_DECREF(b);
    if (rc == 0)
        *fid = id;
    return rc;
}

/* Build the task for func/body (pickling errors are raised here); snap:
 * copy its large mutable buffers now (msg.c: snapshot). */
static int
make_task(Core *c, cp_task *t, uint64_t job, uint64_t index, int mode,
          PyObject *func, PyObject *body, int snap)
{
    uint32_t fid;
    if (func_id(c, func, &fid) < 0)
        return -1;
    PyObject *obj = fid ? Py_NewRef(body) : PyTuple_Pack(2, func, body);
    if (obj == NULL)
        return -1;
    int oob;
    PyObject *payload = cp_dumps(obj, cp_msg_has_big_buffer(body, 2),
                                 c->slots[0].tq.max_frag, &oob,
                                 &(cp_arena_use){c->arena, 0, 1, NULL, snap});
    Py_DECREF(obj);
    if (payload == NULL)
        return -1;
    *t = (cp_task){.job = job, .index = index, .payload = payload,
                   .func = Py_NewRef(func), .fid = fid, .mode = (uint32_t)mode,
                   .mflags = oob ? CP_F_OOB : 0};
    return 0;
}

/* After queueing: leave nothing that only the collector can move without
 * telling it (a half-sent message, work with nothing in flight, or work a
 * held-back worker could take once it moves again: the collector then looks
 * within STALL_NS, see stall_wait_ms). */
static void
wake_if_needed(Core *c)
{
    int wake = 0, stalled = 0, takes = 0;
    for (int i = 0; i < c->nslots; i++) {
        if (c->slots[i].out_buf)
            wake = 1;
        stalled |= c->slots[i].stalled;
        takes |= takeable(&c->slots[i]);
    }
    if (stalled && (takes || c->pending.len))
        wake = 1;
    if (c->pending.len && !wake) {
        wake = 1;
        for (int i = 0; i < c->nslots; i++)
            if (c->slots[i].fifo.len)
                wake = 0;
    }
    if (wake && c->asleep)
        ring_doorbell(c);
}

/* The (job, index, mode) arguments of submit()/submit_many(), checked, and
 * whether this pool takes work now.  -1 with an exception set if not. */
static int
submit_args(Core *c, PyObject *const *args, unsigned long long *job,
            unsigned long long *index, int *mode)
{
    *job = PyLong_AsUnsignedLongLong(args[0]);
    *index = PyLong_AsUnsignedLongLong(args[1]);
    *mode = (int)PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return -1;
    if (*mode < CP_MODE_APPLY || *mode > CP_MODE_CALL1) {
        PyErr_SetString(PyExc_ValueError, "bad mode");
        return -1;
    }
    if (check_owner(c) < 0)
        return -1;
    if (c->state > CORE_CLOSING) {
        not_running(c);
        return -1;
    }
    return 0;
}

/* Queue a task made by make_task(); -1 (and the task cleared) if the pool
 * stopped meanwhile. */
static int
queue_made_task(Core *c, cp_task *tp)
{
    cp_task t = *tp;
    if (c->state > CORE_CLOSING) {
        /* Terminated or shut down while pickling (which runs Python). */
        task_clear(&t);
        not_running(c);
        return -1;
    }
    if (fifo_push_back(&c->pending, &t) < 0) {
        task_clear(&t);
        PyErr_NoMemory();
        return -1;
    }
    /* The task is queued: a failure to dispatch now (out of memory) is not
     * this caller's; the collector retries. */
    if (pump(c) < 0)
        PyErr_WriteUnraisable((PyObject *)c);
    wake_if_needed(c);
    return 0;
}

/* Pickle a task and queue it; -1 with the pickling error set. */
static int
queue_task(Core *c, uint64_t job, uint64_t index, int mode, PyObject *func,
           PyObject *body, int snap)
{
    cp_task t;
    if (make_task(c, &t, job, index, mode, func, body, snap) < 0)
        return -1;
    return queue_made_task(c, &t);
}

PyDoc_STRVAR(Core_submit_doc,
"submit(job, index, mode, func, body, snapshot=False)\n--\n\n"
"Pickle a task and queue it.  mode 0: body is (args, kwds); 1: body is a\n"
"tuple of items for func(x); 2: a tuple of argument tuples for func(*x);\n"
"3: body is x for func(x).  snapshot: copy large mutable buffers now.\n"
"Pickling errors are raised here, in the caller.");

static PyObject *
Core_submit(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long job, index;
    int mode, snap = 0;
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "submit() takes 5 or 6 arguments");
        return NULL;
    }
    if (submit_args(c, args, &job, &index, &mode) < 0 ||
        (nargs == 6 && (snap = PyObject_IsTrue(args[5])) < 0))
        return NULL;
    if (queue_task(c, job, index, mode, args[3], args[4], snap) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A task for items[start:stop] of a list or tuple: encoded straight from
 * the sequence when they are plain data, without making the slice (nor
 * checking items of refcount 1 for sharing).  Otherwise the slice goes
 * through make_task(), as a chunk of any other input does. */
static int
make_slice_task(Core *c, cp_task *t, uint64_t job, uint64_t index, int mode,
                PyObject *func, PyObject *seq, Py_ssize_t start, Py_ssize_t stop)
{
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (stop > len)
        stop = len;
    if (start > stop)
        start = stop;
    PyObject **items = PySequence_Fast_ITEMS(seq) + start;
    Py_ssize_t n = stop - start;
    uint32_t fid;
    if (func_id(c, func, &fid) < 0)
        return -1;
    int big = 0;
    for (Py_ssize_t i = 0; i < n && i < 16 && !big; i++)
        big = cp_msg_has_big_buffer(items[i], 1);
    if (fid && !big) {
        PyObject *payload = cp_dumps_items(items, n, c->slots[0].tq.max_frag);
        if (payload == NULL)
            return -1;
        if (payload != Py_None) {
            *t = (cp_task){.job = job, .index = index, .payload = payload,
                           .func = Py_NewRef(func), .fid = fid,
                           .mode = (uint32_t)mode};
            return 0;
        }
        Py_DECREF(payload);
    }
    PyObject *chunk = PySequence_GetSlice(seq, start, stop);
    if (chunk == NULL)
        return -1;
    int rc = make_task(c, t, job, index, mode, func, chunk, 0);
    Py_DECREF(chunk);
    return rc;
}

PyDoc_STRVAR(Core_submit_slice_doc,
"submit_slice(job, index, mode, func, seq, start, stop)\n--\n\n"
"submit() of the chunk seq[start:stop] of a list or tuple (mode 1 or 2),\n"
"without making the slice when its items are plain data.");

static PyObject *
Core_submit_slice(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !(PyList_CheckExact(args[4]) || PyTuple_CheckExact(args[4]))) {
        PyErr_SetString(PyExc_TypeError,
                        "submit_slice(job, index, mode, func, list, start, stop)");
        return NULL;
    }
    unsigned long long job, index;
    int mode;
    if (submit_args(c, args, &job, &index, &mode) < 0)
        return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[5]);
    Py_ssize_t stop = start < 0 ? -1 : PyLong_AsSsize_t(args[6]);
    if (start < 0 || stop < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "submit_slice: negative bound");
        return NULL;
    }
    if (mode != CP_MODE_MAP && mode != CP_MODE_STARMAP) {
        PyErr_SetString(PyExc_ValueError, "submit_slice: mode must be MAP or STARMAP");
        return NULL;
    }
    cp_task t;
    if (make_slice_task(c, &t, job, index, mode, args[3], args[4], start, stop) < 0 ||
        queue_made_task(c, &t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* apply_async() once PoolBase.apply_async() (result.c) has parsed its
 * arguments and checked the pool's state: args are (pool, func, args, kwds,
 * callback, error_callback), its job number or'ed with flags
 * (CP_APPLY_JOB or 0).  The result object is made here; a task that
 * cannot be pickled fails its result, as in multiprocessing. */
PyObject *
cp_core_apply_async(PyObject *core, PyObject *const *args, uint64_t flags)
{
    if (!Py_IS_TYPE(core, cp_state->core_type)) {
        PyErr_SetString(PyExc_TypeError, "apply_async() needs the pool's Core");
        return NULL;
    }
    Core *c = (Core *)core;
    if (check_owner(c) < 0)
        return NULL;
    uint64_t job;
    PyObject *r = cp_result_new(args[0], c->cache, args[4], args[5], flags, &job);
    if (r == NULL)
        return NULL;
    PyObject *body = PyTuple_Pack(2, args[2], args[3]);
    int rc = body ? queue_task(c, job, 0, CP_MODE_APPLY, args[1], body, 0) : -1;
    Py_XDECREF(body);
    if (rc < 0) {
        /* As in multiprocessing, a task that cannot be sent fails its
         * result; the pool is untouched. */
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            cp_result_forget(r);
            Py_DECREF(r);
            return NULL;
        }
        if (c->state > CORE_CLOSING) {
            cp_result_forget(r);
            Py_DECREF(r);
            PyErr_Clear();
            not_running(c);
            return NULL;
        }
        fail_unsent(c, job, 0, cp_err_take(),
                    args[4] != Py_None || args[5] != Py_None);
    }
    return r;
}

/* Give a slot back to the collector after a synchronous call.  Work queued
 * meanwhile went to `pending` (nothing is sent to an owned slot): send it
 * now.  If the collector sleeps, it may have looked at the pool while the
 * slot was owned, and it is not watching this slot: watch it on its behalf
 * (set the flag the worker checks), and wake it if something is there for
 * it to do: results, a death, work still pending, or a close() to finish
 * (the call may have been the last work). */
static void
release_slot(Core *c, cp_slot *s)
{
    s->owner = 0;
    if (c->pending.len && pump(c) < 0)
        PyErr_WriteUnraisable((PyObject *)c);   /* the collector retries */
    if (c->asleep) {
        cp_store_relaxed(&s->rq.h->cons_sleep, 1);
        cp_fence_full();
        if (cp_load_acquire(&s->rq.h->tail) != s->rq.pos || s->death_pending ||
            c->pending.len || c->state == CORE_CLOSING)
            ring_doorbell(c);
    }
}

static long
call_spin_ns(Core *c, cp_slot *s)
{
    /* Spin for about a few run times of a typical task here, within bounds:
     * the caller's core is better spent elsewhere on long tasks.
     * CPOOL_CALL_SPIN_NS fixes it (tests: a call that keeps its worker). */
    if (c->call_spin_ns > 0)
        return c->call_spin_ns;
    long ns = (long)(s->avg_us * 3000.0);
    long lo = 20000;
    if (s->avg_us > 1000.0 || ns < lo)
        ns = lo;
    return ns > 200000 ? 200000 : ns;
}

PyDoc_STRVAR(Core_call_doc,
"call(func, args, kwds) -> (ok, value) or None\n--\n\n"
"apply() without a result object: send the task to an idle worker and\n"
"read its result directly.  Returns None when no worker is idle (use the\n"
"asynchronous path then).  Raises what pickling or the wait raises.");

static void
call_unregister(Core *c, cp_call *k)
{
    for (int i = 0; i < c->ncalls; i++) {
        if (c->calls[i] == k) {
            c->calls[i] = c->calls[--c->ncalls];
            return;
        }
    }
}

static PyObject *
Core_call(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "call() takes 3 arguments");
        return NULL;
    }
    if (check_owner(c) < 0)
        return NULL;
    if (c->state != CORE_RUN) {
        not_running(c);
        return NULL;
    }
    /* Not in the collector (a callback calling apply()): its wait would
     * need the collector; the caller's slow path says so. */
    if (c->pending.len || !c->collecting || c->ncalls >= CP_MAX_CALLS ||
        PyThread_get_thread_ident() == c->collector)
        Py_RETURN_NONE;
    cp_slot *s = NULL;
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *x = &c->slots[i];
        if (slot_accepts(c, x) && x->fifo.len == 0 && !x->draining &&
            !x->death_pending && x->pid > 0) {
            s = x;
            break;
        }
    }
    if (s == NULL)
        Py_RETURN_NONE;

    /* Take a mailbox before pickling: pickling runs Python code, and other
     * threads may make calls (or terminate) meanwhile. */
    cp_call call = {.job = CP_SYNC_JOB | ++c->next_seq};
    c->calls[c->ncalls++] = &call;
    PyObject *body = PyTuple_Pack(2, args[1], args[2]);
    cp_task t;
    int rc = body ? make_task(c, &t, call.job, 0, CP_MODE_APPLY, args[0], body, 0)
                  : -1;
    Py_XDECREF(body);
    if (rc < 0) {
        call_unregister(c, &call);
        return NULL;
    }
    if (c->state != CORE_RUN) {
        task_clear(&t);
        call_unregister(c, &call);
        not_running(c);
        return NULL;
    }
    /* The slot may have been taken while we pickled. */
    if (!slot_accepts(c, s) || s->fifo.len || s->draining || s->death_pending ||
        (s->fifo.len == s->fifo.cap && fifo_grow(&s->fifo) < 0) ||
        (rc = try_send(c, s, &t)) <= 0) {
        task_clear(&t);
        call_unregister(c, &call);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    fifo_push_back(&s->fifo, &t);   /* room was made above */
    s->sent++;
    if (c->maxtasks > 0 && s->sent >= (uint64_t)c->maxtasks)
        s->retiring = 1;
    s->owner = 1;
    /* We watch this ring now: the worker need not wake the collector. */
    cp_store_relaxed(&s->rq.h->cons_sleep, 0);
    /* A task larger than the room in the ring is finished by the collector. */
    wake_if_needed(c);

    /* Phase 1: spin on the result ring ourselves, and drain it. */
    long budget = call_spin_ns(c, s);
    uint64_t start = cp_now_ns();
    while (s->owner && !cp_load_acquire(&call.ready)) {
        int seen = 0;
        Py_BEGIN_ALLOW_THREADS
        unsigned n = 0;
        for (;;) {
            if (cp_load_acquire(&s->rq.h->tail) != cp_load_relaxed(&s->rq.pos) ||
                cp_load_acquire(&call.ready)) {
                seen = 1;
                break;
            }
            cp_cpu_relax();
            if ((++n & 31) == 0 && (long)(cp_now_ns() - start) > budget)
                break;
        }
        Py_END_ALLOW_THREADS
        /* Terminated: drain() reads nothing more, and a quiet terminate
         * leaves the mailbox empty: wait as for a long task. */
        if (!seen || c->state >= CORE_TERMINATED)
            break;
        if (s->owner && s->live && !cp_load_acquire(&call.ready))
            drain(c, s, DRAIN_BUDGET);
    }
    if (s->owner)
        release_slot(c, s);

    /* Phase 2: a long task; the collector delivers it to the mailbox. */
    while (!cp_load_acquire(&call.ready)) {
        Py_BEGIN_ALLOW_THREADS
        cp_futex_wait(&call.ready, 0, 50 * 1000 * 1000);
        Py_END_ALLOW_THREADS
        if (cp_load_acquire(&call.ready))
            break;
        if (PyErr_CheckSignals() < 0) {
            call_unregister(c, &call);   /* its result is dropped */
            return NULL;
        }
    }
    call_unregister(c, &call);
    return Py_BuildValue("(NN)", PyBool_FromLong(call.ok), call.value);
}

PyDoc_STRVAR(Core_submit_many_doc,
"submit_many(job, first_index, mode, func, bodies)\n--\n\n"
"submit(..., snapshot=True) for each body of the list (an imap input's\n"
"items), with indexes from first_index.  All are pickled before any is\n"
"queued: on a pickling error none is queued.");

static PyObject *
Core_submit_many(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "submit_many(job, first_index, mode, func, list)");
        return NULL;
    }
    unsigned long long job, first;
    int mode;
    if (submit_args(c, args, &job, &first, &mode) < 0)
        return NULL;
    PyObject *bodies = args[4];
    Py_ssize_t n = PyList_GET_SIZE(bodies);
    cp_task *ts = PyMem_Calloc((size_t)(n ? n : 1), sizeof(cp_task));
    if (ts == NULL)
        return PyErr_NoMemory();
    Py_ssize_t k;
    for (k = 0; k < n; k++) {
        if (make_task(c, &ts[k], job, first + (uint64_t)k, mode, args[3],
                      PyList_GET_ITEM(bodies, k), 1) < 0)
            break;
    }
    if (k == n && c->state > CORE_CLOSING) {
        not_running(c);
    }
    if (k < n || PyErr_Occurred()) {
        while (k-- > 0)
            task_clear(&ts[k]);
        PyMem_Free(ts);
        return NULL;
    }
    for (k = 0; k < n; k++) {
        if (fifo_push_back(&c->pending, &ts[k]) < 0) {
            /* None is queued, as after a pickling error (the caller may
             * retry them one by one): take back the ones pushed (no Python
             * runs here, so they are still the last ones). */
            for (Py_ssize_t j = 0; j < k; j++) {
                cp_task t = fifo_pop_back(&c->pending);
                task_clear(&t);
            }
            for (Py_ssize_t j = k; j < n; j++)
                task_clear(&ts[j]);
            PyMem_Free(ts);
            return PyErr_NoMemory();
        }
    }
    PyMem_Free(ts);
    /* The task is queued: a failure to dispatch now (out of memory) is not
     * this caller's; the collector retries. */
    if (pump(c) < 0)
        PyErr_WriteUnraisable((PyObject *)c);
    wake_if_needed(c);
    Py_RETURN_NONE;
}

static PyObject *
Core_close(Core *c, PyObject *Py_UNUSED(ignored))
{
    if (check_owner(c) < 0)
        return NULL;
    if (c->state == CORE_RUN) {
        c->state = CORE_CLOSING;
        ring_doorbell(c);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Core_terminate_doc,
"terminate(quiet=False)\n--\n\n"
"Kill every worker now and fail whatever is unfinished.  Quiet (at\n"
"interpreter exit), the results fail only for those who ask from now on:\n"
"threads already waiting are not woken, and no callback runs.");

static PyObject *
Core_terminate(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "terminate() takes at most 1 argument");
        return NULL;
    }
    int quiet = nargs ? PyObject_IsTrue(args[0]) : 0;
    if (quiet < 0)
        return NULL;
    if (check_owner(c) < 0)
        return NULL;
    if (c->state == CORE_TERMINATED || c->state == CORE_DONE) {
        Py_RETURN_NONE;
    }
    /* Which workers Pool._pool lists from now on (their objects are made
     * when it is read, and told their ends by the records). */
    for (int i = 0; i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        s->final_number = 0;
        s->final_pid = listed_pid(s, &s->final_number);
        /* A worker asked for and not forked yet: if the zygote forks it
         * before it sees the KILL, its `spawned` word tells (see below). */
        s->final_wait = s->final_pid <= 0 && s->live && s->pid_wait;
    }
    c->quiet = quiet;
    c->state = CORE_TERMINATED;
    /* The collector fails what is unfinished and exits while we wait for the
     * processes to go. */
    int collecting = c->collecting;
    if (collecting)
        ring_doorbell(c);
    let_idle_workers_leave(c);
    kill_everything(c);
    procs_killed(c);
    if (!collecting)
        fail_all(c, CP_E_TERMINATED);
    Py_RETURN_NONE;
}

static PyObject *
Core_pids(Core *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *l = PyList_New(0);
    for (int i = 0; l != NULL && i < c->nslots; i++) {
        if (!c->slots[i].live || c->slots[i].pid <= 0)
            continue;
        PyObject *v = PyLong_FromLong(c->slots[i].pid);
        if (v == NULL || PyList_Append(l, v) < 0)
            Py_CLEAR(l);
        Py_XDECREF(v);
    }
    return l;
}

PyDoc_STRVAR(Core_workers_doc,
"workers(make) -> (list, unknown)\n--\n\n"
"Pool._pool: an object per live worker, the same one for as long as that\n"
"worker lives, made by make(pid, number, slot, ident) the first time (make None:\n"
"only those made already); it is given _exitcode when the collector reads\n"
"the worker's end (exit_code() tells it before that).  unknown counts the\n"
"workers asked for that the zygote has not forked yet.  Once the pool is\n"
"terminated: the workers it had then.  Empty in a forked child.");

/* The pid and number of the worker the zygote last forked for slot s (0 if
 * none since the slot's reset). */
static pid_t
spawned_pid(cp_slot *s, int *number)
{
    uint64_t w = cp_load_acquire(&s->ctl->spawned);
    *number = CP_CTL_LOW(w);
    return (pid_t)CP_CTL_HIGH(w);
}

/* The pid of slot s's worker as far as Pool._pool is concerned (the zygote
 * writes it when it forks, before the collector reads it), and its number;
 * 0 if none or its death is known. */
static pid_t
listed_pid(cp_slot *s, int *number)
{
    if (!s->live || s->death_pending)
        return 0;
    if (s->pid > 0) {
        *number = s->number;
        return s->pid;
    }
    return s->pid_wait ? spawned_pid(s, number) : 0;
}

static PyObject *
Core_workers(Core *c, PyObject *make)
{
    PyObject *l = PyList_New(0);
    int unknown = 0;
    if (c->owner != cp_self_pid())
        goto done;
    for (int i = 0; l != NULL && i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        int number = 0;
        pid_t pid;
        if (c->state >= CORE_TERMINATED) {
            pid = s->final_pid;     /* ended: their records tell how */
            number = s->final_number;
            if (pid <= 0 && s->final_wait)
                pid = spawned_pid(s, &number);
        } else {
            pid = listed_pid(s, &number);
            if (pid <= 0)
                unknown += s->live && s->pid_wait && !s->death_pending;
        }
        if (pid <= 0)
            continue;
        PyObject *p;
        if (s->proc != NULL && s->proc_pid == pid && s->proc_number == number) {
            p = Py_NewRef(s->proc);
        } else if (make == Py_None) {
            continue;
        } else {
            int ended = c->state >= CORE_TERMINATED;
            p = PyObject_CallFunction(make, "iiiI", (int)pid, number, i, s->ident);
            if (p == NULL) {
                Py_CLEAR(l);
                break;
            }
            /* make() ran Python, and so maybe other threads: the collector
             * may have seen the worker go (it is not listed then, as if
             * asked a moment later), or another reader made its object.
             * (Once terminated, no more deaths are read: the slot keeps the
             * object, for the same one at each reading.) */
            int again = 0;
            if (!ended && (c->state >= CORE_TERMINATED ||
                           listed_pid(s, &again) != pid || again != number)) {
                Py_DECREF(p);
                continue;
            }
            if (s->proc != NULL && s->proc_pid == pid && s->proc_number == number) {
                Py_SETREF(p, Py_NewRef(s->proc));
            } else {
                Py_XSETREF(s->proc, Py_NewRef(p));
                s->proc_pid = pid;
                s->proc_number = number;
            }
        }
        if (PyList_Append(l, p) < 0)
            Py_CLEAR(l);
        Py_DECREF(p);
    }
done:
    if (l == NULL)
        return NULL;
    return Py_BuildValue("(Ni)", l, unknown);
}

/* Has the zygote exited (it records every end before it goes)? */
static int
zygote_gone(Core *c)
{
    if (c->zpid <= 0)
        return 1;
    if (c->zpidfd < 0)
        return kill(c->zpid, 0) < 0 && errno == ESRCH;
    struct pollfd p = {.fd = c->zpidfd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

PyDoc_STRVAR(Core_exit_code_doc,
"exit_code(slot, number) -> int or None\n--\n\n"
"How slot's worker number `number` ended, from the zygote's record (written\n"
"before it reaps the worker, so that None also says the worker's pid is\n"
"not free for reuse), or None if it has not ended.  With the zygote gone,\n"
"a worker it did not record was killed with it (-SIGKILL).");

static PyObject *
Core_exit_code(Core *c, PyObject *args)
{
    int slot, number;
    if (!PyArg_ParseTuple(args, "ii:exit_code", &slot, &number))
        return NULL;
    if (slot < 0 || slot >= c->nslots || c->slots == NULL) {
        PyErr_Format(PyExc_ValueError, "no slot %d", slot);
        return NULL;
    }
    cp_ctl *ctl = c->slots[slot].ctl;
    uint64_t rec = cp_load_acquire(&ctl->exited);
    if (CP_CTL_HIGH(rec) == number)
        return PyLong_FromLong(CP_CTL_LOW(rec));
    /* (A forked child has none of the pool's fds to ask with.) */
    if (c->owner == cp_self_pid() && zygote_gone(c)) {
        /* It may have written the record just before it went. */
        rec = cp_load_acquire(&ctl->exited);
        return PyLong_FromLong(CP_CTL_HIGH(rec) == number ? CP_CTL_LOW(rec)
                                                          : -SIGKILL);
    }
    Py_RETURN_NONE;
}

/* [(pid, queued, unfinished)] per slot: the tasks the parent holds as sent
 * to it, and how many of those its worker has not finished. */
static PyObject *
Core_queues(Core *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *l = PyList_New(c->nslots);
    for (int i = 0; l != NULL && i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        /* A Core whose __init__ failed may have slots without shared memory;
         * the worker writes its pid before the zygote's report arrives. */
        long pid = s->pid > 0 ? (long)s->pid
                 : s->ctl ? (long)cp_load_acquire(&s->ctl->pid) : 0;
        size_t n = s->fifo.len;
        PyObject *t = Py_BuildValue("(lnn)", pid, (Py_ssize_t)n,
                                    (Py_ssize_t)(s->ctl ? unfinished(s) : n));
        if (t == NULL)
            Py_CLEAR(l);
        else
            PyList_SET_ITEM(l, i, t);
    }
    return l;
}

/* [(use, live, brk, busy_bytes, busy_blocks)] per arena partition; use is
 * a slot number, "args", "free" or "retired".  None without an arena. */
static PyObject *
Core_arena_info(Core *c, PyObject *Py_UNUSED(ignored))
{
    cp_arena *a = c->arena;
    if (a == NULL || a->pid != getpid())
        Py_RETURN_NONE;
    PyObject *l = PyList_New(a->nparts);
    for (int p = 0; l != NULL && p < a->nparts; p++) {
        uint64_t brk, warm, busy, nbusy;
        cp_arena_stats(a, p, &brk, &warm, &busy, &nbusy);
        int32_t u = a->part_slot[p];
        PyObject *use = u >= 0 ? PyLong_FromLong(u)
                               : PyUnicode_FromString(u == CP_PART_ARGS ? "args"
                                                      : u == CP_PART_FREE ? "free"
                                                                          : "retired");
        PyObject *t = use ? Py_BuildValue("(NKKKKK)", use,
                                          (unsigned long long)a->part_live[p],
                                          (unsigned long long)brk,
                                          (unsigned long long)busy,
                                          (unsigned long long)nbusy,
                                          (unsigned long long)warm)
                          : NULL;
        if (t == NULL)
            Py_CLEAR(l);
        else
            PyList_SET_ITEM(l, p, t);
    }
    return l;
}

static PyObject *
Core_get_state(Core *c, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(c->state);
}

static PyObject *
Core_get_zygote(Core *c, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(c->zpid);
}

static PyObject *
Core_get_pending(Core *c, void *Py_UNUSED(closure))
{
    size_t n = c->pending.len;
    for (int i = 0; i < c->nslots; i++)
        n += c->slots[i].fifo.len;
    return PyLong_FromSize_t(n);
}

/* The arena for large out-of-band buffers: partition 0 for arguments, one
 * per worker for results, as many spares.  Address space only (a sparse
 * memfd); without it (CPOOL_ARENA=0, or no room) buffers go through the
 * rings. */
static void
arena_setup(Core *c)
{
    const char *env = getenv("CPOOL_ARENA");
    if (env != NULL && strcmp(env, "0") == 0)
        return;
    int nparts = 1 + 2 * c->nslots;
    uint64_t part = UINT64_C(4) << 30;
    while (part > (UINT64_C(64) << 20) &&
           part * (uint64_t)nparts > (UINT64_C(512) << 30))
        part >>= 1;
    c->arena = cp_arena_adopt(nparts, part);
    if (c->arena == NULL && cp_arena_create(&c->arena, nparts, part) < 0) {
        c->arena = NULL;
        return;
    }
    c->arena->part_slot[0] = CP_PART_ARGS;
    c->arena->keep = cp_warm_share(c->nslots);
    env = getenv("CPOOL_ARENA_ARGS");
    uint64_t limit = env ? strtoull(env, NULL, 10) : CP_ARENA_ARGS_LIMIT;
    cp_arena_format(c->arena, 0, limit);
}

/* Core(processes, initializer, initargs, maxtasks, ring_bytes, cache,
 *      make_error, spin_ns, process=None); process: what the workers'
 *      multiprocessing process objects are made from (see
 *      _worker.become_worker) */
static int
Core_init(Core *c, PyObject *args, PyObject *kwds)
{
    int n;
    PyObject *init, *initargs, *cache, *make_error, *process = Py_None;
    long maxtasks, spin_ns;
    unsigned long long ring_bytes;
    static char *kwlist[] = {"processes", "initializer", "initargs", "maxtasks",
                             "ring_bytes", "cache", "make_error", "spin_ns",
                             "process", NULL};

    if (c->shm.base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOO!lKO!Ol|O", kwlist, &n, &init,
                                     &PyTuple_Type, &initargs, &maxtasks,
                                     &ring_bytes, &PyDict_Type, &cache,
                                     &make_error, &spin_ns, &process))
        return -1;
    if (n < 1 || n > 4096) {
        PyErr_SetString(PyExc_ValueError, "processes must be between 1 and 4096");
        return -1;
    }
    if (ring_bytes > (UINT64_C(1) << 34)) {
        PyErr_SetString(PyExc_ValueError, "ring_bytes must be at most 2**34");
        return -1;
    }
    c->owner = getpid();
    c->start_by_ns = cp_now_ns() + start_timeout_ns();
    c->ring_check_ms = ring_check_ms();
    c->call_spin_ns = (long)env_number("CPOOL_CALL_SPIN_NS", 3600LL * 1000000000);
    c->nslots = n;
    c->maxtasks = maxtasks > 0 ? maxtasks : 0;
    c->spin_ns = spin_ns;
    c->initializer = Py_NewRef(init);
    c->initargs = Py_NewRef(initargs);
    c->process = Py_NewRef(process);
    c->cache = Py_NewRef(cache);
    c->make_error = Py_NewRef(make_error);
    c->fids = PyDict_New();
    c->fbytes = PyDict_New();
    c->late = PyList_New(0);
    c->str_mp_process = PyUnicode_InternFromString("multiprocessing.process");
    c->str_counter = PyUnicode_InternFromString("_process_counter");
    PyObject *itertools = PyImport_ImportModule("itertools");
    c->count_type = itertools ? PyObject_GetAttrString(itertools, "count") : NULL;
    Py_XDECREF(itertools);
    c->slots = PyMem_Calloc((size_t)n, sizeof(cp_slot));
    if (c->fids == NULL || c->fbytes == NULL || c->late == NULL || c->slots == NULL ||
        c->str_mp_process == NULL || c->str_counter == NULL || c->count_type == NULL ||
        !PyType_Check(c->count_type)) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < n; i++) {
        c->slots[i].known = PySet_New(NULL);
        if (c->slots[i].known == NULL)
            return -1;
    }
    int rc = cp_shm_create(&c->shm, n, ring_bytes);
    if (rc < 0) {
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    arena_setup(c);
    /* Before the zygote's fork: it and the workers inherit the cache. */
    cp_pyheap_install();
    for (int i = 0; i < n; i++) {
        c->slots[i].ctl = cp_shm_ctl(&c->shm, i);
        c->slots[i].part = -1;
        slot_reset(c, i);
        slot_ident(c, i);
    }
    c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int sv[2];
    if (c->efd < 0 ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* The zygote forks the n workers at once, unasked. */
    rc = cp_proc_zygote_start(sv[1], sv[0], cp_worker_main, c, &c->shm, n,
                              &c->zpid);
    if (rc < 0) {
        close(sv[0]);
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    c->zsock = sv[0];
    fcntl(c->zsock, F_SETFL, fcntl(c->zsock, F_GETFL) | O_NONBLOCK);
    c->zpidfd = (int)syscall(SYS_pidfd_open, c->zpid, 0);
    cp_proc_register_fd(c->zsock);
    cp_proc_register_fd(c->efd);
    if (c->zpidfd >= 0)
        cp_proc_register_fd(c->zpidfd);
    for (int i = 0; i < n; i++) {
        c->slots[i].live = 1;
        c->slots[i].pid_wait = 1;     /* the zygote forks them at once */
    }
    return 0;
}

static PyObject *
Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    c->efd = c->zsock = c->zpidfd = -1;
    c->state = CORE_RUN;
    return (PyObject *)c;
}

static int
Core_traverse(Core *c, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(c));
    Py_VISIT(c->initializer);
    Py_VISIT(c->initargs);
    Py_VISIT(c->process);
    Py_VISIT(c->cache);
    Py_VISIT(c->make_error);
    Py_VISIT(c->fids);
    Py_VISIT(c->fbytes);
    Py_VISIT(c->wfuncs);
    Py_VISIT(c->batch_yes);
    Py_VISIT(c->batch_no);
    Py_VISIT(c->late);
    for (int i = 0; c->slots && i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        Py_VISIT(s->known);
        Py_VISIT(s->init_exc);
        Py_VISIT(s->proc);
        for (size_t j = 0; j < s->fifo.len; j++)
            Py_VISIT(fifo_at(&s->fifo, j)->func);
    }
    for (size_t j = 0; j < c->pending.len; j++)
        Py_VISIT(fifo_at(&c->pending, j)->func);
    return 0;
}

static int
Core_clear(Core *c)
{
    Py_CLEAR(c->initializer);
    Py_CLEAR(c->initargs);
    Py_CLEAR(c->process);
    Py_CLEAR(c->cache);
    Py_CLEAR(c->make_error);
    Py_CLEAR(c->fids);
    Py_CLEAR(c->fbytes);
    Py_CLEAR(c->wfuncs);
    Py_CLEAR(c->batch_yes);
    Py_CLEAR(c->batch_no);
    Py_CLEAR(c->late);
    Py_CLEAR(c->str_mp_process);
    Py_CLEAR(c->str_counter);
    Py_CLEAR(c->count_type);
    /* Not the procs: they hold nothing (__slots__ without a pool), and
     * dealloc tells them their workers were killed. */
    return 0;
}

static void
Core_dealloc(Core *c)
{
    PyTypeObject *tp = Py_TYPE(c);
    PyObject_GC_UnTrack(c);
    if (c->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)c);
    if (c->owner == getpid()) {
        if (c->state != CORE_DONE && c->zpid > 0) {
            kill_everything(c);
            procs_killed(c);
        }
        close_fds(c);
    }
    /* In a child forked from the owner, these fds were closed at fork
     * (cp_proc_register_fd) and their numbers may have been reused. */
    for (int i = 0; c->slots && i < c->nslots; i++) {
        cp_slot *s = &c->slots[i];
        fifo_free(&s->fifo);
        Py_CLEAR(s->known);
        Py_CLEAR(s->out_buf);
        gather_drop(s);
        Py_CLEAR(s->scratch);
        Py_CLEAR(s->init_exc);
        Py_CLEAR(s->proc);
    }
    fifo_free(&c->pending);
    PyMem_Free(c->slots);
    c->slots = NULL;
    cp_shm_destroy(&c->shm);
    if (c->arena != NULL) {
        cp_arena_close(c->arena, c->owner == getpid() && c->all_reaped);
        c->arena = NULL;
    }
    Core_clear(c);
    tp->tp_free(c);
    Py_DECREF(tp);
}

PyDoc_STRVAR(Core_fail_unsent_doc,
"fail_unsent(job, index, exc)\n--\n\n"
"Fail the result of a task that could not be sent, from the collector\n"
"thread (its callbacks run there), or at once if the collector has ended.");

static PyObject *
Core_fail_unsent(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fail_unsent(job, index, exc)");
        return NULL;
    }
    if (check_owner(c) < 0)
        return NULL;
    uint64_t job = PyLong_AsUnsignedLongLong(args[0]);
    uint64_t index = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    fail_unsent(c, job, index, Py_NewRef(args[2]), 1);
    Py_RETURN_NONE;
}

static PyMethodDef Core_methods[] = {
    {"fail_unsent", (PyCFunction)(void (*)(void))Core_fail_unsent, METH_FASTCALL,
     Core_fail_unsent_doc},
    {"submit", (PyCFunction)(void (*)(void))Core_submit, METH_FASTCALL, Core_submit_doc},
    {"call", (PyCFunction)(void (*)(void))Core_call, METH_FASTCALL, Core_call_doc},
    {"submit_slice", (PyCFunction)(void (*)(void))Core_submit_slice, METH_FASTCALL,
     Core_submit_slice_doc},
    {"submit_many", (PyCFunction)(void (*)(void))Core_submit_many, METH_FASTCALL,
     Core_submit_many_doc},
    {"collect", (PyCFunction)Core_collect, METH_NOARGS,
     "Run the collector loop until the pool is done (call from its own thread)."},
    {"close", (PyCFunction)Core_close, METH_NOARGS,
     "Finish queued work, then stop the workers."},
    {"terminate", (PyCFunction)(void (*)(void))Core_terminate, METH_FASTCALL,
     Core_terminate_doc},
    {"pids", (PyCFunction)Core_pids, METH_NOARGS, "Pids of the live workers."},
    {"workers", (PyCFunction)Core_workers, METH_O, Core_workers_doc},
    {"exit_code", (PyCFunction)Core_exit_code, METH_VARARGS, Core_exit_code_doc},
    {"queues", (PyCFunction)Core_queues, METH_NOARGS,
     "Per slot: (pid, tasks sent and not yet answered, of those how many its "
     "worker has not finished)."},
    {"arena_info", (PyCFunction)Core_arena_info, METH_NOARGS,
     "Per arena partition: (use, blocks the parent wraps, brk, busy bytes, "
     "busy blocks, bytes known populated from its start); None without an "
     "arena."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Core_getset[] = {
    {"state", (getter)Core_get_state, NULL, "CORE_* state", NULL},
    {"zygote_pid", (getter)Core_get_zygote, NULL, "pid of the fork server", NULL},
    {"unfinished", (getter)Core_get_pending, NULL, "tasks not yet resolved", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Core_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Core, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Core_slots[] = {
    {Py_tp_new, Core_new},
    {Py_tp_init, Core_init},
    {Py_tp_dealloc, Core_dealloc},
    {Py_tp_traverse, Core_traverse},
    {Py_tp_clear, Core_clear},
    {Py_tp_methods, Core_methods},
    {Py_tp_getset, Core_getset},
    {Py_tp_members, Core_members},
    {Py_tp_doc, "The C core of a cpool.Pool: shared memory, zygote, workers."},
    {0, NULL},
};

PyType_Spec cp_core_spec = {
    .name = "cpool._core.Core",
    .basicsize = sizeof(Core),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Core_slots,
};
