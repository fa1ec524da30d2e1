/* What _forkfast.c (the C start) and _forkjoin.c (the C join) share: where
 * the engine's objects keep what they read and write (set by fast_setup()),
 * and small helpers that only read. */
#ifndef PROCSHARE_FORKFAST_H
#define PROCSHARE_FORKFAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#include "_forkstep.h"

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

enum {
    R_BUF, R_CANCELLED, R_DAEMON, R_DEADLINE, R_DECODED, R_DONE, R_DROPPED, R_EOF, R_EXIT,
    R_LOST, R_NAME, R_PID, R_RESULT_FD, R_SCOPE, R_SEQ, R_TIMED_OUT, R_TIMEOUT, R_WAIT_FD,
    R_COUNT
};
enum { E_PID, E_PENDING, E_KEPT, E_FORKS, E_FORKING, E_DEFERRED, E_COUNT };
enum { P_ENGINE, P_LIVE, P_SCOPED, P_LOCAL, P_COUNT };
enum { S_LIMIT, S_CANCELLING, S_RECORDS, S_RUNNING, S_COUNT };

PS_HIDDEN extern Py_ssize_t roff[R_COUNT], eoff[E_COUNT], poff[P_COUNT], soff[S_COUNT];
PS_HIDDEN extern PyTypeObject *record_type, *engine_type, *part_type, *handle_type, *exit_type;
PS_HIDDEN extern PyTypeObject *scope_type;
PS_HIDDEN extern PyObject *core_g, *children_g, *runtime_g, *process_g; /* module globals */
PS_HIDDEN extern PyObject *child_main, *child_end, *child_holding, *child_backend, *child_held;
PS_HIDDEN extern PyObject *set_handler, *handlers, *transport_g;
PS_HIDDEN extern PyObject *exit_ok, *returned_none, *poll_if_asked, *empty_dict, *empty_str;
PS_HIDDEN extern PyObject *k_armed, *k_pending, *k_raised, *k_engine, *k_pid, *k_current, *k_entered, *k_pidfd_open, *k_watch, *k_first;
PS_HIDDEN extern PyObject *k_stack, *k_call, *k_join, *k_joined, *k_drop, *k_check_held, *k_warn;
PS_HIDDEN extern int fast_ready, fast_on;
PS_HIDDEN extern unsigned long long n_starts, n_joins; /* fast starts and joins (for tests) */


typedef struct {
    PyObject_HEAD
    PyObject *fn, *name, *timeout, *daemon;
} LauncherObject;

typedef struct {
    PyObject_HEAD
    PyObject *part, *rec;
    PyObject *weakreflist;
} HandleObject;

PS_HIDDEN extern PyTypeObject HandleType;

/* A module global, borrowed; NULL (no error) if missing. Reads only. */
static inline PyObject *
global(PyObject *globals, PyObject *key)
{
    PyObject *value = PyDict_GetItemWithError(globals, key);
    if (value == NULL) {
        PyErr_Clear();
    }
    return value;
}

static inline int
is_zero(PyObject *v)
{
    return v != NULL && PyLong_CheckExact(v) && Py_SIZE(v) == 0;
}

/* An exact int's value, without writing it; 0 if it is none. */
static inline int
as_long(PyObject *v, long *out)
{
    if (v == NULL || !PyLong_CheckExact(v)) {
        return 0;
    }
    *out = PyLong_AsLong(v);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* Store a new reference (stolen) in a slot. */
static inline void
put(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

static inline double
global_seconds(PyObject *key, double otherwise)
{
    PyObject *v = global(children_g, key);
    if (v != NULL && PyFloat_CheckExact(v)) {
        return PyFloat_AS_DOUBLE(v);
    }
    if (v != NULL && PyLong_CheckExact(v)) {
        long n;
        if (as_long(v, &n)) {
            return (double)n;
        }
    }
    return otherwise;
}

static inline double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
