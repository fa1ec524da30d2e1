/* Included by _robustmutex.c: the by-name reuse of lock objects. */
/* The by-name reuse of lock objects (see procshare._engine.locks): a
 * `with ps.interprocess_lock("m"):` in a loop gets back the object the
 * previous one made, if nothing but the cache refers to it. The check is
 * here because the same in Python (a dict lookup, the current namespace,
 * the environment, sys.getrefcount) cost as much as the lock itself, and
 * keeping is here because a forked child that opens a lock once would
 * otherwise run (and copy the pages of) three more Python functions.
 * The cache is the current engine's "by_name" dict: name -> (namespace,
 * raw $PROCSHARE_NAMESPACE, lock object). Where the current engine,
 * namespace and environment are read from is set once by reuse_setup();
 * only touched with the GIL held. */
static PyObject *reuse_globals;  /* procshare._engine.core's globals: "_engine" */
static PyObject *reuse_engine_key, *reuse_pending_key, *reuse_by_name_key, *reuse_kept_key;
static PyObject *reuse_nsvar;    /* the namespace ContextVar */
static PyObject *reuse_env;      /* os.environ's dict, or NULL */
static PyObject *reuse_env_key;
/* The engine class and where its "by_name" and "pending" slots are: read in
 * place (the same as getattr, without looking the descriptors up per call).
 * 0 when not known: then getattr. */
static PyTypeObject *reuse_engine_type;
static Py_ssize_t by_name_offset, pending_offset;

static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    Py_ssize_t offset;
    if (ps_member_offset(type, name, &offset, "reuse_setup") < 0) {
        PyErr_Clear();
        return 0;
    }
    return offset;
}

static PyObject *
robustmutex_reuse_setup(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyContextVar_CheckExact(args[1]) ||
        (args[2] != Py_None && !PyDict_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError,
                        "reuse_setup(engine_globals, namespace_var, environ_dict or None, key)");
        return NULL;
    }
    if (reuse_engine_key == NULL) {
        reuse_engine_key = PyUnicode_InternFromString("_engine");
        reuse_pending_key = PyUnicode_InternFromString("pending");
        reuse_by_name_key = PyUnicode_InternFromString("by_name");
        reuse_kept_key = PyUnicode_InternFromString("kept");
        if (reuse_engine_key == NULL || reuse_pending_key == NULL ||
            reuse_by_name_key == NULL || reuse_kept_key == NULL) {
            return NULL;
        }
    }
    PyObject *engine_type = PyDict_GetItemString(args[0], "Engine"); /* borrowed */
    if (engine_type != NULL && PyType_Check(engine_type)) {
        Py_XSETREF(reuse_engine_type, (PyTypeObject *)Py_NewRef(engine_type));
        by_name_offset = slot_offset(reuse_engine_type, "by_name");
        pending_offset = slot_offset(reuse_engine_type, "pending");
    }
    Py_XSETREF(reuse_globals, Py_NewRef(args[0]));
    Py_XSETREF(reuse_nsvar, Py_NewRef(args[1]));
    Py_XSETREF(reuse_env, args[2] == Py_None ? NULL : Py_NewRef(args[2]));
    Py_XSETREF(reuse_env_key, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

/* The current engine (borrowed) and its by_name dict (new reference), or
 * *cache NULL with no error when there is no engine (a fresh child). */
static int
current_cache(PyObject **engine, PyObject **cache)
{
    *cache = NULL;
    *engine = PyDict_GetItemWithError(reuse_globals, reuse_engine_key);
    if (*engine == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (*engine == Py_None) {
        return 0;
    }
    if (by_name_offset && Py_TYPE(*engine) == reuse_engine_type) {
        *cache = *(PyObject **)((char *)*engine + by_name_offset);
        Py_XINCREF(*cache);
    }
    else {
        *cache = PyObject_GetAttr(*engine, reuse_by_name_key);
        if (*cache == NULL) {
            return -1;
        }
    }
    if (*cache == NULL) {
        return 0;
    }
    if (!PyDict_CheckExact(*cache)) {
        Py_CLEAR(*cache);
    }
    return 0;
}

/* The current namespace (new reference, None for none) and the raw value of
 * $PROCSHARE_NAMESPACE (borrowed, Py_None if unset). */
static int
current_namespace(PyObject **ns, PyObject **env)
{
    if (PyContextVar_Get(reuse_nsvar, Py_None, ns) < 0) {
        return -1;
    }
    *env = NULL;
    if (reuse_env != NULL) {
        *env = PyDict_GetItemWithError(reuse_env, reuse_env_key);
        if (*env == NULL && PyErr_Occurred()) {
            Py_DECREF(*ns);
            return -1;
        }
    }
    if (*env == NULL) {
        *env = Py_None;
    }
    return 0;
}

/* reuse(name): the lock object kept for name if it is for the current
 * namespace and environment, the engine has no housekeeping pending, and
 * the cache's tuple is its only reference (nobody uses it, nobody can be
 * about to close it); else None. */
static PyObject *
robustmutex_reuse(PyObject *Py_UNUSED(module), PyObject *name)
{
#ifdef Py_GIL_DISABLED
    /* Reference counts are not exact without the GIL: never reuse. */
    (void)name;
    Py_RETURN_NONE;
#else
    PyObject *engine, *cache, *hit, *ns, *env, *pending, *result = Py_None;
    int same, busy;
    if (reuse_globals == NULL) {
        Py_RETURN_NONE;
    }
    if (current_cache(&engine, &cache) < 0) {
        return NULL;
    }
    if (cache == NULL) {
        Py_RETURN_NONE;
    }
    hit = PyDict_GetItemWithError(cache, name); /* borrowed, alive while cache is */
    if (hit == NULL) {
        Py_DECREF(cache);
        if (PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
                return NULL;
            }
            PyErr_Clear(); /* unhashable: not a name (the slow path says so) */
        }
        Py_RETURN_NONE;
    }
    Py_INCREF(hit);
    Py_DECREF(cache);
    if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 3) {
        goto done;
    }
    /* Housekeeping pending (a dropped child to reap, ...): the slow path, a
     * call into procshare like any other, runs it. */
    if (pending_offset && Py_TYPE(engine) == reuse_engine_type) {
        pending = *(PyObject **)((char *)engine + pending_offset);
        busy = pending != Py_False; /* (unset: as if pending) */
    }
    else {
        pending = PyObject_GetAttr(engine, reuse_pending_key);
        if (pending == NULL) {
            result = NULL;
            goto done;
        }
        busy = PyObject_IsTrue(pending);
        Py_DECREF(pending);
    }
    if (busy != 0) {
        result = busy < 0 ? NULL : Py_None;
        goto done;
    }
    if (current_namespace(&ns, &env) < 0) {
        result = NULL;
        goto done;
    }
    same = ns == PyTuple_GET_ITEM(hit, 0) && env == PyTuple_GET_ITEM(hit, 1);
    Py_DECREF(ns);
    /* Last, after every lookup: only the cache's tuple refers to it. */
    if (same && Py_REFCNT(PyTuple_GET_ITEM(hit, 2)) == 1) {
        result = PyTuple_GET_ITEM(hit, 2);
    }
done:
    Py_XINCREF(result);
    Py_DECREF(hit);
    return result;
#endif
}

/* keep(name, lock): keep a by-name lock object this process just made for
 * reuse (see reuse()), in the current engine's cache, for the current
 * namespace and environment, and ask the engine's next housekeeping to drop
 * it (engine.kept). Nothing where reuse() would never hand it out. */
static PyObject *
robustmutex_keep(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "keep(name, lock)");
        return NULL;
    }
#ifdef Py_GIL_DISABLED
    Py_RETURN_NONE;
#else
    PyObject *engine, *cache, *ns, *env, *kept;
    int rc;
    if (reuse_globals == NULL || !PyUnicode_CheckExact(args[0])) {
        Py_RETURN_NONE;
    }
    if (current_cache(&engine, &cache) < 0) {
        return NULL;
    }
    if (cache == NULL) {
        Py_RETURN_NONE;
    }
    if (current_namespace(&ns, &env) < 0) {
        Py_DECREF(cache);
        return NULL;
    }
    kept = PyTuple_Pack(3, ns, env, args[1]);
    Py_DECREF(ns);
    if (kept == NULL) {
        Py_DECREF(cache);
        return NULL;
    }
    /* (Replacing an entry may free the object kept before, running its
     * finalizer: the engine is held across it.) */
    Py_INCREF(engine);
    rc = PyDict_SetItem(cache, args[0], kept);
    Py_DECREF(kept);
    Py_DECREF(cache);
    if (rc == 0) {
        rc = PyObject_SetAttr(engine, reuse_kept_key, Py_True);
    }
    Py_DECREF(engine);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
#endif
}
