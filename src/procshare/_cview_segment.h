/* Included by _cview.c: the Segment handle's C part (SegmentCore), the
 * Segment and ScalarView built together (scalar_segment), and the planned
 * by-name open of a number (open_planned). */
/* -- the Segment handle's C part, and the scalar open built in C --------------
 *
 * Why: the by-name open of a scalar (`with ps.shared("sum", ps.u64) as s:`)
 * is often a freshly forked child's first call into procshare, and each
 * Python function run there for the first time, each slot descriptor
 * looked up, copies pages (CPython 3.11 writes a code object's counters
 * and reference count on every call). Building the Segment handle and its
 * ScalarView here, in one call, replaced four Python constructors; the
 * Python ones (_shared.Segment.__init__, _kinds.ScalarKind.view,
 * _views.ScalarView.__init__) stay the reference and serve every other
 * case. SegmentCore holds the handle's fields and its `with` entry. */

typedef struct {
    PyObject_HEAD
    PyObject *part;
    PyObject *rec;
    PyObject *view;
} CoreObject;

/* Set by setup(): the Segment and ScalarView classes, and where the engine's
 * C record (segments.OpenSegment) keeps `closed`, `view` and `handle`. */
static PyTypeObject *segment_cls, *view_cls, *record_type;
static Py_ssize_t rec_closed_off, rec_view_off, rec_handle_off, rec_forks_off;
static PyObject *str_view, *str_close, *str_data, *str_cast;

#define REC_FIELD(rec, off) (*(PyObject **)((char *)(rec) + (off)))

/* The engine's and the segments part's fields the planned open and the C
 * close read (_slots.h), found by close_setup(). */
static ps_slot sl_engine_pid, sl_engine_forks, sl_engine_forking, sl_engine_backend,
    sl_engine_pending, sl_engine_kept, sl_engine_parts, sl_part_engine, sl_part_open,
    sl_part_created_last, sl_part_open_fast;

static int
core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->part);
    Py_VISIT(self->rec);
    Py_VISIT(self->view);
    return 0;
}

static int
core_clear(CoreObject *self)
{
    Py_CLEAR(self->part);
    Py_CLEAR(self->rec);
    Py_CLEAR(self->view);
    return 0;
}

static void
core_dealloc(CoreObject *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* resurrected */
    PyObject_GC_UnTrack(self);
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether the record is known open (a C record whose closed is False). */
static int
rec_open(PyObject *rec)
{
    return rec != NULL && record_type != NULL && Py_IS_TYPE(rec, record_type) &&
           REC_FIELD(rec, rec_closed_off) == Py_False;
}

/* __enter__(): the view; the `view` property (SegmentClosed) when closed. */
static PyObject *
core_enter(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    if (rec_open(self->rec) && self->view != NULL)
        return Py_NewRef(self->view);
    return PyObject_GetAttr((PyObject *)self, str_view);
}

static int close_fast(CoreObject *self); /* _cview_close.h */
static void core_finalize(CoreObject *self);

/* __exit__(*exc_info): close() (its common case in C: close_fast). */
static PyObject *
core_exit(CoreObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    int rc = close_fast(self);
    if (rc != 0)
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *done = PyObject_CallMethodNoArgs((PyObject *)self, str_close);
    if (done == NULL)
        return NULL;
    Py_DECREF(done);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"__enter__", (PyCFunction)core_enter, METH_NOARGS,
     "The view (the with block's target); SegmentClosed once closed."},
    {"__exit__", (PyCFunction)(void (*)(void))core_exit, METH_FASTCALL,
     "Close the segment (close())."},
    {NULL},
};

static PyMemberDef core_members[] = {
    {"_part", T_OBJECT_EX, offsetof(CoreObject, part), 0, "The engine part that opened it."},
    {"_rec", T_OBJECT_EX, offsetof(CoreObject, rec), 0, "The engine's record of the open."},
    {"_view", T_OBJECT_EX, offsetof(CoreObject, view), 0, "The view, or None once closed."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._cview.SegmentCore",
    .tp_doc = "The fields and `with` entry of procshare.Segment (see _cview.c).",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_finalize = (destructor)core_finalize,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_members = core_members,
};

/* setup(Segment, ScalarView, _Closed, (record type, offsets of closed, view,
 * handle, forks)) */
static PyObject *
cview_setup(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *seg, *view, *closed, *rec;
    Py_ssize_t closed_off, view_off, handle_off, forks_off;
    if (!PyArg_ParseTuple(args, "O!O!O!(O!nnnn):setup", &PyType_Type, &seg, &PyType_Type, &view,
                          &PyType_Type, &closed, &PyType_Type, &rec, &closed_off, &view_off,
                          &handle_off, &forks_off))
        return NULL;
    /* _Closed's one slot, _ps_name: where it is, from its member descriptor. */
    if (ps_member_offset((PyTypeObject *)closed, "_ps_name", &closed_name_off, "setup") < 0)
        return NULL;
    Py_XSETREF(closed_cls, (PyTypeObject *)Py_NewRef(closed));
    if (!PyType_IsSubtype((PyTypeObject *)seg, &CoreType) ||
        !PyType_IsSubtype((PyTypeObject *)view, &CellType)) {
        PyErr_SetString(PyExc_TypeError, "setup(Segment, ScalarView, record offsets)");
        return NULL;
    }
    Py_XSETREF(segment_cls, (PyTypeObject *)Py_NewRef(seg));
    Py_XSETREF(view_cls, (PyTypeObject *)Py_NewRef(view));
    Py_XSETREF(record_type, (PyTypeObject *)Py_NewRef(rec));
    rec_closed_off = closed_off;
    rec_view_off = view_off;
    rec_handle_off = handle_off;
    rec_forks_off = forks_off;
    Py_RETURN_NONE;
}

/* scalar_segment(part, rec, (name, kind, format)) -> a Segment whose view is a
 * ScalarView of the open `rec` (an engine record): what Segment(part, rec,
 * resolved) builds for a number kind, through _kinds.ScalarKind.view. On
 * failure the record is closed (part.close(rec)), as Segment.__init__ does. */
static PyObject *
cview_scalar_segment(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || segment_cls == NULL || !PyTuple_CheckExact(args[2]) ||
        PyTuple_GET_SIZE(args[2]) != 3 || record_type == NULL ||
        !Py_IS_TYPE(args[1], record_type)) {
        PyErr_SetString(PyExc_TypeError, "scalar_segment(part, rec, (name, kind, format)) "
                                         "after setup()");
        return NULL;
    }
    PyObject *part = args[0], *rec = args[1];
    PyObject *name = PyTuple_GET_ITEM(args[2], 0), *kind = PyTuple_GET_ITEM(args[2], 1);
    PyObject *fmt = PyTuple_GET_ITEM(args[2], 2);
    CoreObject *seg = NULL;
    CellObject *view = NULL;
    PyObject *data = NULL, *mv = NULL, *ref = NULL;
    const char *format = PyUnicode_AsUTF8(fmt);
    if (format == NULL)
        goto fail;
    seg = (CoreObject *)segment_cls->tp_alloc(segment_cls, 0);
    if (seg == NULL)
        goto fail;
    seg->part = Py_NewRef(part);
    seg->rec = Py_NewRef(rec);
    data = PyObject_GetAttr(REC_FIELD(rec, rec_handle_off), str_data);
    if (data == NULL)
        goto fail;
    mv = PyMemoryView_Check(data) ? PyObject_Vectorcall(mv_cast, (PyObject *[]){data, fmt}, 2, NULL)
                                  : PyObject_CallMethodOneArg(data, str_cast, fmt);
    if (mv == NULL)
        goto fail;
    view = (CellObject *)view_cls->tp_alloc(view_cls, 0);
    if (view == NULL)
        goto fail;
    view->segment = Py_NewRef(seg);
    view->name = Py_NewRef(name);
    view->kind = Py_NewRef(kind);
    view->mv = Py_NewRef(mv);
    if (attach(view, mv, format) < 0)
        goto fail;
    ref = PyWeakref_NewRef((PyObject *)view, NULL);
    if (ref == NULL)
        goto fail;
    seg->view = (PyObject *)view; /* (the reference is handed over) */
    view = NULL;
    Py_XSETREF(REC_FIELD(rec, rec_view_off), ref);
    Py_DECREF(data);
    Py_DECREF(mv);
    return (PyObject *)seg;
fail:
    Py_XDECREF(view);
    Py_XDECREF(mv);
    Py_XDECREF(data);
    Py_XDECREF(ref);
    if (seg != NULL) {
        /* Not a handle yet: nothing may close the record through it. */
        Py_CLEAR(seg->rec);
        Py_DECREF(seg);
    }
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *done = PyObject_CallMethodOneArg(part, str_close, rec);
        if (done == NULL)
            PyErr_Clear(); /* the first error is the one to report */
        Py_XDECREF(done);
        PyErr_Restore(type, value, tb);
    }
    return NULL;
}


/* -- the planned by-name open of a number, whole ----------------------------
 *
 * `ps.shared(name, kind)` with default options, for a (name, kind) this
 * process (or the parent it was forked from) opened before, attaching to a
 * segment somebody holds: the common case of a child reopening by name.
 * The same steps as _shared.shared's planned path and the engine's
 * SegmentsPart.open / _register, which stay the reference: the plan key
 * and lookup, the current engine (made by get_engine() if there is none
 * yet), its housekeeping (poll()) if it asks, the backend's segment_open,
 * the record and its registration, then scalar_segment(). Anything else (no
 * plan, another kind, a namespace not swept yet, a name this process
 * created last time, nothing to attach to, an OSError, a different
 * metadata) returns None before changing anything, and the Python path
 * runs instead. No system call here; the backend's segment_open makes them.
 * What it reads is handed over once by open_setup(). */

static PyObject *op_plans, *op_core, *op_nsvar, *op_env, *op_env_key, *op_swept,
    *op_keep_nothing, *op_default_ns, *op_mode, *op_current_namespace, *op_get_engine,
    *op_segments_part;
static PyObject *str_engine, *str_pid, *str_pending, *str_kept, *str_poll, *str_parts,
    *str_segments, *str_backend, *str_segment_open, *str_keep_orphan, *str_meta, *str_open,
    *str_created_last, *str_forks, *str_forking, *str_register, *str_swept, *kw_open,
    *str_open_fast;

static int
intern(PyObject **slot, const char *text)
{
    if (*slot == NULL)
        *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

static PyObject *
cview_open_setup(PyObject *Py_UNUSED(module), PyObject *conf)
{
    static const char *keys[] = {"plans", "core", "nsvar", "env", "env_key", "swept",
                                 "keep_nothing", "default_namespace", "mode",
                                 "current_namespace", "get_engine", "segments_part"};
    PyObject **slots[] = {&op_plans, &op_core, &op_nsvar, &op_env, &op_env_key, &op_swept,
                          &op_keep_nothing, &op_default_ns, &op_mode, &op_current_namespace,
                          &op_get_engine, &op_segments_part};
    if (!PyDict_Check(conf)) {
        PyErr_SetString(PyExc_TypeError, "open_setup(dict)");
        return NULL;
    }
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        PyObject *value = PyDict_GetItemString(conf, keys[i]); /* borrowed */
        if (value == NULL) {
            PyErr_Format(PyExc_KeyError, "open_setup: %s missing", keys[i]);
            return NULL;
        }
        Py_XSETREF(*slots[i], Py_NewRef(value));
    }
    if (!PyDict_Check(op_plans) || !PyDict_Check(op_core) || !PyContextVar_CheckExact(op_nsvar) ||
        (op_env != Py_None && !PyDict_Check(op_env)) || !PyDict_Check(op_swept)) {
        PyErr_SetString(PyExc_TypeError, "open_setup: wrong types");
        return NULL;
    }
    if (intern(&str_engine, "_engine") < 0 || intern(&str_pid, "pid") < 0 ||
        intern(&str_pending, "pending") < 0 || intern(&str_kept, "kept") < 0 ||
        intern(&str_poll, "poll") < 0 || intern(&str_parts, "_parts") < 0 ||
        intern(&str_segments, "segments") < 0 || intern(&str_backend, "backend") < 0 ||
        intern(&str_segment_open, "segment_open") < 0 ||
        intern(&str_keep_orphan, "keep_orphan") < 0 || intern(&str_meta, "meta") < 0 ||
        intern(&str_open, "_open") < 0 || intern(&str_created_last, "_created_last") < 0 ||
        intern(&str_forks, "forks") < 0 || intern(&str_forking, "forking") < 0 ||
        intern(&str_register, "_register") < 0 || intern(&str_swept, "swept_namespaces") < 0 ||
        intern(&str_open_fast, "segment_open_fast") < 0)
        return NULL;
    if (kw_open == NULL) {
        kw_open = PyTuple_Pack(2, str_keep_orphan, str_meta);
        if (kw_open == NULL)
            return NULL;
    }
    Py_RETURN_NONE;
}

/* The current engine (new reference): core._engine if it is this process's,
 * else get_engine(). */
static PyObject *
current_engine(void)
{
    PyObject *engine = PyDict_GetItemWithError(op_core, str_engine); /* borrowed */
    PyObject *pid = PyDict_GetItemWithError(op_core, str_pid);       /* borrowed */
    if (PyErr_Occurred())
        return NULL;
    if (engine != NULL && engine != Py_None && pid != NULL) {
        PyObject *own = ps_slot_get(&sl_engine_pid, engine, str_pid);
        if (own == NULL)
            return NULL;
        int same = PyObject_RichCompareBool(own, pid, Py_EQ);
        Py_DECREF(own);
        if (same < 0)
            return NULL;
        if (same)
            return Py_NewRef(engine);
    }
    return PyObject_CallNoArgs(op_get_engine);
}

/* backend.segment_open(os_name, keep_orphan=keep, meta=meta), through the
 * backend's one-call common case (segment_open_fast) when it has one: as the
 * segments part found it (SegmentsPart.open_fast), else looked up. */
static PyObject *
open_by_name(PyObject *part, PyObject *backend, PyObject *os_name, PyObject *keep, PyObject *meta)
{
    PyObject *fast = ps_slot_peek(&sl_part_open_fast, part);
    if (fast == Py_None)
        fast = NULL;
    else if (fast != NULL)
        Py_INCREF(fast);
    else if ((fast = PyObject_GetAttr(backend, str_open_fast)) == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
    }
    if (fast != NULL) {
        PyObject *call[2] = {os_name, meta};
        PyObject *found = PyObject_Vectorcall(fast, call, 2, NULL);
        Py_DECREF(fast);
        if (found == NULL || !PyLong_Check(found))
            return found; /* a handle, None, or an error */
        Py_DECREF(found); /* not the common case */
    }
    PyObject *call[4] = {backend, os_name, keep, meta};
    return PyObject_VectorcallMethod(str_segment_open, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     kw_open);
}

static PyObject *
cview_open_planned(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open_planned(name, kind)");
        return NULL;
    }
    PyObject *name = args[0], *kind = args[1];
    if (op_plans == NULL || segment_cls == NULL || !PyUnicode_CheckExact(name))
        Py_RETURN_NONE;
    PyObject *ns = NULL, *env = NULL, *euid = NULL, *kid = NULL, *key = NULL, *plan = NULL;
    PyObject *engine = NULL, *part = NULL, *handle = NULL, *rec = NULL, *result = NULL;
    PyObject *tmp;
    int holding = 0; /* a handle nothing else will close if this call fails */
    /* The key, as _shared.shared builds it (see there). */
    if (PyContextVar_Get(op_nsvar, Py_None, &ns) < 0)
        return NULL;
    if (op_env != Py_None) {
        env = PyDict_GetItemWithError(op_env, op_env_key); /* borrowed */
        if (env == NULL && PyErr_Occurred())
            goto done;
    }
    if (env == NULL)
        env = Py_None;
    if (ns == Py_None) {
        Py_DECREF(ns);
        ns = env == Py_None ? Py_NewRef(op_default_ns) : PyObject_CallNoArgs(op_current_namespace);
        if (ns == NULL)
            goto done;
    }
    euid = PyLong_FromUnsignedLong((unsigned long)geteuid());
    kid = PyLong_FromVoidPtr(kind);
    if (euid == NULL || kid == NULL)
        goto done;
    key = PyTuple_Pack(10, name, kid, Py_None, Py_None, Py_None, Py_False, op_mode, ns, euid, env);
    if (key == NULL)
        goto done;
    plan = PyDict_GetItemWithError(op_plans, key); /* borrowed */
    if (plan == NULL) {
        if (PyErr_Occurred())
            goto done;
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_INCREF(plan);
    if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != 6 ||
        PyTuple_GET_ITEM(plan, 0) != kind || !PyTuple_CheckExact(PyTuple_GET_ITEM(plan, 4))) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *os_name = PyTuple_GET_ITEM(plan, 2);
    PyObject *meta = PyTuple_GET_ITEM(plan, 3), *fast = PyTuple_GET_ITEM(plan, 4);
    /* The engine, its housekeeping, the segments part (as segments_part()). */
    engine = current_engine();
    if (engine == NULL)
        goto done;
    int busy = ps_slot_true(&sl_engine_pending, engine, str_pending);
    if (busy == 0)
        busy = ps_slot_true(&sl_engine_kept, engine, str_kept);
    if (busy < 0)
        goto done;
    if (busy) {
        tmp = PyObject_CallMethodNoArgs(engine, str_poll);
        if (tmp == NULL)
            goto done;
        Py_DECREF(tmp);
    }
    tmp = ps_slot_get(&sl_engine_parts, engine, str_parts);
    if (tmp == NULL)
        goto done;
    part = PyDict_Check(tmp) ? PyDict_GetItemWithError(tmp, str_segments) : NULL;
    Py_XINCREF(part);
    Py_DECREF(tmp);
    if (part == NULL) {
        if (PyErr_Occurred())
            goto done;
        part = PyObject_CallOneArg(op_segments_part, engine);
        if (part == NULL)
            goto done;
    }
    /* SegmentsPart.open's common case: attach. */
    /* (Looked up per call: a test may replace the set.) */
    PyObject *swept_set = PyDict_GetItemWithError(op_swept, str_swept); /* borrowed */
    if (swept_set == NULL || !PyAnySet_Check(swept_set)) {
        if (!PyErr_Occurred())
            result = Py_NewRef(Py_None);
        goto done;
    }
    int swept = PySet_Contains(swept_set, ns);
    if (swept <= 0) {
        if (swept == 0)
            result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *created_last = ps_slot_get(&sl_part_created_last, part, str_created_last);
    if (created_last == NULL)
        goto done;
    tmp = PyDict_Check(created_last) ? PyDict_GetItemWithError(created_last, os_name) : NULL;
    int create_first = tmp != NULL && PyObject_IsTrue(tmp) == 1;
    Py_DECREF(created_last);
    if (PyErr_Occurred())
        goto done;
    if (create_first) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *backend = ps_slot_get(&sl_engine_backend, engine, str_backend);
    if (backend == NULL)
        goto done;
    handle = open_by_name(part, backend, os_name, op_keep_nothing, meta);
    Py_DECREF(backend);
    if (handle == NULL) {
        if (PyErr_ExceptionMatches(PyExc_OSError)) {
            PyErr_Clear(); /* the Python path opens again and says what went wrong */
            result = Py_NewRef(Py_None);
        }
        goto done;
    }
    if (handle == Py_None) {
        result = Py_NewRef(Py_None); /* nothing to attach to: the Python path creates */
        goto done;
    }
    holding = 1;
    PyObject *layout = Py_NewRef(PyTuple_GET_ITEM(plan, 5));
    tmp = PyObject_GetAttr(handle, str_meta);
    int same = tmp == NULL ? -1 : PyObject_RichCompareBool(tmp, meta, Py_EQ);
    Py_XDECREF(tmp);
    if (same < 0) {
        Py_DECREF(layout);
        goto done;
    }
    if (!same) {
        /* Another creator's metadata: _register compares what matters (and
         * closes and raises when the segment holds something else). */
        holding = 0;
        rec = PyObject_CallMethodObjArgs(part, str_register, name, ns, handle, Py_False, layout,
                                         meta, NULL);
        Py_DECREF(layout);
        if (rec == NULL)
            goto done;
    }
    else {
        rec = PyObject_CallFunctionObjArgs((PyObject *)record_type, name, ns, handle, Py_False,
                                           layout, NULL);
        Py_DECREF(layout);
        if (rec == NULL)
            goto done;
        /* Below any fork under way in another thread: its child inherits this. */
        PyObject *forks = ps_slot_get(&sl_engine_forks, engine, str_forks);
        PyObject *forking =
            forks == NULL ? NULL : ps_slot_get(&sl_engine_forking, engine, str_forking);
        PyObject *below = forking == NULL ? NULL : PyNumber_Subtract(forks, forking);
        Py_XDECREF(forks);
        Py_XDECREF(forking);
        if (below == NULL)
            goto done;
        Py_XSETREF(REC_FIELD(rec, rec_forks_off), below);
        PyObject *opened = ps_slot_get(&sl_part_open, part, str_open);
        PyObject *rid = opened == NULL ? NULL : PyLong_FromVoidPtr(rec);
        int rc = rid == NULL ? -1 : PyObject_SetItem(opened, rid, rec);
        Py_XDECREF(rid);
        Py_XDECREF(opened);
        if (rc < 0)
            goto done;
        holding = 0; /* registered: the engine closes it (as scalar_segment does on failure) */
        created_last = ps_slot_get(&sl_part_created_last, part, str_created_last);
        if (created_last == NULL)
            goto done;
        if (PyDict_Check(created_last) && PyDict_GET_SIZE(created_last) > 4096)
            PyDict_Clear(created_last); /* a hint: losing it costs one extra look */
        rc = PyObject_SetItem(created_last, os_name, Py_False);
        Py_DECREF(created_last);
        if (rc < 0)
            goto done;
    }
    Py_CLEAR(handle);
    {
        PyObject *build[3] = {part, rec, fast};
        result = cview_scalar_segment(NULL, build, 3);
    }
done:
    if (holding && result == NULL && engine != NULL) {
        /* Failed between the open and the registration (no memory): let go. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *backend = PyObject_GetAttr(engine, str_backend);
        PyObject *close = backend == NULL ? NULL : PyObject_GetAttrString(backend, "segment_close");
        PyObject *kwargs = close == NULL ? NULL : Py_BuildValue("{sO}", "keep", Py_None);
        PyObject *pos = kwargs == NULL ? NULL : PyTuple_Pack(1, handle);
        PyObject *done = pos == NULL ? NULL : PyObject_Call(close, pos, kwargs);
        Py_XDECREF(pos);
        Py_XDECREF(kwargs);
        Py_XDECREF(close);
        if (done == NULL)
            PyErr_Clear();
        Py_XDECREF(done);
        Py_XDECREF(backend);
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(ns);
    Py_XDECREF(euid);
    Py_XDECREF(kid);
    Py_XDECREF(key);
    Py_XDECREF(plan);
    Py_XDECREF(engine);
    Py_XDECREF(part);
    Py_XDECREF(handle);
    Py_XDECREF(rec);
    return result;
}
