/* Included by _cview.c: the close at the end of `with ps.shared(...) as v:`
 * in C (Segment.__exit__), and the close of a dropped handle (its finalizer).
 *
 * Why: closing is often a freshly forked child's last step, where the
 * Python close (Segment.close, SegmentsPart.close, the backend's
 * segment_close: three functions run there for the first time, and the
 * slot descriptors they look up) copied pages. The common case here: a
 * handle of the by-name segments part whose engine is this process's and
 * forked no child since the open; the same steps as SegmentsPart.close,
 * which stays the reference and takes everything else: the claim (the
 * record out of the part's registry), closed, the view invalidated, then
 * the backend's one-call close (segment_close_fast). An error of that
 * close is raised by the part's _close_failed, as the Python path raises
 * it. */

static PyObject *cl_core, *str_close_fast, *str_close_failed, *str_pid_g, *str_invalidate;

/* close_setup(SegmentsPart, Engine, core globals) */
static PyObject *
cview_close_setup(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *part, *engine, *core;
    if (!PyArg_ParseTuple(args, "O!O!O!:close_setup", &PyType_Type, &part, &PyType_Type, &engine,
                          &PyDict_Type, &core))
        return NULL;
    const ps_slot_spec slots[] = {
        {&sl_part_engine, part, "engine"},
        {&sl_part_open, part, "_open"},
        {&sl_part_created_last, part, "_created_last"},
        {&sl_part_open_fast, part, "open_fast"},
        {&sl_engine_pid, engine, "pid"},
        {&sl_engine_forks, engine, "forks"},
        {&sl_engine_forking, engine, "forking"},
        {&sl_engine_backend, engine, "backend"},
        {&sl_engine_pending, engine, "pending"},
        {&sl_engine_kept, engine, "kept"},
        {&sl_engine_parts, engine, "_parts"},
    };
    if (ps_slots_find(slots, sizeof slots / sizeof slots[0], "close_setup") < 0)
        return NULL;
    if (intern(&str_close_fast, "segment_close_fast") < 0 ||
        intern(&str_close_failed, "_close_failed") < 0 || intern(&str_pid_g, "_pid") < 0 ||
        intern(&str_invalidate, "_ps_invalidate") < 0)
        return NULL;
    Py_XSETREF(cl_core, Py_NewRef(core));
    Py_RETURN_NONE;
}

/* a <= b for two ints: 1, 0, -1 on error (not ints: 0). */
static int
int_le(PyObject *a, PyObject *b)
{
    if (a == NULL || b == NULL || !PyLong_CheckExact(a) || !PyLong_CheckExact(b))
        return 0;
    return PyObject_RichCompareBool(a, b, Py_LE);
}

/* The C close of `self`: 1 closed (or closed already), 0 not the common
 * case (nothing done: the Python close runs), -1 with an exception set. */
static int
close_fast(CoreObject *self)
{
    PyObject *rec = self->rec, *part = self->part;
    if (sl_part_engine.type == NULL || rec == NULL || record_type == NULL ||
        !Py_IS_TYPE(rec, record_type))
        return 0;
    if (REC_FIELD(rec, rec_closed_off) != Py_False)
        return REC_FIELD(rec, rec_closed_off) == Py_True; /* closed already: nothing to do */
    PyObject *engine = part == NULL ? NULL : ps_slot_peek(&sl_part_engine, part);
    PyObject *open = part == NULL ? NULL : ps_slot_peek(&sl_part_open, part);
    if (engine == NULL || Py_TYPE(engine) != sl_engine_pid.type || open == NULL ||
        !PyDict_CheckExact(open))
        return 0;
    /* This process's engine (an inherited handle is only forgotten), and no
     * child forked since the open (else the release waits for it). */
    PyObject *pid = PyDict_GetItemWithError(cl_core, str_pid_g); /* borrowed */
    if (pid == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL)
        return -1;
    PyObject *own = ps_slot_peek(&sl_engine_pid, engine);
    int simple = own != NULL && PyObject_RichCompareBool(own, pid, Py_EQ);
    if (simple == 1)
        simple = int_le(ps_slot_peek(&sl_engine_forks, engine), REC_FIELD(rec, rec_forks_off));
    if (simple == 1)
        simple = int_le(ps_slot_peek(&sl_engine_forking, engine), zero);
    Py_DECREF(zero);
    if (simple != 1)
        return simple < 0 ? -1 : 0;
    PyObject *backend = ps_slot_peek(&sl_engine_backend, engine);
    PyObject *fast = backend == NULL ? NULL : PyObject_GetAttr(backend, str_close_fast);
    if (fast == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    /* As Segment.close: drop our reference to the view first. */
    Py_XSETREF(self->view, Py_NewRef(Py_None));
    /* The claim: the record out of the registry (of two closers, one goes on). */
    PyObject *key = PyLong_FromVoidPtr(rec);
    if (key == NULL) {
        Py_DECREF(fast);
        return -1;
    }
    PyObject *claimed = PyDict_GetItemWithError(open, key); /* borrowed */
    int ours = claimed == rec && PyDict_DelItem(open, key) == 0;
    Py_DECREF(key);
    if (!ours) {
        Py_DECREF(fast);
        return PyErr_Occurred() ? -1 : 1; /* another thread closed it */
    }
    Py_XSETREF(REC_FIELD(rec, rec_closed_off), Py_NewRef(Py_True));
    PyObject *ref = REC_FIELD(rec, rec_view_off);
    REC_FIELD(rec, rec_view_off) = Py_NewRef(Py_None);
    PyObject *view = ref != NULL && PyWeakref_Check(ref) ? PyWeakref_GET_OBJECT(ref) : Py_None;
    int rc = 0;
    if (view != Py_None) {
        Py_INCREF(view);
        PyObject *done = PyObject_TypeCheck(view, &CellType)
                             ? cell_invalidate((CellObject *)view, NULL)
                             : PyObject_CallMethodNoArgs(view, str_invalidate);
        Py_DECREF(view);
        Py_XDECREF(done);
        rc = done == NULL ? -1 : 0;
    }
    Py_XDECREF(ref);
    PyObject *handle = REC_FIELD(rec, rec_handle_off);
    if (rc == 0 && handle != NULL) {
        Py_INCREF(handle);
        PyObject *done = PyObject_CallOneArg(fast, handle);
        if (done == Py_NotImplemented) {
            /* Not a named object's handle: the backend's general close. */
            Py_DECREF(done);
            PyObject *close = PyObject_GetAttrString(backend, "segment_close");
            PyObject *pos = close == NULL ? NULL : PyTuple_Pack(1, handle);
            PyObject *kw = pos == NULL ? NULL : Py_BuildValue("{sO}", "keep", Py_None);
            done = kw == NULL ? NULL : PyObject_Call(close, pos, kw);
            Py_XDECREF(kw);
            Py_XDECREF(pos);
            Py_XDECREF(close);
        }
        if (done == NULL && PyErr_ExceptionMatches(PyExc_OSError)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL)
                PyException_SetTraceback(value, tb);
            done = PyObject_CallMethodObjArgs(part, str_close_failed, value, rec, NULL);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        Py_DECREF(handle);
        Py_XDECREF(done);
        rc = done == NULL ? -1 : 0;
    }
    Py_DECREF(fast);
    return rc < 0 ? -1 : 1;
}

/* The finalizer of a dropped handle: close it if it is still open (as the
 * Python close would), saying nothing of an error (an Exception; anything
 * else is reported as unraisable). */
static void
core_finalize(CoreObject *self)
{
    if (self->rec == NULL || record_type == NULL || !Py_IS_TYPE(self->rec, record_type) ||
        REC_FIELD(self->rec, rec_closed_off) != Py_False)
        return; /* closed (or not a handle yet): nothing to do, no Python run */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int rc = close_fast(self);
    if (rc == 0) {
        PyObject *done = PyObject_CallMethodNoArgs((PyObject *)self, str_close);
        Py_XDECREF(done);
        rc = done == NULL ? -1 : 1;
    }
    if (rc < 0) {
        if (PyErr_ExceptionMatches(PyExc_Exception))
            PyErr_Clear();
        else
            PyErr_WriteUnraisable((PyObject *)self);
    }
    PyErr_Restore(type, value, tb);
}
