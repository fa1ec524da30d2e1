/* Included by _cengine.c: get_engine() in C (core.get_engine, whose Python
 * version, core.get_engine_py, stays the reference).
 *
 * Why: a freshly forked child's first call into procshare asks for its
 * engine, and adopting the spare one (core._new_engine) in Python ran two
 * functions and touched their code, globals and the Engine's slot
 * descriptors for the first time there: copied pages. Here: this process's
 * engine if it has one; else, when the spare a forked child inherited is
 * there to adopt and no thread is inside _new_engine (its lock is free,
 * and this code holds the GIL throughout), the adoption itself; anything
 * else calls the Python _new_engine. */

static PyObject *ge_lock_type; /* threading.Lock, for after_fork_child() */
static PyObject *ge_core, *ge_new, *s_ge_engine, *s_ge_spare, *s_ge_inherited, *s_ge_lock,
    *s_ge_locked;
#define AT(obj, off) (*(PyObject **)((char *)(obj) + (off)))
#define GE_SLOT(obj) AT(obj, sl_e_pid.offset)

/* engine_setup(core globals, Engine, _new_engine, threading.Lock) */
static PyObject *
cengine_engine_setup(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *globals, *type, *new_engine, *lock_type;
    if (!PyArg_ParseTuple(args, "O!O!OO:engine_setup", &PyDict_Type, &globals, &PyType_Type,
                          &type, &new_engine, &lock_type)) {
        return NULL;
    }
    const ps_slot_spec slots[] = {
        {&sl_e_pid, type, "pid"},
        {&sl_e_forks, type, "forks"},
        {&sl_e_forking, type, "forking"},
        {&sl_e_pending, type, "pending"},
        {&sl_e_kept, type, "kept"},
        {&sl_e_parts, type, "_parts"},
        {&sl_e_lock, type, "lock"},
        {&sl_e_backend, type, "backend"},
        {&sl_e_closed, type, "_closed"},
        {&sl_e_deferred, type, "_deferred"},
    };
    if (ps_slots_find(slots, sizeof slots / sizeof slots[0], "engine_setup") < 0) {
        return NULL;
    }
    if (intern_str(&s_ge_engine, "_engine") < 0 || intern_str(&s_ge_spare, "_spare") < 0 ||
        intern_str(&s_ge_inherited, "_inherited") < 0 ||
        intern_str(&s_ge_lock, "_engine_lock") < 0 || intern_str(&s_ge_locked, "locked") < 0 ||
        intern_str(&s_pid_g, "_pid") < 0) {
        return NULL;
    }
    Py_XSETREF(ge_core, Py_NewRef(globals));
    Py_XSETREF(ge_new, Py_NewRef(new_engine));
    Py_XSETREF(ge_lock_type, Py_NewRef(lock_type));
    Py_RETURN_NONE;
}

/* after_fork_child(): what core.py registers to run in every child. Every
 * child of the process runs it (os.register_at_fork), raw os.fork children
 * included: the Python function's frame, its code (cold in a child: the
 * parent never calls it) and the modules it read were pages each child
 * copied. The pid, a fresh engine lock (another thread may have held the old
 * one at the fork), and the parent's engine put aside as inherited. */
static PyObject *
cengine_after_fork_child(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    if (ge_core == NULL) {
        PyErr_SetString(PyExc_TypeError, "after_fork_child() after engine_setup()");
        return NULL;
    }
    PyObject *pid = PyLong_FromLong((long)getpid());
    int rc = pid == NULL ? -1 : PyDict_SetItem(ge_core, s_pid_g, pid);
    Py_XDECREF(pid);
    PyObject *lock = rc < 0 ? NULL : PyObject_CallNoArgs(ge_lock_type);
    rc = lock == NULL ? -1 : PyDict_SetItem(ge_core, s_ge_lock, lock);
    Py_XDECREF(lock);
    PyObject *engine = rc < 0 ? NULL : PyDict_GetItemWithError(ge_core, s_ge_engine);
    if (engine == NULL) {
        if (rc == 0 && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_NameError, "procshare._engine.core has no _engine");
        }
        return NULL;
    }
    if (engine != Py_None) {
        PyObject *inherited = PyDict_GetItemWithError(ge_core, s_ge_inherited);
        if (inherited == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_NameError, "procshare._engine.core has no _inherited");
            }
            return NULL;
        }
        Py_INCREF(engine);
        rc = PyList_CheckExact(inherited) ? PyList_Append(inherited, engine) : -1;
        if (rc == 0) {
            rc = PyDict_SetItem(ge_core, s_ge_engine, Py_None);
        }
        else if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "procshare._engine.core._inherited is not a list");
        }
        Py_DECREF(engine);
        if (rc < 0) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* Whether obj is an Engine whose pid slot equals pid: 1, 0, -1 on error. */
static int
engine_of(PyObject *obj, PyObject *pid)
{
    PyObject *own = obj == NULL ? NULL : ps_slot_peek(&sl_e_pid, obj);
    if (own == NULL) {
        return 0;
    }
    return own == pid ? 1 : PyObject_RichCompareBool(own, pid, Py_EQ);
}

static PyObject *
cengine_get_engine(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    if (ge_core == NULL) {
        PyErr_SetString(PyExc_TypeError, "get_engine() after engine_setup()");
        return NULL;
    }
    PyObject *engine = PyDict_GetItemWithError(ge_core, s_ge_engine); /* borrowed */
    PyObject *pid = PyDict_GetItemWithError(ge_core, s_pid_g);        /* borrowed */
    if (PyErr_Occurred()) {
        return NULL;
    }
    int mine = pid == NULL ? 0 : engine_of(engine, pid);
    if (mine != 0) {
        return mine < 0 ? NULL : Py_NewRef(engine);
    }
    /* The adoption of the spare (core._new_engine's first branch). */
    PyObject *spare = PyDict_GetItemWithError(ge_core, s_ge_spare);        /* borrowed */
    PyObject *inherited = PyDict_GetItemWithError(ge_core, s_ge_inherited); /* borrowed */
    PyObject *lock = PyDict_GetItemWithError(ge_core, s_ge_lock);           /* borrowed */
    if (PyErr_Occurred()) {
        return NULL;
    }
    int spare_ok = pid != NULL && spare != NULL && Py_IS_TYPE(spare, sl_e_pid.type) &&
                   inherited != NULL && PyList_CheckExact(inherited) && lock != NULL;
    if (spare_ok) {
        int same = engine_of(spare, pid);
        if (same < 0) {
            return NULL;
        }
        spare_ok = same == 0; /* built here: never used by its builder, a child's to adopt */
    }
    if (spare_ok) {
        PyObject *busy = PyObject_CallMethodNoArgs(lock, s_ge_locked);
        if (busy == NULL) {
            return NULL;
        }
        spare_ok = busy == Py_False; /* nobody half-way through _new_engine */
        Py_DECREF(busy);
    }
    if (!spare_ok) {
        return PyObject_CallNoArgs(ge_new);
    }
    Py_INCREF(spare); /* (the dict's reference goes below) */
    if ((engine != NULL && engine != Py_None && PyList_Append(inherited, engine) < 0) ||
        PyDict_SetItem(ge_core, s_ge_spare, Py_None) < 0) {
        Py_DECREF(spare);
        return NULL;
    }
    Py_SETREF(GE_SLOT(spare), Py_NewRef(pid));
    if (PyDict_SetItem(ge_core, s_ge_engine, spare) < 0) {
        Py_DECREF(spare);
        return NULL;
    }
    return spare;
}
