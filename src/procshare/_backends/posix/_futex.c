/* 32-bit words in shared memory: atomic operations and futex wait/wake.
 *
 * The one wait/wake primitive the coordination families (semaphore, event,
 * condition, barrier, rwlock, queue) are written on, in Python, in
 * procshare/_backends/posix/sync.py and procshare/_sync.py. A Words object
 * wraps a writable buffer (a slice of a sync object's data area) and
 * addresses it by byte offset.
 *
 * Why a futex and not a process-shared pthread condition variable: glibc's
 * condvar is not robust (its internal lock is a plain futex, and a waiter
 * that dies consumes a pthread_cond_signal). A futex word needs no lock:
 * FUTEX_WAIT sleeps only while the word still holds the value the caller
 * saw, so a wake can never be lost between "look" and "sleep", and a waiter
 * that dies simply leaves the kernel's queue.
 *
 * Waits use FUTEX_WAIT_BITSET with an absolute CLOCK_MONOTONIC deadline, so
 * a wait interrupted by a signal (EINTR) resumes with the time it has left;
 * between the two, PyErr_CheckSignals() runs Python's handlers, as CPython's
 * own semaphore.c does, so Ctrl-C interrupts a wait at once. The words are
 * shared between processes: never FUTEX_PRIVATE_FLAG.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <string.h>
#include <math.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    int detaching;  /* detach() asked while threads waited: the last one releases */
    long busy;      /* threads of this process blocked in wait() or a ring copy */
    /* ring_setup(): a queue's geometry (see the ring section below) */
    Py_ssize_t ring_desc;  /* offset of the descriptors */
    Py_ssize_t ring_data;  /* offset of the ring's bytes */
    uint32_t ring_slots;   /* descriptors (a power of two) */
    uint32_t ring_cap;     /* ring bytes (a power of two) */
    uint32_t ring_max;     /* maxsize (0: none) */
} WordsObject;

static int
check_open(WordsObject *self)
{
    if (!self->has_view || self->detaching) {
        PyErr_SetString(PyExc_ValueError, "futex words are detached");
        return -1;
    }
    return 0;
}

static uint32_t *
word_at(WordsObject *self, Py_ssize_t offset)
{
    if (check_open(self) < 0) {
        return NULL;
    }
    if (offset < 0 || offset % 4 != 0 || offset + 4 > self->view.len) {
        PyErr_Format(PyExc_ValueError,
                     "futex word offset %zd is not a 4-byte aligned offset within %zd bytes",
                     offset, self->view.len);
        return NULL;
    }
    return (uint32_t *)((char *)self->view.buf + offset);
}

static int
Words_init(WordsObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *buffer;
    static char *kwlist[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &buffer)) {
        return -1;
    }
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Words already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (((uintptr_t)self->view.buf % 4) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "futex words must be 4-byte aligned");
        return -1;
    }
    self->has_view = 1;
    return 0;
}

static void
Words_dealloc(WordsObject *self)
{
    if (self->has_view) {
        PyBuffer_Release(&self->view);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Words_load(WordsObject *self, PyObject *arg)
{
    Py_ssize_t offset = PyLong_AsSsize_t(arg);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint32_t *w = word_at(self, offset);
    if (w == NULL) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(__atomic_load_n(w, __ATOMIC_SEQ_CST));
}

static PyObject *
Words_store(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store(offset, value)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long value = PyLong_AsUnsignedLongMask(args[1]);
    if (value == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    uint32_t *w = word_at(self, offset);
    if (w == NULL) {
        return NULL;
    }
    __atomic_store_n(w, (uint32_t)value, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* cas(offset, expected, new) -> bool: store new if the word holds expected. */
static PyObject *
Words_cas(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "cas(offset, expected, new)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long expected = PyLong_AsUnsignedLongMask(args[1]);
    unsigned long desired = PyLong_AsUnsignedLongMask(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    uint32_t *w = word_at(self, offset);
    if (w == NULL) {
        return NULL;
    }
    uint32_t exp32 = (uint32_t)expected;
    int ok = __atomic_compare_exchange_n(w, &exp32, (uint32_t)desired, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    return PyBool_FromLong(ok);
}

/* add(offset, delta) -> the value before: a wrapping 32-bit fetch-and-add. */
static PyObject *
Words_add(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(offset, delta)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long delta = PyLong_AsLong(args[1]);
    if (delta == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint32_t *w = word_at(self, offset);
    if (w == NULL) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(__atomic_fetch_add(w, (uint32_t)delta, __ATOMIC_SEQ_CST));
}

static int
deadline_after(double timeout, struct timespec *deadline)
{
    if (clock_gettime(CLOCK_MONOTONIC, deadline) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (timeout > 1e9) {
        timeout = 1e9; /* ~31 years: no overflow of tv_sec */
    }
    double whole = floor(timeout);
    deadline->tv_sec += (time_t)whole;
    deadline->tv_nsec += (long)((timeout - whole) * 1e9);
    if (deadline->tv_nsec >= 1000000000L) {
        deadline->tv_sec += 1;
        deadline->tv_nsec -= 1000000000L;
    }
    return 0;
}

/* wait(offset, expected, timeout) -> bool
 *
 * Sleep while the word holds `expected`, at most `timeout` seconds (None:
 * forever). True when woken or when the word no longer held `expected`
 * (callers look again: a wake may be spurious); False when the time ran out.
 * A signal runs Python's handlers; an exception from one (KeyboardInterrupt)
 * propagates, otherwise the wait goes on until the same deadline. */
static PyObject *
Words_wait(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "wait(offset, expected, timeout)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long expected = PyLong_AsUnsignedLongMask(args[1]);
    if (expected == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    struct timespec deadline;
    int timed = 0;
    if (args[2] != Py_None) {
        double timeout = PyFloat_AsDouble(args[2]);
        if (timeout == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (isnan(timeout) || timeout < 0) {
            PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
            return NULL;
        }
        if (deadline_after(timeout, &deadline) < 0) {
            return NULL;
        }
        timed = 1;
    }
    uint32_t *w = word_at(self, offset);
    if (w == NULL) {
        return NULL;
    }
    PyObject *result = NULL;
    self->busy++;
    for (;;) {
        if (__atomic_load_n(w, __ATOMIC_SEQ_CST) != (uint32_t)expected) {
            result = Py_True;
            break;
        }
        long rc;
        int err;
        Py_BEGIN_ALLOW_THREADS
        rc = syscall(SYS_futex, w, FUTEX_WAIT_BITSET, (uint32_t)expected,
                     timed ? &deadline : NULL, NULL, FUTEX_BITSET_MATCH_ANY);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0 || err == EAGAIN) {
            result = Py_True;
            break;
        }
        if (err == ETIMEDOUT) {
            result = Py_False;
            break;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                break;
            }
            continue;
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
    self->busy--;
    if (self->busy == 0 && self->detaching && self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_XINCREF(result);
    return result;
}

/* wake(offset, n) -> how many sleepers were woken (n < 0: all of them). */
static PyObject *
Words_wake(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "wake(offset, n)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long n = PyLong_AsLong(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint32_t *w = word_at(self, offset);
    if (w == NULL) {
        return NULL;
    }
    int count = (n < 0 || n > INT32_MAX) ? INT32_MAX : (int)n;
    long rc = syscall(SYS_futex, w, FUTEX_WAKE, count, NULL, NULL, 0);
    if (rc < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(rc);
}


#include "_futex_ring.h"
#include "_futex_holds.h"

/* in_use() -> whether a thread of this process waits on these words now. */
static PyObject *
Words_in_use(WordsObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->busy > 0);
}

/* detach(): let go of the memory; deferred to the last waiter if any. */
static PyObject *
Words_detach(WordsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->has_view) {
        if (self->busy > 0) {
            self->detaching = 1;
        }
        else {
            PyBuffer_Release(&self->view);
            self->has_view = 0;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
Words_get_size(WordsObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->has_view ? self->view.len : 0);
}

static PyMethodDef Words_methods[] = {
    {"load", (PyCFunction)Words_load, METH_O, "load(offset) -> the 32-bit word there"},
    {"store", (PyCFunction)(void (*)(void))Words_store, METH_FASTCALL, "store(offset, value)"},
    {"cas", (PyCFunction)(void (*)(void))Words_cas, METH_FASTCALL,
     "cas(offset, expected, new) -> whether the word held expected (and now new)"},
    {"add", (PyCFunction)(void (*)(void))Words_add, METH_FASTCALL,
     "add(offset, delta) -> the value before (wrapping 32-bit)"},
    {"wait", (PyCFunction)(void (*)(void))Words_wait, METH_FASTCALL,
     "wait(offset, expected, timeout) -> False if the time ran out"},
    {"wake", (PyCFunction)(void (*)(void))Words_wake, METH_FASTCALL,
     "wake(offset, n) -> sleepers woken (n < 0: all)"},
    {"in_use", (PyCFunction)Words_in_use, METH_NOARGS, "whether a thread waits on it now"},
    {"ring_setup", (PyCFunction)Words_ring_setup, METH_VARARGS,
     "ring_setup(desc, data, slots, cap, maxsize): a queue's geometry"},
    {"ring_put", (PyCFunction)(void (*)(void))Words_ring_put, METH_FASTCALL,
     "ring_put(parts, pid, start) -> False to go the slow way"},
    {"ring_get", (PyCFunction)(void (*)(void))Words_ring_get, METH_FASTCALL,
     "ring_get(pid, start) -> (descriptor, offset, length) or None to go the slow way"},
    {"ring_free", (PyCFunction)Words_ring_free, METH_O, "ring_free(descriptor)"},
    {"ring_ready", (PyCFunction)Words_ring_ready, METH_NOARGS,
     "ring_ready() -> READY records now (a snapshot)"},
    {"hold", (PyCFunction)(void (*)(void))Words_hold, METH_FASTCALL,
     "hold(op, pid, start, hint, nslots) -> slot, or -1 to go slow"},
    {"detach", (PyCFunction)Words_detach, METH_NOARGS, "let go of the memory"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Words_getset[] = {
    {"size", (getter)Words_get_size, NULL, "bytes addressed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WordsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "procshare._backends.posix._futex.Words",
    .tp_basicsize = sizeof(WordsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "32-bit words in a shared buffer: atomics and futex wait/wake.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Words_init,
    .tp_dealloc = (destructor)Words_dealloc,
    .tp_methods = Words_methods,
    .tp_getset = Words_getset,
};

static struct PyModuleDef futex_module = {
    PyModuleDef_HEAD_INIT,
    "_futex",
    "Atomic 32-bit words and futex wait/wake in shared memory.",
    -1,
    NULL,
};

PyMODINIT_FUNC
PyInit__futex(void)
{
    if (PyType_Ready(&WordsType) < 0 || PyType_Ready(&HoldGuardType) < 0) {
        return NULL;
    }
    holds_pid = getpid();
    pthread_atfork(NULL, NULL, holds_after_fork);
    PyObject *m = PyModule_Create(&futex_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&WordsType);
    if (PyModule_AddObject(m, "Words", (PyObject *)&WordsType) < 0) {
        Py_DECREF(&WordsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HoldGuardType);
    if (PyModule_AddObject(m, "HoldGuard", (PyObject *)&HoldGuardType) < 0) {
        Py_DECREF(&HoldGuardType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
