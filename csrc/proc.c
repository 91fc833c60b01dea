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
 *     gone (however it died), and the zygote SIGKILLs every worker and exits.
 *     A socket is used rather than PR_SET_PDEATHSIG because the death signal
 *     follows the parent *thread* that forked, and a Pool may be built in a
 *     short-lived thread;
 *   - workers set PR_SET_PDEATHSIG(SIGKILL) (their parent, the zygote, has a
 *     single thread), then check getppid() to close the race with its death.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
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
} child_t;

#define MAX_CHILDREN 4096

static child_t children[MAX_CHILDREN];
static int n_children;
static int n_spawned;      /* workers this zygote forked (their numbers) */

/* In a worker: its number among its zygote's forks, from 1. */
int
cp_proc_worker_number(void)
{
    return n_spawned;
}

static void
kill_all_and_exit(void)
{
    for (int i = 0; i < n_children; i++)
        kill(children[i].pid, SIGKILL);
    for (int i = 0; i < n_children; i++) {
        while (waitpid(children[i].pid, NULL, 0) < 0 && errno == EINTR)
            ;
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
        /* Ctrl-C stays the parent's business, but through a handler that
         * does nothing rather than the zygote's SIG_IGN: exec() resets a
         * handled signal to its default and keeps an ignored one ignored,
         * and the programs a task runs must get their Ctrl-C. */
        struct sigaction sa = {.sa_handler = ignore_signal, .sa_flags = SA_RESTART};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
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
        n_children++;
        m.type = CP_Z_SPAWNED;
        m.pid = pid;
        m.status = n_spawned;   /* its number, for its name */
    }
    if (cp_proc_send(sock, &m) < 0)
        kill_all_and_exit();
}

static void
reap(int sock, int sfd)
{
    struct signalfd_siginfo si;
    while (read(sfd, &si, sizeof si) > 0)
        ;
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0)
            return;
        for (int i = 0; i < n_children; i++) {
            if (children[i].pid != pid)
                continue;
            cp_zmsg m = {.type = CP_Z_EXITED, .slot = children[i].slot,
                         .pid = pid, .status = st};
            children[i] = children[--n_children];
            if (cp_proc_send(sock, &m) < 0)
                kill_all_and_exit();
            break;
        }
    }
}

static void
zygote_main(int sock, cp_worker_fn fn, void *arg, int nfirst)
{
    sigset_t mask, oldmask;

    /* Ctrl-C is the parent's business: a pool's processes never see it. */
    signal(SIGINT, SIG_IGN);
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, &oldmask);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        _exit(71);
    /* The first workers, at once: the parent does not ask for them. */
    for (int i = 0; i < nfirst; i++)
        spawn(sock, &oldmask, sfd, fn, arg, i);

    for (;;) {
        struct pollfd fds[2] = {{.fd = sock, .events = POLLIN},
                                {.fd = sfd, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            kill_all_and_exit();
        }
        if (fds[1].revents)
            reap(sock, sfd);
        if (fds[0].revents) {
            cp_zmsg m;
            int rc = cp_proc_recv(sock, &m);
            if (rc <= 0)            /* EOF: the parent is gone */
                kill_all_and_exit();
            if (m.type == CP_Z_SPAWN) {
                spawn(sock, &oldmask, sfd, fn, arg, m.slot);
            } else {
                /* CP_Z_KILL, CP_Z_QUIT.  Those that left on their own (the
                 * idle workers terminate() lets go) are reported as usual
                 * first: Pool._pool tells their exit codes. */
                reap(sock, sfd);
                kill_all_and_exit();
            }
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
                     void *arg, int nfirst, pid_t *zpid)
{
    PyOS_BeforeFork();
    pid_t pid = fork();
    if (pid == 0) {
        /* No PyOS_AfterFork_Child(): the zygote runs no Python (see top). */
        close(sock_parent);
        /* The table may hold another zygote's children if this process is
         * itself a worker (a pool made inside a task): start empty. */
        n_children = 0;
        n_spawned = 0;
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
