/* The fast path of a scalar view's `.value`: a C-level descriptor.
 *
 * Why C: `view.value += 1` through a Python property is two Python function
 * calls (the getter and the setter), and measured ~2x the same update on a
 * ctypes value (`ctypes.c_uint64.from_buffer(mm).value += 1`), whose `.value`
 * is a C getset. ScalarCell gives procshare's ScalarView (a Python subclass,
 * in _views.py) the same kind of descriptor.
 *
 * It is only a fast path. It reads and stores the common cases itself: an
 * exact int into an integer kind, an exact float or int into a float kind,
 * True or False into a bool, all within the kind's range. Everything else
 * (a closed view, a value out of range or of another type, an int subclass,
 * a char) goes to the Python methods _ps_get_slow / _ps_set_slow, which are
 * the reference: they say what went wrong, and raise SegmentClosed once the
 * view is closed. So the fast path never decides an error on its own.
 *
 * A cell holds a buffer export of the segment's memory while it is attached
 * (so its pointer stays valid however the Python side is used), and
 * _ps_detach drops it: from then on every access takes the slow path.
 * No system call, no OS object: only memory the backend already mapped,
 * like a memoryview.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <structmember.h>

#include <unistd.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    char *ptr; /* NULL while detached: every access takes the slow path */
    Py_buffer buf;
    char code; /* the struct / memoryview format of the number */
    /* ScalarView's fields (here so that scalar_segment() below fills them in
     * place): the segment handle, its name, the kind's name, the memoryview
     * (or the closed stand-in). */
    PyObject *segment;
    PyObject *name;
    PyObject *kind;
    PyObject *mv;
} CellObject;

static PyObject *str_get_slow;
static PyObject *str_set_slow;
/* _views._Closed (the stand-in for a closed view's memory) and where its one
 * slot is: set by setup(). */
static PyTypeObject *closed_cls;
static Py_ssize_t closed_name_off;

static Py_ssize_t
code_size(char code)
{
    switch (code) {
    case 'b': case 'B': case '?': case 'c': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': return 4;
    case 'q': case 'Q': case 'd': return 8;
    default: return 0;
    }
}

static void
detach(CellObject *self)
{
    if (self->ptr != NULL) {
        self->ptr = NULL;
        PyBuffer_Release(&self->buf);
    }
}

/* Hold `buffer` and read and write its first number, of struct format
 * `format`; -1 with an exception set if it cannot. */
static int
attach(CellObject *self, PyObject *buffer, const char *format)
{
    Py_ssize_t size = code_size(format[0]);
    if (size == 0 || format[1] != '\0') {
        PyErr_Format(PyExc_ValueError, "unsupported scalar format %s", format);
        return -1;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(buffer, &buf, PyBUF_WRITABLE) < 0)
        return -1;
    if (buf.len < size) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "a %zd-byte buffer cannot hold a %s", buf.len, format);
        return -1;
    }
    detach(self);
    self->buf = buf;
    self->ptr = buf.buf;
    self->code = format[0];
    return 0;
}

static PyObject *
cell_attach(CellObject *self, PyObject *args)
{
    PyObject *buffer;
    const char *format;
    if (!PyArg_ParseTuple(args, "Os:_ps_attach", &buffer, &format))
        return NULL;
    if (attach(self, buffer, format) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
cell_detach(CellObject *self, PyObject *Py_UNUSED(ignored))
{
    detach(self);
    Py_RETURN_NONE;
}

static PyObject *str_release, *mv_cast, *mv_release;

/* _ps_invalidate(): the segment closed: drop the buffer, put a closed
 * stand-in (_views._Closed, whose every use raises SegmentClosed) in place
 * of the memoryview, and release that memoryview (if nothing else exports
 * it). What _views.ScalarView's Python version did, without running Python
 * (closing is often a freshly forked child's last step). */
static PyObject *
cell_invalidate(CellObject *self, PyObject *Py_UNUSED(ignored))
{
    detach(self);
    if (closed_cls == NULL || self->name == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_ps_invalidate before setup()");
        return NULL;
    }
    PyObject *stand_in = closed_cls->tp_alloc(closed_cls, 0);
    if (stand_in == NULL)
        return NULL;
    *(PyObject **)((char *)stand_in + closed_name_off) = Py_NewRef(self->name);
    PyObject *mv = self->mv;
    self->mv = stand_in;
    if (mv != NULL && PyMemoryView_Check(mv)) {
        PyObject *done = PyObject_CallOneArg(mv_release, mv);
        if (done == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_BufferError)) {
                Py_DECREF(mv);
                return NULL;
            }
            PyErr_Clear(); /* still exported: released when the exports go */
        }
        Py_XDECREF(done);
    }
    Py_XDECREF(mv);
    Py_RETURN_NONE;
}

static PyObject *
cell_get(CellObject *self, void *Py_UNUSED(closure))
{
    const char *p = self->ptr;
    if (p == NULL)
        return PyObject_CallMethodNoArgs((PyObject *)self, str_get_slow);
    switch (self->code) {
    case 'b': { int8_t v; memcpy(&v, p, 1); return PyLong_FromLong(v); }
    case 'B': { uint8_t v; memcpy(&v, p, 1); return PyLong_FromLong(v); }
    case 'h': { int16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case 'H': { uint16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case 'i': { int32_t v; memcpy(&v, p, 4); return PyLong_FromLong(v); }
    case 'I': { uint32_t v; memcpy(&v, p, 4); return PyLong_FromUnsignedLong(v); }
    case 'q': { int64_t v; memcpy(&v, p, 8); return PyLong_FromLongLong(v); }
    case 'Q': { uint64_t v; memcpy(&v, p, 8); return PyLong_FromUnsignedLongLong(v); }
    case 'f': { float v; memcpy(&v, p, 4); return PyFloat_FromDouble(v); }
    case 'd': { double v; memcpy(&v, p, 8); return PyFloat_FromDouble(v); }
    case '?': return PyBool_FromLong(p[0] != 0);
    default: return PyObject_CallMethodNoArgs((PyObject *)self, str_get_slow);
    }
}

/* Store an exact int into a signed or unsigned integer of `size` bytes; 0 if
 * done, -1 if the slow path must decide (no exception set). */
static int
store_int(char *p, char code, PyObject *value)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        if (code != 'Q' || overflow < 0)
            return -1;
        unsigned long long u = PyLong_AsUnsignedLongLong(value);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        memcpy(p, &u, 8);
        return 0;
    }
    switch (code) {
    case 'b': if (v < INT8_MIN || v > INT8_MAX) return -1;
        { int8_t x = (int8_t)v; memcpy(p, &x, 1); } return 0;
    case 'B': if (v < 0 || v > UINT8_MAX) return -1;
        { uint8_t x = (uint8_t)v; memcpy(p, &x, 1); } return 0;
    case 'h': if (v < INT16_MIN || v > INT16_MAX) return -1;
        { int16_t x = (int16_t)v; memcpy(p, &x, 2); } return 0;
    case 'H': if (v < 0 || v > UINT16_MAX) return -1;
        { uint16_t x = (uint16_t)v; memcpy(p, &x, 2); } return 0;
    case 'i': if (v < INT32_MIN || v > INT32_MAX) return -1;
        { int32_t x = (int32_t)v; memcpy(p, &x, 4); } return 0;
    case 'I': if (v < 0 || v > (long long)UINT32_MAX) return -1;
        { uint32_t x = (uint32_t)v; memcpy(p, &x, 4); } return 0;
    case 'q': { int64_t x = (int64_t)v; memcpy(p, &x, 8); } return 0;
    case 'Q': if (v < 0) return -1;
        { uint64_t x = (uint64_t)v; memcpy(p, &x, 8); } return 0;
    default: return -1;
    }
}

/* Store an exact float or int into a float kind; -1: the slow path decides. */
static int
store_float(char *p, char code, PyObject *value)
{
    double d;
    if (PyFloat_CheckExact(value)) {
        d = PyFloat_AS_DOUBLE(value);
    }
    else if (PyLong_CheckExact(value)) {
        d = PyLong_AsDouble(value);
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
    }
    else {
        return -1;
    }
    if (code == 'd') {
        memcpy(p, &d, 8);
        return 0;
    }
    float f = (float)d;
    /* A finite number the cast makes infinite: refused (struct's rule), by the slow path. */
    if (isinf(f) && !isinf(d))
        return -1;
    memcpy(p, &f, 4);
    return 0;
}

static int
cell_set(CellObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError,
                        "cannot delete .value of a shared view: assign a number instead");
        return -1;
    }
    char *p = self->ptr;
    if (p != NULL) {
        char code = self->code;
        switch (code) {
        case 'f': case 'd':
            if (store_float(p, code, value) == 0)
                return 0;
            break;
        case '?':
            if (value == Py_True || value == Py_False) {
                p[0] = (char)(value == Py_True);
                return 0;
            }
            break;
        case 'c':
            break;
        default:
            if (PyLong_CheckExact(value) && store_int(p, code, value) == 0)
                return 0;
        }
    }
    PyObject *done = PyObject_CallMethodOneArg((PyObject *)self, str_set_slow, value);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return 0;
}

static int
cell_traverse(CellObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->segment);
    Py_VISIT(self->name);
    Py_VISIT(self->kind);
    Py_VISIT(self->mv);
    /* Not buf.obj: the export this cell holds must stay a reference the
     * collector cannot account for, so that it never clears the exporter (a
     * memoryview refuses to be released while exported) before this cell
     * lets go of it, as before ScalarCell took part in collection. */
    return 0;
}

static int
cell_clear(CellObject *self)
{
    detach(self);
    Py_CLEAR(self->segment);
    Py_CLEAR(self->name);
    Py_CLEAR(self->kind);
    Py_CLEAR(self->mv);
    return 0;
}

static void
cell_dealloc(CellObject *self)
{
    PyObject_GC_UnTrack(self);
    cell_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef cell_members[] = {
    {"_segment", T_OBJECT_EX, offsetof(CellObject, segment), 0,
     "The segment handle (kept open while its view is alive)."},
    {"_name", T_OBJECT_EX, offsetof(CellObject, name), 0, "The segment's name."},
    {"_kind", T_OBJECT_EX, offsetof(CellObject, kind), 0, "The kind's name (\"u64\")."},
    {"_mv", T_OBJECT_EX, offsetof(CellObject, mv), 0,
     "The memoryview of the number (the slow path's), or the closed stand-in."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef cell_getset[] = {
    {"value", (getter)cell_get, (setter)cell_set, "The number, read from shared memory now.",
     NULL},
    {NULL},
};

static PyMethodDef cell_methods[] = {
    {"_ps_attach", (PyCFunction)cell_attach, METH_VARARGS,
     "_ps_attach(buffer, format): read and write the first number of `buffer` (held)."},
    {"_ps_detach", (PyCFunction)cell_detach, METH_NOARGS,
     "Drop the buffer: every later access takes the slow path."},
    {"_ps_invalidate", (PyCFunction)cell_invalidate, METH_NOARGS,
     "The segment closed: every later use raises SegmentClosed."},
    {NULL},
};

static PyTypeObject CellType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._cview.ScalarCell",
    .tp_doc = "Fast path of a scalar view's .value (see _views.ScalarView).",
    .tp_basicsize = sizeof(CellObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)cell_dealloc,
    .tp_traverse = (traverseproc)cell_traverse,
    .tp_clear = (inquiry)cell_clear,
    .tp_getset = cell_getset,
    .tp_methods = cell_methods,
    .tp_members = cell_members,
};

#include "_slots.h"
#include "_cview_segment.h"
#include "_cview_close.h"

static PyMethodDef cview_functions[] = {
    {"setup", cview_setup, METH_VARARGS,
     "setup(Segment, ScalarView, _Closed, record offsets): the classes scalar_segment() "
     "and _ps_invalidate() build."},
    {"scalar_segment", (PyCFunction)(void (*)(void))cview_scalar_segment, METH_FASTCALL,
     "scalar_segment(part, rec, (name, kind, format)) -> Segment with a ScalarView."},
    {"close_setup", cview_close_setup, METH_VARARGS,
     "close_setup(SegmentsPart, Engine, core globals): what a handle's C close reads."},
    {"open_setup", cview_open_setup, METH_O,
     "open_setup(dict): what open_planned() reads (see _shared.py)."},
    {"open_planned", (PyCFunction)(void (*)(void))cview_open_planned, METH_FASTCALL,
     "open_planned(name, kind) -> the Segment of a planned by-name open of a number, or None."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "procshare._cview",
    .m_doc = "The C fast path of scalar views.",
    .m_size = -1,
    .m_methods = cview_functions,
};

PyMODINIT_FUNC
PyInit__cview(void)
{
    str_get_slow = PyUnicode_InternFromString("_ps_get_slow");
    str_set_slow = PyUnicode_InternFromString("_ps_set_slow");
    str_view = PyUnicode_InternFromString("view");
    str_close = PyUnicode_InternFromString("close");
    str_data = PyUnicode_InternFromString("data");
    str_cast = PyUnicode_InternFromString("cast");
    str_release = PyUnicode_InternFromString("release");
    if (str_get_slow == NULL || str_set_slow == NULL || str_view == NULL || str_close == NULL ||
        str_data == NULL || str_cast == NULL || str_release == NULL)
        return NULL;
    /* memoryview's cast and release, called through these (a method lookup in
     * a fresh child writes the type's lookup cache and the method's count). */
    mv_cast = PyObject_GetAttr((PyObject *)&PyMemoryView_Type, str_cast);
    mv_release = PyObject_GetAttr((PyObject *)&PyMemoryView_Type, str_release);
    if (mv_cast == NULL || mv_release == NULL)
        return NULL;
    if (PyType_Ready(&CellType) < 0 || PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "ScalarCell", (PyObject *)&CellType) < 0 ||
        PyModule_AddObjectRef(m, "SegmentCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
