/*
 * proc.c - the zygote (fork server) and the forks it makes.
 *
 * The parent forks the zygote once, from the thread that builds the Pool,
 * before any cpool thread of that pool exists, the way os.fork() does
 * (PyOS_BeforeFork() and PyOS_AfterFork_Parent() around it, so the
 * os.register_at_fork() "before" and "after in parent" hooks run in the
 * parent).  The zygote is single-threaded for the rest of its life and forks
 * every worker, first ones and replacements alike, so replacements never come
 * from a parent that has threads (CPython gh-90622, gh-105464: forking a
 * threaded parent deadlocks).
 *
 * The zygote runs no Python at all: only this file's C loop (poll, fork,
 * waitpid, send).  Its memory stays the snapshot of the parent taken at
 * fork time, between PyOS_BeforeFork() and PyOS_AfterFork_Parent(), and a
 * worker forked from it is in the state a direct child of the parent would
 * be in: the worker runs PyOS_AfterFork_Child() (and so the "after in child"
 * hooks), as os.fork()'s child does.  Skipping the interpreter in the
 * zygote saves its PyOS_AfterFork_Child() (the copy-on-write faults of the
 * hooks and of the thread clean-up: most of a millisecond here) and keeps
 * its pages shared with the parent.
 *
 * The zygote forks the pool's first workers as soon as it runs, without
 * waiting to be asked; replacements on CP_Z_SPAWN.
 *
 * Lifetimes:
 *   - the zygote watches its socket to the parent: EOF means the parent is
 *     gone (however it died), and the zygote ends every worker and exits
 *     (kill_all_and_exit).  A socket is used rather than PR_SET_PDEATHSIG
 *     because the death signal follows the parent *thread* that forked, and
 *     a Pool may be built in a short-lived thread;
 *   - workers set PR_SET_PDEATHSIG(SIGKILL) (their parent, the zygote, has a
 *     single thread), then check getppid() to close the race with its death.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cpool.h"

/* ------------------------------------------------ fds closed in children */

/* Parent-side fds of every live pool of this process.  A child forked from
 * this process (our zygotes, or the user's os.fork()) must not hold them, or
 * a zygote could not see its parent's death as EOF.  Touched only with the
 * GIL held, and in the child right after fork. */
#define MAX_REG_FDS 1024
static int reg_fds[MAX_REG_FDS];
static int n_reg_fds;
static int atfork_installed;

static pid_t self_pid;   /* getpid(), cached; reset in a forked child */

static void
atfork_child(void)
{
    self_pid = 0;
    for (int i = 0; i < n_reg_fds; i++)
        close(reg_fds[i]);
    n_reg_fds = 0;
}

/* getpid() without a system call per use (every submit checks that it
 * runs in the pool's process).  Valid once a pool exists (the atfork hook is
 * installed by then). */
pid_t
cp_self_pid(void)
{
    if (self_pid == 0)
        self_pid = getpid();
    return self_pid;
}

void
cp_proc_register_fd(int fd)
{
    if (!atfork_installed) {
        pthread_atfork(NULL, NULL, atfork_child);
        atfork_installed = 1;
    }
    if (n_reg_fds < MAX_REG_FDS)
        reg_fds[n_reg_fds++] = fd;
}

void
cp_proc_unregister_fd(int fd)
{
    for (int i = 0; i < n_reg_fds; i++) {
        if (reg_fds[i] == fd) {
            reg_fds[i] = reg_fds[--n_reg_fds];
            return;
        }
    }
}

void
cp_proc_close_inherited(void)
{
    atfork_child();
}

/* ------------------------------------------------------------- messages */

int
cp_proc_send(int sock, const cp_zmsg *m)
{
    for (;;) {
        ssize_t n = send(sock, m, sizeof *m, MSG_NOSIGNAL);
        if (n == (ssize_t)sizeof *m)
            return CP_OK;
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EPROTO;
    }
}

/* Returns 1 with a message, 0 on EOF, -EAGAIN if none is waiting
 * (non-blocking sockets), or -errno. */
int
cp_proc_recv(int sock, cp_zmsg *m)
{
    for (;;) {
        ssize_t n = recv(sock, m, sizeof *m, 0);
        if (n == (ssize_t)sizeof *m)
            return 1;
        if (n == 0)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EPROTO;
    }
}

/* --------------------------------------------------------------- zygote */

typedef struct {
    pid_t pid;
    int slot;
    int number;
} child_t;

#define MAX_CHILDREN 4096
#define LEAVE_GRACE_MS 100
#define TERM_GRACE_MS 100

static child_t children[MAX_CHILDREN];
static int n_children;
static int n_spawned;      /* workers this zygote forked (their numbers) */
static cp_shm *zshm;       /* the pool's slots (their ctl's zygote line) */
static int zsfd = -1;      /* the zygote's signalfd (SIGCHLD, forwarded) */
static pid_t zparent;      /* the pool's process, the zygote's parent */
static struct sigaction parent_chld;   /* the parent's SIGCHLD, for workers */

/* In a worker: its number among its zygote's forks, from 1. */
int
cp_proc_worker_number(void)
{
    return n_spawned;
}

/*
 * Child i has ended (flags: WNOHANG to only look): record how in its slot,
 * reap it, drop it from the table and fill *m with the report for the
 * parent.  The record is written between waitid(WNOWAIT) and the reap,
 * while the pid cannot be reused yet: Pool._pool trusts a pidfd it opened
 * only if, after opening it, the record does not name that pid.  Returns 1
 * if it was reaped, 0 if not (still running, or not ours to wait for).
 */
static int
collect(int i, int flags, cp_zmsg *m)
{
    pid_t pid = children[i].pid;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    while (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT | flags) < 0) {
        if (errno != EINTR)
            return 0;
    }
    if (si.si_pid != pid)
        return 0;
    int code = si.si_code == CLD_EXITED ? si.si_status : -si.si_status;
    cp_store_release(&cp_shm_ctl(zshm, children[i].slot)->exited,
                     CP_CTL_WORD(children[i].number, code));
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    *m = (cp_zmsg){.type = CP_Z_EXITED, .slot = children[i].slot,
                   .pid = pid, .status = st};
    children[i] = children[--n_children];
    return 1;
}

/* Is child i still there (not exited)? */
static int
running(int i)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    return waitid(P_PID, (id_t)children[i].pid, &si,
                  WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == 0;
}

/* Is child i through with everything but its _exit() (CP_W_LEFT), and
 * not gone yet? */
static int
leaving(int i)
{
    return cp_load_acquire(&cp_shm_ctl(zshm, children[i].slot)->state) == CP_W_LEFT &&
           running(i);
}

/*
 * Signals a task may send to os.getppid(), which is the zygote: with
 * multiprocessing it is the pool's process, so the zygote passes on those a
 * worker sends (kill(), sigqueue()) to its parent.  Blocked and read from
 * the signalfd, with the sender's pid.  Faults, job control, SIGPIPE and
 * the resource-limit signals are the zygote's own business and are left
 * alone, as are glibc's internal real-time signals (below SIGRTMIN).
 */
static const int fwd_signals[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2,
                                  SIGALRM, SIGTERM, SIGWINCH, SIGVTALRM,
                                  SIGPROF, SIGIO, SIGPWR};

static void
fwd_sigset(sigset_t *set)
{
    for (size_t i = 0; i < sizeof fwd_signals / sizeof fwd_signals[0]; i++)
        sigaddset(set, fwd_signals[i]);
    for (int sig = SIGRTMIN; sig <= SIGRTMAX; sig++)
        sigaddset(set, sig);
}

static int
is_child(pid_t pid)
{
    for (int i = 0; i < n_children; i++)
        if (children[i].pid == pid)
            return 1;
    return 0;
}

/*
 * A signal other than SIGCHLD has been read from the signalfd.  From a
 * worker (still unreaped: reap() reads the signals before it collects),
 * it goes to the parent, while the parent is still there (a dead parent's
 * pid could name another process once it is reaped; getppid() changes as
 * soon as it dies).  From anyone else (a Ctrl-C, a killpg(), a kill
 * aimed at the zygote) it does what the zygote's inherited disposition
 * says, except that a handler is not run (the handler is the parent's
 * Python one, and the zygote runs no Python): ignored, or, at the default,
 * the default action (SIGINT is ignored: see zygote_main).
 */
static void
on_signal(const struct signalfd_siginfo *si)
{
    int sig = (int)si->ssi_signo;
    int sent = si->ssi_code == SI_USER || si->ssi_code == SI_QUEUE ||
               si->ssi_code == SI_TKILL;
    if (sent && is_child((pid_t)si->ssi_pid)) {
        if (getppid() == zparent) {
            if (si->ssi_code == SI_QUEUE) {
                union sigval v = {.sival_ptr = (void *)(uintptr_t)si->ssi_ptr};
                sigqueue(zparent, sig, v);
            } else {
                kill(zparent, sig);
            }
        }
        return;
    }
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) < 0 || cur.sa_handler != SIG_DFL)
        return;
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, sig);
    raise(sig);                     /* pending while blocked */
    sigprocmask(SIG_UNBLOCK, &one, NULL);
}

/* Read every signal waiting on the signalfd; SIGCHLD needs no more than
 * the look at the children that follows. */
static void
drain_signals(void)
{
    struct signalfd_siginfo si;
    while (zsfd >= 0 && read(zsfd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo != SIGCHLD)
            on_signal(&si);
    }
}

/* Wait, woken by SIGCHLD, until no child is still `busy(i)`, for at most
 * ms milliseconds. */
static void
wait_while(int (*busy)(int), int ms)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t until_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000 + ms;
    for (;;) {
        int any = 0;
        for (int i = 0; i < n_children && !any; i++)
            any = busy(i);
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t left = until_ms - ((int64_t)now.tv_sec * 1000 +
                                   now.tv_nsec / 1000000);
        if (!any || left <= 0 || zsfd < 0)
            return;
        struct pollfd p = {.fd = zsfd, .events = POLLIN};
        poll(&p, 1, (int)left);
        drain_signals();
    }
}

/*
 * End every worker, record how each ended (those that had left on their
 * own too: the idle workers terminate() lets go), and exit.
 *
 * A worker that is leaving on its own is a few instructions from its exit:
 * it gets there, within LEAVE_GRACE_MS, so that its exit code is its own.
 * The others get SIGTERM, as multiprocessing's terminate() sends, and
 * SIGKILL if they are still there TERM_GRACE_MS later (a task's handler
 * that ignores SIGTERM must not hang the pool).
 *
 * The reports go to the parent while its socket takes them without
 * blocking (sock < 0: none); the records in the slots are what counts.
 */
static void
kill_all_and_exit(int sock)
{
    wait_while(leaving, LEAVE_GRACE_MS);
    for (int i = 0; i < n_children; i++)
        kill(children[i].pid, SIGTERM);
    wait_while(running, TERM_GRACE_MS);
    for (int i = 0; i < n_children; i++)
        kill(children[i].pid, SIGKILL);
    while (n_children > 0) {
        cp_zmsg m;
        if (!collect(n_children - 1, 0, &m)) {
            n_children--;       /* not ours to wait for */
            continue;
        }
        if (sock >= 0 && send(sock, &m, sizeof m, MSG_NOSIGNAL | MSG_DONTWAIT)
                             != (ssize_t)sizeof m)
            sock = -1;
    }
    _exit(0);
}

static void
ignore_signal(int sig)
{
    (void)sig;
}

static void
spawn(int sock, const sigset_t *oldmask, int sfd, cp_worker_fn fn, void *arg,
      int slot)
{
    cp_zmsg m = {.slot = slot};
    pid_t zygote = getpid();

    if (n_children >= MAX_CHILDREN) {
        m.type = CP_Z_SPAWNFAIL;
        m.status = EAGAIN;
        cp_proc_send(sock, &m);
        return;
    }
    /* No PyOS_BeforeFork() here: the zygote's interpreter is the parent's,
     * frozen right after the parent's PyOS_BeforeFork() (see above). */
    n_spawned++;
    pid_t pid = fork();
    if (pid == 0) {
        /* Tie the worker to the zygote first: if PyOS_AfterFork_Child()
         * hangs (on a lock another thread of the parent held at fork time),
         * the parent's start-up deadline kills the zygote, and this with it. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != zygote)
            _exit(70);
        close(sock);
        close(sfd);
        zsfd = -1;
        /* Ctrl-C stays the parent's business, but through a handler that
         * does nothing rather than the zygote's SIG_IGN: exec() resets a
         * handled signal to its default and keeps an ignored one ignored,
         * and the programs a task runs must get their Ctrl-C. */
        struct sigaction sa = {.sa_handler = ignore_signal, .sa_flags = SA_RESTART};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGCHLD, &parent_chld, NULL);
        sigprocmask(SIG_SETMASK, oldmask, NULL);
        PyOS_AfterFork_Child();
        fn(arg, slot);   /* never returns */
        _exit(70);
    }
    int err = errno;
    if (pid < 0) {
        m.type = CP_Z_SPAWNFAIL;
        m.status = err;
    } else {
        children[n_children].pid = pid;
        children[n_children].slot = slot;
        children[n_children].number = n_spawned;
        n_children++;
        cp_store_release(&cp_shm_ctl(zshm, slot)->spawned,
                         CP_CTL_WORD(pid, n_spawned));
        m.type = CP_Z_SPAWNED;
        m.pid = pid;
        m.status = n_spawned;   /* its number, for its name */
    }
    if (cp_proc_send(sock, &m) < 0)
        kill_all_and_exit(-1);
}

static void
reap(int sock)
{
    drain_signals();
    /* Downwards: collect() moves the last entry into the one it drops. */
    for (int i = n_children - 1; i >= 0; i--) {
        cp_zmsg m;
        if (i < n_children && collect(i, WNOHANG, &m) &&
            cp_proc_send(sock, &m) < 0)
            kill_all_and_exit(-1);
    }
}

static void
zygote_main(int sock, cp_worker_fn fn, void *arg, int nfirst)
{
    sigset_t mask, oldmask;

    /* Ctrl-C is the parent's business: a pool's processes never see it
     * (a SIGINT a worker sends goes to the parent: on_signal). */
    signal(SIGINT, SIG_IGN);
    /* The zygote reaps its workers itself: with the parent's SIGCHLD set to
     * SIG_IGN (or SA_NOCLDWAIT), a common way to avoid zombies, the kernel
     * would reap them and their ends would go unseen.  The workers get the
     * parent's setting back. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGCHLD, &dfl, &parent_chld);
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    fwd_sigset(&mask);
    sigprocmask(SIG_BLOCK, &mask, &oldmask);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        _exit(71);
    zsfd = sfd;
    /* The first workers come at once, unasked, but one at a time between
     * looks at the socket: a KILL sent meanwhile (a pool terminated as soon
     * as it is made) does not wait for hundreds of forks. */
    int first = 0;
    for (;;) {
        struct pollfd fds[2] = {{.fd = sock, .events = POLLIN},
                                {.fd = sfd, .events = POLLIN}};
        if (poll(fds, 2, first < nfirst ? 0 : -1) < 0) {
            if (errno == EINTR)
                continue;
            kill_all_and_exit(sock);
        }
        if (fds[1].revents)
            reap(sock);
        if (fds[0].revents) {
            cp_zmsg m;
            int rc = cp_proc_recv(sock, &m);
            if (rc <= 0)            /* EOF: the parent is gone */
                kill_all_and_exit(-1);
            if (m.type == CP_Z_SPAWN) {
                spawn(sock, &oldmask, sfd, fn, arg, m.slot);
            } else {
                /* CP_Z_KILL, CP_Z_QUIT.  Those that left on their own (the
                 * idle workers terminate() lets go) are reported as usual
                 * first: Pool._pool tells their exit codes. */
                reap(sock);
                kill_all_and_exit(sock);
            }
        } else if (first < nfirst) {
            spawn(sock, &oldmask, sfd, fn, arg, first++);
        }
    }
}

/*
 * Fork the zygote, which forks workers for slots 0 .. nfirst-1 at once.
 * Needs the GIL (PyOS_BeforeFork).  sock_child is the zygote's end of the
 * control socket and is closed in the parent on return; sock_parent is closed
 * in the zygote.  Returns 0 and the pid, or -errno.
 */
int
cp_proc_zygote_start(int sock_child, int sock_parent, cp_worker_fn fn,
                     void *arg, cp_shm *shm, int nfirst, pid_t *zpid)
{
    pid_t parent = getpid();
    PyOS_BeforeFork();
    pid_t pid = fork();
    if (pid == 0) {
        /* No PyOS_AfterFork_Child(): the zygote runs no Python (see top). */
        close(sock_parent);
        zparent = parent;
        /* The table may hold another zygote's children if this process is
         * itself a worker (a pool made inside a task): start empty. */
        n_children = 0;
        n_spawned = 0;
        zshm = shm;
        zygote_main(sock_child, fn, arg, nfirst);
        _exit(0);
    }
    int err = errno;
    PyOS_AfterFork_Parent();
    close(sock_child);
    if (pid < 0)
        return -err;
    *zpid = pid;
    return CP_OK;
}
