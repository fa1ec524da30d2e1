/* Included by _cengine.c: a lock's by-name open (locks.LocksPart.open). */
/* -- a lock's by-name open: the engine's locks part (locks.LocksPart.open) ---
 *
 * The same steps as LocksPart.open and _open_new, which stay the reference:
 * the current namespace, the engine's locks part, its entry for the name
 * (registering the user), else, holding the engine's lock, a new entry: the
 * OS name (remembered per user, as segments.os_name), the metadata
 * (locks._lock_meta), the backend's segment_open, else segment_create with
 * the lock's memory set up, and the entry. Anything unusual (a namespace not
 * swept yet, an OSError, an object too small) is handed to the Python
 * _open_new, which says what went wrong. A lock object is often first opened
 * by name in a freshly forked child: there these steps in Python (eight
 * functions) copied ~25 more pages. What it reads is given once by
 * lock_setup(). */

static PyObject *lk_nsvar, *lk_env, *lk_env_key, *lk_default_ns, *lk_current_namespace,
    *lk_env_namespace, *lk_segments, *lk_locks_part, *lk_entry_cls, *lk_keep_all, *lk_rlock,
    *lk_rlock_acquire, *lk_rlock_release;
static PyObject *s_parts, *s_locks, *s_entries, *s_users, *s_closed, *s_lock, *s_acquire,
    *s_release, *s_backend, *s_swept, *s_os_names, *s_segment_open, *s_segment_create,
    *s_segment_close, *s_lock_keep, *s_lock_init, *s_lock_attach, *s_lock_data_size,
    *s_data_size, *s_open_new, *s_l, *kw_lopen, *kw_lcreate, *kw_keep, *s_open_fast,
    *s_create_fast;

static PyObject *entry_new(PyObject *name, PyObject *ns, PyObject *os_name, PyObject *handle,
                           PyObject *mutex, PyObject *part); /* _cengine_new.h */

static int
intern_str(PyObject **slot, const char *text)
{
    if (*slot == NULL) {
        *slot = PyUnicode_InternFromString(text);
    }
    return *slot == NULL ? -1 : 0;
}

static PyObject *
cengine_lock_setup(PyObject *Py_UNUSED(module), PyObject *conf)
{
    static const char *keys[] = {"nsvar", "env", "env_key", "default_namespace",
                                 "current_namespace", "env_namespace", "segments",
                                 "locks_part", "LockEntry", "keep_all", "RLock"};
    PyObject **slots[] = {&lk_nsvar, &lk_env, &lk_env_key, &lk_default_ns,
                          &lk_current_namespace, &lk_env_namespace, &lk_segments,
                          &lk_locks_part, &lk_entry_cls, &lk_keep_all, &lk_rlock};
    if (!PyDict_Check(conf)) {
        PyErr_SetString(PyExc_TypeError, "lock_setup(dict)");
        return NULL;
    }
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        PyObject *value = PyDict_GetItemString(conf, keys[i]); /* borrowed */
        if (value == NULL) {
            PyErr_Format(PyExc_KeyError, "lock_setup: %s missing", keys[i]);
            return NULL;
        }
        Py_XSETREF(*slots[i], Py_NewRef(value));
    }
    if (!PyContextVar_CheckExact(lk_nsvar) || (lk_env != Py_None && !PyDict_Check(lk_env)) ||
        !PyDict_Check(lk_segments) || !PyType_Check(lk_rlock)) {
        PyErr_SetString(PyExc_TypeError, "lock_setup: wrong types");
        return NULL;
    }
    PyObject *locks_part = PyDict_GetItemString(conf, "LocksPart");        /* borrowed */
    PyObject *segments_part = PyDict_GetItemString(lk_segments, "SegmentsPart"); /* borrowed */
    if (locks_part == NULL || segments_part == NULL) {
        PyErr_SetString(PyExc_KeyError, "lock_setup: LocksPart or segments.SegmentsPart missing");
        return NULL;
    }
    const ps_slot_spec fields[] = {
        {&sl_lp_entries, locks_part, "_entries"},
        {&sl_lp_backend, locks_part, "backend"},
        {&sl_lp_engine, locks_part, "engine"},
        {&sl_lp_fast, locks_part, "fast"},
        {&sl_sp_open, segments_part, "_open"},
    };
    if (ps_slots_find(fields, sizeof fields / sizeof fields[0], "lock_setup") < 0) {
        return NULL;
    }
    for (int i = 0; i < EN_COUNT; i++) {
        if (ps_slot_find(&sl_le[i], lk_entry_cls, en_names[i], "lock_setup") < 0) {
            return NULL;
        }
    }
    /* The engine's lock is taken and released through the methods found here
     * (a method lookup in a fresh child writes the type's lookup cache). */
    Py_XSETREF(lk_rlock_acquire, PyObject_GetAttrString(lk_rlock, "acquire"));
    Py_XSETREF(lk_rlock_release, PyObject_GetAttrString(lk_rlock, "release"));
    if (lk_rlock_acquire == NULL || lk_rlock_release == NULL) {
        return NULL;
    }
    if (intern_str(&s_parts, "_parts") < 0 || intern_str(&s_locks, "locks") < 0 ||
        intern_str(&s_entries, "_entries") < 0 || intern_str(&s_users, "users") < 0 ||
        intern_str(&s_closed, "closed") < 0 || intern_str(&s_lock, "lock") < 0 ||
        intern_str(&s_acquire, "acquire") < 0 || intern_str(&s_release, "release") < 0 ||
        intern_str(&s_backend, "backend") < 0 || intern_str(&s_swept, "swept_namespaces") < 0 ||
        intern_str(&s_os_names, "_inherited_os_names") < 0 ||
        intern_str(&s_segment_open, "segment_open") < 0 ||
        intern_str(&s_segment_create, "segment_create") < 0 ||
        intern_str(&s_segment_close, "segment_close") < 0 ||
        intern_str(&s_lock_keep, "lock_keep") < 0 || intern_str(&s_lock_init, "lock_init") < 0 ||
        intern_str(&s_lock_attach, "lock_attach") < 0 ||
        intern_str(&s_lock_data_size, "lock_data_size") < 0 ||
        intern_str(&s_data_size, "data_size") < 0 || intern_str(&s_open_new, "_open_new") < 0 ||
        intern_str(&s_l, "l") < 0 || intern_str(&s_open_fast, "segment_open_fast") < 0 ||
        intern_str(&s_create_fast, "lock_create_fast") < 0) {
        return NULL;
    }
    if (kw_lopen == NULL) {
        PyObject *keep_orphan = PyUnicode_InternFromString("keep_orphan");
        PyObject *meta = PyUnicode_InternFromString("meta");
        PyObject *mode = PyUnicode_InternFromString("mode");
        PyObject *persist = PyUnicode_InternFromString("persist");
        PyObject *init = PyUnicode_InternFromString("init");
        PyObject *keep = PyUnicode_InternFromString("keep");
        if (keep_orphan == NULL || meta == NULL || mode == NULL || persist == NULL ||
            init == NULL || keep == NULL) {
            return NULL;
        }
        kw_lopen = PyTuple_Pack(2, keep_orphan, meta);
        kw_lcreate = PyTuple_Pack(5, meta, s_data_size, mode, persist, init);
        kw_keep = PyTuple_Pack(1, keep);
        if (kw_lopen == NULL || kw_lcreate == NULL || kw_keep == NULL) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* The current namespace (new reference): names.current_namespace(). */
static PyObject *
lock_namespace(PyObject **env)
{
    PyObject *ns;
    if (PyContextVar_Get(lk_nsvar, Py_None, &ns) < 0) {
        return NULL;
    }
    *env = NULL;
    if (lk_env != Py_None) {
        *env = PyDict_GetItemWithError(lk_env, lk_env_key); /* borrowed */
        if (*env == NULL && PyErr_Occurred()) {
            Py_DECREF(ns);
            return NULL;
        }
    }
    if (ns != Py_None) {
        return ns;
    }
    Py_DECREF(ns);
    return *env == NULL ? Py_NewRef(lk_default_ns) : PyObject_CallNoArgs(lk_current_namespace);
}

/* A new entry for (ns, name): the work of LocksPart._open_new, or the Python
 * _open_new itself for anything unusual. New reference, or NULL. */
static PyObject *
lock_open_new(PyObject *part, PyObject *backend, PyObject *ns, PyObject *name, PyObject *mode,
              PyObject *env)
{
    PyObject *swept = PyDict_GetItemWithError(lk_segments, s_swept); /* borrowed */
    if (swept == NULL && PyErr_Occurred()) {
        return NULL;
    }
    int known = swept != NULL && PyAnySet_Check(swept) ? PySet_Contains(swept, ns) : 0;
    if (known < 0) {
        return NULL;
    }
    if (!known) {
        goto python; /* the Python path reclaims the namespace's orphans first */
    }
    /* The OS name, remembered as segments.os_name does. */
    PyObject *uid = PyLong_FromUnsignedLong((unsigned long)geteuid());
    if (uid == NULL) {
        return NULL;
    }
    PyObject *key = PyTuple_Pack(4, s_l, name, ns, uid);
    if (key == NULL) {
        Py_DECREF(uid);
        return NULL;
    }
    PyObject *names_seen = PyDict_GetItemWithError(lk_segments, s_os_names); /* borrowed */
    PyObject *os_name = names_seen != NULL && PyDict_Check(names_seen)
                            ? PyDict_GetItemWithError(names_seen, key)
                            : NULL;
    Py_XINCREF(os_name);
    if (os_name == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            Py_DECREF(uid);
            return NULL;
        }
        PyObject *args[4] = {s_l, name, ns, uid};
        os_name = cnames_os_name(NULL, args, 4);
        if (os_name != NULL && names_seen != NULL && PyDict_Check(names_seen)) {
            if (PyDict_GET_SIZE(names_seen) >= 4096) {
                PyDict_Clear(names_seen);
            }
            if (PyDict_SetItem(names_seen, key, os_name) < 0) {
                Py_CLEAR(os_name);
            }
        }
    }
    Py_DECREF(key);
    Py_DECREF(uid);
    if (os_name == NULL) {
        return NULL;
    }
    /* The metadata (locks._lock_meta): the creator's $PROCSHARE_NAMESPACE as
     * its origin when it differs from the namespace. */
    PyObject *origin = env == NULL ? Py_NewRef(lk_default_ns) : PyObject_CallNoArgs(lk_env_namespace);
    if (origin == NULL) {
        Py_DECREF(os_name);
        return NULL;
    }
    int same = PyUnicode_Compare(origin, ns) == 0;
    if (PyErr_Occurred()) {
        Py_DECREF(origin);
        Py_DECREF(os_name);
        return NULL;
    }
    PyObject *text = same ? PyUnicode_FromFormat(
                                "{\"kind\": \"lock\", \"name\": \"%U\", \"namespace\": \"%U\"}",
                                name, ns)
                          : PyUnicode_FromFormat("{\"kind\": \"lock\", \"name\": \"%U\", "
                                                 "\"namespace\": \"%U\", \"origin\": \"%U\"}",
                                                 name, ns, origin);
    Py_DECREF(origin);
    PyObject *meta = text == NULL ? NULL : PyUnicode_AsUTF8String(text);
    Py_XDECREF(text);
    if (meta == NULL) {
        Py_DECREF(os_name);
        return NULL;
    }
    /* Open, else create; a racing creator or closer can make both miss once. */
    PyObject *handle = NULL, *keep = NULL, *init = NULL, *size = NULL;
    PyObject *fast = NULL, *create_fast = NULL, *attach = NULL;
    PyObject *held = NULL; /* the reference that keeps the four above: the table, or NULL */
    int made = 0; /* made by create_fast, at the lock's size */
    PyObject *table = ps_slot_peek(&sl_lp_fast, part);
    if (table != NULL && PyTuple_CheckExact(table) && PyTuple_GET_SIZE(table) == 4) {
        /* The backend's functions, found when the part was built (LocksPart.fast):
         * borrowed from the table, which is held instead (one count written,
         * not four). */
        Py_INCREF(table);
        held = table;
        fast = PyTuple_GET_ITEM(table, 0) == Py_None ? NULL : PyTuple_GET_ITEM(table, 0);
        create_fast = PyTuple_GET_ITEM(table, 1) == Py_None ? NULL : PyTuple_GET_ITEM(table, 1);
        size = PyTuple_GET_ITEM(table, 2);
        attach = PyTuple_GET_ITEM(table, 3);
    }
    else {
        fast = PyObject_GetAttr(backend, s_open_fast);
        if (fast == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
        }
        create_fast = PyErr_Occurred() ? NULL : PyObject_GetAttr(backend, s_create_fast);
        if (create_fast == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
        }
        size = PyErr_Occurred() ? NULL : PyObject_GetAttr(backend, s_lock_data_size);
        /* (held: these references, dropped together below) */
        held = size == NULL ? NULL
                            : PyTuple_Pack(3, fast == NULL ? Py_None : fast,
                                           create_fast == NULL ? Py_None : create_fast, size);
        Py_XDECREF(fast);
        Py_XDECREF(create_fast);
        Py_XDECREF(size);
        if (held == NULL) {
            Py_DECREF(meta);
            Py_DECREF(os_name);
            return NULL;
        }
    }
    /* (keep and init only when the backend's own open or create runs: each
     * lookup makes or touches an object, a copied page in a fresh child.) */
    while (size != NULL) {
        handle = fast == NULL ? NULL : PyObject_Vectorcall(fast, (PyObject *[]){os_name, meta}, 2,
                                                           NULL);
        if (handle == NULL || PyLong_Check(handle)) {
            /* No one-call open, or not its common case: the backend's own. */
            if (handle == NULL && fast != NULL) {
                break;
            }
            Py_XDECREF(handle);
            handle = NULL;
            if (keep == NULL && (keep = PyObject_GetAttr(backend, s_lock_keep)) == NULL) {
                break;
            }
            PyObject *open_args[4] = {backend, os_name, keep, meta};
            handle = PyObject_VectorcallMethod(s_segment_open, open_args,
                                               2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_lopen);
        }
        if (handle == Py_None) {
            Py_DECREF(handle);
            /* The backend's one-call creation of a lock object, if it has one. */
            handle = create_fast == NULL
                         ? Py_NewRef(Py_NotImplemented)
                         : PyObject_Vectorcall(create_fast, (PyObject *[]){os_name, meta, mode},
                                               3, NULL);
            made = handle != NULL && handle != Py_None && handle != Py_NotImplemented;
            if (handle == Py_NotImplemented) {
                Py_DECREF(handle);
                if (init == NULL && (init = PyObject_GetAttr(backend, s_lock_init)) == NULL) {
                    handle = NULL;
                    break;
                }
                PyObject *create_args[7] = {backend, os_name, meta, size, mode, Py_False, init};
                handle = PyObject_VectorcallMethod(s_segment_create, create_args,
                                                   2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_lcreate);
            }
        }
        if (handle == NULL || handle != Py_None) {
            break;
        }
        Py_DECREF(handle);
        handle = NULL;
    }
    Py_XDECREF(keep);
    Py_XDECREF(init);
    Py_DECREF(meta);
    PyObject *entry = NULL;
    if (handle == NULL) {
        Py_DECREF(held);
        Py_DECREF(os_name);
        if (PyErr_ExceptionMatches(PyExc_OSError)) {
            PyErr_Clear(); /* the Python path tries again and says what went wrong */
            goto python;
        }
        return NULL;
    }
    /* (One the backend just made at that size is no smaller.) */
    PyObject *have = made ? NULL : PyObject_GetAttr(handle, s_data_size);
    int small = made ? 0 : have == NULL ? -1 : PyObject_RichCompareBool(have, size, Py_LT);
    Py_XDECREF(have);
    if (small != 0) {
        Py_DECREF(held);
        if (small > 0) {
            /* Not ours to judge: close it, keeping it, and let the Python
             * path meet it again and say what it is. */
            PyObject *close_args[3] = {backend, handle, lk_keep_all};
            PyObject *done = PyObject_VectorcallMethod(
                s_segment_close, close_args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_keep);
            Py_XDECREF(done);
            if (done != NULL) {
                Py_DECREF(handle);
                Py_DECREF(os_name);
                goto python;
            }
        }
        Py_DECREF(handle);
        Py_DECREF(os_name);
        return NULL;
    }
    PyObject *mutex = attach != NULL ? PyObject_CallOneArg(attach, handle)
                                     : PyObject_CallMethodOneArg(backend, s_lock_attach, handle);
    Py_DECREF(held);
    if (mutex != NULL) {
        entry = entry_new(name, ns, os_name, handle, mutex, part);
        Py_DECREF(mutex);
    }
    Py_DECREF(handle);
    Py_DECREF(os_name);
    return entry;
python:
    return PyObject_CallMethodObjArgs(part, s_open_new, ns, name, mode, NULL);
}

/* lock.name(): through `method`, found by lock_setup(), when the engine's
 * lock is the RLock it expects (no method lookup), else looked up. */
static PyObject *
rlock_call(PyObject *lock, PyObject *method, PyObject *name)
{
    return Py_IS_TYPE(lock, (PyTypeObject *)lk_rlock) ? PyObject_CallOneArg(method, lock)
                                                      : PyObject_CallMethodNoArgs(lock, name);
}

/* Whether entry.closed is true: 1, 0, -1 with an exception set. */
static int
entry_closed(PyObject *entry)
{
    return ps_slot_true(&sl_le[EN_CLOSED], entry, s_closed);
}

/* entries[key], a new reference, or NULL: absent (no error set) or an error.
 * A dict's lookup, not the subscript: a missing key there raises a KeyError,
 * and the exception object, made and freed once or twice in every child
 * that creates its lock, is a few copied pages. */
static PyObject *
entry_of(PyObject *entries, PyObject *key)
{
    if (PyDict_CheckExact(entries)) {
        return Py_XNewRef(PyDict_GetItemWithError(entries, key));
    }
    PyObject *entry = PyObject_GetItem(entries, key);
    if (entry == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
    }
    return entry;
}

/* open_lock(engine, name, user, mode) -> the entry for name in the current
 * namespace, user registered on it (LocksPart.open). */
static PyObject *
cengine_open_lock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || lk_nsvar == NULL) {
        PyErr_SetString(PyExc_TypeError, "open_lock(engine, name, user, mode) after lock_setup()");
        return NULL;
    }
    PyObject *engine = args[0], *name = args[1], *user = args[2], *mode = args[3];
    PyObject *env, *ns = lock_namespace(&env), *part = NULL, *entries = NULL, *key = NULL;
    PyObject *entry = NULL, *users = NULL, *lock = NULL, *result = NULL;
    if (ns == NULL) {
        return NULL;
    }
    PyObject *parts = ps_slot_get(&sl_e_parts, engine, s_parts);
    if (parts == NULL) {
        goto done;
    }
    part = PyDict_Check(parts) ? PyDict_GetItemWithError(parts, s_locks) : NULL;
    Py_XINCREF(part);
    Py_DECREF(parts);
    if (part == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        part = PyObject_CallOneArg(lk_locks_part, engine);
        if (part == NULL) {
            goto done;
        }
    }
    entries = ps_slot_get(&sl_lp_entries, part, s_entries);
    key = entries == NULL ? NULL : PyTuple_Pack(2, ns, name);
    if (key == NULL) {
        goto done;
    }
    entry = entry_of(entries, key);
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
    }
    else {
        /* Register first, then check: a concurrent close marks the entry
         * closed before it looks at the users (LocksPart._close_if_idle). */
        users = ps_slot_get(&sl_le[EN_USERS], entry, s_users);
        if (users == NULL || PySet_Add(users, user) < 0) {
            goto done;
        }
        int closed = entry_closed(entry);
        if (closed < 0) {
            goto done;
        }
        if (!closed) {
            result = Py_NewRef(entry);
            goto done;
        }
        if (PySet_Discard(users, user) < 0) {
            goto done;
        }
        Py_CLEAR(users);
        Py_CLEAR(entry);
    }
    lock = ps_slot_get(&sl_e_lock, engine, s_lock);
    PyObject *taken = lock == NULL ? NULL : rlock_call(lock, lk_rlock_acquire, s_acquire);
    if (taken == NULL) {
        goto done;
    }
    Py_DECREF(taken);
    entry = entry_of(entries, key);
    int fresh = entry == NULL;
    if (entry != NULL) {
        int closed = entry_closed(entry);
        fresh = closed != 0;
        if (closed < 0) {
            Py_CLEAR(entry);
        }
        else if (closed) {
            Py_CLEAR(entry);
        }
    }
    if (!PyErr_Occurred() && fresh) {
        PyObject *backend = ps_slot_get(&sl_lp_backend, part, s_backend);
        entry = backend == NULL ? NULL : lock_open_new(part, backend, ns, name, mode, env);
        Py_XDECREF(backend);
        if (entry != NULL && PyObject_SetItem(entries, key, entry) < 0) {
            Py_CLEAR(entry);
        }
    }
    if (entry != NULL) {
        users = ps_slot_get(&sl_le[EN_USERS], entry, s_users);
        if (users != NULL && PySet_Add(users, user) == 0) {
            result = Py_NewRef(entry);
        }
    }
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *released = rlock_call(lock, lk_rlock_release, s_release);
        if (released == NULL) {
            if (type == NULL) {
                Py_CLEAR(result); /* that error is the one to report */
                goto done;
            }
            PyErr_Clear();
        }
        Py_XDECREF(released);
        PyErr_Restore(type, value, tb);
    }
done:
    Py_XDECREF(ns);
    Py_XDECREF(part);
    Py_XDECREF(entries);
    Py_XDECREF(key);
    Py_XDECREF(entry);
    Py_XDECREF(users);
    Py_XDECREF(lock);
    return result;
}
