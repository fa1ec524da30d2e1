/* The common case of Child.join() in C (issue 16): see _forkfast.c, whose
 * state (_forkfast.h) it reads. The handle class the front end's Child
 * derives from: join() waits for the child, reaps it and finishes its
 * record; anything unusual goes to the Python join (self._join(timeout)). */
#include "_forkfast.h"

#include <errno.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

/* ----------------------------------------------------------------- handle */


/* poll() for POLLIN on n descriptors, at most ms (< 0: forever), the GIL
 * released; EINTR runs the signal handlers and retries with the time left.
 * Returns poll()'s count, or -1 with an exception set. */
static int
wait_fds(struct pollfd *p, int n, long ms)
{
    double start = now();
    long left = ms;
    for (;;) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = poll(p, (nfds_t)n, left < 0 ? -1 : (left > INT_MAX ? INT_MAX : (int)left));
        Py_END_ALLOW_THREADS
        if (rc >= 0) {
            return rc;
        }
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
        if (ms >= 0) {
            left = ms - (long)((now() - start) * 1000.0);
            if (left < 0) {
                left = 0;
            }
        }
    }
}

static long
to_ms(double seconds)
{
    double ms = seconds * 1000.0 + 0.999;
    return ms < 0 ? 0 : (ms > (double)INT_MAX ? INT_MAX : (long)ms);
}

/* Append what the pipe holds now to rec.buf (at most up to `limit` bytes in
 * all); 1 if it reached end of file, 0 if not (EAGAIN, or the limit). */
static int
read_rest(PyObject *rec, int fd, Py_ssize_t limit)
{
    char first[64]; /* small: a child that sent nothing costs no stack page */
    for (;;) {
        PyObject *buf = SLOT(rec, roff[R_BUF]);
        Py_ssize_t have = PyByteArray_CheckExact(buf) ? PyByteArray_GET_SIZE(buf) : 0;
        if (have >= limit) {
            return 0;
        }
        ssize_t n;
        if (have == 0) {
            n = read(fd, first, sizeof first);
        }
        else {
            Py_ssize_t room = limit - have < 65536 ? limit - have : 65536;
            if (PyByteArray_Resize(buf, have + room) < 0) {
                PyErr_Clear();
                return 0;
            }
            n = read(fd, PyByteArray_AS_STRING(buf) + have, (size_t)room);
            PyByteArray_Resize(buf, have + (n > 0 ? n : 0)); /* shrinking cannot fail */
        }
        if (n == 0) {
            put(rec, roff[R_EOF], Py_NewRef(Py_True));
            return 1;
        }
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return 0; /* EAGAIN: nothing more yet (or a grandchild keeps the pipe open) */
        }
        if (have == 0) {
            if (!PyByteArray_CheckExact(buf)) {
                buf = PyByteArray_FromStringAndSize(first, n);
                if (buf == NULL) {
                    PyErr_Clear();
                    return 0;
                }
                put(rec, roff[R_BUF], buf);
            }
            else if (PyByteArray_Resize(buf, n) < 0) {
                PyErr_Clear();
                return 0;
            }
            else {
                memcpy(PyByteArray_AS_STRING(buf), first, (size_t)n);
            }
        }
    }
}

/* Results up to this size are read here; a bigger one is left to the
 * Python path, which enlarges the pipe (transport._BIG_RESULT). */
#define READ_HERE 65536

/* Wait for the child's exit as ChildrenPart.wait does, warning once after
 * DEADLOCK_WATCH seconds: on the pidfd and the pipe (reading what comes),
 * after _EXIT_FIRST seconds on the pidfd alone if the child's exit makes
 * the pipe hang up (it does not when the parent kept the write end: then
 * the parent wakes once, for the exit). 1: it exited; 0: take the Python
 * path (a large result); -1: an exception is set. */
static int
wait_exit(PyObject *part, PyObject *rec, int pidfd, int result_fd)
{
    struct pollfd p[2] = {{.fd = pidfd, .events = POLLIN}, {.fd = result_fd, .events = POLLIN}};
    int rc;
    if (result_fd < 0 || !ps_write_kept(result_fd)) {
        rc = wait_fds(p, 1, to_ms(global_seconds(k_first, 0.002)));
        if (rc != 0) {
            return rc < 0 ? -1 : 1;
        }
    }
    double watch = now() + global_seconds(k_watch, 5.0);
    int warned = 0;
    for (;;) {
        long ms = -1;
        if (!warned) {
            double left = watch - now();
            ms = left <= 0 ? 0 : to_ms(left);
        }
        p[0].revents = p[1].revents = 0;
        rc = wait_fds(p, result_fd >= 0 ? 2 : 1, ms);
        if (rc < 0) {
            return -1;
        }
        if (p[0].revents) {
            return 1;
        }
        if (rc > 0) {
            /* The pipe: data, or end of file (the child is exiting). */
            PyObject *buf = SLOT(rec, roff[R_BUF]);
            Py_ssize_t had = PyByteArray_CheckExact(buf) ? PyByteArray_GET_SIZE(buf) : 0;
            if (read_rest(rec, result_fd, READ_HERE)) {
                result_fd = -1; /* all in: wait for the exit only */
                continue;
            }
            buf = SLOT(rec, roff[R_BUF]);
            Py_ssize_t has = PyByteArray_CheckExact(buf) ? PyByteArray_GET_SIZE(buf) : 0;
            if (has >= READ_HERE) {
                return 0;
            }
            if (has == had) {
                result_fd = -1; /* ready but empty (an error?): the exit tells */
            }
            continue;
        }
        if (!warned) {
            warned = 1;
            PyObject *r = PyObject_CallMethodNoArgs(part, k_warn);
            if (r == NULL) {
                return -1;
            }
            Py_DECREF(r);
        }
    }
}

/* The fast join: the value (None), or NULL with *slow set: take the Python
 * path, or NULL with *slow clear: an error. */
static PyObject *
fast_join(HandleObject *self, int *slow)
{
    *slow = 1;
    PyObject *rec = self->rec, *part = self->part;
    if (!fast_ready || !fast_on || rec == NULL || part == NULL ||
        !PyObject_TypeCheck(rec, record_type) || !PyObject_TypeCheck(part, part_type)) {
        return NULL;
    }
    PyObject *engine = SLOT(part, poff[P_ENGINE]);
    long pid, epid, mypid, wait_fd, result_fd = -1, result_orig = -1;
    PyObject *result_obj = SLOT(rec, roff[R_RESULT_FD]);
    PyObject *wait_obj = SLOT(rec, roff[R_WAIT_FD]);
    if (SLOT(rec, roff[R_DONE]) != Py_False || SLOT(rec, roff[R_DEADLINE]) != Py_None ||
        engine == NULL || !PyObject_TypeCheck(engine, engine_type) ||
        !as_long(SLOT(engine, eoff[E_PID]), &epid) || !as_long(global(core_g, k_pid), &mypid) ||
        epid != mypid || !as_long(SLOT(rec, roff[R_PID]), &pid) || pid <= 0 ||
        !as_long(wait_obj, &wait_fd) ||
        (result_obj != Py_None && !as_long(result_obj, &result_fd))) {
        return NULL;
    }
    result_orig = result_fd;
    if (SLOT(rec, roff[R_EOF]) != Py_False) {
        result_fd = -1; /* all its data is in: wait for the exit only */
    }
    Py_INCREF(rec); /* the handle's slots may change while the GIL is released */
    Py_INCREF(part);
    PyObject *value = NULL;
    int ready = wait_exit(part, rec, (int)wait_fd, (int)result_fd);
    if (ready < 0) {
        *slow = 0;
        goto done;
    }
    /* Another thread may have finished it (or closed its descriptors) meanwhile. */
    if (ready == 0 || SLOT(rec, roff[R_DONE]) != Py_False ||
        SLOT(rec, roff[R_WAIT_FD]) != wait_obj || SLOT(rec, roff[R_RESULT_FD]) != result_obj) {
        goto done;
    }
    int status;
    pid_t got = waitpid((pid_t)pid, &status, WNOHANG);
    if (got != (pid_t)pid) {
        goto done; /* not yet, or not ours any more: the Python path says which */
    }
    /* Reaped: finish the record before anything can release the GIL (no
     * Python runs until it is done), as ChildrenPart._finish does. */
    *slow = 0;
    PyObject *exit_;
    if (status == 0) {
        exit_ = Py_NewRef(exit_ok);
    }
    else {
        PyObject *code = WIFSIGNALED(status) ? Py_NewRef(Py_None) : PyLong_FromLong(WEXITSTATUS(status));
        PyObject *sig = WIFSIGNALED(status) ? PyLong_FromLong(WTERMSIG(status)) : Py_NewRef(Py_None);
        exit_ = exit_type->tp_alloc(exit_type, 2);
        if (exit_ == NULL || code == NULL || sig == NULL) {
            Py_XDECREF(code);
            Py_XDECREF(sig);
            Py_XDECREF(exit_);
            exit_ = Py_NewRef(Py_None); /* no memory: recorded as lost, never left unreaped */
            put(rec, roff[R_LOST], Py_NewRef(Py_True));
        }
        else {
            PyTuple_SET_ITEM(exit_, 0, code);
            PyTuple_SET_ITEM(exit_, 1, sig);
        }
    }
    put(rec, roff[R_EXIT], exit_);
    if (result_fd >= 0 && SLOT(rec, roff[R_EOF]) == Py_False) {
        read_rest(rec, (int)result_fd, PY_SSIZE_T_MAX); /* the child is gone: all is in */
    }
    if (result_obj != Py_None) {
        ps_close_fd((int)result_orig);
    }
    ps_close_fd((int)wait_fd);
    put(rec, roff[R_RESULT_FD], Py_NewRef(Py_None));
    put(rec, roff[R_WAIT_FD], Py_NewRef(Py_None));
    put(rec, roff[R_DONE], Py_NewRef(Py_True));
    PyObject *key = SLOT(rec, roff[R_PID]);
    if (PyDict_DelItem(SLOT(part, poff[P_LIVE]), key) < 0) {
        PyErr_Clear();
    }
    if (!is_zero(SLOT(engine, eoff[E_DEFERRED]))) {
        put(engine, eoff[E_PENDING], Py_NewRef(Py_True)); /* a release waits for children */
    }
    n_joins++;
    /* Done: from here on Python may run. */
    PyObject *buf = SLOT(rec, roff[R_BUF]);
    if (PyObject_Length(buf) > 0) {
        PyObject *r = PyObject_CallMethodOneArg(part, k_check_held, rec);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }
    if (exit_ != exit_ok || PyObject_Length(SLOT(rec, roff[R_BUF])) != 0 ||
        SLOT(rec, roff[R_DECODED]) != Py_None) {
        value = PyObject_CallMethodNoArgs((PyObject *)self, k_joined);
        goto done;
    }
    /* Returned None: _poll_if_asked(), then the outcome. */
    PyObject *current = global(core_g, k_engine);
    if (current != NULL && PyObject_TypeCheck(current, engine_type) &&
        (SLOT(current, eoff[E_PENDING]) != Py_False || SLOT(current, eoff[E_KEPT]) != Py_False)) {
        PyObject *r = PyObject_CallNoArgs(poll_if_asked);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }
    put(rec, roff[R_DECODED], Py_NewRef(returned_none));
    value = Py_NewRef(Py_None);
done:
    Py_DECREF(rec);
    Py_DECREF(part);
    return value;
}

static PyObject *
handle_join(HandleObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    int plain = nargs + nkw == 0 ||
                (nargs + nkw == 1 && args[0] == Py_None &&
                 (nkw == 0 || PyUnicode_CompareWithASCIIString(
                                  PyTuple_GET_ITEM(kwnames, 0), "timeout") == 0));
    if (plain) {
        int slow;
        PyObject *value = fast_join(self, &slow);
        if (!slow) {
            return value;
        }
    }
    /* The Python path, with the same arguments. */
    PyObject *stack[3];
    if (nargs + nkw > 2) {
        PyErr_SetString(PyExc_TypeError, "join() takes at most 1 argument (timeout)");
        return NULL;
    }
    stack[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++) {
        stack[i + 1] = args[i];
    }
    return PyObject_VectorcallMethod(k_join, stack, (size_t)(nargs + 1), kwnames);
}

static void
handle_finalize(HandleObject *self)
{
    /* What Child.__del__ did: a handle dropped unjoined marks its record
     * dropped (reaped at the next call into procshare). Nothing to do, and
     * nothing touched, when its child is done or a children() scope will
     * join it: ChildrenPart.drop() returns at once then, and calling it for
     * every handle a `for` loop drops wrote its function's and code's pages
     * in the parent, copies while the children forked before share them. */
    PyObject *rec = self->rec, *part = self->part;
    if (rec == NULL || part == NULL) {
        return;
    }
    if (record_type != NULL && PyObject_TypeCheck(rec, record_type)) {
        PyObject *scope = SLOT(rec, roff[R_SCOPE]);
        if (SLOT(rec, roff[R_DONE]) == Py_True || (scope != NULL && scope != Py_None)) {
            return;
        }
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodOneArg(part, k_drop, rec);
    if (r == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();
        }
        else {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
}

static int
handle_traverse(HandleObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->part);
    Py_VISIT(self->rec);
    return 0;
}

static int
handle_clear(HandleObject *self)
{
    Py_CLEAR(self->part);
    Py_CLEAR(self->rec);
    return 0;
}

static void
handle_dealloc(HandleObject *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    handle_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef handle_members[] = {
    {"_part", T_OBJECT_EX, offsetof(HandleObject, part), 0, NULL},
    {"_rec", T_OBJECT_EX, offsetof(HandleObject, rec), 0, NULL},
    {NULL},
};

static PyMethodDef handle_methods[] = {
    {"join", (PyCFunction)(void (*)(void))handle_join, METH_FASTCALL | METH_KEYWORDS,
     "join($self, /, timeout=None)\n--\n\n"
     "Wait for the child and return its function's return value (see Child.join; the "
     "common case in C, the rest through self._join(timeout))."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._backends.posix._forkstep.Handle",
    .tp_doc = "Base of a child's handle: the common case of join() in C.",
    .tp_basicsize = sizeof(HandleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)handle_traverse,
    .tp_clear = (inquiry)handle_clear,
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_finalize = (destructor)handle_finalize,
    .tp_weaklistoffset = offsetof(HandleObject, weakreflist),
    .tp_members = handle_members,
    .tp_methods = handle_methods,
};

