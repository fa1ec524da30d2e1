/* Part of _forkstep.c (included there, once): the descriptors private to the
 * parent (see the top of _forkstep.c): their list, the result pipes whose
 * write end the parent keeps, what a child does with the ones it inherited,
 * and the module functions close(), adopt() and private(). */

/* The parent-private descriptors; only touched with the GIL held. */
static int *private_fds;
static Py_ssize_t n_private, cap_private;
/* The process the list belongs to. A process that inherited it through a
 * fork that was not ours (os.fork) may have closed those descriptors and
 * reused their numbers: it forgets the list instead of closing anything. */
static pid_t private_owner;

/* Result pipes whose write end the parent keeps open (the fast start's,
 * see _forkstep.h): read end -> write end. The write end is private too
 * (children close it), and closing the read end closes it. */
#define MAX_KEPT 8
static int kept_read[MAX_KEPT], kept_write[MAX_KEPT];
static int n_kept;

/* Room for three more entries; -1 with MemoryError set if there is none. */
static int
reserve_private(void)
{
    if (n_private + 3 <= cap_private) {
        return 0;
    }
    Py_ssize_t cap = cap_private ? cap_private * 2 : 64;
    int *grown = PyMem_RawRealloc(private_fds, (size_t)cap * sizeof(int));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    private_fds = grown;
    cap_private = cap;
    return 0;
}

/* In a child: close the parent-private descriptors it inherited. They are
 * mostly a run of consecutive numbers (each fork makes a pipe and a pidfd,
 * and the parent reuses the numbers it frees), so after a sort each run
 * goes in one close_range() (Linux 5.9) instead of a close() each: a child
 * forked while 100 siblings are unreaped inherited ~200 of them. The list
 * is the child's own copy, sorted in place (it is reset right after) by
 * insertion: it is nearly sorted already, and qsort would allocate. */
static void
close_inherited_private(void)
{
    static int no_close_range;
    for (Py_ssize_t i = 1; i < n_private; i++) {
        int fd = private_fds[i];
        Py_ssize_t j = i;
        for (; j > 0 && private_fds[j - 1] > fd; j--) {
            private_fds[j] = private_fds[j - 1];
        }
        private_fds[j] = fd;
    }
    for (Py_ssize_t i = 0; i < n_private;) {
        Py_ssize_t j = i;
        while (j + 1 < n_private && private_fds[j + 1] == private_fds[j] + 1) {
            j++;
        }
#ifdef SYS_close_range
        if (j > i && !no_close_range) {
            if (syscall(SYS_close_range, (unsigned int)private_fds[i],
                        (unsigned int)private_fds[j], 0U) == 0) {
                i = j + 1;
                continue;
            }
            no_close_range = errno == ENOSYS || errno == EPERM; /* (a seccomp filter) */
        }
#endif
        for (; i <= j; i++) {
            close(private_fds[i]);
        }
    }
}

static void
forget_private(int fd)
{
    for (Py_ssize_t i = n_private - 1; i >= 0; i--) {
        if (private_fds[i] == fd) {
            private_fds[i] = private_fds[--n_private];
            return;
        }
    }
}

int
ps_close_fd(int fd)
{
    forget_private(fd);
    int rc = close(fd) != 0 && errno != EBADF ? -1 : 0;
    int saved_errno = errno;
    for (int i = 0; i < n_kept; i++) {
        if (kept_read[i] == fd) {
            int w = kept_write[i];
            n_kept--;
            kept_read[i] = kept_read[n_kept];
            kept_write[i] = kept_write[n_kept];
            forget_private(w);
            close(w);
            break;
        }
    }
    errno = saved_errno;
    return rc;
}

int
ps_write_kept(int fd)
{
    for (int i = 0; i < n_kept; i++) {
        if (kept_read[i] == fd) {
            return 1;
        }
    }
    return 0;
}

/* A descriptor number given to close() or adopt(), or -1 with an exception set. */
static int
fd_argument(PyObject *arg)
{
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < 0 || value > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "not a file descriptor: %ld", value);
        return -1;
    }
    return (int)value;
}

static PyObject *
forkstep_close(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int value = fd_argument(arg);
    if (value < 0) {
        return NULL;
    }
    if (ps_close_fd(value) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* adopt(fd): record a descriptor this process made itself (a pool's end of a
 * worker's socket) as private, so every child forked later closes it first
 * thing, as it closes result pipes: a worker must not keep its siblings'
 * channels open, or a sibling would never see the parent let go of them. */
static PyObject *
forkstep_adopt(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int value = fd_argument(arg);
    if (value < 0) {
        return NULL;
    }
    pid_t self = getpid();
    if (private_owner != self) {
        n_private = 0; /* inherited through a fork that was not ours: forget it */
        n_kept = 0;
        private_owner = self;
    }
    if (reserve_private() < 0) {
        return NULL;
    }
    forget_private(value);
    private_fds[n_private++] = value;
    Py_RETURN_NONE;
}

static PyObject *
forkstep_private(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    PyObject *list = PyList_New(n_private);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n_private; i++) {
        PyObject *fd = PyLong_FromLong(private_fds[i]);
        if (fd == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, fd);
    }
    return list;
}
