/* Part of _shmstep.c (included there, once): the two Python types it builds.
 *
 * Mapping: a shared mapping of a whole object, exported through the buffer
 * protocol. Handle: one open of one procshare object, the C base of
 * segment_object.py's PosixSegment, which attach() builds directly.
 * Needs the includes and HEADER_SIZE / META_OFFSET of _shmstep.c, and
 * _shmstep_holds.h (fork_epoch, fd_holds, map_shared).
 */

/* A shared mapping of a whole object, exported through the buffer protocol.
 *
 * What segment.py needs of Python's mmap.mmap, without its two extra system
 * calls per map (an fstat to check the size, a dup of the descriptor) and
 * the close() of that dup: the size is known here, and a dup would keep the
 * description (and so the hold) alive after close() unmapped. close() unmaps, or raises BufferError while a buffer exported from the
 * mapping (a memoryview, a numpy array) is alive, exactly as mmap does; the
 * memory is then unmapped when the mapping object itself is collected,
 * which cannot happen before those buffers are gone. */
typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t size;
    Py_ssize_t exports;
} MappingObject;

static PyTypeObject Mapping_Type;

static PyObject *mapping_wrap(void *data, Py_ssize_t size);

static PyObject *
mapping_new(int fd, Py_ssize_t size)
{
    void *data = map_shared(fd, (size_t)size);
    if (data == MAP_FAILED) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return mapping_wrap(data, size);
}

/* A Mapping object owning `data` (unmapped on failure). */
static PyObject *
mapping_wrap(void *data, Py_ssize_t size)
{
    MappingObject *self = PyObject_New(MappingObject, &Mapping_Type);
    if (self == NULL) {
        munmap(data, (size_t)size);
        return NULL;
    }
    self->data = data;
    self->size = size;
    self->exports = 0;
    return (PyObject *)self;
}

static void
mapping_dealloc(MappingObject *self)
{
    if (self->data != NULL) {
        munmap(self->data, (size_t)self->size);
    }
    PyObject_Free(self);
}

static int
mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags)
{
    if (self->data == NULL) {
        PyErr_SetString(PyExc_ValueError, "the shared mapping is closed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size, 0, flags) < 0) {
        return -1;
    }
    self->exports++;
    return 0;
}

static void
mapping_releasebuffer(MappingObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static PyObject *
mapping_close(MappingObject *self, PyObject *Py_UNUSED(args))
{
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "cannot close a shared mapping: buffers are exported");
        return NULL;
    }
    if (self->data != NULL) {
        munmap(self->data, (size_t)self->size);
        self->data = NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mapping_closed(MappingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->data == NULL);
}

static Py_ssize_t
mapping_length(MappingObject *self)
{
    return self->size;
}

static PyBufferProcs mapping_as_buffer = {
    (getbufferproc)mapping_getbuffer,
    (releasebufferproc)mapping_releasebuffer,
};

static PySequenceMethods mapping_as_sequence = {
    .sq_length = (lenfunc)mapping_length,
};

static PyMethodDef mapping_methods[] = {
    {"close", (PyCFunction)mapping_close, METH_NOARGS,
     "Unmap (BufferError while exported buffers are alive). Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
mapping_exported(MappingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->exports > 0);
}

static PyGetSetDef mapping_getset[] = {
    {"closed", (getter)mapping_closed, NULL, "Whether close() unmapped it.", NULL},
    {"exported", (getter)mapping_exported, NULL, "Whether a buffer of it is alive.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Mapping_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._backends.posix._shmstep.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_as_sequence = &mapping_as_sequence,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A shared mapping of a whole procshare object (buffer protocol, close()).",
    .tp_methods = mapping_methods,
    .tp_getset = mapping_getset,
};

/* One open of one object: segment.py's PosixSegment is a Python subclass of
 * this type (methods only, no slots of its own).
 *
 * Why C: attach() builds the handle right here, in one allocation with no
 * Python frame, instead of returning a tuple of fields for a Python __init__
 * to store one by one. In a freshly forked child that Python path touched
 * (and so copied) a page for nearly every object it stored or called: the
 * __init__ function and its code, the class, each field's value. */
typedef struct {
    PyObject_HEAD
    PyObject *os_name;
    PyObject *mm;
    PyObject *meta;
    PyObject *data; /* the memoryview of the data area, made on first use */
    unsigned long long st_dev;
    unsigned long long st_ino;
    unsigned long long created_ns;
    Py_ssize_t data_offset;
    Py_ssize_t data_size;
    unsigned int creator_pid;
    int opener_pid;
    /* The descriptor that keeps the hold (see _shmstep_holds.h), or -1 when
     * the mapping alone keeps it; and fork_epoch when the hold was taken. */
    int fd;
    unsigned long epoch;
    char persist;
    char closed;
} HandleObject;

/* The descriptor that keeps handle's hold, if it still is the object's;
 * else -1, and the handle forgets it. A program may close descriptors it did
 * not open (os.closerange, a double close elsewhere), and the number may name
 * one of its own files by now: a lock call, a close or a decision made on it
 * would touch that file (and could unlink the object while others hold it).
 * The hold itself lives on in the mapping, which keeps the open description
 * and its lock: the close then goes the mapping way. One fstat(). */
static int
handle_own_fd(HandleObject *handle)
{
    int fd = handle->fd;
    struct stat st;
    if (fd < 0 || (fstat(fd, &st) == 0 && (unsigned long long)st.st_dev == handle->st_dev &&
                   (unsigned long long)st.st_ino == handle->st_ino)) {
        return fd;
    }
    handle->fd = -1;
    fd_holds--;
    return -1;
}

static PyTypeObject Handle_Type;
/* The subclass attach() builds (segment.py's PosixSegment), set by set_handle_type(). */
static PyTypeObject *handle_type = NULL;

static PyObject *
handle_make(PyTypeObject *type, PyObject *os_name, PyObject *mm, unsigned long long dev,
            unsigned long long ino, PyObject *meta, int persist, Py_ssize_t data_offset,
            Py_ssize_t data_size, unsigned long long created, unsigned int creator, int opener)
{
    HandleObject *self = (HandleObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->os_name = Py_NewRef(os_name);
    self->mm = Py_NewRef(mm);
    self->meta = Py_NewRef(meta);
    self->data = NULL;
    self->st_dev = dev;
    self->st_ino = ino;
    self->created_ns = created;
    self->data_offset = data_offset;
    self->data_size = data_size;
    self->creator_pid = creator;
    self->opener_pid = opener;
    self->fd = -1;
    self->epoch = fork_epoch;
    self->persist = (char)(persist != 0);
    self->closed = 0;
    return (PyObject *)self;
}

/* Handle(os_name, mm, st_dev, st_ino, meta, persist, data_offset, data_size,
 *        created_ns, creator_pid, opener_pid) */
static PyObject *
handle_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *os_name, *mm, *meta;
    unsigned long long dev, ino, created;
    int persist, opener;
    Py_ssize_t data_offset, data_size;
    unsigned int creator;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "a segment handle takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "UOKKSpnnKIi", &os_name, &mm, &dev, &ino, &meta, &persist,
                          &data_offset, &data_size, &created, &creator, &opener)) {
        return NULL;
    }
    return handle_make(type, os_name, mm, dev, ino, meta, persist, data_offset, data_size,
                       created, creator, opener);
}

/* No GC: a handle refers to no container that could lead back to it (and an
 * untracked object is one less write to the collector's lists in a child).
 * A Python subclass's deallocator calls this one, then drops its type. */
static void
handle_dealloc(HandleObject *self)
{
    if (self->fd >= 0 && self->opener_pid == getpid() && handle_own_fd(self) >= 0) {
        /* Never closed: the hold ends with the object, as a mapping's would
         * (a child leaves what it inherited to its exit). */
        close(self->fd);
        fd_holds--;
    }
    self->fd = -1;
    Py_CLEAR(self->data);
    Py_CLEAR(self->mm);
    Py_CLEAR(self->os_name);
    Py_CLEAR(self->meta);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The data area as a writable memoryview (cached): a slice of a view of the
 * whole mapping, so that it keeps the mapping exported while it lives. */
static PyObject *
handle_get_data(HandleObject *self, void *Py_UNUSED(closure))
{
    if (self->data == NULL) {
        PyObject *whole = PyMemoryView_FromObject(self->mm);
        if (whole == NULL) {
            return NULL;
        }
        PyObject *slice = PySlice_New(NULL, NULL, NULL);
        PyObject *start = PyLong_FromSsize_t(self->data_offset);
        PyObject *stop = PyLong_FromSsize_t(self->data_offset + self->data_size);
        if (slice != NULL && start != NULL && stop != NULL) {
            Py_SETREF(slice, PySlice_New(start, stop, NULL));
        }
        Py_XDECREF(start);
        Py_XDECREF(stop);
        if (slice == NULL) {
            Py_DECREF(whole);
            return NULL;
        }
        self->data = PyObject_GetItem(whole, slice);
        Py_DECREF(slice);
        /* The slice shares the whole view's managed buffer, which stays
         * exported while the slice lives: release nothing here. */
        Py_DECREF(whole);
        if (self->data == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(self->data);
}

static PyObject *
handle_get_cached(HandleObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->data != NULL ? self->data : Py_None);
}

static int
handle_set_cached(HandleObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value != NULL && value != Py_None && !PyMemoryView_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "_data must be a memoryview or None");
        return -1;
    }
    Py_XSETREF(self->data, (value == NULL || value == Py_None) ? NULL : Py_NewRef(value));
    return 0;
}

static PyGetSetDef handle_getset[] = {
    {"data", (getter)handle_get_data, NULL,
     "A writable memoryview of the data area (data_size bytes, 64-byte aligned).", NULL},
    {"_data", (getter)handle_get_cached, (setter)handle_set_cached,
     "The cached data view, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef handle_members[] = {
    {"os_name", T_OBJECT_EX, offsetof(HandleObject, os_name), READONLY, NULL},
    {"mm", T_OBJECT_EX, offsetof(HandleObject, mm), READONLY, NULL},
    {"meta", T_OBJECT_EX, offsetof(HandleObject, meta), READONLY, NULL},
    {"st_dev", T_ULONGLONG, offsetof(HandleObject, st_dev), READONLY, NULL},
    {"st_ino", T_ULONGLONG, offsetof(HandleObject, st_ino), READONLY, NULL},
    {"created_ns", T_ULONGLONG, offsetof(HandleObject, created_ns), READONLY, NULL},
    {"data_offset", T_PYSSIZET, offsetof(HandleObject, data_offset), READONLY, NULL},
    {"data_size", T_PYSSIZET, offsetof(HandleObject, data_size), READONLY, NULL},
    {"creator_pid", T_UINT, offsetof(HandleObject, creator_pid), READONLY, NULL},
    {"opener_pid", T_INT, offsetof(HandleObject, opener_pid), READONLY, NULL},
    {"fd", T_INT, offsetof(HandleObject, fd), READONLY,
     "The descriptor that keeps the hold, or -1 when the mapping alone keeps it."},
    {"persist", T_BOOL, offsetof(HandleObject, persist), READONLY, NULL},
    {"closed", T_BOOL, offsetof(HandleObject, closed), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Handle_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._backends.posix._shmstep.Handle",
    .tp_basicsize = sizeof(HandleObject),
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "One open of one procshare object (the fields of segment.py's PosixSegment).",
    .tp_members = handle_members,
    .tp_getset = handle_getset,
    .tp_new = handle_new,
};
