/* Included by _cengine.c: the end of a forked child's engine, in C
 * (core.Engine.shutdown for the common case).
 *
 * A child that opened a segment and a lock by name and closed them with
 * `with` (the README example) still has an engine when its function returns:
 * the by-name lock stays open, kept for reuse, until the engine shuts down.
 * The Python shutdown that releases it (the parts in order, the lock part's
 * entries, the backend's close) runs some twenty functions for the first time
 * in that process, and each is a copied page or two. end_child() does the
 * same for an engine whose state is that simple, and answers False, having
 * changed nothing, for anything else, which core.Engine.shutdown then does
 * (it stays the reference):
 *
 *   - the engine is this process's, not shut down, forked no child, and has
 *     no release waiting for children;
 *   - its parts are the by-name segments part with no segment open, and the
 *     by-name locks part;
 *   - no thread of the process holds a lock (the caller asks the backend
 *     first: lock_holding() is False), and only one thread runs.
 *
 * Then the only OS state to end is each open lock entry's hold: the
 * backend's lock_close(handle), one C call each, whose last holder removes
 * the object unless a death must be told. The Python objects are left as
 * they are: the process exits next. An error from a close is raised (the
 * others are closed first); the caller reports it as the Python path does.
 */

static PyObject *end_core, *s_pid_g, *s_pid_e, *s_closed_e, *s_deferred_e, *s_forks_e,
    *s_forking_e, *s_parts_e, *s_open_p, *s_entries_p, *s_closed_entry, *s_handle_entry,
    *s_backend_e, *s_lock_close, *s_segments_key, *s_locks_key;

static PyObject *
cengine_end_setup(PyObject *Py_UNUSED(module), PyObject *core_globals)
{
    if (!PyDict_Check(core_globals)) {
        PyErr_SetString(PyExc_TypeError, "end_setup(core globals)");
        return NULL;
    }
    if (intern_str(&s_pid_g, "_pid") < 0 || intern_str(&s_pid_e, "pid") < 0 ||
        intern_str(&s_closed_e, "_closed") < 0 || intern_str(&s_deferred_e, "_deferred") < 0 ||
        intern_str(&s_forks_e, "forks") < 0 || intern_str(&s_forking_e, "forking") < 0 ||
        intern_str(&s_parts_e, "_parts") < 0 || intern_str(&s_open_p, "_open") < 0 ||
        intern_str(&s_entries_p, "_entries") < 0 || intern_str(&s_closed_entry, "closed") < 0 ||
        intern_str(&s_handle_entry, "handle") < 0 || intern_str(&s_backend_e, "backend") < 0 ||
        intern_str(&s_lock_close, "lock_close") < 0 ||
        intern_str(&s_segments_key, "segments") < 0 || intern_str(&s_locks_key, "locks") < 0) {
        return NULL;
    }
    Py_XSETREF(end_core, Py_NewRef(core_globals));
    Py_RETURN_NONE;
}

/* slot_get(obj, name), or NULL: with an exception set on an error, without
 * one if the attribute is missing. */
static PyObject *
slot_or_missing(const ps_slot *slot, PyObject *obj, PyObject *name)
{
    PyObject *got = ps_slot_get(slot, obj, name);
    if (got == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return got;
}

/* 1 if obj.name == value (an int), 0 if not or if it is missing, -1 with an
 * exception set on any other error. */
static int
attr_is_int(const ps_slot *slot, PyObject *obj, PyObject *name, long value)
{
    PyObject *got = slot_or_missing(slot, obj, name);
    if (got == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int same = PyLong_CheckExact(got) && PyLong_AsLong(got) == value;
    Py_DECREF(got);
    return PyErr_Occurred() ? -1 : same;
}

/* Whether obj.name is an empty dict or list (0 otherwise, -1 on an error
 * other than a missing attribute). */
static int
attr_is_empty(const ps_slot *slot, PyObject *obj, PyObject *name)
{
    PyObject *got = slot_or_missing(slot, obj, name);
    if (got == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int empty = (PyDict_CheckExact(got) && PyDict_GET_SIZE(got) == 0) ||
                (PyList_CheckExact(got) && PyList_GET_SIZE(got) == 0);
    Py_DECREF(got);
    return empty;
}

/* The open entries' handles of a locks part (new list), or NULL: with an
 * exception set on an error, without one if the part is not as expected. */
static PyObject *
open_lock_handles(PyObject *part)
{
    PyObject *entries = slot_or_missing(&sl_lp_entries, part, s_entries_p);
    if (entries == NULL) {
        return NULL;
    }
    PyObject *handles = PyDict_CheckExact(entries) ? PyList_New(0) : NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *entry;
    while (handles != NULL && PyDict_Next(entries, &pos, &key, &entry)) {
        int done = ps_slot_true(&sl_le[EN_CLOSED], entry, s_closed_entry);
        PyObject *handle = done != 0 ? NULL : ps_slot_get(&sl_le[EN_HANDLE], entry, s_handle_entry);
        if (done < 0 || (done == 0 && (handle == NULL || PyList_Append(handles, handle) < 0))) {
            Py_XDECREF(handle);
            Py_CLEAR(handles);
            break;
        }
        Py_XDECREF(handle);
    }
    Py_DECREF(entries);
    return handles;
}

/* end_child(engine) -> True: every hold the engine had is ended (nothing is
 * left for the Python shutdown); False: nothing was done, shut it down in
 * Python. Raises what a close raised (after closing the rest). */
static PyObject *
cengine_end_child(PyObject *Py_UNUSED(module), PyObject *engine)
{
    if (end_core == NULL) {
        PyErr_SetString(PyExc_TypeError, "end_child(engine) after end_setup()");
        return NULL;
    }
    if (engine == Py_None) {
        Py_RETURN_TRUE;
    }
    PyObject *pid = PyDict_GetItemWithError(end_core, s_pid_g); /* borrowed */
    long me = pid == NULL ? -1 : PyLong_AsLong(pid);
    if (me == -1) {
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    }
    int simple = attr_is_int(&sl_e_pid, engine, s_pid_e, me);
    if (simple == 1) {
        PyObject *closed = ps_slot_get(&sl_e_closed, engine, s_closed_e);
        simple = closed == NULL ? -1 : closed == Py_False;
        Py_XDECREF(closed);
    }
    if (simple == 1) {
        simple = attr_is_int(&sl_e_forks, engine, s_forks_e, 0);
    }
    if (simple == 1) {
        simple = attr_is_int(&sl_e_forking, engine, s_forking_e, 0);
    }
    if (simple == 1) {
        simple = attr_is_empty(&sl_e_deferred, engine, s_deferred_e);
    }
    if (simple != 1) {
        return simple < 0 ? NULL : Py_NewRef(Py_False);
    }
    PyObject *parts = ps_slot_get(&sl_e_parts, engine, s_parts_e);
    if (parts == NULL) {
        return NULL;
    }
    PyObject *handles = NULL, *key, *part;
    Py_ssize_t pos = 0;
    while (PyDict_CheckExact(parts) && PyDict_Next(parts, &pos, &key, &part)) {
        int is_segments = PyUnicode_Check(key) && PyUnicode_Compare(key, s_segments_key) == 0;
        int is_locks = PyUnicode_Check(key) && PyUnicode_Compare(key, s_locks_key) == 0;
        if (is_segments) {
            simple = attr_is_empty(&sl_sp_open, part, s_open_p);
        }
        else if (is_locks && handles == NULL) {
            handles = open_lock_handles(part);
            simple = handles != NULL ? 1 : PyErr_Occurred() ? -1 : 0;
        }
        else {
            simple = 0; /* anything else: the Python shutdown knows it */
        }
        if (simple != 1) {
            break;
        }
    }
    if (simple == 1 && !PyDict_CheckExact(parts)) {
        simple = 0;
    }
    Py_DECREF(parts);
    if (simple != 1) {
        Py_XDECREF(handles);
        return simple < 0 ? NULL : Py_NewRef(Py_False);
    }
    if (handles == NULL || PyList_GET_SIZE(handles) == 0) {
        Py_XDECREF(handles);
        Py_RETURN_TRUE;
    }
    /* (Looked up now, as the Python close does: not the part's table.) */
    PyObject *backend = ps_slot_get(&sl_e_backend, engine, s_backend_e);
    PyObject *close = backend == NULL ? NULL : PyObject_GetAttr(backend, s_lock_close);
    Py_XDECREF(backend);
    if (close == NULL) {
        Py_DECREF(handles);
        return NULL;
    }
    /* In the order the Python shutdown closes them (the entries' order); a
     * failure does not stop the rest, and the first is raised. */
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(handles); i++) {
        PyObject *done = PyObject_CallOneArg(close, PyList_GET_ITEM(handles, i));
        if (done == NULL) {
            if (type == NULL) {
                PyErr_Fetch(&type, &value, &tb);
            }
            else {
                PyErr_Clear();
            }
        }
        Py_XDECREF(done);
    }
    Py_DECREF(close);
    Py_DECREF(handles);
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_TRUE;
}
