/* Included by _cengine.c (after _cengine_lock.h and _cengine_get.h): the lock
 * object of `ps.interprocess_lock(name)` with the default options, built in
 * C (new_lock), and the locks part's entry it opens (entry_new).
 *
 * Why: the by-name open of a lock is often a freshly forked child's first
 * call into procshare; the Python constructors (InterprocessLock.__init__
 * and LockEntry.__init__, which stay the reference and serve every other
 * case) ran there for the first time, with their checks, and each copied
 * pages. Here the fields are set through their slots, as those
 * constructors set them for a valid name and the default options. */

static PyTypeObject *nl_lock_type, *nl_entry_type;
static Py_ssize_t nl_name, nl_timeout, nl_death, nl_entry, nl_m;
static PyObject *s_poll_e, *s_engine_p;

/* new_lock_setup(InterprocessLock, LockEntry), after lock_setup() found the
 * entry's slots (sl_le) on the same LockEntry. */
static PyObject *
cengine_new_lock_setup(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyTypeObject *lock, *entry;
    if (!PyArg_ParseTuple(args, "O!O!:new_lock_setup", &PyType_Type, &lock, &PyType_Type, &entry)) {
        return NULL;
    }
    const char *who = "new_lock_setup";
    if (ps_member_offset(lock, "_name", &nl_name, who) < 0 ||
        ps_member_offset(lock, "_timeout", &nl_timeout, who) < 0 ||
        ps_member_offset(lock, "_on_owner_death", &nl_death, who) < 0 ||
        ps_member_offset(lock, "_entry", &nl_entry, who) < 0 ||
        ps_member_offset(lock, "_m", &nl_m, who) < 0) {
        return NULL;
    }
    if (sl_le[0].type != entry) {
        PyErr_SetString(PyExc_TypeError, "new_lock_setup: not the LockEntry lock_setup() took");
        return NULL;
    }
    if (intern_str(&s_poll_e, "poll") < 0 || intern_str(&s_engine_p, "engine") < 0) {
        return NULL;
    }
    Py_XSETREF(nl_lock_type, (PyTypeObject *)Py_NewRef(lock));
    Py_XSETREF(nl_entry_type, (PyTypeObject *)Py_NewRef(entry));
    Py_RETURN_NONE;
}

/* A new LockEntry (LockEntry.__init__'s fields), or NULL. */
static PyObject *
entry_new(PyObject *name, PyObject *ns, PyObject *os_name, PyObject *handle, PyObject *mutex,
          PyObject *part)
{
    if (nl_entry_type == NULL) {
        return PyObject_CallFunctionObjArgs(lk_entry_cls, name, ns, os_name, handle, mutex, part,
                                            NULL);
    }
    PyObject *engine = ps_slot_get(&sl_lp_engine, part, s_engine_p);
    if (engine == NULL) {
        return NULL;
    }
    PyObject *forks = NULL;
    PyObject *forks_now = ps_slot_peek(&sl_e_forks, engine);
    PyObject *forking_now = ps_slot_peek(&sl_e_forking, engine);
    if (forks_now != NULL && forking_now != NULL) {
        /* Below any fork under way in another thread: its child inherits it. */
        forks = PyNumber_Subtract(forks_now, forking_now);
    }
    else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "a locks part without its engine");
    }
    Py_DECREF(engine);
    PyObject *users = forks == NULL ? NULL : PySet_New(NULL);
    PyObject *zero = users == NULL ? NULL : PyLong_FromLong(0);
    PyObject *entry = zero == NULL ? NULL : nl_entry_type->tp_alloc(nl_entry_type, 0);
    if (entry == NULL) {
        Py_XDECREF(forks);
        Py_XDECREF(users);
        Py_XDECREF(zero);
        return NULL;
    }
    AT(entry, sl_le[EN_NAME].offset) = Py_NewRef(name);
    AT(entry, sl_le[EN_NAMESPACE].offset) = Py_NewRef(ns);
    AT(entry, sl_le[EN_OS_NAME].offset) = Py_NewRef(os_name);
    AT(entry, sl_le[EN_HANDLE].offset) = Py_NewRef(handle);
    AT(entry, sl_le[EN_MUTEX].offset) = Py_NewRef(mutex);
    AT(entry, sl_le[EN_PART].offset) = Py_NewRef(part);
    AT(entry, sl_le[EN_USERS].offset) = users;
    AT(entry, sl_le[EN_CLOSED].offset) = Py_NewRef(Py_False);
    AT(entry, sl_le[EN_FORKS].offset) = forks;
    AT(entry, sl_le[EN_CLOSED_AT].offset) = zero;
    return entry;
}

/* new_lock(name, mode) -> InterprocessLock(name) with the default options,
 * built without running its __init__; NotImplemented, nothing done, when
 * the name is not a valid one (the Python constructor says what is wrong), or
 * when new_lock_setup() did not take the lock class. */
static PyObject *
cengine_new_lock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "new_lock(name, mode)");
        return NULL;
    }
    if (nl_lock_type == NULL) {
        Py_RETURN_NOTIMPLEMENTED; /* not set up (a lock class without the C guard) */
    }
    PyObject *name = args[0], *mode = args[1];
    if (!PyUnicode_CheckExact(name) || !PyUnicode_IS_ASCII(name) ||
        !valid_bytes((const char *)PyUnicode_DATA(name), PyUnicode_GET_LENGTH(name))) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *engine = cengine_get_engine(NULL, NULL);
    if (engine == NULL) {
        return NULL;
    }
    PyObject *lock = nl_lock_type->tp_alloc(nl_lock_type, 0);
    if (lock == NULL) {
        Py_DECREF(engine);
        return NULL;
    }
    AT(lock, nl_name) = Py_NewRef(name);
    AT(lock, nl_timeout) = Py_NewRef(Py_None);
    AT(lock, nl_death) = Py_NewRef(Py_None);
    AT(lock, nl_entry) = Py_NewRef(Py_None);
    AT(lock, nl_m) = Py_NewRef(Py_None);
    PyObject *user = PyLong_FromVoidPtr(lock);
    PyObject *entry = NULL;
    if (user != NULL) {
        /* (LocksPart.open, as the Python constructor calls it) */
        PyObject *call[4] = {engine, name, user, mode};
        entry = cengine_open_lock(NULL, call, 4);
        Py_DECREF(user);
    }
    PyObject *mutex = entry == NULL ? NULL : ps_slot_peek(&sl_le[EN_MUTEX], entry);
    if (entry != NULL && mutex == NULL) {
        mutex = PyObject_GetAttrString(entry, "mutex"); /* (a Python-made entry) */
        Py_XDECREF(mutex);                               /* (the entry keeps it) */
    }
    if (mutex == NULL) {
        Py_XDECREF(entry);
        Py_DECREF(lock); /* (its _entry is None: its finalizer has nothing to undo) */
        Py_DECREF(engine);
        return NULL;
    }
    Py_SETREF(AT(lock, nl_entry), entry);
    Py_SETREF(AT(lock, nl_m), Py_NewRef(mutex));
    /* After registering as a user, so housekeeping never closes our own entry. */
    int busy = 0;
    if (Py_IS_TYPE(engine, sl_e_pid.type)) {
        PyObject *pending = ps_slot_peek(&sl_e_pending, engine);
        PyObject *kept = ps_slot_peek(&sl_e_kept, engine);
        busy = (pending != NULL && pending != Py_False) || (kept != NULL && kept != Py_False);
    }
    if (busy) {
        PyObject *done = PyObject_CallMethodNoArgs(engine, s_poll_e);
        busy = done == NULL ? -1 : 0;
        Py_XDECREF(done);
    }
    Py_DECREF(engine);
    if (busy < 0) {
        Py_DECREF(lock);
        return NULL;
    }
    return lock;
}
