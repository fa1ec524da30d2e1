/* The fork step of procshare's process backend, in one C call.
 *
 * Why C: after fork() every page the parent or the child writes is copied
 * (copy-on-write, ~2.8 us a page here). Doing the pipe, signal mask, fork,
 * die-with-parent and pidfd steps in Python wrote ~10 more pages in the
 * parent and ~10-30 more in the child per fork (the Python objects and
 * frames of those steps; measured with getrusage minflt). Here the work
 * after fork() touches almost no Python memory.
 *
 * Semantics are those of the Python version it replaces (see process.py):
 *   - result pipe: pipe2(O_CLOEXEC), read end non-blocking, write end blocking;
 *   - SIGINT/TERM/HUP/QUIT/ALRM/USR1/USR2 blocked across fork(); the parent
 *     restores its mask last, after the pidfd is open; the CHILD returns with
 *     them still blocked and calls unblock() inside its try/finally, so a
 *     handler that raises cannot run before the child is in it;
 *   - CPython's fork hooks and os.fork's audit event, as os.fork() does;
 *   - in the child (if asked): prctl(PR_SET_PDEATHSIG, SIGKILL), then a
 *     getppid() re-check: a parent that died before the prctl took effect
 *     would otherwise leave an orphan nobody kills;
 *   - the pidfd is None when not wanted, or pidfd_open is unavailable or fails.
 *
 * Descriptors private to the parent: the read end of every result pipe and
 * every pidfd are recorded here (in the parent, as they are made) until
 * close() closes them. A child closes all of them first thing, in C: its
 * siblings' pipes and pidfds are the parent's business, and holding a
 * sibling's read end would keep its pipe open after the parent let go of it.
 * The child then records its own result write end, so that its own children
 * close that one. (The same in Python touched every sibling's record: ~100
 * microseconds and a dozen copied pages per child with 50 siblings alive.)
 *
 * _forkfast.c (compiled into this module; _forkstep.h is what the two
 * share) builds the common case of a whole start and join on this step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <poll.h>
#include <sys/syscall.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "_forkstep.h"

/* The mask in force before fork_child() blocked signals. Written under the
 * GIL just before fork(), so the child's copy is the one its own fork saved. */
static sigset_t saved_mask;

/* The parent's result of the last fork, until the caller has recorded it
 * (claim()). A signal that arrived while the fork had signals blocked makes
 * its Python handler run right after fork() returns, before the caller can
 * store the result: unclaimed() hands it over then, so the engine still
 * knows (and reaps) the child. A reference, or NULL; only touched under the
 * GIL. */
static PyObject *last_fork;
static long last_token; /* the caller's number for that fork */

#include "_forkstep_private.h" /* the parent-private descriptors */

/* In a child: its result pipe's write end as the fork step made it (the
 * descriptor and the pipe's identity), or -1. A function may close
 * descriptors it did not open (os.closerange) and get the number back for a
 * file of its own: the result must not be written there (see result_pipe()). */
static int result_fd = -1;
static dev_t result_dev;
static ino_t result_ino;

static void
block_signals(void)
{
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGQUIT);
    sigaddset(&block, SIGALRM);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &block, &saved_mask);
}

/* The fork step itself, shared with the fast path (_forkfast.c): see
 * _forkstep.h. */
int
ps_fork_step(int die_with_parent, int want_pidfd, int keep_write, pid_t *pid_out, int *fd_out,
             int *pidfd_out)
{
    int fds[2], flags, saved_errno, pidfd = -1;
    pid_t parent, pid;

    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_RuntimeError, "fork not supported for subinterpreters");
        return -1;
    }
    if (PySys_Audit("os.fork", NULL) < 0) {
        return -1;
    }
    if (reserve_private() < 0) {
        return -1;
    }
    parent = getpid();
    if (private_owner != parent) {
        n_private = 0;
        n_kept = 0;
        private_owner = parent;
    }
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    flags = fcntl(fds[1], F_GETFL);
    if (flags == -1 || fcntl(fds[1], F_SETFL, flags & ~O_NONBLOCK) == -1) {
        saved_errno = errno;
        close(fds[0]);
        close(fds[1]);
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    block_signals();
    PyOS_BeforeFork();
    pid = fork();
    saved_errno = errno;
    if (pid == 0) {
        PyOS_AfterFork_Child();
        /* The parent's, not ours: forgotten without a decref, which would
         * free the tuple and its numbers here, writing (copying) the pages
         * they live on; the child's memory goes with it at exit anyway. */
        last_fork = NULL;
        close(fds[0]);
        close_inherited_private();
        n_private = 0;
        n_kept = 0;
        private_fds[n_private++] = fds[1]; /* reserved above */
        private_owner = getpid();
        struct stat st;
        result_fd = -1;
        if (fstat(fds[1], &st) == 0) {
            result_fd = fds[1];
            result_dev = st.st_dev;
            result_ino = st.st_ino;
        }
        if (die_with_parent) {
#ifdef __linux__
            prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
#endif
            if (getppid() != parent) {
                /* The parent died before the prctl took effect. */
                kill(getpid(), SIGKILL);
            }
        }
        *pid_out = 0;
        *fd_out = fds[1];
        *pidfd_out = -1;
        return 0;
    }
    PyOS_AfterFork_Parent();
    if (pid == -1) {
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL);
        close(fds[0]);
        close(fds[1]);
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    private_fds[n_private++] = fds[0]; /* reserved above */
#ifdef SYS_pidfd_open
    if (want_pidfd) {
        pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    }
#else
    (void)want_pidfd;
#endif
    if (pidfd >= 0) {
        private_fds[n_private++] = pidfd;
    }
    if (keep_write && pidfd >= 0 && n_kept < MAX_KEPT) {
        private_fds[n_private++] = fds[1];
        kept_read[n_kept] = fds[0];
        kept_write[n_kept++] = fds[1];
    }
    else {
        close(fds[1]);
    }
    *pid_out = pid;
    *fd_out = fds[0];
    *pidfd_out = pidfd < 0 ? -1 : pidfd;
    return 0;
}

void
ps_restore_mask(void)
{
    pthread_sigmask(SIG_SETMASK, &saved_mask, NULL);
}

static PyObject *
forkstep_fork(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    int die_with_parent, want_pidfd, fd, pidfd;
    long token = 0;
    pid_t pid;

    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fork() takes die_with_parent, want_pidfd[, token]");
        return NULL;
    }
    if (nargs == 3) {
        token = PyLong_AsLong(args[2]);
        if (token == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    die_with_parent = PyObject_IsTrue(args[0]);
    if (die_with_parent < 0) {
        return NULL;
    }
    want_pidfd = PyObject_IsTrue(args[1]);
    if (want_pidfd < 0) {
        return NULL;
    }
    if (ps_fork_step(die_with_parent, want_pidfd, 0, &pid, &fd, &pidfd) < 0) {
        return NULL;
    }
    if (pid == 0) {
        return Py_BuildValue("(iiO)", 0, fd, Py_None);
    }
    PyObject *result;
    if (pidfd >= 0) {
        result = Py_BuildValue("(iii)", (int)pid, fd, pidfd);
    }
    else {
        result = Py_BuildValue("(iiO)", (int)pid, fd, Py_None);
    }
    Py_XSETREF(last_fork, Py_XNewRef(result));
    last_token = token;
    /* Restored last: a KeyboardInterrupt cannot separate the fork from the
     * descriptors that let the engine reap the child (and if it lands just
     * after this call returns, unclaimed() still has them). */
    ps_restore_mask();
    return result;
}

static PyObject *
forkstep_unclaimed(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long token = PyLong_AsLong(arg);
    if (token == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (last_fork == NULL || token != last_token) {
        Py_RETURN_NONE; /* that call never forked (or another fork came since) */
    }
    PyObject *result = last_fork;
    last_fork = NULL;
    return result;
}

static PyObject *
forkstep_unblock(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    pthread_sigmask(SIG_SETMASK, &saved_mask, NULL);
    Py_RETURN_NONE;
}

static PyObject *flush_name; /* "flush", interned by the module's init */
static PyObject *sys_dict, *stream_names[2]; /* sys.__dict__, "stdout", "stderr" */

/* sys.stdout (0) or sys.stderr (1), borrowed, or NULL (no error set). */
static PyObject *
ps_std_stream(int which)
{
    /* PySys_GetObject() without its per-call name object (made and hashed
     * on every call: copied pages in a child about to exit). */
    PyObject *stream = PyDict_GetItemWithError(sys_dict, stream_names[which]); /* borrowed */
    if (stream == NULL) {
        PyErr_Clear();
    }
    return stream;
}

PyObject *
ps_flush_stream(int which)
{
    PyObject *stream = ps_std_stream(which);
    if (stream == NULL || stream == Py_None) {
        return Py_NewRef(Py_None);
    }
    /* No bound method and no name object made per call: a child calls this
     * as it ends, where each object written is a copied page. */
    Py_INCREF(stream); /* (a flush may run Python that replaces sys.stdout) */
    PyObject *r = PyObject_CallMethodNoArgs(stream, flush_name);
    Py_DECREF(stream);
    return r;
}

static void
flush_stream(int which)
{
    Py_XDECREF(ps_flush_stream(which));
    PyErr_Clear(); /* a failed flush must not stop the exit */
}

static void
ps_flush_stdio(void)
{
    flush_stream(0);
    flush_stream(1);
}

void
ps_exit(long status)
{
    ps_flush_stdio();
    if (status < 0 && status > -NSIG) {
        /* End by the signal, with its default action, as the parent expects of
         * a child that unwound from a cancel (and as CPython ends itself after
         * an unhandled KeyboardInterrupt). */
        int signum = (int)-status;
        sigset_t only;
        signal(signum, SIG_DFL);
        sigemptyset(&only);
        sigaddset(&only, signum);
        pthread_sigmask(SIG_UNBLOCK, &only, NULL);
        kill(getpid(), signum);
        _exit(128 + signum); /* a signal whose default is to be ignored */
    }
    _exit((int)status);
}

static PyObject *
forkstep_exit(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long status = PyLong_AsLong(arg);
    if (status == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        status = 1;
    }
    ps_exit(status);
}

/* poll1(fd, timeout_ms) -> [fd] or []: poll() on one descriptor for POLLIN
 * (timeout_ms < 0: forever), the GIL released. The common wait of join()
 * (a child's pidfd): select.poll's object, registration and result list
 * are a dozen Python objects written while the child still shares this
 * process's pages, each a copied page. EINTR runs the signal handlers (one
 * that raises, a KeyboardInterrupt, propagates) and retries with the time
 * left, as PEP 475 says. */
static PyObject *
forkstep_poll1(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "poll1(fd, timeout_ms)");
        return NULL;
    }
    long value = PyLong_AsLong(args[0]);
    if (value == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (value < 0 || value > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "not a file descriptor: %ld", value);
        return NULL;
    }
    int fd = (int)value;
    long ms = PyLong_AsLong(args[1]);
    if (ms == -1 && PyErr_Occurred()) {
        return NULL;
    }
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long left = ms;
    int rc;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = poll(&p, 1, left < 0 ? -1 : (left > INT_MAX ? INT_MAX : (int)left));
        Py_END_ALLOW_THREADS
        if (rc >= 0) {
            break;
        }
        if (errno != EINTR) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
        if (ms >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long spent = (long)(now.tv_sec - start.tv_sec) * 1000 +
                         (long)(now.tv_nsec - start.tv_nsec) / 1000000;
            left = ms - spent;
            if (left < 0) {
                left = 0;
            }
        }
    }
    if (rc == 0 || p.revents == 0) {
        return PyList_New(0);
    }
    return Py_BuildValue("[i]", fd);
}

/* python_threads() -> the number of Python threads (threading._active and
 * _limbo, set once by threads_setup()): threading.active_count() without
 * its lock and without touching the dictionaries' reference counts, since a
 * forked child asks as it ends, where each object written is a copied page.
 * threading keeps both dictionaries for good (it clears them in place). */
static PyObject *threads_active, *threads_limbo;

static PyObject *
forkstep_threads_setup(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "threads_setup(threading._active, threading._limbo)");
        return NULL;
    }
    Py_XSETREF(threads_active, Py_NewRef(args[0]));
    Py_XSETREF(threads_limbo, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

Py_ssize_t
ps_python_threads(void)
{
    if (threads_active == NULL || threads_limbo == NULL) {
        return -1;
    }
    return PyDict_GET_SIZE(threads_active) + PyDict_GET_SIZE(threads_limbo);
}

static PyObject *
forkstep_python_threads(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    Py_ssize_t n = ps_python_threads();
    if (n < 0) {
        PyErr_SetString(PyExc_RuntimeError, "python_threads() before threads_setup()");
        return NULL;
    }
    return PyLong_FromSsize_t(n);
}

/* result_pipe(fd) -> bool: whether fd is still this child's result pipe. */
static PyObject *
forkstep_result_pipe(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    struct stat st;
    return PyBool_FromLong(fd >= 0 && fd == result_fd && fstat((int)fd, &st) == 0 &&
                           st.st_dev == result_dev && st.st_ino == result_ino);
}

static PyMethodDef forkstep_methods[] = {
    {"result_pipe", forkstep_result_pipe, METH_O,
     "result_pipe(fd) -> whether fd is still the result pipe the fork step gave this child "
     "(not closed, and not a number reused for another file since)."},
    {"adopt", forkstep_adopt, METH_O,
     "adopt(fd): children forked from now on close fd first thing (until close(fd))."},
    {"close", forkstep_close, METH_O,
     "close(fd): close a descriptor fork() returned (EBADF ignored); children stop "
     "closing it."},
    {"poll1", (PyCFunction)(void (*)(void))forkstep_poll1, METH_FASTCALL,
     "poll1(fd, timeout_ms) -> [fd] if fd became readable (or hung up), else []; "
     "timeout_ms < 0 waits forever. EINTR runs signal handlers and retries."},
    {"python_threads", forkstep_python_threads, METH_NOARGS,
     "The number of Python threads (len(threading._active) + len(threading._limbo))."},
    {"threads_setup", (PyCFunction)(void (*)(void))forkstep_threads_setup, METH_FASTCALL,
     "threads_setup(threading._active, threading._limbo): what python_threads() counts."},
    {"private", forkstep_private, METH_NOARGS,
     "The descriptors a child made now would close first thing (for tests)."},
    {"exit", forkstep_exit, METH_O,
     "exit(status): flush sys.stdout and sys.stderr (ignoring errors), then _exit(status); "
     "a negative status ends the process by signal -status (its default action)."},
    {"fork", (PyCFunction)(void (*)(void))forkstep_fork, METH_FASTCALL,
     "fork(die_with_parent, want_pidfd[, token]) -> (pid, fd, pidfd or None): in the child "
     "(0, write end, None) "
     "with the fork-blocked signals still blocked (call unblock()); in the parent (pid, "
     "read end, pidfd)."},
    {"unblock", forkstep_unblock, METH_NOARGS,
     "In the child: restore the signal mask fork() saved."},
    {"unclaimed", forkstep_unclaimed, METH_O,
     "unclaimed(token) -> the (pid, fd, pidfd) of the last fork if it was made with "
     "this token (its caller may have lost it to an exception), else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef forkstep_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "procshare._backends.posix._forkstep",
    .m_doc = "The fork step of procshare's process backend (pipe, signal mask, fork, pidfd).",
    .m_size = -1,
    .m_methods = forkstep_methods,
};

PyMODINIT_FUNC
PyInit__forkstep(void)
{
    flush_name = PyUnicode_InternFromString("flush");
    stream_names[0] = PyUnicode_InternFromString("stdout");
    stream_names[1] = PyUnicode_InternFromString("stderr");
    PyObject *sys = PyImport_ImportModule("sys");
    if (sys != NULL) {
        sys_dict = Py_NewRef(PyModule_GetDict(sys));
        Py_DECREF(sys);
    }
    if (flush_name == NULL || stream_names[0] == NULL || stream_names[1] == NULL ||
        sys_dict == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&forkstep_module);
    if (module != NULL && ps_fast_init(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
