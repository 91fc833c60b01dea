/*
 * cpool.h - the one internal header of the cpool C core.
 *
 * Layers, bottom up:
 *   ring.c    single-producer/single-consumer byte ring in shared memory and
 *             the futex/eventfd wake-ups around it.  No Python.
 *   shm.c     the memfd region holding every slot's control block and rings.
 *             No Python.
 *   arena.c   shared memory for large out-of-band buffers (numpy arrays):
 *             blocks one side fills and the other wraps in place.  No Python.
 *   npalloc.c a worker's large numpy arrays, made in its arena partition.
 *   pyheap.c  Python's freed object arenas, kept for reuse once the process
 *             has made a pool.
 *   proc.c    the zygote (fork server) and how it forks workers.
 *   worker.c  the worker loop: take a task record, run it, publish a result.
 *   core.c    the parent side: dispatch, the collector loop, crash handling.
 *   module.c  the Python module (cpool._core).
 *
 * Plain-C layers return 0 or -errno and never touch Python's error state.
 */
#ifndef CPOOL_H
#define CPOOL_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "atomics.h"

#define CP_OK 0

/* ------------------------------------------------------------------ ring */

/*
 * Shared header of one ring.  Invariants:
 *   - tail is written only by the producer, head only by the consumer;
 *   - 0 <= tail - head <= cap, both count bytes ever written/consumed;
 *   - bytes in [head, tail) hold complete, published records;
 *   - cons_sleep is set by the consumer just before it sleeps until tail
 *     moves, and prod_sleep by the producer before it sleeps until head
 *     moves; each is also the futex word its side sleeps on (ring.c).
 * head and tail live on separate cache lines so the two sides do not fight
 * over one line.
 */
typedef struct cp_ring_hdr {
    _Alignas(CP_CACHELINE) uint64_t tail;
    uint32_t cons_sleep;
    _Alignas(CP_CACHELINE) uint64_t head;
    uint32_t prod_sleep;
    _Alignas(CP_CACHELINE) uint64_t cap;   /* bytes of data, a power of two */
} cp_ring_hdr;

#define CP_RING_DATA_OFFSET 256  /* data starts this far after the header */

/* Record kinds. */
enum {
    CP_K_PAD = 1,      /* skip to the end of the ring (no payload) */
    CP_K_FUNC = 2,     /* parent->worker: pickled callable for fid */
    CP_K_TASK = 3,     /* parent->worker: a task */
    CP_K_STOP = 4,     /* parent->worker: exit after this */
    CP_K_RESULT = 5,   /* worker->parent: result of the task with seq */
    CP_K_INITERR = 6,  /* worker->parent: initializer raised (payload: exc) */
    CP_K_MAX = 7,
};

/* Record flags. */
#define CP_F_MORE 0x1   /* more fragments of this message follow */
#define CP_F_ERR  0x2   /* RESULT: the payload is a pickled exception */
#define CP_F_OOB  0x4   /* the message carries out-of-band buffers (msg.c) */

/* Task modes (cp_rec.aux of a TASK record). */
enum { CP_MODE_APPLY = 0, CP_MODE_MAP = 1, CP_MODE_STARMAP = 2, CP_MODE_CALL1 = 3 };

/*
 * A record: this header, then `size` payload bytes, padded to 8 bytes.  A
 * message larger than a ring's largest record is sent as several records
 * ("fragments"), all but the last flagged CP_F_MORE; `total` in each fragment
 * is the size of the whole message.  A PAD record only uses its first 8 bytes.
 */
typedef struct cp_rec {
    uint32_t size;
    uint16_t kind;
    uint16_t flags;
    uint32_t fid;     /* TASK/FUNC: function id (0: function is in payload) */
    uint32_t aux;     /* TASK: mode; RESULT: run time in microseconds */
    uint64_t seq;     /* TASK/RESULT: the parent's dispatch sequence number */
    uint64_t job;
    uint64_t index;
    uint64_t total;
    uint32_t state;   /* TASK: CP_T_* (claim vs. steal, decided by CAS) */
    uint32_t pad;
} cp_rec;

/* A queued task's record is claimed by its worker or taken back by the
 * parent (to give to an idle worker), whichever CAS wins. */
enum { CP_T_QUEUED = 0, CP_T_CLAIMED = 1, CP_T_STOLEN = 2 };

#define CP_REC_ALIGN(n) (((n) + 7u) & ~(uint64_t)7u)

/* A byte count from environment variable `name`, in decimal digits, or
 * `dflt` if it is unset or anything else. */
static inline uint64_t
cp_env_bytes(const char *name, uint64_t dflt)
{
    const char *env = getenv(name);
    if (env == NULL || *env < '0' || *env > '9')
        return dflt;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(env, &end, 10);
    return errno == 0 && *end == '\0' ? (uint64_t)v : dflt;
}

/* Warm memory (first-touch page faults are slow here): what a process keeps
 * for reuse of each kind (a worker's free heap, a gather buffer for messages
 * in several fragments, kept if the message was no larger, an arena
 * partition's pages) is at most this, and less in pools of more than 4
 * workers: 1 GiB shared among the workers, 32 MiB each at least. */
#define CP_WARM_MAX (UINT64_C(256) << 20)

static inline uint64_t
cp_warm_share(int nworkers)
{
    uint64_t share = nworkers > 0 ? (UINT64_C(1) << 30) / (uint64_t)nworkers
                                  : CP_WARM_MAX;
    if (share > CP_WARM_MAX)
        share = CP_WARM_MAX;
    if (share < (UINT64_C(32) << 20))
        share = UINT64_C(32) << 20;
    return share;
}

/* ---------------------------------------------------------------- pyheap */

/* Freed pymalloc arenas a process keeps for reuse once it has made a pool
 * (pyheap.c; CPOOL_PYHEAP_KEEP overrides, 0 turns it off). */
#define CP_PYHEAP_KEEP ((size_t)64 << 20)

void cp_pyheap_install(void);
void cp_pyheap_limit(size_t limit);
#ifdef Py_PYTHON_H
PyObject *cp_pyheap_info(PyObject *m, PyObject *noargs);
#endif

/*
 * One process's end of a ring: a pointer to the shared header plus private
 * cached indices.  `pos` is this side's own index (producer: the tail it is
 * building, possibly ahead of the published tail; consumer: the head).
 * `other` caches the opposite index and is refreshed only when the ring looks
 * full (producer) or empty (consumer).
 */
typedef struct cp_ring {
    cp_ring_hdr *h;
    uint8_t *data;
    uint64_t cap;
    uint64_t mask;
    uint64_t pos;
    uint64_t other;
    uint64_t max_frag;  /* largest payload of one record */
    int wake_fd;        /* eventfd to write instead of FUTEX_WAKE, or -1 */
} cp_ring;

size_t cp_ring_bytes(uint64_t cap);
void cp_ring_format(void *mem, uint64_t cap);
int cp_ring_attach(cp_ring *r, void *mem, int wake_fd);

cp_rec *cp_ring_reserve(cp_ring *r, uint32_t size);
void cp_ring_commit(cp_ring *r, cp_rec *rec);
void cp_ring_flush(cp_ring *r);
uint64_t cp_ring_free_bytes(cp_ring *r);
uint64_t cp_ring_need(cp_ring *r, uint32_t size);

int cp_ring_peek(cp_ring *r, cp_rec *hdr, const uint8_t **payload);
int cp_ring_has_data(cp_ring *r);
void cp_ring_release(cp_ring *r, const cp_rec *hdr, int publish);
void cp_ring_release_flush(cp_ring *r);

int cp_ring_send_some(cp_ring *r, const cp_rec *tmpl, const uint8_t *data,
                      uint64_t total, uint64_t *off, cp_rec **first,
                      uint64_t *first_pos);
int cp_ring_send_iov(cp_ring *r, const cp_rec *tmpl, const struct iovec *iov,
                     int iovcnt, uint64_t total, uint64_t *off, cp_rec **first,
                     uint64_t *first_pos);
uint64_t cp_ring_next_need(cp_ring *r, uint64_t left);

void cp_ring_set_spin_yields(int workers);
int cp_ring_wait_data(cp_ring *r, long spin_ns, long timeout_ns);
int cp_ring_wait_space(cp_ring *r, uint64_t need, long spin_ns, long timeout_ns);

int cp_futex_wait(uint32_t *addr, uint32_t expected, long timeout_ns);
int cp_futex_wake(uint32_t *addr);
uint64_t cp_now_ns(void);

/* ------------------------------------------------------------------- shm */

/* Per-worker control block in shared memory. */
typedef struct cp_ctl {
    _Alignas(CP_CACHELINE) uint64_t running;  /* seq of the task being run, 0 if none */
    uint32_t pid;
    uint32_t state;                            /* CP_W_* */
    int32_t arena_part;                        /* its result partition, or -1 */
    uint32_t ident;                            /* its process identity (below) */
    uint64_t results;                          /* results it has published */
    /* The zygote's line (Pool._pool reads it, not the collector):
     * spawned: pid << 32 | number of the slot's newest worker, written when
     *   it is forked (0 from the slot's reset until then);
     * exited: number << 32 | (uint32_t)exit code (-signal if killed) of the
     *   slot's last worker that ended, written BEFORE the zygote reaps it,
     *   so that while it does not name worker k, k's pid is not free for
     *   reuse; kept across resets.  (Numbers, not pids: a later worker of
     *   the slot may get the same pid, never the same number.) */
    _Alignas(CP_CACHELINE) uint64_t spawned;
    uint64_t exited;
    _Alignas(CP_CACHELINE) uint8_t pad[CP_CACHELINE];
} cp_ctl;

#define CP_CTL_WORD(high, low) (((uint64_t)(uint32_t)(high) << 32) | (uint32_t)(low))
#define CP_CTL_HIGH(word) ((int32_t)(uint32_t)((word) >> 32))
#define CP_CTL_LOW(word) ((int32_t)(uint32_t)(word))

/* CP_W_LEFT: the worker is through with Python (its output flushed, its
 * exit functions run) and about to _exit(); it wakes futex waiters. */
enum { CP_W_EMPTY = 0, CP_W_STARTING = 1, CP_W_READY = 2, CP_W_DEAD = 3,
       CP_W_LEFT = 4 };

/* A worker's exit code when a task closed the fd it wakes the parent with
 * (ring.c).  (70-78 are the worker's other exits: worker.c, proc.c.) */
#define CP_EXIT_NO_DOORBELL 79

/* The shared region: a header, then per slot [ctl | task ring | result ring]. */
typedef struct cp_shm {
    void *base;
    size_t size;
    int nslots;
    uint64_t ring_cap;
    size_t slot_bytes;
} cp_shm;

int cp_shm_create(cp_shm *s, int nslots, uint64_t ring_cap);
void cp_shm_destroy(cp_shm *s);
cp_ctl *cp_shm_ctl(cp_shm *s, int slot);
void *cp_shm_task_ring(cp_shm *s, int slot);
void *cp_shm_result_ring(cp_shm *s, int slot);
void cp_shm_reset_slot(cp_shm *s, int slot);

/* ----------------------------------------------------------------- arena */

/* A block's header; its data follows (64-byte aligned). */
typedef struct cp_blk {
    uint32_t magic;
    uint32_t lent;      /* CP_LENT_*, the only word the borrower writes */
    uint64_t size;      /* whole block, a multiple of the page size */
    uint32_t oref;      /* holds the owner has on it (a count) */
    int32_t holder;     /* pid of the borrower that took it */
    uint64_t len;       /* data bytes */
    uint32_t kind;      /* CP_BLK_* (the owner's) */
    uint8_t pad[28];
} cp_blk;

/* cp_blk.kind: a transfer's copy, or the data of a worker's numpy array
 * (npalloc.c). */
enum { CP_BLK_COPY = 0, CP_BLK_NUMPY = 1 };

enum { CP_LENT_NO = 0, CP_LENT_OUT = 1, CP_LENT_HELD = 2 };

/* part_slot[]: a worker slot, or one of these. */
enum { CP_PART_FREE = -1, CP_PART_ARGS = -2, CP_PART_RETIRED = -3 };

/* Out-of-band buffers this large go through the arena. */
#define CP_ARENA_MIN (UINT64_C(1) << 20)
/* Arguments of queued tasks hold at most this much of the arena. */
#define CP_ARENA_ARGS_LIMIT (UINT64_C(1) << 30)

typedef struct cp_arena {
    uint8_t *base;
    size_t size;
    uint64_t part_size;
    int nparts;
    long refs;           /* process-local (GIL): Core and live wrappers */
    int fd;              /* the memfd, kept for fallocate() */
    pid_t pid;           /* the parent, which created it */
    int32_t *part_slot;  /* parent only: what each partition is for */
    uint64_t *part_live; /* parent only: blocks it wraps, per partition */
    int closed;          /* its pool is gone (cp_arena_close) */
    uint64_t carry;      /* closed: populated bytes it may keep for the next */
    uint64_t carry_left; /* pool (0 if it keeps none), and what is left */
    uint64_t args_warm;  /* carried over: partition 0's warm mark */
    uint64_t *part_kept; /* parent only: bytes of each partition whose pages
                            exist (written before), for its next owner */
    uint64_t mapped;     /* a worker: its partition's pages below this offset
                            are mapped in this process */
    uint64_t keep;       /* this much of a worker's partition stays populated
                            once used (cp_warm_share; set by the parent) */
} cp_arena;

/* The last pool's arena is carried over to the next pool of the process
 * with this much of its pages kept populated, at most (CPOOL_ARENA_CARRY). */
#define CP_ARENA_CARRY (UINT64_C(256) << 20)

int cp_arena_create(cp_arena **out, int nparts, uint64_t part_size);
void cp_arena_ref(cp_arena *a);
void cp_arena_unref(cp_arena *a);
void cp_arena_format(cp_arena *a, int p, uint64_t limit);
void cp_arena_worker_start(cp_arena *a);
int cp_arena_premap_args(cp_arena *a, uint64_t *mapped);
int cp_arena_premap_own(cp_arena *a, int p);
cp_blk *cp_arena_alloc(cp_arena *a, int p, uint64_t len);
cp_blk *cp_arena_alloc_warm(cp_arena *a, int p, uint64_t len);
void cp_arena_map(cp_arena *a, cp_blk *b);
cp_blk *cp_arena_block_at(cp_arena *a, int p, const void *data);
void cp_arena_hold(cp_blk *b);
int cp_arena_only_holder(cp_blk *b);
void cp_fork_stage(void *addr, size_t n);
int cp_fork_stage_hooks(void);
void cp_arena_stage_numpy(cp_arena *a, int p);
void cp_arena_layout_lock(void);
void cp_arena_layout_unlock(void);
uint8_t *cp_blk_data(cp_blk *b);
uint64_t cp_arena_offset(cp_arena *a, cp_blk *b);
cp_blk *cp_arena_take(cp_arena *a, int p, uint64_t off, uint64_t len, pid_t pid,
                      uint64_t *size);
void cp_arena_give_back(cp_arena *a, int p, cp_blk *b, uint64_t size);
void cp_arena_drop(cp_blk *b, int unclaimed);
void cp_arena_forget_holder(cp_arena *a, int p, pid_t pid);
int cp_arena_assign(cp_arena *a, int slot, int old, uint64_t limit);
void cp_arena_unlive(cp_arena *a, int p);
void cp_arena_close(cp_arena *a, int clean);
cp_arena *cp_arena_adopt(int nparts, uint64_t part_size);
uint64_t cp_arena_carried(void);
void cp_arena_drop_parked(void);
void cp_arena_carry_default(uint64_t bytes);
void cp_arena_stats(cp_arena *a, int p, uint64_t *brk, uint64_t *warm,
                    uint64_t *busy, uint64_t *nbusy);
void cp_arena_fill(cp_arena *a, cp_blk *b, const void *src, uint64_t n);

/* npalloc.c: a worker's large numpy arrays in its arena partition */
void cp_np_setup(cp_arena *a, int part);
void cp_np_poll(void);
void cp_np_given(uint64_t len);
cp_blk *cp_np_block(cp_arena *a, int part, const void *buf, uint64_t len);
#ifdef Py_PYTHON_H
int cp_np_plain(PyObject *v);
#endif

/* ------------------------------------------------------------------ proc */

/* Messages between the parent and the zygote (SOCK_SEQPACKET datagrams). */
typedef struct cp_zmsg {
    int32_t type;    /* CP_Z_* */
    int32_t slot;
    int32_t pid;     /* CP_Z_SPAWNED: the worker's pid */
    int32_t status;  /* CP_Z_EXITED: wait status; CP_Z_SPAWNED: the number */
} cp_zmsg;

enum {
    CP_Z_SPAWN = 1,    /* parent->zygote: fork a worker for slot */
    CP_Z_KILL = 2,     /* parent->zygote: SIGKILL every worker, reap, exit */
    CP_Z_QUIT = 3,     /* parent->zygote: reap the (exiting) workers, exit */
    CP_Z_SPAWNED = 4,  /* zygote->parent: slot's worker has pid */
    CP_Z_EXITED = 5,   /* zygote->parent: slot's worker pid exited with status */
    CP_Z_SPAWNFAIL = 6,/* zygote->parent: fork failed, status = errno */
};

/* What runs in a forked worker; provided by the Python-facing layer. */
typedef void (*cp_worker_fn)(void *arg, int slot);
int cp_proc_worker_number(void);

int cp_proc_zygote_start(int sock_child, int sock_parent, cp_worker_fn fn,
                         void *arg, cp_shm *shm, int nfirst, pid_t *zpid);
int cp_proc_send(int sock, const cp_zmsg *m);
int cp_proc_recv(int sock, cp_zmsg *m);
void cp_proc_close_inherited(void);
void cp_proc_register_fd(int fd);
void cp_proc_unregister_fd(int fd);
pid_t cp_self_pid(void);

/* ---------------------------------------------- Python-facing (core.c) */
#ifdef Py_PYTHON_H

/* A task as the parent keeps it until its result arrives (so that it can be
 * given to another worker if the one it was queued to dies first). */
typedef struct cp_task {
    uint64_t seq;         /* dispatch sequence, unique per pool, 0 = none */
    uint64_t job;
    uint64_t index;
    PyObject *payload;    /* bytes: the pickled task */
    PyObject *func;       /* the callable, for error messages */
    uint32_t fid;
    uint32_t mode;
    uint32_t mflags;      /* CP_F_OOB if the payload has out-of-band buffers */
    cp_rec *rec;          /* its first record in the task ring, once sent */
    uint64_t rec_pos;     /* ring position of that record */
} cp_task;

/* A FIFO of tasks (a growable circular array). */
typedef struct cp_fifo {
    cp_task *v;
    size_t head, len, cap;
} cp_fifo;

/* The parent's view of one worker slot. */
typedef struct cp_slot {
    cp_ctl *ctl;
    cp_ring tq;            /* producer end of the task ring */
    cp_ring rq;            /* consumer end of the result ring */
    pid_t pid;             /* 0 until the zygote reports it */
    int pid_wait;          /* spawn asked for, the zygote has not answered */
    int live;              /* a worker was requested and has not been reaped */
    int retiring;          /* got maxtasksperchild tasks: send no more */
    int stopping;          /* a STOP record was queued */
    uint64_t sent;         /* tasks sent to the current worker */
    uint64_t results;      /* of its results, how many were read (on_result) */
    uint32_t credit;       /* how many of its tasks may be unfinished */
    double avg_us;         /* moving average of its task run time */
    cp_fifo fifo;          /* tasks sent to it, oldest first */
    uint64_t stall_seq;    /* its oldest task, found unclaimed at stall_ns */
    uint64_t stall_ns;     /* while another worker was idle */
    int stalled;           /* that task was taken: send it nothing until */
    uint64_t stall_pos;    /* its worker's ring head passes this */
    PyObject *known;       /* set of fids it has been sent */
    uint32_t last_fid;     /* fid of the last task sent (known), or 0 */
    /* message being streamed to it (only the newest fifo task) */
    PyObject *out_buf;
    uint64_t out_off;
    cp_rec out_hdr;
    /* message being gathered from it */
    struct cp_gather *in_g;
    PyObject *in_err;      /* the gather failed: the error, for the end */
    cp_rec in_hdr;
    PyObject *scratch;     /* kept gather buffer (warm), see cp_warm_share */
    int part;              /* its worker's arena partition (results), or -1 */
    PyObject *init_exc;    /* the initializer's exception, if it raised */
    int startup_deaths;    /* its workers' deaths in start-up in a row, with
                            * no exception from the initializer */
    int corrupt;           /* its result ring held garbage: it was killed */
    int draining;          /* drain() is running on it (it may call Python) */
    int death_pending;     /* the zygote reported its death mid-drain */
    pid_t dead_pid;
    int dead_status;
    /* Synchronous apply() fast path: a caller owns the (idle) slot, sends one
     * task and reads its result ring itself; the collector keeps off it. */
    int owner;
    int number;            /* its worker's number among the zygote's forks */
    uint32_t ident;        /* its worker's identity: ForkPoolWorker-<ident> */
    /* Pool._pool's object for its worker (made on first asking), told the
     * worker's exit code when the zygote reports it; proc_pid is its pid. */
    PyObject *proc;
    pid_t proc_pid;
    int proc_number;
    /* Its worker when the pool was terminated (0: none), for Pool._pool. */
    pid_t final_pid;
    int final_number;
    int final_wait;        /* or its spawn was asked for, not answered */
} cp_slot;

/* A synchronous call's mailbox, on its caller's stack while it waits. */
typedef struct cp_call {
    uint64_t job;          /* CP_SYNC_JOB | sequence */
    uint32_t ready;        /* futex word: value is there */
    int ok;
    PyObject *value;
} cp_call;

#define CP_SYNC_JOB (UINT64_C(1) << 63)
/* An apply() call that found no idle worker and went through a result
 * object: it is named as an apply() call in errors, like a synchronous one. */
#define CP_APPLY_JOB (UINT64_C(1) << 62)
#define CP_MAX_CALLS 256

typedef struct Core {
    PyObject_HEAD
    pid_t owner;           /* the process that built it */
    cp_shm shm;
    cp_arena *arena;       /* large out-of-band buffers, or NULL */
    int nslots;
    cp_slot *slots;
    int efd;               /* eventfd: workers ring it when the collector sleeps */
    int zsock;             /* socket to the zygote */
    int zsock_ready;       /* the collector's poll saw the zygote speak */
    uint64_t zcheck_ns;    /* when the collector last read the zygote */
    int zpidfd;
    pid_t zpid;
    int all_reaped;        /* the zygote exited 0: every worker was reaped */
    uint32_t zreaping;     /* a thread is reaping the zygote (reap_zygote) */
    int state;             /* CORE_* */
    int broken;            /* it went through CORE_BROKEN */
    int quiet;             /* terminated at interpreter exit: unfinished
                              results fail without waking their waiters or
                              running callbacks (deliver_quietly) */
    int collecting;        /* the collector loop is running */
    unsigned long collector;   /* its thread's ident, once it ran */
    int collected;         /* ... and has ended: nothing will deliver late */
    PyObject *late;        /* list of (job, index, exc): tasks that could not
                              be sent, whose results the collector fails
                              (fail_unsent) */
    cp_call *calls[CP_MAX_CALLS];  /* synchronous calls waiting */
    int ncalls;
    int asleep;            /* the collector is in collector_sleep() */
    int started;           /* a worker got through PyOS_AfterFork_Child() */
    uint64_t start_by_ns;  /* ... or the pool is broken at this time */
    uint64_t next_seq;
    cp_fifo pending;       /* tasks not yet given to a worker */
    PyObject *fids;        /* dict: callable -> fid (cacheable callables) */
    PyObject *str_mp_process;  /* "multiprocessing.process" (slot_ident) */
    PyObject *str_counter;     /* "_process_counter" */
    PyObject *count_type;      /* itertools.count */
    PyObject *fbytes;      /* dict: fid -> pickled callable */
    uint32_t next_fid;
    PyObject *initializer;
    PyObject *initargs;
    PyObject *process;     /* for become_worker: None, or (class, daemon) */
    long maxtasks;         /* 0 = unlimited */
    long spin_ns;
    int ring_check_ms;     /* the collector's longest sleep (RING_CHECK_MS) */
    long call_spin_ns;     /* apply()'s spin on its result, if fixed, or 0 */
    PyObject *cache;       /* job -> result object with _set(i, (ok, value)) */
    PyObject *make_error;  /* callable(kind, pid, status, job, index, func) */
    PyObject *wfuncs;      /* worker only: fid -> callable */
    PyObject *batch_yes;   /* a result type with _set_many (see takes_batches) */
    PyObject *batch_no;    /* a result type without */
    PyObject *weakreflist;
} Core;

enum {
    CORE_RUN = 0,        /* accepting tasks */
    CORE_CLOSING = 1,    /* no new work from the pool; finish what is queued */
    CORE_STOPPING = 2,   /* STOP sent; waiting for workers to exit */
    CORE_DONE = 3,       /* all workers and the zygote are gone */
    CORE_TERMINATED = 4, /* terminate(): everything killed */
    CORE_BROKEN = 5,     /* the zygote died: no more workers can be made */
};

/* Error kinds handed to Core.make_error. */
/* If no worker gets through PyOS_AfterFork_Child() within this time of the
 * pool's creation, the pool is declared broken: they hang there when another
 * thread of the parent held a lock at fork time, and every worker is forked
 * from the same snapshot.  CPOOL_START_TIMEOUT_MS overrides it (tests). */
#define CP_START_NS (UINT64_C(10) * 1000 * 1000 * 1000)

enum { CP_E_LOST = 1, CP_E_TERMINATED = 2, CP_E_BROKEN = 3, CP_E_PROTO = 4,
       CP_E_STARTUP = 5 };

/* The current exception, normalized, with its traceback attached; clears
 * the error indicator.  (PyErr_GetRaisedException() arrived in 3.12.) */
static inline PyObject *
cp_err_take(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v == NULL) {
        v = Py_NewRef(Py_None);
    } else if (tb != NULL) {
        PyException_SetTraceback(v, tb);
    }
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

/* module.c */
typedef struct cp_module_state {
    PyObject *dumps;         /* pickle.dumps */
    PyObject *loads;         /* pickle.loads */
    PyObject *protocol;      /* int 5 */
    PyObject *str_set;       /* "_set" */
    PyObject *str_set_many;  /* "_set_many" */
    PyObject *str_fail_quietly;  /* "_fail_quietly" */
    PyObject *str_release;   /* "release" */
    /* Attribute names used per message, interned: a name made afresh for
     * each lookup would be a new string at a new address every time, and
     * CPython's type attribute cache keeps a reference to the names it
     * caches (up to 4096 strings held for nothing). */
    PyObject *str_oob, *str_pid, *str_dump, *str_load, *str_getitem,
             *str_persistent_id, *str_persistent_load, *str_dispatch_table,
             *str_byteorder, *str_newbyteorder, *str_astype, *str_native, *str_dtype;
    PyObject *pickler;       /* pickle.Pickler */
    PyObject *unpickler;     /* pickle.Unpickler */
    PyObject *np_unpickler;  /* its subclass for arrays (msg.c: cp_unpickle) */
    PyObject *find_class;    /* pickle.Unpickler.find_class */
    PyObject *mem_reader_type;   /* MemReader (msg.c), the file it reads */
    PyObject *frombuffer_type;   /* FromBuffer (msg.c), what it hands numpy */
    /* cpool._pickling, imported at the first pickling (msg.c: fp_ready) */
    PyObject *fp_reducers;   /* ForkingPickler._extra_reducers (a dict) */
    Py_ssize_t fp_baseline;  /* how many of them are multiprocessing's own */
    PyObject *fp_dumps;      /* dumps(obj, protocol) with them */
    PyObject *fp_table;      /* dispatch_table() */
    PyTypeObject *segwriter_type;
    PyTypeObject *shmbuf_type;
    PyTypeObject *arenaref_type;
    PyTypeObject *core_type;
    PyTypeObject *result_base;   /* ResultBase (result.c) */
    PyTypeObject *pool_base;     /* PoolBase (result.c) */
} cp_module_state;

extern cp_module_state *cp_state;

/* msg.c: a pickled message is a bytes object, or a tuple of segments whose
 * concatenation is the pickle (large buffers are referenced, not copied). */
#define CP_MAX_OOB 64

/* Which part of the arena a message's large buffers go to (sending) or
 * may come from (receiving).  a == NULL or part < 0: no arena. */
typedef struct cp_arena_use {
    cp_arena *a;
    int part;
    int args;     /* the parent sending arguments: the task holds the blocks */
    PyObject **value;  /* a worker's result: its reference to it, which
                          pickling may drop (msg.c: a worker's own arrays) */
    int snapshot;      /* the parent copies mutable buffers (msg.c: snapshot) */
} cp_arena_use;

/* Receiving a message in fragments (msg.c). */
typedef struct cp_gather {
    uint64_t total, off;
    int oob;
    cp_arena_use au;
    uint64_t alen[CP_MAX_OOB];   /* arena buffers: data length, else 0 */
    uint8_t isbytes[CP_MAX_OOB]; /* gathered into a bytes object */
    uint8_t desc[16];            /* an arena buffer's descriptor, arriving */
    PyObject **scratch;          /* where the kept pickle buffer lives */
    uint64_t keep;               /* ... kept if at most this large */
    uint8_t pre[16 + 8 * CP_MAX_OOB];
    uint32_t pre_need, pre_have;
    uint32_t nbuf;
    uint64_t lens[CP_MAX_OOB];
    PyObject *pickle;            /* bytearray, at least pickle_len bytes */
    uint64_t pickle_len;
    PyObject *bufs[CP_MAX_OOB];  /* bytearrays for the out-of-band buffers */
    uint32_t cur;
    uint64_t cur_off;
} cp_gather;

int cp_gather_init(cp_gather *g, uint64_t total, int oob, PyObject **scratch,
                   uint64_t keep, const cp_arena_use *au);
int cp_gather_begin_pickle(cp_gather *g, uint64_t n);
int cp_gather_feed(cp_gather *g, const uint8_t *p, uint64_t n);
PyObject *cp_gather_finish(cp_gather *g);
int cp_unpickle_setup(cp_module_state *st);
PyObject *cp_unpickle(PyObject *mv, const uint8_t *p, uint64_t n, PyObject *buffers,
                      PyObject *table);
void cp_gather_clear(cp_gather *g);

PyObject *cp_msg_dumps(PyObject *obj, int big_hint, int *oob,
                       const cp_arena_use *au);
uint64_t cp_msg_size(PyObject *msg);
PyObject *cp_msg_settle(PyObject *msg);
int cp_msg_send_some(cp_ring *r, const cp_rec *tmpl, PyObject *msg,
                     uint64_t *off, cp_rec **first, uint64_t *first_pos);
int cp_msg_has_big_buffer(PyObject *obj, int depth);
extern PyType_Spec cp_segwriter_spec;
extern PyType_Spec cp_shmbuf_spec;
extern PyType_Spec cp_arenaref_spec;
void cp_msg_fork_hooks(void);

/* codec.c: plain data (None, bool, int, float, str, bytes, and tuples,
 * lists, dicts, sets and frozensets of them, exact types; dates and times;
 * namedtuples, enum members and instances of plain classes, rebuilt as
 * pickle rebuilds them) without pickle.
 * A message in this encoding starts with CP_CODEC_MAGIC (a pickle of
 * protocol 2 or later starts with 0x80). */
#define CP_CODEC_MAGIC 0xCB
int cp_codec_setup(void);
void cp_codec_clear(void);
PyObject *cp_fp_reducers(void);
PyObject *cp_codec_encode(PyObject *obj, uint64_t max_bytes);
PyObject *cp_codec_pickle(PyObject *m, PyObject *obj);
PyObject *cp_codec_decode(const uint8_t *p, uint64_t n);
PyObject *cp_dumps(PyObject *obj, int big_hint, uint64_t max_plain, int *oob,
                   const cp_arena_use *au);
PyObject *cp_dumps_items(PyObject *const *items, Py_ssize_t n, uint64_t max_plain);
PyObject *cp_loads(const uint8_t *p, uint64_t n);
PyObject *cp_codec_encode_plain_py(PyObject *m, PyObject *const *args,
                                   Py_ssize_t nargs);
PyObject *cp_codec_loads_py(PyObject *m, PyObject *arg);

/* result.c: apply_async() result objects made and completed in C */
PyObject *cp_result_set_type(PyObject *m, PyObject *const *args, Py_ssize_t nargs);
void cp_result_clear_types(void);
PyObject *cp_result_new(PyObject *pool, PyObject *cache, PyObject *callback,
                        PyObject *error_callback, uint64_t flags, uint64_t *job);
int cp_result_complete(PyObject *r, int ok, PyObject *value);
void cp_result_forget(PyObject *r);
void cp_result_fail_quietly(PyObject *r, PyObject *exc);
PyObject *cp_result_done_lock(PyObject *m, PyObject *r);
extern PyType_Spec cp_result_base_spec;
extern PyType_Spec cp_pool_base_spec;
extern PyType_Spec cp_consumer_base_spec;

/* worker.c */
void cp_worker_main(void *core, int slot);

/* core.c */
extern PyType_Spec cp_core_spec;
PyObject *cp_core_apply_async(PyObject *core, PyObject *const *args,
                              uint64_t flags);

#endif /* Py_PYTHON_H */

#endif /* CPOOL_H */
