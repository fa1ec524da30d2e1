/* Included by _cengine.c: the record of an open segment (segments.OpenSegment). */
/* -- the record of an open segment (segments.OpenSegment) ----------------- */

/* A C type rather than a slotted Python class: one is built on every open,
 * often in a freshly forked child, where running its Python __init__ (and
 * looking up a slot descriptor per field) copied pages. The fields are
 * plain members, read and written from Python as before; the front end's C
 * (_cview.c) reads `closed` and sets `view` through the offsets it is given
 * by record_offsets(). */
typedef struct {
    PyObject_HEAD
    PyObject *name;
    PyObject *namespace;
    PyObject *handle;
    PyObject *created;
    PyObject *layout;
    PyObject *view;
    PyObject *closed;
    PyObject *forks;
} RecordObject;

static int
Record_init(RecordObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "namespace", "handle", "created", "layout", NULL};
    PyObject *name, *namespace, *handle, *created, *layout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:OpenSegment", kwlist, &name, &namespace,
                                     &handle, &created, &layout)) {
        return -1;
    }
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->namespace, Py_NewRef(namespace));
    Py_XSETREF(self->handle, Py_NewRef(handle));
    Py_XSETREF(self->created, Py_NewRef(created));
    Py_XSETREF(self->layout, Py_NewRef(layout));
    Py_XSETREF(self->view, Py_NewRef(Py_None));
    Py_XSETREF(self->closed, Py_NewRef(Py_False));
    Py_XSETREF(self->forks, PyLong_FromLong(0));
    return self->forks == NULL ? -1 : 0;
}

static int
Record_traverse(RecordObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->namespace);
    Py_VISIT(self->handle);
    Py_VISIT(self->created);
    Py_VISIT(self->layout);
    Py_VISIT(self->view);
    Py_VISIT(self->closed);
    Py_VISIT(self->forks);
    return 0;
}

static int
Record_clear(RecordObject *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->namespace);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->created);
    Py_CLEAR(self->layout);
    Py_CLEAR(self->view);
    Py_CLEAR(self->closed);
    Py_CLEAR(self->forks);
    return 0;
}

static void
Record_dealloc(RecordObject *self)
{
    PyObject_GC_UnTrack(self);
    Record_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Record_repr(RecordObject *self)
{
    return PyUnicode_FromFormat("<OpenSegment %R in %R (%s)>", self->name ? self->name : Py_None,
                                self->namespace ? self->namespace : Py_None,
                                self->closed == Py_True ? "closed" : "open");
}

static PyMemberDef Record_members[] = {
    {"name", T_OBJECT_EX, offsetof(RecordObject, name), 0, "The name given to ps.shared."},
    {"namespace", T_OBJECT_EX, offsetof(RecordObject, namespace), 0, "Its namespace."},
    {"handle", T_OBJECT_EX, offsetof(RecordObject, handle), 0, "The backend's handle."},
    {"created", T_OBJECT_EX, offsetof(RecordObject, created), 0, "Whether this open created it."},
    {"layout", T_OBJECT_EX, offsetof(RecordObject, layout), 0, "What it holds (a Layout)."},
    {"view", T_OBJECT_EX, offsetof(RecordObject, view), 0,
     "A weak reference to the view to invalidate at close, or None."},
    {"closed", T_OBJECT_EX, offsetof(RecordObject, closed), 0, "Whether it was closed."},
    {"forks", T_OBJECT_EX, offsetof(RecordObject, forks), 0,
     "The engine's fork count when opened."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._engine.segments.OpenSegment",
    .tp_doc = "One segment this process opened (one ps.shared call).",
    .tp_basicsize = sizeof(RecordObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Record_init,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_traverse = (traverseproc)Record_traverse,
    .tp_clear = (inquiry)Record_clear,
    .tp_repr = (reprfunc)Record_repr,
    .tp_members = Record_members,
};


/* record_offsets() -> (type, offsets of closed, view, handle and forks): for _cview.c. */
static PyObject *
cengine_record_offsets(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return Py_BuildValue("(Onnnn)", (PyObject *)&RecordType,
                         (Py_ssize_t)offsetof(RecordObject, closed),
                         (Py_ssize_t)offsetof(RecordObject, view),
                         (Py_ssize_t)offsetof(RecordObject, handle),
                         (Py_ssize_t)offsetof(RecordObject, forks));
}
