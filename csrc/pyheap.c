/*
 * pyheap.c - Python's freed object arenas, kept for reuse while a pool
 * exists.
 *
 * Python's small-object allocator (pymalloc) takes its memory from the
 * system in arenas (1 MiB since 3.10), and gives an arena back (munmap) as
 * soon as the last object in it is freed.  A map of 10^6 ints makes 32 MiB of
 * arenas in the parent; they go when the result list goes, and the next such
 * map faults 32 MiB of fresh pages in again.  On these machines that is
 * 25 ms, against 4.5 ms to write the same pages once they exist, and it is
 * paid by the thread that decodes results, beside the workers.
 *
 * So while a pool exists, the process's arena allocator
 * (PyObject_SetArenaAllocator) is this file's: it keeps up to `keep` bytes
 * of freed arenas (CP_PYHEAP_KEEP, or CPOOL_PYHEAP_KEEP bytes; 0 turns it
 * off) and hands them out again before asking the allocator it replaced.  A
 * kept arena is madvise(MADV_FREE)d first: its pages stay mapped and cost
 * nothing to reuse, but the kernel may take them back under memory pressure
 * (they then read as zeros, which pymalloc does not mind: it formats an
 * arena as it hands out its pools).  Everything else goes to the allocator
 * that was there before, which also serves every arena the cache cannot.
 * When the last pool of the process is deallocated, that allocator is put
 * back (unless another has been set on top of this one since: this one
 * then passes everything through) and the kept arenas are given back.
 *
 * The zygote and the workers are forked after the install and keep it: a
 * worker's tasks reuse what earlier tasks freed, the way its malloc heap
 * does (worker.c, "The heap"), with at most min(keep, its warm share).
 *
 * Arena calls come with the GIL of some interpreter, but isolated
 * subinterpreters (3.12+) have GILs of their own and share this allocator,
 * so the cache has a lock; it is held around fork() (pthread_atfork) so a
 * child never inherits it taken.  No system call is made under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sys/mman.h>

#include "cpool.h"

#ifndef MADV_FREE
#define MADV_FREE 8             /* Linux 4.5 */
#endif

#define MAX_KEPT 256            /* arenas: 256 MiB of 1 MiB ones */

static struct {
    pthread_mutex_t lock;
    PyObjectArenaAllocator prev;  /* the allocator this one replaced */
    int installed;              /* ours is (or was last) set */
    int active;                 /* keeping arenas (installed, users > 0) */
    int users;                  /* pools holding it (cp_pyheap_hold) */
    int atfork;                 /* the fork handlers are registered */
    int free_works;             /* MADV_FREE known to work, until it fails */
    size_t keep, kept;          /* bytes: at most, now (written under the
                                   lock, also read without it) */
    int n;
    struct { void *p; size_t size; } a[MAX_KEPT];
} heap = {PTHREAD_MUTEX_INITIALIZER, {NULL, NULL, NULL}, 0, 0, 0, 0, 1, 0, 0,
          0, {{NULL, 0}}};

static void *
arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = NULL;
    pthread_mutex_lock(&heap.lock);
    for (int i = heap.n - 1; i >= 0; i--) {
        if (heap.a[i].size == size) {       /* the last kept: the warmest */
            p = heap.a[i].p;
            heap.a[i] = heap.a[--heap.n];
            cp_store_relaxed(&heap.kept, heap.kept - size);
            break;
        }
    }
    pthread_mutex_unlock(&heap.lock);
    return p != NULL ? p : heap.prev.alloc(heap.prev.ctx, size);
}

static void
arena_free(void *ctx, void *p, size_t size)
{
    (void)ctx;
    /* A look without the lock, to spare madvise() when the cache is full
     * or off; checked again under it. */
    if (cp_load_relaxed(&heap.active) &&
        cp_load_relaxed(&heap.kept) + size <= cp_load_relaxed(&heap.keep)) {
        /* Before the arena is in the cache, where another thread could
         * take it and fill it. */
        if (cp_load_relaxed(&heap.free_works) &&
            madvise(p, size, MADV_FREE) != 0)
            cp_store_relaxed(&heap.free_works, 0);   /* kept, pinned */
        pthread_mutex_lock(&heap.lock);
        int kept = heap.active && heap.kept + size <= heap.keep &&
                   heap.n < MAX_KEPT;
        if (kept) {
            heap.a[heap.n].p = p;
            heap.a[heap.n++].size = size;
            cp_store_relaxed(&heap.kept, heap.kept + size);
        }
        pthread_mutex_unlock(&heap.lock);
        if (kept)
            return;
    }
    heap.prev.free(heap.prev.ctx, p, size);
}

/* Give every kept arena back to the previous allocator.  GIL held. */
static void
release_kept(void)
{
    for (;;) {
        pthread_mutex_lock(&heap.lock);
        void *p = NULL;
        size_t size = 0;
        if (heap.n > 0) {
            p = heap.a[--heap.n].p;
            size = heap.a[heap.n].size;
            cp_store_relaxed(&heap.kept, heap.kept - size);
        }
        pthread_mutex_unlock(&heap.lock);
        if (p == NULL)
            return;
        heap.prev.free(heap.prev.ctx, p, size);
    }
}

static void lock_for_fork(void) { pthread_mutex_lock(&heap.lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&heap.lock); }

/* CPOOL_PYHEAP_KEEP: bytes (0: off), or the default; at most MAX_KEPT MiB. */
static size_t
keep_setting(void)
{
    uint64_t v = cp_env_bytes("CPOOL_PYHEAP_KEEP", CP_PYHEAP_KEEP);
    return v > (uint64_t)MAX_KEPT << 20 ? (size_t)MAX_KEPT << 20 : (size_t)v;
}

/* A pool is being made: install the cache if it is not yet.  GIL held. */
void
cp_pyheap_hold(void)
{
    if (heap.users++ > 0)
        return;
    size_t keep = keep_setting();
    if (keep == 0)
        return;
    if (!heap.atfork) {
        if (pthread_atfork(lock_for_fork, unlock_after_fork,
                           unlock_after_fork) != 0)
            return;
        heap.atfork = 1;
    }
    if (!heap.installed) {
        PyObjectArenaAllocator ours = {NULL, arena_alloc, arena_free};
        PyObject_GetArenaAllocator(&heap.prev);
        PyObject_SetArenaAllocator(&ours);
        heap.installed = 1;
    }
    /* else still there, under another allocator set on top of it since
     * (which calls it): it only has to keep arenas again */
    pthread_mutex_lock(&heap.lock);
    cp_store_relaxed(&heap.keep, keep);
    cp_store_relaxed(&heap.active, 1);
    pthread_mutex_unlock(&heap.lock);
}

/* A pool made with cp_pyheap_hold() is gone: on the last one, put the
 * previous allocator back and give back what is kept.  GIL held. */
void
cp_pyheap_release(void)
{
    if (heap.users <= 0 || --heap.users > 0 || !heap.installed)
        return;
    pthread_mutex_lock(&heap.lock);
    cp_store_relaxed(&heap.active, 0);
    pthread_mutex_unlock(&heap.lock);
    PyObjectArenaAllocator cur;
    PyObject_GetArenaAllocator(&cur);
    if (cur.alloc == arena_alloc) {
        PyObject_SetArenaAllocator(&heap.prev);
        heap.installed = 0;
    }
    release_kept();
}

/* A worker keeps at most `limit` bytes (its warm share), if that is less.
 * Called before it runs any Python of its own. */
void
cp_pyheap_limit(size_t limit)
{
    pthread_mutex_lock(&heap.lock);
    if (heap.keep > limit)
        cp_store_relaxed(&heap.keep, limit);
    pthread_mutex_unlock(&heap.lock);
}

/* For tests: {"installed": ours is the allocator set, "active": keeping
 * arenas, "keep", "kept": bytes, "arenas": kept}. */
PyObject *
cp_pyheap_info(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    PyObjectArenaAllocator cur;
    PyObject_GetArenaAllocator(&cur);
    pthread_mutex_lock(&heap.lock);
    int active = heap.active;
    size_t keep = heap.active ? heap.keep : 0, kept = heap.kept;
    int n = heap.n;
    pthread_mutex_unlock(&heap.lock);
    return Py_BuildValue("{s:O,s:O,s:n,s:n,s:i}", "installed",
                         cur.alloc == arena_alloc ? Py_True : Py_False,
                         "active", active ? Py_True : Py_False,
                         "keep", (Py_ssize_t)keep, "kept", (Py_ssize_t)kept,
                         "arenas", n);
}
