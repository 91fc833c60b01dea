/*
 * arena.c - shared memory for large out-of-band buffers.
 *
 * A numpy array passed to or returned from a task is copied once, into a
 * block of this arena, and the other side wraps the block where it lies (no
 * second copy, no fresh pages: blocks are reused warm).  The arena is one
 * sparse memfd mapped MAP_SHARED before the zygote is forked, cut into
 * equal partitions:
 *
 *   partition 0        arguments; the parent allocates, workers borrow;
 *   one per worker     its results; that worker allocates, the parent
 *                      borrows (the user's result arrays live there);
 *   spares             for replacement workers while the parent still holds
 *                      blocks of a dead worker's partition.
 *
 * Only a partition's owner changes its layout (allocates, splits, merges).
 * The other side only ever flips the `lent` word of a block it was given:
 *
 *   LENT_NO    not lent (free once the owner also dropped `oref`)
 *   LENT_OUT   a descriptor of it is in a message
 *   LENT_HELD  the borrower wraps it (CAS from LENT_OUT: wrapped once only)
 *
 * and the borrower stores LENT_NO when its wrapper goes away.  A block is
 * free when oref == 0 and lent == LENT_NO; the owner merges free blocks when
 * it next allocates.  Deaths: the parent clears the blocks a dead worker
 * held in partition 0 (`holder` names it), and never lets a replacement
 * reuse a partition in which it still holds blocks (it gets a spare; the old
 * one is emptied when the parent lets go of its last block).
 *
 * Memory: the first part_keep() bytes of a partition stay populated once
 * used (warm for the next transfer); a borrower releasing a block beyond
 * that gives its pages back (MADV_REMOVE).  The owner records how far from
 * the start the partition is known populated (`warm`); a copy into pages
 * beyond that allocates them in one fallocate() and maps each chunk with
 * MADV_POPULATE_WRITE before copying into it, not a page fault per page
 * (see cp_arena_fill).
 *
 * No Python here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpool.h"

#define PART_MAGIC 0x54524150u   /* "PART" */
#define BLK_MAGIC 0x4b4c4243u    /* "CBLK" */
#define PAGE 4096u
#define PART_HDR PAGE            /* first block at this offset */
#define MIN_SPLIT (64u * 1024)   /* don't split off smaller free blocks */
#define PAR_COPY_MIN (UINT64_C(16) << 20)
#define FILL_CHUNK (UINT64_C(2) << 20)  /* populate, then copy, this much */
#define FILL_MIN (UINT64_C(1) << 20)    /* fresh pages worth preparing */

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22           /* Linux 5.14 */
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23          /* Linux 5.14 */
#endif

typedef struct cp_part_hdr {
    uint32_t magic;
    uint32_t id;
    uint64_t brk;      /* end of the last block, from the partition start */
    uint64_t limit;    /* blocks end at or below this offset */
    uint64_t warm;     /* pages below this offset are populated (owner's) */
} cp_part_hdr;

static void populate(uint8_t *from, uint8_t *to, int advice);
static int populate_works = 1;   /* MADV_POPULATE_* known (see populate) */

static uint64_t
round_up(uint64_t n, uint64_t to)
{
    return (n + to - 1) / to * to;
}

static uint8_t *
part_base(cp_arena *a, int p)
{
    return a->base + (size_t)p * a->part_size;
}

/* Create the arena: nparts partitions of part_size bytes (a multiple of the
 * page size), reserved, not populated.  Returns 0 or -errno. */
int
cp_arena_create(cp_arena **out, int nparts, uint64_t part_size)
{
    *out = NULL;
    if (nparts < 1 || part_size < (UINT64_C(1) << 20) || part_size % PAGE)
        return -EINVAL;
    cp_arena *a = calloc(1, sizeof *a);
    if (a == NULL)
        return -ENOMEM;
    a->fd = -1;
    a->part_slot = calloc((size_t)nparts, sizeof *a->part_slot);
    a->part_live = calloc((size_t)nparts, sizeof *a->part_live);
    a->part_kept = calloc((size_t)nparts, sizeof *a->part_kept);
    if (a->part_slot == NULL || a->part_live == NULL || a->part_kept == NULL) {
        cp_arena_unref(a);
        return -ENOMEM;
    }
    a->nparts = nparts;
    a->part_size = part_size;
    a->keep = CP_WARM_MAX;
    a->size = (size_t)nparts * part_size;
    a->refs = 1;
    a->pid = getpid();
    for (int i = 0; i < nparts; i++)
        a->part_slot[i] = CP_PART_FREE;
    /* The fd stays open (and is inherited by the workers) for fallocate(). */
    a->fd = memfd_create("cpool-arena", MFD_CLOEXEC);
    if (a->fd < 0) {
        int rc = -errno;
        cp_arena_unref(a);
        return rc;
    }
    int rc = 0;
    if (ftruncate(a->fd, (off_t)a->size) < 0) {
        rc = -errno;
    } else {
        void *m = mmap(NULL, a->size, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_NORESERVE, a->fd, 0);
        if (m == MAP_FAILED)
            rc = -errno;
        else
            a->base = m;
    }
    if (rc < 0) {
        cp_arena_unref(a);
        return rc;
    }
    *out = a;
    return 0;
}

void
cp_arena_ref(cp_arena *a)
{
    a->refs++;
}

static void
destroy(cp_arena *a)
{
    if (a->base != NULL)
        munmap(a->base, a->size);
    if (a->fd >= 0)
        close(a->fd);
    free(a->part_slot);
    free(a->part_live);
    free(a->part_kept);
    free(a);
}

/*
 * Carrying over.  A pool made per batch (`with Pool() as p:` in a loop)
 * would copy its first large argument into fresh shared pages, at several
 * times the cost of a copy into warm ones.  So when a pool is gone, with
 * every process of it reaped, its arena keeps up to CP_ARENA_CARRY bytes
 * (CPOOL_ARENA_CARRY) of its populated pages, and once the last array of it
 * the user held is gone too, it waits here for the process's next pool of
 * the same size, which adopts it.  Only in the process that made it: a
 * forked child lets go of it (the pages are the parent's).
 */
static cp_arena *parked;
static int park_atfork;

/* A parked arena's pages are nobody's but this process's: give them back
 * (a forked child's mapping would keep the memfd's pages otherwise). */
static void
empty_and_destroy(cp_arena *a)
{
    madvise(a->base, a->size, MADV_REMOVE);
    destroy(a);
}

/* In a forked child: the parked arena is the parent's.  Its mapping and fd
 * go (the child would otherwise keep the parent's pages alive for as long
 * as it lives), its pages stay. */
static void
forget_parked(void)
{
    if (parked != NULL)
        destroy(parked);
    parked = NULL;
}

/* How much of partition p stays populated once used: the arguments
 * partition's (the parent's, one per pool) up to CP_WARM_MAX, a worker's its
 * share (a->keep). */
static uint64_t
part_keep(const cp_arena *a, int p)
{
    return p == 0 ? CP_WARM_MAX : a->keep;
}

/* What is populated of partition p, or may be: up to its break or its
 * warm mark, within what is ever kept.  (The header is the owner's, maybe
 * a dead worker's; it only bounds what is kept.) */
static uint64_t
part_extent(cp_arena *a, int p)
{
    cp_part_hdr *h = (cp_part_hdr *)part_base(a, p);
    uint64_t e = cp_load_relaxed(&h->brk), w = cp_load_relaxed(&h->warm);
    if (w > e)
        e = w;
    if (e > part_keep(a, p))
        e = part_keep(a, p);
    if (e > a->part_size)
        e = a->part_size;
    return round_up(e, PAGE);
}

/* Empty partition p beyond what the carry-over budget still allows. */
static void
trim_part(cp_arena *a, int p)
{
    uint64_t keep = part_extent(a, p);
    if (keep > a->carry_left)
        keep = a->carry_left & ~(uint64_t)(PAGE - 1);
    a->carry_left -= keep;
    if (keep < a->part_size)
        madvise(part_base(a, p) + keep, a->part_size - keep, MADV_REMOVE);
    a->part_kept[p] = keep;
    if (p == 0) {
        uint64_t w = cp_load_relaxed(&((cp_part_hdr *)part_base(a, 0))->warm);
        a->args_warm = w < keep ? w & ~(uint64_t)(PAGE - 1) : keep;
    }
}

static uint64_t carry_default = CP_ARENA_CARRY;

/* The budget when CPOOL_ARENA_CARRY does not say (a worker sets 0). */
void
cp_arena_carry_default(uint64_t bytes)
{
    carry_default = bytes;
}

static uint64_t
carry_budget(void)
{
    return cp_env_bytes("CPOOL_ARENA_CARRY", carry_default);
}

/* Drop a reference; the last one unmaps, or parks a closed arena that
 * kept pages for the next pool (the one parked before is emptied). */
void
cp_arena_unref(cp_arena *a)
{
    if (a == NULL || --a->refs > 0)
        return;
    if (a->closed && a->pid == getpid() && a->carry_left < a->carry) {
        cp_arena_drop_parked();
        if (!park_atfork)
            park_atfork = pthread_atfork(NULL, NULL, forget_parked) == 0;
        if (park_atfork) {
            parked = a;
            return;
        }
        empty_and_destroy(a);
        return;
    }
    destroy(a);
}

/* Parent, making a pool: the arena parked by the last one, if it has this
 * geometry (refs 1, partition 0's warm mark to be set by its format), else
 * NULL (and one parked of another size is emptied and dropped). */
cp_arena *
cp_arena_adopt(int nparts, uint64_t part_size)
{
    cp_arena *a = parked;
    if (a == NULL)
        return NULL;
    parked = NULL;
    if (a->pid != getpid())
        return NULL;            /* the parent's (a fork without the hooks) */
    if (a->nparts != nparts || a->part_size != part_size) {
        empty_and_destroy(a);
        return NULL;
    }
    a->refs = 1;
    a->closed = 0;
    a->carry = a->carry_left = 0;
    for (int p = 0; p < nparts; p++) {
        a->part_slot[p] = CP_PART_FREE;
        a->part_live[p] = 0;
    }
    return a;
}

/* Empty and drop the parked arena, if any. */
void
cp_arena_drop_parked(void)
{
    cp_arena *a = parked;
    parked = NULL;
    if (a != NULL && a->pid == getpid())
        empty_and_destroy(a);
}

/* The bytes the parked arena keeps populated (0: none is parked). */
uint64_t
cp_arena_carried(void)
{
    return parked != NULL ? parked->carry - parked->carry_left : 0;
}

/* Make partition p empty, with allocations below `limit` bytes.  Only while
 * nobody else uses it. */
void
cp_arena_format(cp_arena *a, int p, uint64_t limit)
{
    cp_part_hdr *h = (cp_part_hdr *)part_base(a, p);
    h->magic = PART_MAGIC;
    h->id = (uint32_t)p;
    h->brk = PART_HDR;
    h->limit = limit < a->part_size ? limit : a->part_size;
    /* Partition 0 of an arena carried over is still mapped in the parent,
     * its owner, as far as it was kept.  A worker's partition may have
     * pages from its last owner (a worker of this pool or the last one):
     * they exist, but its new owner has yet to map them. */
    uint64_t warm = p == 0 ? a->args_warm : a->part_kept[p];
    cp_store_relaxed(&h->warm, warm > PART_HDR ? warm : PART_HDR);
    if (p == 0)
        a->args_warm = 0;
}

/* A worker has mapped pages [start, end) of its partition: everything up
 * to `end` is, if everything up to `start` was.  (Its main thread copying
 * without the GIL and another allocating an array may both get here.) */
static void
note_mapped(cp_arena *a, uint64_t start, uint64_t end)
{
    uint64_t cur = cp_load_relaxed(&a->mapped);
    while (cur >= start && cur < end &&
           !__atomic_compare_exchange_n(&a->mapped, &cur, end, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

/* A worker, starting: it has mapped nothing of its partition yet but the
 * header (a fork does not copy the page tables of shared mappings). */
void
cp_arena_worker_start(cp_arena *a)
{
    a->mapped = PART_HDR;
}

static cp_blk *
blk_at(cp_arena *a, int p, uint64_t off)
{
    return (cp_blk *)(part_base(a, p) + off);
}

/* The partition's header, if it is sane (workers map it writable: the
 * parent must not walk out of the partition on a header one of them
 * scribbled over).  NULL otherwise. */
static cp_part_hdr *
part_hdr(cp_arena *a, int p)
{
    cp_part_hdr *h = (cp_part_hdr *)part_base(a, p);
    uint64_t brk = cp_load_relaxed(&h->brk), limit = cp_load_relaxed(&h->limit);
    if (cp_load_relaxed(&h->magic) != PART_MAGIC || limit > a->part_size ||
        brk < PART_HDR || brk > limit || brk % PAGE)
        return NULL;
    return h;
}

/* The block at off, if its header is sane: a whole number of pages, within
 * brk.  Else the partition is disabled (nothing more is allocated in it;
 * transfers go through the rings) and NULL returned. */
static cp_blk *
walk_blk(cp_arena *a, int p, cp_part_hdr *h, uint64_t off)
{
    cp_blk *b = blk_at(a, p, off);
    uint64_t size = cp_load_relaxed(&b->size);
    if (cp_load_relaxed(&b->magic) != BLK_MAGIC || size < PAGE || size % PAGE ||
        size > h->brk - off) {
        cp_store_relaxed(&h->magic, 0);
        return NULL;
    }
    return b;
}

static int
blk_free(cp_blk *b)
{
    return cp_load_relaxed(&b->oref) == 0 &&
           cp_load_acquire(&b->lent) == CP_LENT_NO;
}

/*
 * Owner: a block for len data bytes in partition p, ending at or below
 * `top` (from the partition start), with oref = 1 and lent = LENT_NO; NULL
 * if there is no room.  First fit, merging runs of free blocks on the way.
 */
static cp_blk *
alloc_below_locked(cp_arena *a, int p, uint64_t len, uint64_t top)
{
    cp_part_hdr *h = part_hdr(a, p);
    if (h == NULL || len > a->part_size)
        return NULL;
    uint64_t need = round_up(len + sizeof(cp_blk), PAGE);
    uint64_t off = PART_HDR;
    cp_blk *found = NULL;
    if (top > h->limit)
        top = h->limit;
    while (off < h->brk) {
        cp_blk *b = walk_blk(a, p, h, off);
        if (b == NULL)
            return NULL;
        if (blk_free(b)) {
            cp_blk *next;
            while (off + b->size < h->brk && blk_free(next = blk_at(a, p, off + b->size))) {
                if (walk_blk(a, p, h, off + b->size) == NULL)
                    return NULL;
                b->size += next->size;
            }
            if (off + b->size == h->brk) {
                h->brk = off;      /* a free tail goes back to the top */
                break;
            }
            if (b->size >= need && off + need <= top) {
                if (b->size - need >= MIN_SPLIT) {
                    cp_blk *rest = blk_at(a, p, off + need);
                    *rest = (cp_blk){.magic = BLK_MAGIC, .size = b->size - need};
                    b->size = need;
                }
                found = b;
                break;
            }
        }
        off += b->size;
    }
    if (found == NULL) {
        if (h->brk > top || need > top - h->brk)
            return NULL;
        found = blk_at(a, p, h->brk);
        found->size = need;
        h->brk += need;
    }
    found->magic = BLK_MAGIC;
    found->oref = 1;
    found->holder = 0;
    found->len = len;
    found->kind = CP_BLK_COPY;
    cp_store_release(&found->lent, CP_LENT_NO);
    return found;
}

/* The owner changes a partition's layout under the GIL, and under this
 * lock, which a fork from a thread without the GIL takes too (a worker's
 * prepare handler walks its partition: cp_arena_stage_numpy). */
static pthread_mutex_t layout_lock = PTHREAD_MUTEX_INITIALIZER;

void
cp_arena_layout_lock(void)
{
    pthread_mutex_lock(&layout_lock);
}

void
cp_arena_layout_unlock(void)
{
    pthread_mutex_unlock(&layout_lock);
}

static cp_blk *
alloc_below(cp_arena *a, int p, uint64_t len, uint64_t top)
{
    pthread_mutex_lock(&layout_lock);
    cp_blk *b = alloc_below_locked(a, p, len, top);
    pthread_mutex_unlock(&layout_lock);
    return b;
}

/* Owner: a block for len data bytes in partition p (see alloc_below). */
cp_blk *
cp_arena_alloc(cp_arena *a, int p, uint64_t len)
{
    return alloc_below(a, p, len, a->part_size);
}

/* Owner: the same, but only on pages that exist already (below the warm
 * mark): no fresh memory.  NULL if there is no such room. */
cp_blk *
cp_arena_alloc_warm(cp_arena *a, int p, uint64_t len)
{
    cp_part_hdr *h = part_hdr(a, p);
    return h == NULL ? NULL : alloc_below(a, p, len, cp_load_relaxed(&h->warm));
}

/* A worker, owner of block b: map the block's pages that it has not
 * mapped yet (they exist: see cp_arena_alloc_warm). */
void
cp_arena_map(cp_arena *a, cp_blk *b)
{
    uint64_t start = (uint64_t)((uint8_t *)b - a->base) % a->part_size;
    uint64_t end = start + b->size;
    uint8_t *base = (uint8_t *)b - start;
    uint64_t mapped = cp_load_relaxed(&a->mapped);
    if (end <= mapped)
        return;
    populate(base + (start > mapped ? start : mapped), base + end,
             MADV_POPULATE_READ);
    note_mapped(a, start, end);
}

/*
 * A worker with nothing to do maps the existing pages (those below the warm
 * mark) of its own partition and of the arguments partition, a chunk per
 * call, so that a large result or argument later finds them mapped: a new
 * worker's mapping of the arena is empty (a fork does not copy the page
 * tables of shared mappings), and reading 64 MiB of arguments it would
 * otherwise fault in costs ~4 ms, after the parent's copy instead of
 * beside it.  Partition p from `mapped` on: the end of the chunk mapped,
 * or 0 if there was nothing left to map.
 */
static uint64_t
premap_chunk(cp_arena *a, int p, uint64_t mapped)
{
    cp_part_hdr *h = (cp_part_hdr *)part_base(a, p);
    uint64_t warm = cp_load_relaxed(&h->warm);
    if (cp_load_relaxed(&h->magic) != PART_MAGIC || warm > part_keep(a, p) ||
        mapped >= warm || !cp_load_relaxed(&populate_works))
        return 0;
    uint64_t end = warm - mapped > FILL_CHUNK ? mapped + FILL_CHUNK : warm;
    populate(part_base(a, p) + mapped, part_base(a, p) + end, MADV_POPULATE_READ);
    return end;
}

/* The arguments partition, as far as *mapped (this worker's) says. */
int
cp_arena_premap_args(cp_arena *a, uint64_t *mapped)
{
    uint64_t end = premap_chunk(a, 0, *mapped > PART_HDR ? *mapped : PART_HDR);
    if (end != 0)
        *mapped = end;
    return end != 0;
}

/* The worker's own partition p (its results, its numpy arrays: npalloc.c). */
int
cp_arena_premap_own(cp_arena *a, int p)
{
    if (p <= 0 || p >= a->nparts)
        return 0;
    uint64_t mapped = cp_load_relaxed(&a->mapped);
    uint64_t end = premap_chunk(a, p, mapped);
    if (end != 0)
        note_mapped(a, mapped, end);
    return end != 0;
}

/* Owner: the block whose data starts at `data` in partition p, if it is a
 * sane block there; else NULL. */
cp_blk *
cp_arena_block_at(cp_arena *a, int p, const void *data)
{
    uint8_t *lo = part_base(a, p), *d = (uint8_t *)data;
    if (p < 0 || p >= a->nparts || d < lo + PART_HDR + sizeof(cp_blk) ||
        d >= lo + a->part_size)
        return NULL;
    cp_blk *b = (cp_blk *)(d - sizeof(cp_blk));
    uint64_t off = (uint64_t)((uint8_t *)b - lo);
    if (off % PAGE || cp_load_relaxed(&b->magic) != BLK_MAGIC ||
        cp_load_relaxed(&b->size) > a->part_size - off)
        return NULL;
    return b;
}

/* Owner: one more hold on block b (any thread). */
void
cp_arena_hold(cp_blk *b)
{
    __atomic_add_fetch(&b->oref, 1, __ATOMIC_RELAXED);
}

/* Owner: is its one hold on b the only one? */
int
cp_arena_only_holder(cp_blk *b)
{
    return __atomic_load_n(&b->oref, __ATOMIC_ACQUIRE) == 1;
}

uint8_t *
cp_blk_data(cp_blk *b)
{
    return (uint8_t *)b + sizeof(cp_blk);
}

/* Where block b is, as an offset from the arena's base (descriptors). */
uint64_t
cp_arena_offset(cp_arena *a, cp_blk *b)
{
    return (uint64_t)((uint8_t *)b - a->base);
}

/*
 * Borrower: the block a descriptor names, which must lie in partition p, be
 * a block of at least len bytes, and be LENT_OUT; it becomes LENT_HELD by
 * `pid`.  NULL if the descriptor is bad (a corrupt or repeated message).
 */
cp_blk *
cp_arena_take(cp_arena *a, int p, uint64_t off, uint64_t len, pid_t pid,
              uint64_t *size_out)
{
    if (p < 0 || p >= a->nparts)
        return NULL;
    uint64_t lo = (uint64_t)p * a->part_size, hi = lo + a->part_size;
    if (off % PAGE || off < lo + PART_HDR || off >= hi ||
        len > hi - off - sizeof(cp_blk))
        return NULL;
    cp_blk *b = (cp_blk *)(a->base + off);
    uint64_t size = cp_load_relaxed(&b->size);
    if (cp_load_relaxed(&b->magic) != BLK_MAGIC || size > hi - off ||
        size < len + sizeof(cp_blk) || cp_load_relaxed(&b->len) != len)
        return NULL;
    cp_store_relaxed(&b->holder, (int32_t)pid);
    uint32_t expect = CP_LENT_OUT;
    if (!__atomic_compare_exchange_n(&b->lent, &expect, CP_LENT_HELD, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return NULL;
    /* The borrower uses these from now on, never the header again (the
     * owner could change it). */
    *size_out = size;
    return b;
}

/* Borrower: done with block b (of partition p), of `size` bytes as checked
 * by cp_arena_take().  Pages beyond the kept part of the partition go back
 * to the system first. */
void
cp_arena_give_back(cp_arena *a, int p, cp_blk *b, uint64_t size)
{
    uint64_t start = cp_arena_offset(a, b) - (uint64_t)p * a->part_size;
    uint64_t end = start + size;
    uint64_t keep = part_keep(a, p);
    uint64_t from = start + PAGE > keep ? start + PAGE : keep;
    if (end > from)
        madvise(part_base(a, p) + from, end - from, MADV_REMOVE);
    cp_store_release(&b->lent, CP_LENT_NO);
}

/*
 * Forks.  Arena memory this process uses as its own (arrays it wraps, a
 * worker's own numpy arrays) is shared with the pool's processes; a child
 * forked from it must get a copy, as of any other memory, not a window
 * onto what the pool does next.  The copy must be of the memory as it is
 * at the fork: a child copying it after fork() returned would race the
 * parent, which goes on freeing and reusing blocks.  So the parent copies
 * it in its prepare handler (cp_fork_stage), the child moves the copies
 * in place before any code of its own runs, and the parent drops its own.
 * (The cost: one copy of that memory per fork.)
 */
typedef struct {
    void *addr, *copy;
    size_t n;
} staged;

static staged *stages;
static size_t nstages, cap_stages;

/* Prepare handler: n bytes at addr (page aligned) are to be the child's
 * own, as they are now.  A copy that fails (no memory) leaves the child
 * sharing them, as before. */
void
cp_fork_stage(void *addr, size_t n)
{
    if (nstages == cap_stages) {
        size_t cap = cap_stages ? 2 * cap_stages : 16;
        staged *v = realloc(stages, cap * sizeof *v);
        if (v == NULL)
            return;
        stages = v;
        cap_stages = cap;
    }
    void *copy = mmap(NULL, n, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (copy == MAP_FAILED)
        return;
    memcpy(copy, addr, n);
    stages[nstages++] = (staged){addr, copy, n};
}

static void
stages_to_child(void)
{
    for (size_t i = 0; i < nstages; i++)
        if (mremap(stages[i].copy, stages[i].n, stages[i].n,
                   MREMAP_MAYMOVE | MREMAP_FIXED, stages[i].addr) == MAP_FAILED)
            munmap(stages[i].copy, stages[i].n);
    nstages = 0;
}

static void
stages_dropped(void)
{
    for (size_t i = 0; i < nstages; i++)
        munmap(stages[i].copy, stages[i].n);
    nstages = 0;
}

/* Once per process, before any prepare handler that stages (pthread_atfork
 * runs the child and parent handlers in the order registered, after every
 * prepare handler). */
int
cp_fork_stage_hooks(void)
{
    static int done;
    if (!done && pthread_atfork(NULL, stages_dropped, stages_to_child) == 0)
        done = 1;
    return done ? 0 : -1;
}

/* Prepare handler in a worker, with the layout lock: its numpy arrays in
 * its partition p (npalloc.c) are to be the child's own. */
void
cp_arena_stage_numpy(cp_arena *a, int p)
{
    uint8_t *base = part_base(a, p);
    cp_part_hdr *h = part_hdr(a, p);
    for (uint64_t off = PART_HDR; h != NULL && off < h->brk;) {
        cp_blk *b = walk_blk(a, p, h, off);
        if (b == NULL)
            return;
        if (b->kind == CP_BLK_NUMPY && cp_load_relaxed(&b->oref) > 0)
            cp_fork_stage(base + off, (size_t)b->size);
        off += b->size;
    }
}

/* Owner: drop one hold (any thread).  With `unclaimed`, a descriptor that
 * nobody took is withdrawn too (the task that carried it is gone). */
void
cp_arena_drop(cp_blk *b, int unclaimed)
{
    __atomic_sub_fetch(&b->oref, 1, __ATOMIC_RELEASE);
    if (unclaimed) {
        uint32_t expect = CP_LENT_OUT;
        __atomic_compare_exchange_n(&b->lent, &expect, CP_LENT_NO, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
}

/* Parent, owner of partition p: worker `pid` is gone; whatever it held
 * there is free. */
void
cp_arena_forget_holder(cp_arena *a, int p, pid_t pid)
{
    cp_part_hdr *h = part_hdr(a, p);
    for (uint64_t off = PART_HDR; h != NULL && off < h->brk;) {
        cp_blk *b = walk_blk(a, p, h, off);
        if (b == NULL)
            return;
        if (cp_load_acquire(&b->lent) == CP_LENT_HELD &&
            cp_load_relaxed(&b->holder) == (int32_t)pid)
            cp_store_release(&b->lent, CP_LENT_NO);
        off += b->size;
    }
}

/* Parent: the partition for slot's next worker.  Its old one is reused if
 * the parent holds nothing in it, else retired (emptied when its last block
 * is given back) and a free one is taken.  -1: none left (that worker's
 * results then go through its ring). */
int
cp_arena_assign(cp_arena *a, int slot, int old, uint64_t limit)
{
    if (old >= 0 && a->part_live[old] > 0) {
        a->part_slot[old] = CP_PART_RETIRED;
        old = -1;
    }
    int p = old;
    if (p >= 0)
        a->part_kept[p] = part_extent(a, p);   /* the last worker's pages */
    for (int i = 1; p < 0 && i < a->nparts; i++)
        if (a->part_slot[i] == CP_PART_FREE)
            p = i;
    if (p < 0)
        return -1;
    a->part_slot[p] = slot;
    cp_arena_format(a, p, limit);
    return p;
}

/* Parent: a block of partition p it wrapped is given back. */
void
cp_arena_unlive(cp_arena *a, int p)
{
    if (--a->part_live[p] == 0 && a->part_slot[p] == CP_PART_RETIRED) {
        if (a->closed)
            trim_part(a, p);
        else {
            madvise(part_base(a, p), a->part_size, MADV_REMOVE);
            a->part_kept[p] = 0;
        }
        a->part_slot[p] = CP_PART_FREE;
    }
}

/* Parent: the pool is gone; `clean`: with every process of it reaped (none
 * can write to the arena any more).  Every partition is retired: those
 * without arrays the user still holds are emptied now, the others when
 * their last array goes (cp_arena_unlive), but for what a clean arena keeps
 * to carry over (see above); the mapping lasts as long as a reference. */
void
cp_arena_close(cp_arena *a, int clean)
{
    if (a->pid == getpid()) {
        a->closed = 1;
        a->carry = a->carry_left = clean ? carry_budget() : 0;
        for (int p = 0; p < a->nparts; p++) {
            a->part_slot[p] = CP_PART_RETIRED;
            if (a->part_live[p] == 0) {
                trim_part(a, p);
                a->part_slot[p] = CP_PART_FREE;
            }
        }
    }
    cp_arena_unref(a);
}

/* Parent: how far partition p reaches (brk) and is known populated (warm),
 * and for a partition it owns (0) the bytes and number of blocks not free.
 * For tests and diagnostics. */
void
cp_arena_stats(cp_arena *a, int p, uint64_t *brk, uint64_t *warm, uint64_t *busy,
               uint64_t *nbusy)
{
    cp_part_hdr *h = part_hdr(a, p);
    *brk = *warm = *busy = *nbusy = 0;
    if (h == NULL)
        return;
    *brk = cp_load_relaxed(&h->brk);
    *warm = cp_load_relaxed(&h->warm);
    if (a->part_slot[p] != CP_PART_ARGS)
        return;
    for (uint64_t off = PART_HDR; off < *brk;) {
        cp_blk *b = walk_blk(a, p, h, off);
        if (b == NULL)
            break;
        if (!blk_free(b)) {
            *busy += b->size;
            ++*nbusy;
        }
        off += b->size;
    }
}

/* ---------------------------------------------------------- copying */

/*
 * Fresh shared pages are slow to come by one fault at a time (a fault per
 * 4 KiB page, each allocating, zeroing and mapping one page: ~2 us each on
 * the VMs this was measured on; shared memory gets no transparent huge
 * pages unless the administrator enabled them for shmem).  For the part of
 * a copy that lands on pages not yet populated, one fallocate() allocates
 * them all, and MADV_POPULATE_WRITE maps each chunk in one call before the
 * copy writes it: 64 MiB into fresh pages took 25.6 ms with two threads
 * faulting, 17.5 ms so (median of 15; warm pages: 4.5 ms).
 *
 * Pages that exist but that this process has not mapped yet (a new
 * worker's partition carried over from the last pool, or left by the
 * worker before it) are mapped with MADV_POPULATE_READ instead: a read
 * fault maps a whole run of them at once (the kernel's fault-around), and
 * writably, since nothing tracks writes to shared memory; a write fault
 * maps one.  64 MiB took 6.2 ms so and 15.3 ms with MADV_POPULATE_WRITE
 * (the copy after either: 3 ms).  A failing call (an old kernel, no
 * memory) just leaves the faults to the copy.
 */
typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    uint64_t n;
    uint8_t *map_lo, *map_hi;  /* existing pages to map first, or equal */
    uint8_t *fresh;            /* pages from here on are to be populated */
} fill_job;

static void
populate(uint8_t *from, uint8_t *to, int advice)
{
    uint8_t *lo = (uint8_t *)((uintptr_t)from & ~(uintptr_t)(PAGE - 1));
    uint8_t *hi = (uint8_t *)(((uintptr_t)to + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
    if (lo < hi && cp_load_relaxed(&populate_works) &&
        madvise(lo, (size_t)(hi - lo), advice) < 0 && errno == EINVAL)
        cp_store_relaxed(&populate_works, 0);
}

static void
fill_range(fill_job *j)
{
    for (uint64_t o = 0; o < j->n; o += FILL_CHUNK) {
        uint64_t k = j->n - o < FILL_CHUNK ? j->n - o : FILL_CHUNK;
        uint8_t *d = j->dst + o, *e = d + k;
        if (j->map_lo < j->map_hi && d < j->map_hi && e > j->map_lo)
            populate(d > j->map_lo ? d : j->map_lo, e < j->map_hi ? e : j->map_hi,
                     MADV_POPULATE_READ);
        if (j->fresh != NULL && e > j->fresh)
            populate(d > j->fresh ? d : j->fresh, e, MADV_POPULATE_WRITE);
        memcpy(d, j->src + o, (size_t)k);
    }
}

static void *
fill_half(void *arg)
{
    fill_range(arg);
    return NULL;
}

/* Copy n bytes into block b (its data), with a second thread for large
 * copies (one core's copy into warm memory is well below what the memory
 * system gives two), preparing the pages first.  No Python, no GIL
 * needed; the caller owns b's partition. */
void
cp_arena_fill(cp_arena *a, cp_blk *b, const void *src, uint64_t n)
{
    uint8_t *dst = cp_blk_data(b);
    int p = (int)((uint64_t)((uint8_t *)b - a->base) / a->part_size);
    cp_part_hdr *h = (cp_part_hdr *)part_base(a, p);
    uint64_t start = (uint64_t)(dst - part_base(a, p)), end = start + n;
    uint64_t warm = cp_load_relaxed(&h->warm);  /* a hint: bounded below */
    /* The parent's mapping of partition 0 is as old as the arena; a worker
     * maps its own partition as it goes. */
    uint64_t mapped = cp_load_relaxed(&a->mapped);
    if (p == 0 || mapped > warm)
        mapped = warm;
    uint8_t *map_lo = NULL, *map_hi = NULL;
    if (mapped < warm && end > mapped && start < warm) {
        map_lo = part_base(a, p) + (start > mapped ? start : mapped);
        map_hi = part_base(a, p) + (end < warm ? end : warm);
    }
    uint8_t *fresh = NULL;
    if (warm < end && end - (warm > start ? warm : start) >= FILL_MIN) {
        uint64_t from = (warm > start ? warm : start) & ~(uint64_t)(PAGE - 1);
        uint64_t to = round_up(end, PAGE);
        if (to > a->part_size)
            to = a->part_size;
        fresh = part_base(a, p) + from;
        (void)fallocate(a->fd, FALLOC_FL_KEEP_SIZE,
                        (off_t)((uint64_t)p * a->part_size + from),
                        (off_t)(to - from));
    }
    fill_job lo = {dst, src, n, map_lo, map_hi, fresh};
    if (n >= PAR_COPY_MIN) {
        uint64_t half = (n / 2) & ~(uint64_t)(PAGE - 1);
        fill_job hi = {dst + half, (const uint8_t *)src + half, n - half,
                       map_lo, map_hi, fresh};
        lo.n = half;
        pthread_t t;
        if (pthread_create(&t, NULL, fill_half, &hi) == 0) {
            fill_range(&lo);
            pthread_join(t, NULL);
            goto filled;
        }
        lo.n = n;
    }
    fill_range(&lo);
filled:
    /* Pages from the partition start up to the end of this copy (the last
     * one too: a page written in part exists whole) are populated now, if
     * the copy began at or below the old mark (blocks do not overlap);
     * pages beyond part_keep() may be given back, so the mark stays below
     * that.  Another thread filling another block moves it too: keep the
     * larger. */
    if (warm >= (start & ~(uint64_t)(PAGE - 1))) {
        uint64_t mark = round_up(end, PAGE);
        if (mark > part_keep(a, p))
            mark = part_keep(a, p);
        uint64_t cur = cp_load_relaxed(&h->warm);
        while (cur < mark &&
               !__atomic_compare_exchange_n(&h->warm, &cur, mark, 0,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
    }
    if (p != 0)
        note_mapped(a, start & ~(uint64_t)(PAGE - 1), round_up(end, PAGE));
}
