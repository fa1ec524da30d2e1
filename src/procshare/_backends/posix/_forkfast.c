/* The common case of `@ps.forked` start and `Child.join()`, in C (issue 16).
 *
 * Why: after fork() every page the parent writes is a copy-on-write fault
 * (~2-3 us here), and CPython 3.11 writes a page for every object it so
 * much as INCREFs: each Python function called (its function and code
 * objects, the globals it loads), each allocation size class, each dict.
 * The Python start and join wrote ~115 more pages per fork than a raw
 * os.fork loop. Here the parent touches only what it must: the launcher
 * (the `@forked` function object), a new record, the engine's counters, the
 * live-children dict, a new handle.
 *
 * The Python code stays the reference and the slow path: the launcher's
 * tp_call runs it (`self._call(*args, **kwargs)`) for every uncommon case
 * (a cluster runtime, a children() scope open, housekeeping pending, a
 * timeout=, other threads running, a fork that failed), and the handle's
 * join runs `self._join(timeout)` when a timeout is given, the child is
 * already done, has no pidfd, wrote to its pipe while still running, or was
 * reaped by someone else. Once this code has reaped a child it finishes the
 * record itself (with the GIL held throughout: no other thread sees it
 * half-done), then hands anything beyond "exited 0, sent nothing" to
 * Python (`part._check_held(rec)`, `self._joined()`).
 *
 * It reads and writes the engine's Python objects in place: the slots of
 * Record, Engine and ChildrenPart (plain slotted classes; the offsets are
 * looked up once by fast_setup(), which refuses a class whose slots are not
 * all there) and the module globals the Python path reads (core._engine,
 * core._pid, children._current, _runtime.entered, ...), so monkeypatching
 * those works alike on both paths.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <poll.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "_forkstep.h"

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* ------------------------------------------------------------------ setup */

enum {
    R_BUF, R_CANCELLED, R_DAEMON, R_DEADLINE, R_DECODED, R_DONE, R_DROPPED, R_EOF, R_EXIT,
    R_LOST, R_NAME, R_PID, R_RESULT_FD, R_SCOPE, R_SEQ, R_TIMED_OUT, R_TIMEOUT, R_WAIT_FD,
    R_COUNT
};
static const char *const record_slots[R_COUNT] = {
    "buf", "cancelled", "daemon", "deadline", "decoded", "done", "dropped", "eof", "exit",
    "lost", "name", "pid", "result_fd", "scope", "seq", "timed_out", "timeout", "wait_fd",
};
enum { E_PID, E_PENDING, E_KEPT, E_FORKS, E_FORKING, E_DEFERRED, E_COUNT };
static const char *const engine_slots[E_COUNT] = {
    "pid", "pending", "kept", "forks", "forking", "deferred",
};
enum { P_ENGINE, P_LIVE, P_SCOPED, P_LOCAL, P_COUNT };
static const char *const part_slots[P_COUNT] = {"engine", "_live", "scoped", "_local"};
enum { S_LIMIT, S_CANCELLING, S_RECORDS, S_RUNNING, S_COUNT };
static const char *const scope_slots[S_COUNT] = {"limit", "cancelling", "records", "running"};

static Py_ssize_t roff[R_COUNT], eoff[E_COUNT], poff[P_COUNT], soff[S_COUNT];
static PyTypeObject *record_type, *engine_type, *part_type, *handle_type, *exit_type;
static PyTypeObject *scope_type;
static PyObject *core_g, *children_g, *runtime_g, *process_g; /* module globals */
static PyObject *child_main, *child_end, *child_taken, *child_backend, *child_held;
static PyObject *set_handler, *handlers, *transport_g;
static PyObject *exit_ok, *returned_none, *poll_if_asked, *empty_dict, *empty_str;
static PyObject *k_armed, *k_pending, *k_raised, *k_engine, *k_pid, *k_current, *k_entered, *k_pidfd_open, *k_watch, *k_first;
static PyObject *k_flush, *k_stack, *k_call, *k_join, *k_joined, *k_drop, *k_check_held, *k_warn;
static int fast_ready, fast_on = 1;
static unsigned long long n_starts, n_joins; /* fast starts and joins (for tests) */

static int
slot_offsets(PyTypeObject *type, const char *const *names, Py_ssize_t *out, int n)
{
    for (int i = 0; i < n; i++) {
        PyObject *descr = PyDict_GetItemString(type->tp_dict, names[i]); /* borrowed */
        if (descr == NULL || !PyObject_TypeCheck(descr, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
            PyErr_Format(PyExc_TypeError, "fast_setup: %s has no slot %s", type->tp_name,
                         names[i]);
            return -1;
        }
        out[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    return 0;
}

static int
take(PyObject *config, const char *key, PyObject **out, PyTypeObject *must_be)
{
    PyObject *value = PyDict_GetItemString(config, key); /* borrowed */
    if (value == NULL || (must_be != NULL && !PyObject_TypeCheck(value, must_be))) {
        PyErr_Format(PyExc_TypeError, "fast_setup: missing or wrong %s", key);
        return -1;
    }
    Py_XSETREF(*out, Py_NewRef(value));
    return 0;
}

static PyTypeObject HandleType, LauncherType;

/* fast_setup(config: dict): see procshare._engine.children.accelerate(). */
static PyObject *
fast_setup(PyObject *Py_UNUSED(module), PyObject *config)
{
    if (!PyDict_Check(config)) {
        PyErr_SetString(PyExc_TypeError, "fast_setup(config: dict)");
        return NULL;
    }
    fast_ready = 0;
    PyObject *t_record = NULL, *t_engine = NULL, *t_part = NULL, *t_handle = NULL;
    PyObject *t_exit = NULL, *t_scope = NULL;
    if (take(config, "core", &core_g, &PyDict_Type) < 0 ||
        take(config, "children", &children_g, &PyDict_Type) < 0 ||
        take(config, "runtime", &runtime_g, &PyDict_Type) < 0 ||
        take(config, "process", &process_g, &PyDict_Type) < 0 ||
        take(config, "Record", &t_record, &PyType_Type) < 0 ||
        take(config, "Engine", &t_engine, &PyType_Type) < 0 ||
        take(config, "ChildrenPart", &t_part, &PyType_Type) < 0 ||
        take(config, "ScopeState", &t_scope, &PyType_Type) < 0 ||
        take(config, "Child", &t_handle, &PyType_Type) < 0 ||
        take(config, "Exit", &t_exit, &PyType_Type) < 0 ||
        take(config, "exit_ok", &exit_ok, NULL) < 0 ||
        take(config, "main", &child_main, NULL) < 0 ||
        take(config, "end", &child_end, NULL) < 0 ||
        take(config, "taken", &child_taken, NULL) < 0 ||
        take(config, "transport", &transport_g, &PyDict_Type) < 0 ||
        take(config, "backend", &child_backend, NULL) < 0 ||
        take(config, "held", &child_held, NULL) < 0 ||
        take(config, "set_handler", &set_handler, NULL) < 0 ||
        take(config, "handlers", &handlers, &PyTuple_Type) < 0 ||
        take(config, "poll_if_asked", &poll_if_asked, NULL) < 0) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(handlers); i++) {
        PyObject *pair = PyTuple_GET_ITEM(handlers, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "fast_setup: handlers are (signum, handler) pairs");
            goto fail;
        }
    }
    if (!PyType_IsSubtype((PyTypeObject *)t_handle, &HandleType) ||
        !PyType_IsSubtype((PyTypeObject *)t_exit, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "fast_setup: Child must derive from Handle, Exit "
                                         "from tuple");
        goto fail;
    }
    if (slot_offsets((PyTypeObject *)t_record, record_slots, roff, R_COUNT) < 0 ||
        slot_offsets((PyTypeObject *)t_engine, engine_slots, eoff, E_COUNT) < 0 ||
        slot_offsets((PyTypeObject *)t_part, part_slots, poff, P_COUNT) < 0 ||
        slot_offsets((PyTypeObject *)t_scope, scope_slots, soff, S_COUNT) < 0) {
        goto fail;
    }
    Py_XSETREF(record_type, (PyTypeObject *)t_record);
    Py_XSETREF(engine_type, (PyTypeObject *)t_engine);
    Py_XSETREF(part_type, (PyTypeObject *)t_part);
    Py_XSETREF(handle_type, (PyTypeObject *)t_handle);
    Py_XSETREF(exit_type, (PyTypeObject *)t_exit);
    Py_XSETREF(scope_type, (PyTypeObject *)t_scope);
    fast_ready = 1;
    Py_RETURN_NONE;
fail:
    Py_XDECREF(t_record);
    Py_XDECREF(t_engine);
    Py_XDECREF(t_part);
    Py_XDECREF(t_handle);
    Py_XDECREF(t_exit);
    Py_XDECREF(t_scope);
    return NULL;
}

static PyObject *
fast_enable(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0) {
        return NULL;
    }
    PyObject *was = PyBool_FromLong(fast_on);
    fast_on = on;
    return was;
}

static PyObject *
fast_stats(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return Py_BuildValue("(KK)", n_starts, n_joins);
}

/* ---------------------------------------------------------------- helpers */

/* A module global, borrowed; NULL (no error) if missing. Reads only. */
static PyObject *
global(PyObject *globals, PyObject *key)
{
    PyObject *value = PyDict_GetItemWithError(globals, key);
    if (value == NULL) {
        PyErr_Clear();
    }
    return value;
}

static int
is_zero(PyObject *v)
{
    return v != NULL && PyLong_CheckExact(v) && Py_SIZE(v) == 0;
}

/* An exact int's value, without writing it; 0 if it is none. */
static int
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
static void
put(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

static double
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

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------ the child */

/* In the child: what process_fork's child branch and transport.child_main
 * do, the common case in C: the child's own handlers while signals are
 * still blocked, then unblock (a cancel sent at the fork is remembered by
 * its handler now), arm the cancel, call the function; a child whose
 * function returned None, that runs no other thread, took no lock and
 * opened nothing ends here; anything else ends in transport.child_end. */
static PS_NORETURN void
run_child(PyObject *fn, PyObject *args, PyObject *kwargs, int fd)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(handlers); i++) {
        PyObject *pair = PyTuple_GET_ITEM(handlers, i);
        PyObject *r = PyObject_Vectorcall(set_handler, &PyTuple_GET_ITEM(pair, 0), 2, NULL);
        if (r == NULL) {
            PyErr_Clear();
            ps_exit(1);
        }
        Py_DECREF(r);
    }
    ps_restore_mask();
    PyObject *fdobj = PyLong_FromLong(fd);
    PyObject *me = global(core_g, k_pid);
    long pending = 0, raised = 0, pid = -1;
    if (PyErr_CheckSignals() < 0 || fdobj == NULL || !as_long(me, &pid)) {
        PyErr_Clear(); /* (a handler that raised: the Python path ends with 1 too) */
        ps_exit(1);
    }
    long status = 1;
    PyObject *r = NULL;
    if (!as_long(global(transport_g, k_pending), &pending) ||
        !as_long(global(transport_g, k_raised), &raised) || pending == pid ||
        PyDict_SetItem(transport_g, k_armed, me) < 0) {
        /* A cancel came before the start: the Python path raises it. */
        PyErr_Clear();
        PyObject *stack[6] = {child_backend, child_held, fn, args,
                              kwargs != NULL ? kwargs : empty_dict, fdobj};
        r = PyObject_Vectorcall(child_main, stack, 6, NULL);
    }
    else {
        PyObject *value = PyObject_Call(fn, args, kwargs);
        PyObject *exc = NULL;
        if (value == Py_None && ps_python_threads() == 1) {
            PyObject *zero = PyLong_FromLong(0);
            if (zero != NULL && PyDict_SetItem(transport_g, k_armed, zero) == 0) {
                PyObject *engine = global(core_g, k_engine);
                PyObject *taken = PyObject_CallNoArgs(child_taken);
                if ((engine == NULL || engine == Py_None) && taken == Py_False) {
                    ps_exit(0); /* the common end: nothing to send, nothing to release */
                }
                Py_XDECREF(taken);
            }
            PyErr_Clear();
        }
        if (value == NULL) {
            PyObject *type, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            if (exc != NULL && tb != NULL) {
                PyException_SetTraceback(exc, tb);
            }
            Py_XDECREF(type);
            Py_XDECREF(tb);
            value = Py_NewRef(Py_None);
        }
        PyObject *box = PyList_New(1);
        if (box != NULL) {
            PyList_SET_ITEM(box, 0, value); /* child_end takes it out (and frees it) */
            PyObject *stack[5] = {child_backend, child_held, box, exc != NULL ? exc : Py_None,
                                  fdobj};
            r = PyObject_Vectorcall(child_end, stack, 5, NULL);
        }
    }
    if (r != NULL && !as_long(r, &status)) {
        status = 1;
    }
    PyErr_Clear();
    ps_exit(status);
}

/* --------------------------------------------------------------- launcher */

typedef struct {
    PyObject_HEAD
    PyObject *part, *rec;
    PyObject *weakreflist;
} HandleObject;

typedef struct {
    PyObject_HEAD
    PyObject *fn, *name, *timeout, *daemon;
} LauncherObject;

static PyObject *fork_now(LauncherObject *self, PyObject *args, PyObject *kwargs,
                          PyObject *part, PyObject *engine, PyObject *live, PyObject *scope,
                          long forks, long forking, int want_pidfd, int *slow);

/* The fast start: a new handle; NULL with *slow set: take the Python path;
 * NULL with *slow clear: an error (set). */
static PyObject *
fast_start(LauncherObject *self, PyObject *args, PyObject *kwargs, int *slow)
{
    *slow = 1;
    if (!fast_ready || !fast_on || self->fn == NULL || self->name == NULL ||
        self->timeout != Py_None || (self->daemon != Py_True && self->daemon != Py_False) ||
        (kwargs != NULL && !PyDict_CheckExact(kwargs)) || !PyTuple_CheckExact(args)) {
        return NULL;
    }
    if (!is_zero(global(runtime_g, k_entered))) {
        return NULL; /* a ps.cluster() block is open somewhere */
    }
    PyObject *part = global(children_g, k_current);
    if (part == NULL || !PyObject_TypeCheck(part, part_type)) {
        return NULL;
    }
    PyObject *engine = SLOT(part, poff[P_ENGINE]);
    if (engine == NULL || engine != global(core_g, k_engine) ||
        !PyObject_TypeCheck(engine, engine_type)) {
        return NULL; /* first fork, or a forked child's first: current_children() */
    }
    PyObject *live = SLOT(part, poff[P_LIVE]);
    long forks, forking;
    if (SLOT(engine, eoff[E_PENDING]) != Py_False || SLOT(engine, eoff[E_KEPT]) != Py_False ||
        live == NULL || !PyDict_CheckExact(live) ||
        !as_long(SLOT(engine, eoff[E_FORKS]), &forks) ||
        !as_long(SLOT(engine, eoff[E_FORKING]), &forking) || ps_python_threads() != 1) {
        return NULL;
    }
    /* The scope this fork belongs to: the innermost children() block of this
     * thread, looked up only while one is open in some thread. One without a
     * limit that is not cancelling only records the child. */
    PyObject *scope = Py_None, *records, *running;
    if (!is_zero(SLOT(part, poff[P_SCOPED]))) {
        PyObject *local = SLOT(part, poff[P_LOCAL]);
        PyObject *stack = local == NULL ? NULL : PyObject_GetAttr(local, k_stack);
        if (stack == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                PyErr_Clear();
                return NULL;
            }
            PyErr_Clear(); /* this thread never opened one */
        }
        else {
            Py_ssize_t depth = PyList_CheckExact(stack) ? PyList_GET_SIZE(stack) : -1;
            if (depth > 0) {
                scope = PyList_GET_ITEM(stack, depth - 1); /* the stack keeps it alive */
            }
            Py_DECREF(stack);
            if (depth < 0) {
                return NULL;
            }
        }
        if (scope != Py_None) {
            if (!PyObject_TypeCheck(scope, scope_type) ||
                SLOT(scope, soff[S_CANCELLING]) != Py_False ||
                SLOT(scope, soff[S_LIMIT]) != Py_None) {
                return NULL; /* admit() waits for a slot, or refuses */
            }
            records = SLOT(scope, soff[S_RECORDS]);
            running = SLOT(scope, soff[S_RUNNING]);
            if (records == NULL || running == NULL || !PyList_CheckExact(records) ||
                !PyList_CheckExact(running)) {
                return NULL;
            }
        }
    }
    PyObject *pidfd_open = global(process_g, k_pidfd_open);
    int want_pidfd = pidfd_open != NULL && pidfd_open != Py_None;

    Py_INCREF(part); /* (Python runs below: the fork hooks, a stream's flush) */
    Py_INCREF(engine);
    Py_INCREF(scope);
    PyObject *handle = fork_now(self, args, kwargs, part, engine, live, scope, forks, forking,
                                want_pidfd, slow);
    Py_DECREF(scope);
    Py_DECREF(engine);
    Py_DECREF(part);
    return handle;
}

/* fast_start's second half: everything is checked, fork now. */
static PyObject *
fork_now(LauncherObject *self, PyObject *args, PyObject *kwargs, PyObject *part,
         PyObject *engine, PyObject *live, PyObject *scope, long forks, long forking,
         int want_pidfd, int *slow)
{
    PyObject *records, *running;
    /* Flush what the parent buffered, or the child would print it again; as
     * process_fork does, a failing flush is ignored, an interruption is not. */
    for (int i = 0; i < 2; i++) {
        PyObject *stream = PySys_GetObject(i == 0 ? "stdout" : "stderr"); /* borrowed */
        if (stream == NULL || stream == Py_None) {
            continue;
        }
        Py_INCREF(stream);
        PyObject *r = PyObject_CallMethodNoArgs(stream, k_flush);
        Py_DECREF(stream);
        if (r != NULL) {
            Py_DECREF(r);
        }
        else if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();
        }
        else {
            *slow = 0;
            return NULL;
        }
    }
    /* Everything the parent needs is built before the fork. */
    PyObject *rec = record_type->tp_alloc(record_type, 0);
    PyObject *seq = PyLong_FromLong(forks + 1);
    PyObject *busy = PyLong_FromLong(forking + 1);
    PyObject *idle = PyLong_FromLong(forking);
    if (rec == NULL || seq == NULL || busy == NULL || idle == NULL) {
        Py_XDECREF(rec);
        Py_XDECREF(seq);
        Py_XDECREF(busy);
        Py_XDECREF(idle);
        *slow = 0;
        return NULL;
    }
    put(rec, roff[R_NAME], Py_NewRef(self->name));
    put(rec, roff[R_DAEMON], Py_NewRef(self->daemon));
    put(rec, roff[R_TIMEOUT], Py_NewRef(Py_None));
    put(rec, roff[R_DEADLINE], Py_NewRef(Py_None));
    put(rec, roff[R_SCOPE], Py_NewRef(scope));
    put(rec, roff[R_PID], PyLong_FromLong(0));
    put(rec, roff[R_SEQ], Py_NewRef(seq));
    put(rec, roff[R_RESULT_FD], Py_NewRef(Py_None));
    put(rec, roff[R_WAIT_FD], Py_NewRef(Py_None));
    put(rec, roff[R_BUF], PyBytes_FromStringAndSize(NULL, 0));
    put(rec, roff[R_EOF], Py_NewRef(Py_False));
    put(rec, roff[R_EXIT], Py_NewRef(Py_None));
    put(rec, roff[R_DONE], Py_NewRef(Py_False));
    put(rec, roff[R_LOST], Py_NewRef(Py_False));
    put(rec, roff[R_TIMED_OUT], Py_NewRef(Py_False));
    put(rec, roff[R_CANCELLED], Py_NewRef(empty_str));
    put(rec, roff[R_DROPPED], Py_NewRef(Py_False));
    put(rec, roff[R_DECODED], Py_NewRef(Py_None));
    put(engine, eoff[E_FORKS], seq); /* numbered; "forking" until it is in _live */
    put(engine, eoff[E_FORKING], busy);

    pid_t pid;
    int fd, pidfd;
    if (ps_fork_step(1, want_pidfd, 1, &pid, &fd, &pidfd) < 0) {
        /* Nothing forked: the Python path tries again and reports it. */
        PyErr_Clear();
        put(engine, eoff[E_FORKING], idle);
        Py_DECREF(rec);
        return NULL;
    }
    if (pid == 0) {
        run_child(self->fn, args, kwargs, fd);
    }
    PyObject *pidobj = PyLong_FromLong((long)pid);
    PyObject *fdobj = PyLong_FromLong(fd);
    PyObject *waitobj = pidfd >= 0 ? PyLong_FromLong(pidfd) : Py_NewRef(Py_None);
    int failed = pidobj == NULL || fdobj == NULL || waitobj == NULL;
    if (!failed) {
        put(rec, roff[R_PID], Py_NewRef(pidobj));
        put(rec, roff[R_RESULT_FD], fdobj);
        put(rec, roff[R_WAIT_FD], waitobj);
        failed = PyDict_SetItem(live, pidobj, rec) < 0;
    }
    else {
        Py_XDECREF(fdobj);
        Py_XDECREF(waitobj);
    }
    Py_XDECREF(pidobj);
    put(engine, eoff[E_FORKING], idle);
    /* Signals back last: the child is recorded (and will be reaped) before
     * any Python signal handler can run. */
    ps_restore_mask();
    *slow = 0;
    if (!failed && scope != Py_None) {
        /* Read again: Python fork hooks ran meanwhile (the record keeps the scope). */
        records = SLOT(scope, soff[S_RECORDS]);
        running = SLOT(scope, soff[S_RUNNING]);
        failed = records == NULL || running == NULL || PyList_Append(records, rec) < 0 ||
                 PyList_Append(running, rec) < 0;
        if (failed && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "procshare: a children() scope lost its lists");
        }
    }
    if (failed) {
        Py_DECREF(rec);
        return NULL;
    }
    PyObject *handle = handle_type->tp_alloc(handle_type, 0);
    if (handle == NULL) {
        Py_DECREF(rec);
        return NULL;
    }
    ((HandleObject *)handle)->part = Py_NewRef(part);
    ((HandleObject *)handle)->rec = rec;
    n_starts++;
    return handle;
}

static PyObject *
launcher_call(LauncherObject *self, PyObject *args, PyObject *kwargs)
{
    int slow;
    PyObject *handle = fast_start(self, args, kwargs, &slow);
    if (!slow) {
        return handle;
    }
    PyObject *method = PyObject_GetAttr((PyObject *)self, k_call);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Call(method, args, kwargs);
    Py_DECREF(method);
    return result;
}

static int
launcher_traverse(LauncherObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fn);
    Py_VISIT(self->name);
    Py_VISIT(self->timeout);
    Py_VISIT(self->daemon);
    return 0;
}

static int
launcher_clear(LauncherObject *self)
{
    Py_CLEAR(self->fn);
    Py_CLEAR(self->name);
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->daemon);
    return 0;
}

static void
launcher_dealloc(LauncherObject *self)
{
    PyObject_GC_UnTrack(self);
    launcher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef launcher_members[] = {
    {"_fn", T_OBJECT_EX, offsetof(LauncherObject, fn), 0, NULL},
    {"_name", T_OBJECT_EX, offsetof(LauncherObject, name), 0, NULL},
    {"_timeout", T_OBJECT_EX, offsetof(LauncherObject, timeout), 0, NULL},
    {"_daemon", T_OBJECT_EX, offsetof(LauncherObject, daemon), 0, NULL},
    {NULL},
};

static PyTypeObject LauncherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._backends.posix._forkstep.Launcher",
    .tp_doc = "Base of a @forked function: calling it forks (the common case in C, the "
              "rest through self._call(*args, **kwargs)).",
    .tp_basicsize = sizeof(LauncherObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_call = (ternaryfunc)launcher_call,
    .tp_traverse = (traverseproc)launcher_traverse,
    .tp_clear = (inquiry)launcher_clear,
    .tp_dealloc = (destructor)launcher_dealloc,
    .tp_members = launcher_members,
};

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
     * nothing touched, when its child is done. */
    PyObject *rec = self->rec, *part = self->part;
    if (rec == NULL || part == NULL) {
        return;
    }
    if (record_type != NULL && PyObject_TypeCheck(rec, record_type) &&
        SLOT(rec, roff[R_DONE]) == Py_True) {
        return;
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

static PyTypeObject HandleType = {
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

static PyMethodDef fast_methods[] = {
    {"fast_setup", fast_setup, METH_O,
     "fast_setup(config: dict): what the C start and join read and write (see "
     "procshare._engine.children)."},
    {"fast_enable", fast_enable, METH_O,
     "fast_enable(on) -> whether it was on: switch the C start and join off (tests)."},
    {"fast_stats", fast_stats, METH_NOARGS,
     "(starts, joins) taken by the C paths so far in this process."},
    {NULL, NULL, 0, NULL},
};

int
ps_fast_init(PyObject *module)
{
#define INTERN(var, text)                                                                        \
    if ((var = PyUnicode_InternFromString(text)) == NULL) {                                      \
        return -1;                                                                               \
    }
    INTERN(k_armed, "_armed");
    INTERN(k_pending, "_pending");
    INTERN(k_raised, "_raised");
    INTERN(k_engine, "_engine");
    INTERN(k_pid, "_pid");
    INTERN(k_current, "_current");
    INTERN(k_entered, "entered");
    INTERN(k_pidfd_open, "_pidfd_open");
    INTERN(k_watch, "DEADLOCK_WATCH");
    INTERN(k_first, "_EXIT_FIRST");
    INTERN(k_flush, "flush");
    INTERN(k_stack, "stack");
    INTERN(k_call, "_call");
    INTERN(k_join, "_join");
    INTERN(k_joined, "_joined");
    INTERN(k_drop, "drop");
    INTERN(k_check_held, "_check_held");
    INTERN(k_warn, "_warn_held_locks");
#undef INTERN
    empty_dict = PyDict_New();
    empty_str = PyUnicode_New(0, 0);
    returned_none = Py_BuildValue("(OO)", Py_True, Py_None);
    if (empty_dict == NULL || empty_str == NULL || returned_none == NULL ||
        PyType_Ready(&LauncherType) < 0 || PyType_Ready(&HandleType) < 0 ||
        PyModule_AddFunctions(module, fast_methods) < 0 ||
        PyModule_AddObjectRef(module, "Launcher", (PyObject *)&LauncherType) < 0 ||
        PyModule_AddObjectRef(module, "Handle", (PyObject *)&HandleType) < 0) {
        return -1;
    }
    return 0;
}
