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
 * This file: the setup, the launcher (the start) and what the child runs;
 * _forkjoin.c: the handle (the join); _forkfast.h: what they share.
 *
 * The Python code stays the reference and the slow path: the launcher's
 * tp_call runs it (`self._call(*args, **kwargs)`) for every uncommon case
 * (a cluster runtime, a children() scope with a limit or cancelling,
 * housekeeping pending, a timeout=, other threads running, a fork that
 * failed), and the handle's join runs `self._join(timeout)` when a timeout
 * is given, the child is already done, has no pidfd, sent more than 64 KiB
 * while still running, or was reaped by someone else. Once the C join has
 * reaped a child it finishes the record itself (with the GIL held
 * throughout: no other thread sees it half-done), then hands anything
 * beyond "exited 0, sent nothing" to Python (`part._check_held(rec)`,
 * `self._joined()`).
 *
 * It reads and writes the engine's Python objects in place: the slots of
 * Record, Engine and ChildrenPart (plain slotted classes; the offsets are
 * looked up once by fast_setup(), which refuses a class whose slots are not
 * all there) and the module globals the Python path reads (core._engine,
 * core._pid, children._current, _runtime.entered, ...), so monkeypatching
 * those works alike on both paths.
 */
#include "_forkfast.h"
#include "../../_slots.h"

#include <unistd.h>

/* ------------------------------------------------------------------ setup */

static const char *const record_slots[R_COUNT] = {
    "buf", "cancelled", "daemon", "deadline", "decoded", "done", "dropped", "eof", "exit",
    "lost", "name", "pid", "result_fd", "scope", "seq", "timed_out", "timeout", "wait_fd",
};
static const char *const engine_slots[E_COUNT] = {
    "pid", "pending", "kept", "forks", "forking", "deferred",
};
static const char *const part_slots[P_COUNT] = {"engine", "_live", "scoped", "_local"};
static const char *const scope_slots[S_COUNT] = {"limit", "cancelling", "records", "running"};

Py_ssize_t roff[R_COUNT], eoff[E_COUNT], poff[P_COUNT], soff[S_COUNT];
PyTypeObject *record_type, *engine_type, *part_type, *handle_type, *exit_type;
PyTypeObject *scope_type;
PyObject *core_g, *children_g, *runtime_g, *process_g; /* module globals */
PyObject *child_main, *child_end, *child_holding, *child_backend, *child_held, *child_end_fast,
    *child_end_failed;
PyObject *set_handler, *handlers, *transport_g;
PyObject *exit_ok, *returned_none, *poll_if_asked, *empty_dict, *empty_str;
PyObject *k_armed, *k_pending, *k_raised, *k_engine, *k_pid, *k_current, *k_entered, *k_pidfd_open, *k_watch, *k_first;
PyObject *k_stack, *k_call, *k_join, *k_joined, *k_drop, *k_check_held, *k_warn;
int fast_ready, fast_on = 1;
unsigned long long n_starts, n_joins; /* fast starts and joins (for tests) */

static int
slot_offsets(PyTypeObject *type, const char *const *names, Py_ssize_t *out, int n)
{
    for (int i = 0; i < n; i++) {
        if (ps_member_offset(type, names[i], &out[i], "fast_setup") < 0) {
            return -1;
        }
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

static PyTypeObject LauncherType;

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
        take(config, "holding", &child_holding, NULL) < 0 ||
        take(config, "end_fast", &child_end_fast, NULL) < 0 ||
        take(config, "end_failed", &child_end_failed, NULL) < 0 ||
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

/* ------------------------------------------------------------ the child */

/* In the child: what process_fork's child branch and transport.child_main
 * do, the common case in C: the child's own handlers while signals are
 * still blocked, then unblock (a cancel sent at the fork is remembered by
 * its handler now), arm the cancel, call the function; a child whose
 * function returned None, that runs no other thread and holds no lock ends
 * here, after the engine's end_child (_cengine_end.h) ended what it opened
 * (an engine it cannot end in C, anything else: transport.child_end). */
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
                PyObject *holding = PyObject_CallNoArgs(child_holding);
                if (holding == Py_False) {
                    /* Nothing to send, no lock to name as held: end what the
                     * engine opened, if it is that simple, and exit. */
                    PyObject *ended = PyObject_CallOneArg(
                        child_end_fast, engine != NULL ? engine : Py_None);
                    if (ended == Py_True) {
                        ps_exit(0); /* the common end */
                    }
                    if (ended == NULL) {
                        /* A close failed: the Python end's report of it. */
                        PyObject *type, *failed, *tb;
                        PyErr_Fetch(&type, &failed, &tb);
                        PyErr_NormalizeException(&type, &failed, &tb);
                        Py_XDECREF(type);
                        Py_XDECREF(tb);
                        PyObject *stack[3] = {child_backend, failed != NULL ? failed : Py_None,
                                              fdobj};
                        r = PyObject_Vectorcall(child_end_failed, stack, 3, NULL);
                        if (r == NULL || !as_long(r, &status)) {
                            status = 1;
                        }
                        PyErr_Clear();
                        ps_exit(status);
                    }
                    Py_DECREF(ended);
                }
                Py_XDECREF(holding);
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
        PyObject *r = ps_flush_stream(i);
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
