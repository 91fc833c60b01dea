/*
 * pyheap.c - Python's freed object arenas, kept for reuse once the process
 * has made a pool.
 *
 * Python's small-object allocator (pymalloc) takes its memory from the
 * system in arenas (1 MiB since 3.10), and gives an arena back (munmap) as
 * soon as the last object in it is freed.  A map of 10^6 ints makes 32 MiB of
 * arenas in the parent; they go when the result list goes, and the next such
 * map faults 32 MiB of fresh pages in again.  On these machines that is
 * 25 ms, against 4.5 ms to write the same pages once they exist, and it is
 * paid by the thread that decodes results, beside the workers.
 *
 * So from its first pool on, the process's arena allocator
 * (PyObject_SetArenaAllocator) is this file's: it keeps up to `keep` bytes
 * of freed arenas (CP_PYHEAP_KEEP, or CPOOL_PYHEAP_KEEP bytes; 0 turns it
 * off) and hands them out again before asking the allocator it replaced,
 * which serves everything else.  It stays when the pools are gone, as the
 * shared arena is carried over (arena.c), since the usual way to use a pool
 * is to make one per batch (`with Pool() as p:`), and a result is mostly
 * dropped after its pool.
 *
 * A kept arena is, first,
 *  - madvise(MADV_FREE)d: its pages stay mapped and cost nothing to reuse,
 *    but the kernel may take them back under memory pressure (they then
 *    read as zeros, which pymalloc does not mind: it formats an arena as it
 *    hands out its pools);
 *  - madvise(MADV_DONTFORK)ed: the next pool forks its zygote from this
 *    process, and every page both then map is copy-on-write, so the first
 *    write to a kept page would cost a fault and a copy (a new pool's first
 *    map of 10^6 ints took 11,400 faults in the parent, and 3,900 with
 *    this).  A child has none of them, so it forgets the list at the fork;
 *    an arena handed out again is MADV_DOFORK first (or, should that fail,
 *    given back rather than used).
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
    int installed;              /* ours is set (or under one set since) */
    int atfork;                 /* the fork handlers are registered */
    int free_works;             /* MADV_FREE known to work, until it fails */
    size_t keep, kept;          /* bytes: at most, now (written under the
                                   lock, also read without it) */
    int n;
    struct { void *p; size_t size; } a[MAX_KEPT];
} heap = {PTHREAD_MUTEX_INITIALIZER, {NULL, NULL, NULL}, 0, 0, 1, 0, 0, 0,
          {{NULL, 0}}};

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
    if (p != NULL) {
        if (madvise(p, size, MADV_DOFORK) == 0)
            return p;
        heap.prev.free(heap.prev.ctx, p, size);  /* a child would lack it */
    }
    return heap.prev.alloc(heap.prev.ctx, size);
}

static void
arena_free(void *ctx, void *p, size_t size)
{
    (void)ctx;
    /* A look without the lock, to spare madvise() when the cache is full
     * or off; checked again under it. */
    if (cp_load_relaxed(&heap.kept) + size <= cp_load_relaxed(&heap.keep)) {
        /* Before the arena is in the cache, where another thread could
         * take it and fill it. */
        if (cp_load_relaxed(&heap.free_works) &&
            madvise(p, size, MADV_FREE) != 0)
            cp_store_relaxed(&heap.free_works, 0);   /* kept, pinned */
        /* (if this fails, a child shares the pages: slower, not wrong) */
        (void)madvise(p, size, MADV_DONTFORK);
        pthread_mutex_lock(&heap.lock);
        int kept = heap.kept + size <= heap.keep && heap.n < MAX_KEPT;
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

static void lock_for_fork(void) { pthread_mutex_lock(&heap.lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&heap.lock); }

/* The kept arenas are not mapped in a child (MADV_DONTFORK). */
static void
child_after_fork(void)
{
    heap.n = 0;
    cp_store_relaxed(&heap.kept, 0);
    pthread_mutex_unlock(&heap.lock);
}

/* CPOOL_PYHEAP_KEEP: bytes (0: off), or the default; at most MAX_KEPT MiB. */
static size_t
keep_setting(void)
{
    uint64_t v = cp_env_bytes("CPOOL_PYHEAP_KEEP", CP_PYHEAP_KEEP);
    return v > (uint64_t)MAX_KEPT << 20 ? (size_t)MAX_KEPT << 20 : (size_t)v;
}

/* A pool is being made: install the cache if it is not yet, for the rest
 * of the process's life.  GIL held. */
void
cp_pyheap_install(void)
{
    size_t keep = heap.installed ? 0 : keep_setting();
    if (keep == 0)
        return;
    if (!heap.atfork) {
        if (pthread_atfork(lock_for_fork, unlock_after_fork,
                           child_after_fork) != 0)
            return;
        heap.atfork = 1;
    }
    PyObjectArenaAllocator ours = {NULL, arena_alloc, arena_free};
    PyObject_GetArenaAllocator(&heap.prev);
    PyObject_SetArenaAllocator(&ours);
    heap.installed = 1;
    pthread_mutex_lock(&heap.lock);
    cp_store_relaxed(&heap.keep, keep);
    pthread_mutex_unlock(&heap.lock);
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
    size_t keep = heap.keep, kept = heap.kept;
    int n = heap.n;
    pthread_mutex_unlock(&heap.lock);
    return Py_BuildValue("{s:O,s:O,s:n,s:n,s:i}", "installed",
                         cur.alloc == arena_alloc ? Py_True : Py_False,
                         "active", keep > 0 ? Py_True : Py_False,
                         "keep", (Py_ssize_t)keep, "kept", (Py_ssize_t)kept,
                         "arenas", n);
}
