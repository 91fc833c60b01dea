/*
 * ring.c - single-producer/single-consumer byte ring in shared memory.
 *
 * No Python here: every function may run without the GIL, and in a process
 * freshly forked from a multi-threaded parent (it allocates nothing).
 *
 * Ordering discipline (the io_uring SQ/CQ one):
 *   producer: write record, store-release tail;
 *   consumer: load-acquire tail, read record, store-release head.
 * Sleeping: the waiting side sets its *_sleep flag, issues a full fence and
 * re-checks the index before it sleeps; the other side publishes its index,
 * issues a full fence and wakes only if the flag is set.  Either the waiter
 * sees the new index, or the publisher sees the flag: never neither.  The
 * publisher clears the flag as it wakes (an exchange): until the woken side
 * runs, which can take a while on a busy machine, further publishes would
 * otherwise each pay another wake-up system call for nothing.  A waiter that
 * goes back to sleep sets the flag again.
 *
 * The futex word is the flag itself (FUTEX_WAIT while it is still 1), not
 * the index.  A publisher held up between its look at the flag and its
 * exchange can clear the flag of a later sleep than the one it saw, for
 * records the waiter has already taken, and wake it just before it enters
 * FUTEX_WAIT.  Waiting on the index, the waiter would then sleep with its
 * flag cleared, and the next publish would not wake it: a lost wake-up.
 * Waiting on the flag, it finds the flag cleared, looks at the ring again
 * and sets the flag anew.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include "cpool.h"

uint64_t
cp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Shared futexes (no FUTEX_PRIVATE_FLAG): the waker is another process. */
int
cp_futex_wait(uint32_t *addr, uint32_t expected, long timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000L;
        ts.tv_nsec = timeout_ns % 1000000000L;
        tsp = &ts;
    }
    if (syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0) < 0)
        return -errno;   /* EAGAIN: value changed; ETIMEDOUT; EINTR */
    return 0;
}

int
cp_futex_wake(uint32_t *addr)
{
    if (syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0) < 0)
        return -errno;
    return 0;
}

/* Wake the other side if its sleep flag is set, clearing the flag (once per
 * sleep; see the top of the file).  Call after a full fence. */
static void
ring_wake_if_asleep(cp_ring *r, uint32_t *flag)
{
    if (!cp_load_relaxed(flag) || !__atomic_exchange_n(flag, 0, __ATOMIC_ACQ_REL))
        return;
    if (r->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(r->wake_fd, &one, sizeof one);
        } while (n < 0 && errno == EINTR);
        /* EAGAIN means the counter is saturated: the reader is awake anyway.
         * Anything else: the fd is gone (only workers ring through an fd, and
         * a task may close it).  Such a worker could never wake the parent
         * again: it exits, the parent takes what it published and replaces
         * it. */
        if (n < 0 && errno != EAGAIN)
            _exit(CP_EXIT_NO_DOORBELL);
    } else {
        cp_futex_wake(flag);
    }
}

size_t
cp_ring_bytes(uint64_t cap)
{
    return CP_RING_DATA_OFFSET + cap;
}

void
cp_ring_format(void *mem, uint64_t cap)
{
    cp_ring_hdr *h = mem;
    memset(h, 0, sizeof *h);
    h->cap = cap;
}

/* Attach one end to a formatted ring.  Returns 0, or -EINVAL for a bad cap. */
int
cp_ring_attach(cp_ring *r, void *mem, int wake_fd)
{
    cp_ring_hdr *h = mem;
    uint64_t cap = h->cap;
    if (cap < 4096 || (cap & (cap - 1)) != 0)
        return -EINVAL;
    r->h = h;
    r->data = (uint8_t *)mem + CP_RING_DATA_OFFSET;
    r->cap = cap;
    r->mask = cap - 1;
    r->pos = 0;
    r->other = 0;
    /* A record of up to cap/2 bytes always fits into an empty ring, with or
     * without a PAD in front of it; a quarter lets both sides overlap. */
    r->max_frag = cap / 4 - sizeof(cp_rec);
    r->wake_fd = wake_fd;
    return CP_OK;
}

/* Producer: bytes a record with `size` payload bytes takes at the current
 * position, including the PAD it may need in front of it. */
uint64_t
cp_ring_need(cp_ring *r, uint32_t size)
{
    uint64_t need = CP_REC_ALIGN(sizeof(cp_rec) + (uint64_t)size);
    uint64_t off = r->pos & r->mask;
    return need + ((off + need > r->cap) ? r->cap - off : 0);
}

uint64_t
cp_ring_free_bytes(cp_ring *r)
{
    r->other = cp_load_acquire(&r->h->head);
    return r->cap - (r->pos - r->other);
}

/*
 * Producer: reserve room for one record with `size` payload bytes (at most
 * max_frag).  Returns the record header to fill, or NULL if the ring has no
 * room now.  Nothing is visible to the consumer until cp_ring_commit() and
 * cp_ring_flush().  The caller fills every header field except `size`.
 */
cp_rec *
cp_ring_reserve(cp_ring *r, uint32_t size)
{
    uint64_t need = CP_REC_ALIGN(sizeof(cp_rec) + (uint64_t)size);
    uint64_t off = r->pos & r->mask;
    uint64_t pad = (off + need > r->cap) ? r->cap - off : 0;

    if (r->cap - (r->pos - r->other) < pad + need) {
        /* Looks full: the consumer's side may have moved on. */
        r->other = cp_load_acquire(&r->h->head);
        if (r->cap - (r->pos - r->other) < pad + need)
            return NULL;
    }
    if (pad) {
        cp_rec *p = (cp_rec *)(r->data + off);
        p->size = (uint32_t)(pad - 8);  /* PAD covers the rest of the ring */
        p->kind = CP_K_PAD;
        p->flags = 0;
        r->pos += pad;
        off = 0;
    }
    cp_rec *rec = (cp_rec *)(r->data + off);
    rec->size = size;
    return rec;
}

/* Producer: the record is filled; count it (still unpublished). */
void
cp_ring_commit(cp_ring *r, cp_rec *rec)
{
    r->pos += CP_REC_ALIGN(sizeof(cp_rec) + (uint64_t)rec->size);
}

/* Producer: publish everything committed so far and wake a sleeping consumer. */
void
cp_ring_flush(cp_ring *r)
{
    /* The consumer must see the records before it sees the new tail. */
    cp_store_release(&r->h->tail, r->pos);
    /* Order the tail store before reading the sleep flag (see top of file). */
    cp_fence_full();
    ring_wake_if_asleep(r, &r->h->cons_sleep);
}

int
cp_ring_has_data(cp_ring *r)
{
    if (r->other != r->pos)
        return 1;
    r->other = cp_load_acquire(&r->h->tail);
    return r->other != r->pos;
}

/*
 * Consumer: look at the next record without consuming it.  Copies the header
 * to *hdr (so that later checks do not re-read shared memory) and points
 * *payload at the payload in the ring.  Returns 1 if a record is there, 0 if
 * the ring is empty, -EPROTO if the ring holds something that is not a valid
 * record (a corrupt or hostile producer: the caller must stop reading it).
 */
int
cp_ring_peek(cp_ring *r, cp_rec *hdr, const uint8_t **payload)
{
    for (;;) {
        if (!cp_ring_has_data(r))
            return 0;
        uint64_t avail = r->other - r->pos;
        uint64_t off = r->pos & r->mask;
        if (avail > r->cap || avail < 8 || (off & 7))
            return -EPROTO;
        const cp_rec *rec = (const cp_rec *)(r->data + off);
        uint32_t size = __atomic_load_n(&rec->size, __ATOMIC_RELAXED);
        uint16_t kind = __atomic_load_n(&rec->kind, __ATOMIC_RELAXED);
        if (kind == CP_K_PAD) {
            if ((uint64_t)size + 8 != r->cap - off || avail < (uint64_t)size + 8)
                return -EPROTO;
            r->pos += (uint64_t)size + 8;
            continue;
        }
        if (avail < sizeof(cp_rec) || off + sizeof(cp_rec) > r->cap)
            return -EPROTO;
        memcpy(hdr, rec, sizeof *hdr);
        uint64_t need = CP_REC_ALIGN(sizeof(cp_rec) + (uint64_t)hdr->size);
        if (hdr->kind == 0 || hdr->kind >= CP_K_MAX || hdr->size != size ||
            hdr->size > r->max_frag || need > avail || off + need > r->cap ||
            (uint64_t)hdr->size > hdr->total)
            return -EPROTO;
        *payload = (const uint8_t *)rec + sizeof(cp_rec);
        return 1;
    }
}

/* Consumer: drop the record last returned by cp_ring_peek().  With publish,
 * the freed space is handed back to the producer at once. */
void
cp_ring_release(cp_ring *r, const cp_rec *hdr, int publish)
{
    r->pos += CP_REC_ALIGN(sizeof(cp_rec) + (uint64_t)hdr->size);
    if (publish)
        cp_ring_release_flush(r);
}

void
cp_ring_release_flush(cp_ring *r)
{
    /* The producer may reuse the bytes once it sees the new head, so every
     * read of them must be done before this store. */
    cp_store_release(&r->h->head, r->pos);
    cp_fence_full();
    ring_wake_if_asleep(r, &r->h->prod_sleep);
}

static long
elapsed(uint64_t start)
{
    return (long)(cp_now_ns() - start);
}

/*
 * Whether a spinning waiter yields the CPU between looks.  Only where a pool
 * has more workers than the CPUs it may run on, or only one CPU: the process
 * a worker waits for then most likely shares its core, and a yield hands it
 * over (Pool(8) on 2 cores: 2*10^4 apply_async() took 42-55 ms yielding,
 * 108-141 ms not).  Elsewhere a yield helps little (the other process is
 * most likely on another core) and can cost a great deal: when a process
 * that is not ours waits for this core (a loaded machine), the scheduler
 * gives it a whole slice, our waiter stays runnable, so the task sent to it
 * meanwhile wakes nobody, and it sees the task only when the slice ends.
 * Measured with three CPU-bound processes beside a pool of 2 on 2 cores:
 * apply() took 0.85-1.26 ms on average (a tenth of the calls ~4 ms)
 * yielding, 0.03-0.26 ms not.  The price, on an otherwise idle machine: a
 * worker that does not yield keeps its core from the parent's threads when
 * they share it, and 2*10^4 apply_async() of a Pool(2) on 2 cores took 15%
 * longer (medians of 10: 37 ms against 33).  Neither a yield-free first
 * phase of the spin (3 or 10 us) nor a yield that times itself told the two
 * cases apart well enough.
 */
static int spin_yields;

void
cp_ring_set_spin_yields(int workers)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        spin_yields = workers > CPU_COUNT(&set) || CPU_COUNT(&set) == 1;
}

/*
 * Consumer: wait until the ring has data, spinning for up to spin_ns and then
 * sleeping on the futex.  timeout_ns < 0 waits forever.  Returns 0 when data
 * is there, -ETIMEDOUT, or -EINTR (a signal arrived; the caller decides).
 */
int
cp_ring_wait_data(cp_ring *r, long spin_ns, long timeout_ns)
{
    uint64_t start = 0;
    unsigned i = 0;

    if (cp_ring_has_data(r))
        return 0;
    if (spin_ns > 0 || timeout_ns >= 0)
        start = cp_now_ns();
    while (spin_ns > 0) {
        cp_cpu_relax();
        if (cp_ring_has_data(r))
            return 0;
        if ((++i & 63) == 0) {
            if (elapsed(start) > spin_ns)
                break;
            if (spin_yields)
                sched_yield();
        }
    }
    for (;;) {
        long left = -1;
        if (timeout_ns >= 0) {
            left = timeout_ns - elapsed(start);
            if (left <= 0)
                return -ETIMEDOUT;
        }
        cp_store_relaxed(&r->h->cons_sleep, 1);
        /* Order the flag store before re-reading tail (see top of file). */
        cp_fence_full();
        uint64_t t = cp_load_acquire(&r->h->tail);
        int rc = 0;
        if (t == r->pos)
            rc = cp_futex_wait(&r->h->cons_sleep, 1, left);
        cp_store_relaxed(&r->h->cons_sleep, 0);
        if (cp_ring_has_data(r))
            return 0;
        if (rc == -EINTR)
            return rc;
    }
}

/*
 * Producer: wait until `need` bytes (a whole record including any PAD) can be
 * reserved.  Same spin/sleep/timeout contract as cp_ring_wait_data().
 */
int
cp_ring_wait_space(cp_ring *r, uint64_t need, long spin_ns, long timeout_ns)
{
    uint64_t start = 0;
    unsigned i = 0;

    if (need > r->cap)
        return -EMSGSIZE;
    if (cp_ring_free_bytes(r) >= need)
        return 0;
    if (spin_ns > 0 || timeout_ns >= 0)
        start = cp_now_ns();
    while (spin_ns > 0) {
        cp_cpu_relax();
        if (cp_ring_free_bytes(r) >= need)
            return 0;
        if ((++i & 63) == 0 && elapsed(start) > spin_ns)
            break;
    }
    for (;;) {
        long left = -1;
        if (timeout_ns >= 0) {
            left = timeout_ns - elapsed(start);
            if (left <= 0)
                return -ETIMEDOUT;
        }
        cp_store_relaxed(&r->h->prod_sleep, 1);
        cp_fence_full();
        uint64_t hd = cp_load_acquire(&r->h->head);
        int rc = 0;
        if (r->cap - (r->pos - hd) < need)
            rc = cp_futex_wait(&r->h->prod_sleep, 1, left);
        cp_store_relaxed(&r->h->prod_sleep, 0);
        if (cp_ring_free_bytes(r) >= need)
            return 0;
        if (rc == -EINTR)
            return rc;
    }
}

/*
 * Producer: send as much of a message as fits now, as fragments of at most
 * max_frag bytes.  The message is the concatenation of iov[0..iovcnt), total
 * bytes.  *tmpl supplies kind/fid/aux/seq/job/index/flags; *off is how much
 * has been sent and is advanced.  Each fragment is committed but not
 * flushed.  If first is not NULL, *first and *first_pos get the first record
 * and its ring position when it is written.  Returns 1 once the whole
 * message is committed, 0 if the ring is full first (call again later with
 * the same *off).
 */
int
cp_ring_send_iov(cp_ring *r, const cp_rec *tmpl, const struct iovec *iov,
                 int iovcnt, uint64_t total, uint64_t *off, cp_rec **first,
                 uint64_t *first_pos)
{
    /* Find where *off falls in the iovec. */
    int seg = 0;
    uint64_t segoff = *off;
    while (seg < iovcnt && segoff >= iov[seg].iov_len && iov[seg].iov_len) {
        segoff -= iov[seg].iov_len;
        seg++;
    }
    do {
        uint64_t left = total - *off;
        uint32_t n = (uint32_t)(left > r->max_frag ? r->max_frag : left);
        cp_rec *rec = cp_ring_reserve(r, n);
        if (rec == NULL)
            return 0;
        rec->kind = tmpl->kind;
        rec->flags = (uint16_t)((tmpl->flags & ~CP_F_MORE) |
                                (*off + n < total ? CP_F_MORE : 0));
        rec->fid = tmpl->fid;
        rec->aux = tmpl->aux;
        rec->seq = tmpl->seq;
        rec->job = tmpl->job;
        rec->index = tmpl->index;
        rec->total = total;
        rec->state = CP_T_QUEUED;
        rec->pad = 0;
        if (*off == 0 && first != NULL) {
            *first = rec;
            *first_pos = r->pos;
        }
        uint8_t *dst = (uint8_t *)rec + sizeof(cp_rec);
        uint32_t done = 0;
        while (done < n && seg < iovcnt) {
            uint64_t avail = iov[seg].iov_len - segoff;
            uint32_t k = (uint32_t)(avail < n - done ? avail : n - done);
            memcpy(dst + done, (const uint8_t *)iov[seg].iov_base + segoff, k);
            done += k;
            segoff += k;
            if (segoff == iov[seg].iov_len) {
                seg++;
                segoff = 0;
            }
        }
        cp_ring_commit(r, rec);
        *off += n;
    } while (*off < total);
    return 1;
}

int
cp_ring_send_some(cp_ring *r, const cp_rec *tmpl, const uint8_t *data,
                  uint64_t total, uint64_t *off, cp_rec **first,
                  uint64_t *first_pos)
{
    struct iovec v = {.iov_base = (void *)data, .iov_len = total};
    return cp_ring_send_iov(r, tmpl, &v, 1, total, off, first, first_pos);
}

/* Producer: bytes the next fragment of a message with `left` bytes to go
 * needs, PAD included. */
uint64_t
cp_ring_next_need(cp_ring *r, uint64_t left)
{
    return cp_ring_need(r, (uint32_t)(left > r->max_frag ? r->max_frag : left));
}
