/* A robust, process-shared pthread mutex living in shared memory.
 *
 * Why C and not ctypes: an uncontended `with lock:` must stay within 2.5x of
 * `with multiprocessing.Lock():`. Measured on the target machine, the leanest
 * ctypes version (PyDLL trylock + unlock, plus the owner-died flag check and
 * owner bookkeeping in Python) costs 3.3x; this module does the same work in
 * two C calls. Everything that is not the hot path stays in Python
 * (procshare/_backends/posix/lock.py and the engine).
 *
 * Memory layout: _lock_layout.h (a pthread_mutex_t, then our own words).
 *
 * The "unconfirmed" flag is ours because plain pthreads turn an unlock
 * without pthread_mutex_consistent() into ENOTRECOVERABLE, poisoned for good.
 * So on EOWNERDEAD we make the mutex consistent *at once* (as far as pthreads
 * is concerned) and keep the truth - "the data may be half-updated" - in our
 * flag, which only mark_consistent() clears. Every acquirer checks it.
 *
 * Ownership inside this process is (thread ident, fork generation, kernel
 * tid): pthread_self() repeats across fork, so a pthread_atfork child handler
 * bumps the generation, and the kernel tid the mutex word records is
 * compared too, so a stale record left by a thread that died holding the
 * lock (whose pthread_t may be reused) is never mistaken for ownership.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_lock_layout.h"

/* Result codes shared with lock.py (keep in sync with api_lock.py). */
enum {
    PSL_OK = 0,              /* acquired (or nested) / released */
    PSL_BUSY = 1,            /* trylock: somebody holds it */
    PSL_TIMEDOUT = 2,        /* timed wait ran out */
    PSL_OWNER_DIED = 3,      /* acquired; its holder died just now: unconfirmed */
    PSL_UNCONFIRMED = 4,     /* acquired; an earlier death was never confirmed */
    PSL_SELF_HELD = 5,       /* this thread holds it and reentrant is false */
    PSL_NOT_OWNER = 6,       /* release/mark_consistent by a non-owner */
    PSL_NOT_RECOVERABLE = 7, /* poisoned by code outside procshare */
};

static unsigned long fork_gen = 1;
static pid_t cached_pid;
/* The fork_gen of the last acquire in this process: equal to fork_gen once a
 * thread of this process (not its parent) has taken any mutex. */
static unsigned long taken_gen;
/* Mutexes a thread of this process (not its parent) holds now: one more when
 * a take makes depth 1, one less when a release makes it 0. It may only err
 * high (a thread that died holding one, a held Mutex deallocated), never
 * low: zero is the proof a forked child's C end relies on that it holds no
 * lock, without touching the Python objects of the locks it has. */
static long held_count;

static void
after_fork_child(void)
{
    fork_gen++;
    cached_pid = getpid();
    held_count = 0;
}

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    pthread_mutex_t *mutex;
    lock_state *state;
    unsigned long owner_ident;
    unsigned long owner_gen;
    uint32_t owner_ktid;
    long depth;
    long waiters; /* threads of this process blocked in acquire on this object */
} MutexObject;

static inline uint32_t
word(MutexObject *self)
{
    return __atomic_load_n((uint32_t *)self->mutex, __ATOMIC_RELAXED);
}

/* Whether the calling thread of this process holds the mutex through this object. */
static inline int
owned_by_me(MutexObject *self)
{
    if (self->depth <= 0 || self->owner_gen != fork_gen ||
        self->owner_ident != PyThread_get_thread_ident()) {
        return 0;
    }
    if ((word(self) & FUTEX_TID_MASK) != self->owner_ktid) {
        /* The thread that took it died holding it and its ident was reused. */
        self->depth = 0;
        return 0;
    }
    return 1;
}

static int
check_open(MutexObject *self)
{
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "robust mutex is detached");
        return -1;
    }
    return 0;
}

static int
Mutex_init(MutexObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *buffer;
    static char *kwlist[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &buffer)) {
        return -1;
    }
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Mutex already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (self->view.len < DATA_SIZE || ((uintptr_t)self->view.buf % 16) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_Format(PyExc_ValueError,
                     "a robust mutex needs %d writable bytes aligned to 16", DATA_SIZE);
        return -1;
    }
    self->has_view = 1;
    self->mutex = (pthread_mutex_t *)self->view.buf;
    self->state = (lock_state *)((char *)self->view.buf + STATE_OFFSET);
    self->depth = 0;
    return 0;
}

static void
Mutex_dealloc(MutexObject *self)
{
    /* Never unmap memory of a mutex we hold: the kernel walks it at thread
     * exit. The engine never drops a held Mutex; this is the last guard. */
    if (self->has_view && !(self->depth > 0 && self->owner_gen == fork_gen)) {
        PyBuffer_Release(&self->view);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Set up a fresh mutex and our words in the DATA_SIZE bytes at `mem`
 * (_lock_layout.h); 0, or -1 with OSError set. */
static int
initialise_memory(void *mem)
{
    int rc = lock_memory_initialise(mem);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* initialise(): set up a fresh mutex (only by the creator, before publication). */
static PyObject *
Mutex_initialise(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0 || initialise_memory(self->view.buf) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static void
took_it(MutexObject *self)
{
    self->owner_ident = PyThread_get_thread_ident();
    self->owner_gen = fork_gen;
    taken_gen = fork_gen;
    held_count++;
    self->owner_ktid = word(self) & FUTEX_TID_MASK;
    self->depth = 1;
    self->state->owner_pid = cached_pid;
    self->state->owner_tid = (int32_t)self->owner_ktid;
}

/* The work of acquire(): a result code, or -1 with an exception set.
 * timeout < 0: try once, keeping the GIL; timeout >= 0: wait up to that many
 * seconds with the GIL released. */
static int
acquire_code(MutexObject *self, int reentrant, double timeout)
{
    int rc;
    if (check_open(self) < 0) {
        return -1;
    }
    if (owned_by_me(self)) {
        if (!reentrant) {
            return PSL_SELF_HELD;
        }
        self->depth++;
        return PSL_OK;
    }
#ifdef __GLIBC__
    /* glibc's trylock on an ENOTRECOVERABLE mutex leaves our tid in the lock
     * word and a later unlock crashes: never call it on one. */
    if (self->mutex->__data.__owner == INT_MAX - 1) { /* PTHREAD_MUTEX_NOTRECOVERABLE */
        return PSL_NOT_RECOVERABLE;
    }
#endif
    if (timeout < 0) {
        rc = pthread_mutex_trylock(self->mutex);
    }
    else {
        struct timespec abs;
        double whole;
        clock_gettime(CLOCK_MONOTONIC, &abs);
        if (timeout > 1e6) {
            timeout = 1e6;
        }
        double frac = modf(timeout, &whole);
        abs.tv_sec += (time_t)whole;
        abs.tv_nsec += (long)(frac * 1e9);
        if (abs.tv_nsec >= 1000000000L) {
            abs.tv_sec += 1;
            abs.tv_nsec -= 1000000000L;
        }
        /* Counted so that detach() never unmaps memory a thread sleeps on. */
        self->waiters++;
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_clocklock(self->mutex, CLOCK_MONOTONIC, &abs);
        Py_END_ALLOW_THREADS
        self->waiters--;
    }
    switch (rc) {
    case 0:
        took_it(self);
        return self->state->unconfirmed ? PSL_UNCONFIRMED : PSL_OK;
    case EOWNERDEAD:
        /* Record the death before making pthreads happy: if we die in
         * between, the next acquirer gets EOWNERDEAD again anyway. */
        self->state->dead_pid = self->state->owner_pid;
        self->state->unconfirmed = 1;
        self->state->deaths++;
        pthread_mutex_consistent(self->mutex);
        took_it(self);
        return PSL_OWNER_DIED;
    case EBUSY:
        return PSL_BUSY;
    case ETIMEDOUT:
        return PSL_TIMEDOUT;
    case EDEADLK:
        /* Held by this thread through another object of the same lock. */
        return PSL_SELF_HELD;
    case ENOTRECOVERABLE:
        return PSL_NOT_RECOVERABLE;
    default:
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
}

/* acquire(reentrant, timeout) -> code (see acquire_code). */
static PyObject *
Mutex_acquire(MutexObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int reentrant, rc;
    double timeout;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "acquire(reentrant, timeout)");
        return NULL;
    }
    reentrant = PyObject_IsTrue(args[0]);
    if (reentrant < 0) {
        return NULL;
    }
    timeout = PyFloat_AsDouble(args[1]);
    if (timeout == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    rc = acquire_code(self, reentrant, timeout);
    return rc < 0 ? NULL : PyLong_FromLong(rc);
}

/* The work of release(): PSL_OK (released or one nesting level undone),
 * PSL_NOT_OWNER, or -1 with an exception set. */
static int
release_code(MutexObject *self)
{
    int rc;
    if (check_open(self) < 0) {
        return -1;
    }
    if (!owned_by_me(self)) {
        return PSL_NOT_OWNER;
    }
    if (self->depth > 1) {
        self->depth--;
        return PSL_OK;
    }
    self->depth = 0;
    held_count--;
    self->owner_ident = 0;
    self->state->owner_pid = 0;
    self->state->owner_tid = 0;
    rc = pthread_mutex_unlock(self->mutex);
    if (rc == EPERM) {
        return PSL_NOT_OWNER;
    }
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return PSL_OK;
}

/* release() -> code (see release_code). */
static PyObject *
Mutex_release(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    int rc = release_code(self);
    return rc < 0 ? NULL : PyLong_FromLong(rc);
}

static PyObject *
Mutex_mark_consistent(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    if (!owned_by_me(self)) {
        return PyLong_FromLong(PSL_NOT_OWNER);
    }
    self->state->unconfirmed = 0;
    self->state->dead_pid = 0;
    return PyLong_FromLong(PSL_OK);
}

static PyObject *
Mutex_owned(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return PyBool_FromLong(owned_by_me(self));
}

/* held_here(): whether any thread of this process holds it through this object. */
static PyObject *
Mutex_held_here(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->has_view) {
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(self->depth > 0 && self->owner_gen == fork_gen &&
                           (word(self) & FUTEX_TID_MASK) == self->owner_ktid);
}

static int
held_here(MutexObject *self)
{
    return self->has_view && self->depth > 0 && self->owner_gen == fork_gen &&
           (word(self) & FUTEX_TID_MASK) == self->owner_ktid;
}

/* in_use(): held, or waited for, by a thread of this process through this object. */
static PyObject *
Mutex_in_use(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(held_here(self) || self->waiters > 0);
}

static PyObject *
Mutex_locked(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return PyBool_FromLong((word(self) & FUTEX_TID_MASK) != 0);
}

/* state() -> (word, unconfirmed, owner_pid, owner_tid, dead_pid, deaths, magic) */
static PyObject *
Mutex_state(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    lock_state *s;
    if (check_open(self) < 0) {
        return NULL;
    }
    s = self->state;
    return Py_BuildValue("(kIiiiIk)", (unsigned long)word(self), s->unconfirmed, s->owner_pid,
                         s->owner_tid, s->dead_pid, s->deaths, (unsigned long)s->magic);
}

/* detach(): drop the buffer (lets the mapping go). Refused while held here. */
static PyObject *
Mutex_detach(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->has_view) {
        Py_RETURN_NONE;
    }
    if (held_here(self) || self->waiters > 0) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cannot detach a robust mutex a thread of this process holds or waits for");
        return NULL;
    }
    self->has_view = 0;
    self->mutex = NULL;
    self->state = NULL;
    PyBuffer_Release(&self->view);
    Py_RETURN_NONE;
}

static PyObject *
Mutex_get_detached(MutexObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(!self->has_view);
}

static PyMethodDef Mutex_methods[] = {
    {"initialise", (PyCFunction)Mutex_initialise, METH_NOARGS, "Initialise a fresh mutex."},
    {"acquire", (PyCFunction)(void (*)(void))Mutex_acquire, METH_FASTCALL,
     "acquire(reentrant, timeout) -> result code"},
    {"release", (PyCFunction)Mutex_release, METH_NOARGS, "release() -> result code"},
    {"mark_consistent", (PyCFunction)Mutex_mark_consistent, METH_NOARGS,
     "Clear the unconfirmed flag (holder only)."},
    {"owned", (PyCFunction)Mutex_owned, METH_NOARGS, "Held by the calling thread?"},
    {"held_here", (PyCFunction)Mutex_held_here, METH_NOARGS,
     "Held by any thread of this process through this object?"},
    {"in_use", (PyCFunction)Mutex_in_use, METH_NOARGS,
     "Held or waited for by a thread of this process through this object?"},
    {"locked", (PyCFunction)Mutex_locked, METH_NOARGS, "Held by anybody?"},
    {"state", (PyCFunction)Mutex_state, METH_NOARGS, "The raw shared state, for listings."},
    {"detach", (PyCFunction)Mutex_detach, METH_NOARGS, "Release the memory."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Mutex_getset[] = {
    {"detached", (getter)Mutex_get_detached, NULL, "Whether detach() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._backends.posix._robustmutex.Mutex",
    .tp_doc = "A robust process-shared pthread mutex in a writable buffer.",
    .tp_basicsize = sizeof(MutexObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Mutex_init,
    .tp_dealloc = (destructor)Mutex_dealloc,
    .tp_methods = Mutex_methods,
    .tp_getset = Mutex_getset,
};

/* Guard: the base class of the front end's lock object, whose `with` is C.
 *
 * Why: CPython runs signal handlers (KeyboardInterrupt) between bytecodes.
 * With __enter__ written in Python, a handler could raise after the mutex was
 * taken and before the with block began, so no __exit__ ever released it; a
 * Python __exit__ could be interrupted before its release. Either way the
 * thread kept the lock for good. Here nothing runs between taking (or
 * releasing) the mutex and returning to the with statement, as with
 * threading.Lock. Only the uncommon outcomes call back into Python: any
 * code but OK from the try-acquire calls self._enter_slow(code) and returns
 * its result; any code but OK from release calls self._not_owner("release").
 * The fields are the front end's `_m` (the Mutex, or whatever stands in for
 * it once the lock object is closed: any object with acquire and release
 * returning codes) and `_reentrant`. */
typedef struct {
    PyObject_HEAD
    PyObject *m;
    char reentrant;
} GuardObject;

static int
Guard_traverse(GuardObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->m);
    return 0;
}

static int
Guard_clear(GuardObject *self)
{
    Py_CLEAR(self->m);
    return 0;
}

static void
Guard_dealloc(GuardObject *self)
{
    PyObject_GC_UnTrack(self);
    Guard_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The result code a stand-in's acquire/release returned, or -1 with an
 * exception set. Anything that is not one of the codes is an error, never
 * taken for OK (2**40 truncated to an int would read as 0). */
static int
code_of(PyObject *result)
{
    if (result == NULL) {
        return -1;
    }
    long rc = PyLong_AsLong(result);
    Py_DECREF(result);
    if (rc == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (rc < PSL_OK || rc > PSL_NOT_RECOVERABLE) {
        PyErr_Format(PyExc_SystemError, "lock handle returned %ld, not a result code", rc);
        return -1;
    }
    return (int)rc;
}

/* acquire(reentrant, -1.0) or release() through a stand-in, held across the
 * call (another thread may replace the object's _m meanwhile). */
static int
call_stand_in(PyObject *m, int acquire, int reentrant)
{
    PyObject *target = m != NULL ? m : Py_None;
    Py_INCREF(target);
    PyObject *r = acquire ? PyObject_CallMethod(target, "acquire", "Od",
                                                reentrant ? Py_True : Py_False, -1.0)
                          : PyObject_CallMethod(target, "release", NULL);
    Py_DECREF(target);
    return code_of(r);
}

static PyObject *
Guard_enter(GuardObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *m = self->m;
    int rc;
    if (m != NULL && Py_IS_TYPE(m, &MutexType)) {
        rc = acquire_code((MutexObject *)m, self->reentrant, -1.0);
    }
    else {
        rc = call_stand_in(m, 1, self->reentrant);
    }
    if (rc < 0) {
        return NULL;
    }
    if (rc == PSL_OK) {
        return Py_NewRef(self);
    }
    return PyObject_CallMethod((PyObject *)self, "_enter_slow", "i", rc);
}

static PyObject *
Guard_exit(GuardObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    PyObject *m = self->m;
    int rc;
    if (m != NULL && Py_IS_TYPE(m, &MutexType)) {
        rc = release_code((MutexObject *)m);
    }
    else {
        rc = call_stand_in(m, 0, 0);
    }
    if (rc < 0) {
        return NULL;
    }
    if (rc == PSL_OK) {
        Py_RETURN_NONE;
    }
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_not_owner", "s", "release");
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef Guard_methods[] = {
    {"__enter__", (PyCFunction)Guard_enter, METH_NOARGS,
     "Take the lock; the with block runs holding it."},
    {"__exit__", (PyCFunction)(void (*)(void))Guard_exit, METH_FASTCALL,
     "Release the lock taken by __enter__."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Guard_members[] = {
    {"_m", T_OBJECT, offsetof(GuardObject, m), 0, "The lock handle (or its closed stand-in)."},
    {"_reentrant", T_BOOL, offsetof(GuardObject, reentrant), 0,
     "Whether the holding thread may take it again."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._backends.posix._robustmutex.Guard",
    .tp_doc = "Base of the lock object: `with` in C (see _robustmutex.c).",
    .tp_basicsize = sizeof(GuardObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Guard_dealloc,
    .tp_traverse = (traverseproc)Guard_traverse,
    .tp_clear = (inquiry)Guard_clear,
    .tp_methods = Guard_methods,
    .tp_members = Guard_members,
};

#include "../../_slots.h"
#include "_robustmutex_reuse.h"

/* taken_here() -> whether a thread of this process has taken any mutex since
 * the process began (a forked child: since its fork). False means that no
 * thread of it holds one: the check a forked child makes as it ends, without
 * touching (and so copying) the Python objects of every lock it inherited. */
static PyObject *
robustmutex_taken_here(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return PyBool_FromLong(taken_gen == fork_gen);
}

/* holding() -> whether a thread of this process may hold a mutex now: False
 * proves that none does (see held_count). */
static PyObject *
robustmutex_holding(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return PyBool_FromLong(held_count > 0);
}

/* needs_keeping(buffer, offset) -> whether the lock memory at `offset` of
 * `buffer` records a death nobody has confirmed (lock_memory_needs_keeping). */
static PyObject *
robustmutex_needs_keeping(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "needs_keeping(buffer, offset)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    int keep = -1;
    if (offset < 0 || view.len - offset < DATA_SIZE) {
        PyErr_Format(PyExc_ValueError, "needs_keeping: %d bytes of lock memory needed at %zd",
                     DATA_SIZE, offset);
    }
    else {
        keep = lock_memory_needs_keeping((const unsigned char *)view.buf + offset);
    }
    PyBuffer_Release(&view);
    return keep < 0 ? NULL : PyBool_FromLong(keep);
}

/* initialise(data): set up a fresh mutex in a new lock object's data (the
 * backend's lock_init; only by the creator, before publication). One C call,
 * no Mutex object: a lock is often first created in a freshly forked child,
 * where each Python call and object costs copied pages. */
static PyObject *
robustmutex_initialise(PyObject *Py_UNUSED(module), PyObject *buffer)
{
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    int rc = -1;
    if (view.len < DATA_SIZE || ((uintptr_t)view.buf % 16) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "a robust mutex needs %d writable bytes aligned to 16", DATA_SIZE);
    }
    else {
        rc = initialise_memory(view.buf);
    }
    PyBuffer_Release(&view);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* attach(handle) -> Mutex(handle.data): the backend's lock_attach, in C for
 * the same reason. */
static PyObject *
robustmutex_attach(PyObject *Py_UNUSED(module), PyObject *handle)
{
    static PyObject *str_data;
    if (str_data == NULL && (str_data = PyUnicode_InternFromString("data")) == NULL) {
        return NULL;
    }
    PyObject *data = PyObject_GetAttr(handle, str_data);
    if (data == NULL) {
        return NULL;
    }
    PyObject *mutex = PyObject_CallOneArg((PyObject *)&MutexType, data);
    Py_DECREF(data);
    return mutex;
}

static PyMethodDef robustmutex_methods[] = {
    {"initialise", robustmutex_initialise, METH_O,
     "initialise(data): set up a fresh robust mutex in a new lock object's data."},
    {"attach", robustmutex_attach, METH_O, "attach(handle) -> Mutex(handle.data)."},
    {"taken_here", robustmutex_taken_here, METH_NOARGS,
     "Whether a thread of this process has taken any mutex since it began (or was forked)."},
    {"holding", robustmutex_holding, METH_NOARGS,
     "Whether a thread of this process may hold a mutex now (False: none does)."},
    {"needs_keeping", (PyCFunction)(void (*)(void))robustmutex_needs_keeping, METH_FASTCALL,
     "needs_keeping(buffer, offset) -> whether the lock at offset records an unconfirmed "
     "death (kept with no living holder, so the next opener is told)."},
    {"keep", (PyCFunction)(void (*)(void))robustmutex_keep, METH_FASTCALL,
     "keep(name, lock): keep a new by-name lock object for reuse() (see _robustmutex.c)."},
    {"reuse", robustmutex_reuse, METH_O,
     "reuse(name) -> the kept by-name lock object if nobody else refers to it, else None."},
    {"reuse_setup", (PyCFunction)(void (*)(void))robustmutex_reuse_setup, METH_FASTCALL,
     "reuse_setup(engine_globals, namespace_var, environ_dict or None, key): where "
     "reuse() and keep() read the current engine, namespace and environment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef robustmutex_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "procshare._backends.posix._robustmutex",
    .m_doc = "Robust process-shared pthread mutexes (the hot path of procshare locks).",
    .m_size = -1,
    .m_methods = robustmutex_methods,
};

PyMODINIT_FUNC
PyInit__robustmutex(void)
{
    PyObject *m;
    cached_pid = getpid();
    if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    if (PyType_Ready(&MutexType) < 0 || PyType_Ready(&GuardType) < 0) {
        return NULL;
    }
    m = PyModule_Create(&robustmutex_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&MutexType);
    if (PyModule_AddObject(m, "Mutex", (PyObject *)&MutexType) < 0) {
        Py_DECREF(&MutexType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&GuardType);
    if (PyModule_AddObject(m, "Guard", (PyObject *)&GuardType) < 0) {
        Py_DECREF(&GuardType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "DATA_SIZE", DATA_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "STATE_OFFSET", STATE_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "STATE_MAGIC", STATE_MAGIC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
