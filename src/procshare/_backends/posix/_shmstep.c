/* The hot steps of opening and closing a procshare segment, one C call each.
 *
 * Why C: in a freshly forked child every Python object the open path touches
 * is a copy-on-write page fault (~3 us of CPU each, measured on our 2-core VM),
 * and the same steps in Python (os.open, two fcntl calls, os.fstat, mmap,
 * a struct unpack of the header, a comparison of the metadata) touched some
 * forty pages: functions, constants, result objects. Here only the mapping
 * object and the result tuple are Python objects.
 *
 * A hold is a READ OFD lock on the holder byte of an open file description.
 * While the process is far below its descriptor limit the hold keeps its
 * descriptor; beyond that only the *mapping* keeps the description alive
 * (the descriptor is closed as soon as the object is mapped), so a process
 * holds as many segments as it may have mappings (vm.max_map_count), not as
 * many as it may have descriptors (ulimit -n). _shmstep_holds.h says how the
 * two are chosen, how fork is dealt with, and which idle mappings are kept.
 *
 * attach() is the common case of segment.py's open protocol and nothing
 * else: it opens the name, sees that somebody already holds the object
 * (an F_OFD_GETLK for WRITE on the holder byte conflicts), takes its own
 * READ hold, checks the object was not unlinked meanwhile, maps it (or takes
 * a spare mapping of it), reads its header, and keeps the descriptor or
 * closes it. Whatever is unusual (an orphan nobody holds, a remover deciding
 * right now, an unlinked or malformed object) it undoes and reports as
 * SLOW, and the Python protocol handles it.
 *
 * release() is closing (_shmstep_close.h): on the kept descriptor, drop READ
 * and try WRITE, which succeeds only for the last holder; without one (or
 * after a fork), open the name again, unmap, and try WRITE on the new
 * description. The last holder, having checked the name still is its
 * object, unlinks it (or hands the decision to the caller). A mapping that
 * cannot be unmapped because buffers exported from it are alive stays, with
 * no lock on its description, so the hold still ends at close.
 *
 * create() and publish() (_shmstep_create.h) are the two halves of
 * segment.py's atomic creation where the kernel has O_TMPFILE (one call when
 * there is nothing to initialise): an unnamed inode, holder READ lock, header
 * and zeroed data written (reserving the pages: ENOSPC now, never SIGBUS
 * later), mapped; then, after the caller's initialisation, linked to its
 * name, which fails with EEXIST if somebody else published first.
 *
 * Layout of the header is the one segment_object.py documents; the holder
 * byte is byte 0 (_ofd.HOLD).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 64
#define META_OFFSET 64
#define ALIGN 64 /* a data area's alignment (segment_object.ALIGN) */
#define HOLD 0

static const char MAGIC[8] = {'P', 'R', 'C', 'S', 'H', 'R', 0, 1};

#include "_lock_layout.h"   /* the lock memory close_lock() judges */
#include "_shmstep_holds.h" /* descriptors or mappings, fork epochs, spares */
#include "_shmstep_types.h" /* the Mapping and Handle types */

/* set_handle_type(cls): the subclass of Handle that attach() returns. */
static PyObject *
shmstep_set_handle_type(PyObject *Py_UNUSED(module), PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &Handle_Type) ||
        ((PyTypeObject *)cls)->tp_basicsize != Handle_Type.tp_basicsize) {
        PyErr_SetString(PyExc_TypeError, "set_handle_type() takes a slot-less subclass of Handle");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(handle_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static int
ofd(int fd, int cmd, short type)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = HOLD;
    fl.l_len = 1;
    int rc;
    do {
        rc = fcntl(fd, cmd, &fl);
    } while (rc == -1 && errno == EINTR && cmd != F_OFD_SETLKW);
    if (rc == 0 && cmd == F_OFD_GETLK) {
        return fl.l_type; /* F_UNLCK: a WRITE would be granted */
    }
    return rc;
}

static uint32_t
u32_at(const char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint64_t
u64_at(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* attach(path: bytes, meta: bytes, os_name: str, opener_pid: int) -> None | SLOW
 * | a handle (of the type set_handle_type() named) */
static PyObject *
shmstep_attach(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "attach() takes path, meta (bytes), os_name, opener_pid");
        return NULL;
    }
    if (handle_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attach(): set_handle_type() was not called");
        return NULL;
    }
    int opener = (int)PyLong_AsLong(args[3]);
    if (opener == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const char *path = PyBytes_AS_STRING(args[0]);
    PyObject *meta = args[1];
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        if (errno == ENOENT) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    struct stat st;
    int lock = ofd(fd, F_OFD_GETLK, F_WRLCK);
    if (lock == -1) {
        goto os_error;
    }
    if (lock == F_UNLCK) {
        goto slow; /* nobody holds it: an orphan, the protocol decides */
    }
    if (ofd(fd, F_OFD_SETLK, F_RDLCK) != 0) {
        if (errno == EAGAIN || errno == EACCES) {
            goto slow; /* a remover holds WRITE: the protocol waits for it */
        }
        goto os_error;
    }
    if (fstat(fd, &st) != 0) {
        goto os_error;
    }
    if (st.st_nlink == 0 || st.st_size < HEADER_SIZE) {
        goto slow; /* unlinked meanwhile, or not ours: the protocol says what */
    }
    /* Keep the descriptor while there is room (see _shmstep_holds.h); then a
     * spare mapping of this very object can serve. Without it the mapping
     * must be of this description: it is what keeps the READ hold. */
    int keep = fd_room();
    size_t size = (size_t)st.st_size;
    void *data = keep ? spare_take((unsigned long long)st.st_dev, (unsigned long long)st.st_ino,
                                   size)
                      : NULL;
    if (data == NULL) {
        data = map_shared(fd, size);
        if (data == MAP_FAILED) {
            goto os_error; /* ENOMEM: most often vm.max_map_count (segment.py says so) */
        }
    }
    if (!keep) {
        close(fd); /* the mapping keeps the description, and with it the READ hold */
        fd = -1;
    }
    const char *base = data;
    uint32_t flags = u32_at(base + 8), metalen = u32_at(base + 12);
    uint64_t dataoff = u64_at(base + 16), datalen = u64_at(base + 24);
    uint64_t created = u64_at(base + 32);
    uint32_t creator = u32_at(base + 40);
    if (memcmp(base, MAGIC, sizeof MAGIC) != 0 || metalen > size - META_OFFSET ||
        dataoff > size || datalen > size - dataoff) {
        munmap(data, size); /* ends the hold (with the descriptor, if kept) */
        if (fd >= 0) {
            close(fd);
        }
        return PyLong_FromLong(0);
    }
    PyObject *mm = mapping_wrap(data, (Py_ssize_t)size);
    if (mm == NULL) {
        if (fd >= 0) {
            close(fd);
        }
        return NULL;
    }
    PyObject *found;
    if ((Py_ssize_t)metalen == PyBytes_GET_SIZE(meta) &&
        memcmp(base + META_OFFSET, PyBytes_AS_STRING(meta), metalen) == 0) {
        found = Py_NewRef(meta);
    }
    else {
        found = PyBytes_FromStringAndSize(base + META_OFFSET, metalen);
        if (found == NULL) {
            Py_DECREF(mm);
            if (fd >= 0) {
                close(fd);
            }
            return NULL;
        }
    }
    PyObject *handle = handle_make(handle_type, args[2], mm, (unsigned long long)st.st_dev,
                                   (unsigned long long)st.st_ino, found, flags & 1,
                                   (Py_ssize_t)dataoff, (Py_ssize_t)datalen,
                                   (unsigned long long)created, creator, opener);
    Py_DECREF(found);
    Py_DECREF(mm); /* the handle holds it (or, on failure, it unmaps: no hold left) */
    if (fd >= 0) {
        if (handle == NULL) {
            close(fd);
        }
        else {
            ((HandleObject *)handle)->fd = fd;
            fd_holds++;
        }
    }
    return handle;

os_error: {
    int saved = errno;
    close(fd);
    errno = saved;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
}
slow:
    close(fd); /* drops the READ taken above with the description */
    return PyLong_FromLong(0);
}

/* map(fd, size) -> Mapping: a shared read-write mapping of the whole object. */
static PyObject *
shmstep_map(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in", &fd, &size)) {
        return NULL;
    }
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "map(): size must be > 0");
        return NULL;
    }
    return mapping_new(fd, size);
}

#include "_shmstep_create.h" /* create, publish, adopt, link_mode */
#include "_shmstep_close.h" /* release, close_lock, let_go, unhold */

/* create_lock(os_name, meta, mode) -> a handle | None (the name is taken) |
 * NotImplemented (no O_TMPFILE here: nothing done): a new lock object (its
 * data area set up as a lock, _lock_layout.h) made, held, mapped and
 * published in one call, the path and pid found where segment_object keeps
 * them; what segment_create(os_name, meta=meta, data_size=DATA_SIZE,
 * mode=mode, persist=False, init=lock_init) does, for the engine's C open
 * of a lock by name. */
static PyObject *
shmstep_create_lock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[0]) || !PyBytes_Check(args[1]) || handle_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "create_lock(os_name, meta: bytes, mode)");
        return NULL;
    }
    unsigned long mode = PyLong_AsUnsignedLong(args[2]);
    if (mode == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    long pid;
    PyObject *dir; /* (borrowed: segment_object's SHM_DIR_BYTES) */
    PyObject *path = named_path(args[0], &pid, &dir);
    if (path == NULL) {
        return NULL;
    }
    unsigned long long dataoff = ((unsigned long long)META_OFFSET +
                                  (unsigned long long)PyBytes_GET_SIZE(args[1]) + ALIGN - 1) /
                                 ALIGN * ALIGN; /* segment_object.align */
    PyObject *made = create_object(PyBytes_AS_STRING(dir), args[1], 0, dataoff, DATA_SIZE,
                                   dataoff + DATA_SIZE, (unsigned int)mode, (unsigned int)pid,
                                   PyBytes_AS_STRING(path), args[0], 1);
    Py_DECREF(path);
    if (made == Py_None) {
        Py_DECREF(made);
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (made == Py_False) {
        Py_DECREF(made);
        Py_RETURN_NONE;
    }
    return made;
}

/* anonymous(size, reserve) -> Mapping: shared memory with no name anywhere.
 *
 * Inherited by fork like any MAP_SHARED mapping and freed by the kernel with
 * its last mapping, whatever ended the processes that had it. Without
 * `reserve`, one mmap(MAP_SHARED | MAP_ANONYMOUS): its pages come from the
 * kernel's internal shmem mount, which has no size limit, so touching one can
 * never raise SIGBUS (only memory pressure can fail it, as for any private
 * memory). With `reserve` (large segments) the pages are allocated now, so a
 * segment that does not fit fails here with ENOSPC/ENOMEM instead of later:
 * an unnamed memfd, fallocate'd (on shmem it really allocates), mapped, and
 * its descriptor closed at once (the mapping keeps the file alive). */
static PyObject *
shmstep_anonymous(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_ssize_t size;
    int reserve;
    if (!PyArg_ParseTuple(args, "np", &size, &reserve)) {
        return NULL;
    }
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "anonymous(): size must be > 0");
        return NULL;
    }
    void *data = MAP_FAILED;
    int saved = 0;
    if (!reserve) {
        data = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        saved = errno;
    }
    else {
#ifdef MFD_CLOEXEC
        int fd;
        int rc = -1;
        Py_BEGIN_ALLOW_THREADS
        fd = memfd_create("procshare-anonymous", MFD_CLOEXEC);
        if (fd >= 0) {
            do {
                rc = fallocate(fd, 0, 0, (off_t)size);
            } while (rc != 0 && errno == EINTR);
            if (rc == 0) {
                data = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            }
            saved = errno;
            close(fd);
        }
        else {
            saved = errno;
        }
        Py_END_ALLOW_THREADS
#else
        saved = ENOSYS;
#endif
    }
    if (data == MAP_FAILED) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return mapping_wrap(data, size);
}

static PyMethodDef shmstep_methods[] = {
    {"attach", (PyCFunction)(void (*)(void))shmstep_attach, METH_FASTCALL,
     "attach(path, meta, os_name, opener_pid) -> None (no such object) | SLOW (use the full "
     "protocol) | a handle holding the object (READ on its descriptor while there is room, "
     "else on its mapping's description); its meta is meta itself when the object's "
     "metadata equals it."},
    {"set_handle_type", shmstep_set_handle_type, METH_O,
     "set_handle_type(cls): the Handle subclass attach() returns."},
    {"map", shmstep_map, METH_VARARGS,
     "map(fd, size) -> Mapping: a shared mapping of the whole object (it keeps fd's "
     "description, and the locks on it, alive after fd is closed)."},
    {"create", shmstep_create, METH_VARARGS,
     "create(dir, meta, flags, data_offset, data_size, total, mode, pid) -> None (no O_TMPFILE) "
     "| (fd, mm, created_ns, st_dev, st_ino): an unnamed, READ-held, written and mapped new "
     "object."},
    {"publish", shmstep_publish, METH_VARARGS,
     "publish(fd, path[, handle, epoch]) -> bool: link the unnamed inode to path; False if "
     "it exists. Closes fd, unless handle keeps it for its hold."},
    {"adopt", shmstep_adopt, METH_VARARGS,
     "adopt(handle, fd, epoch) -> bool: handle keeps fd (READ held since fork_epoch epoch) "
     "for its hold if there is room; else the caller closes fd."},
    {"descriptors", shmstep_descriptors, METH_NOARGS,
     "descriptors() -> (holds keeping a descriptor, how many may)."},
    {"set_descriptor_budget", shmstep_set_descriptor_budget, METH_O,
     "set_descriptor_budget(n) -> previous: at most n holds keep a descriptor (n < 0: a "
     "quarter of the soft RLIMIT_NOFILE)."},
    {"spares", shmstep_spares, METH_NOARGS,
     "spares() -> [(st_dev, st_ino)]: the objects an idle spare mapping is kept of."},
    {"drop_spares", shmstep_drop_spares, METH_NOARGS,
     "drop_spares() -> int: unmap the idle spare mappings."},
    {"fork_epoch", shmstep_fork_epoch, METH_NOARGS,
     "fork_epoch() -> int: how many times this process (and its ancestors) forked."},
    {"link_mode", shmstep_link_mode, METH_VARARGS,
     "link_mode([mode]) -> previous mode: how publish() links (1 AT_EMPTY_PATH, 0 "
     "/proc/self/fd, -1 undecided)."},
    {"anonymous", shmstep_anonymous, METH_VARARGS,
     "anonymous(size, reserve) -> Mapping: MAP_SHARED memory with no name, inherited by "
     "fork; with reserve its pages are allocated now (ENOSPC/ENOMEM if they do not fit)."},
    {"open_named", (PyCFunction)(void (*)(void))shmstep_open_named, METH_FASTCALL,
     "open_named(os_name, meta) -> None | SLOW | handle: attach() with the path and pid found "
     "where segment_object keeps them."},
    {"create_lock", (PyCFunction)(void (*)(void))shmstep_create_lock, METH_FASTCALL,
     "create_lock(os_name, meta, mode) -> handle | None (taken) | NotImplemented (no "
     "O_TMPFILE: nothing done): a new lock object in one call."},
    {"close_named", shmstep_close_named, METH_O,
     "close_named(handle) -> removed (NotImplemented, nothing done, for another kind of "
     "handle): segment_close(handle, keep=None) of a named segment in one call."},
    {"close_lock", shmstep_close_lock, METH_O,
     "close_lock(handle) -> removed: segment_close(handle, keep=lock_keep) in one call; the "
     "last holder removes the lock object unless its memory records an unconfirmed death."},
    {"refresh_pid", shmstep_refresh_pid, METH_NOARGS,
     "refresh_pid(): segment_object's _pid = getpid() (an after-fork hook in each child)."},
    {"set_paths", shmstep_set_paths, METH_O,
     "set_paths(globals): segment_object's globals, where close_lock() finds paths and the pid."},
    {"release", (PyCFunction)(void (*)(void))shmstep_release, METH_FASTCALL,
     "release(handle, path, pid, decide) -> RELEASED | REMOVED | fd: close handle and end "
     "its hold; the last holder unlinks path (decide 1; 2: unless the lock memory at the "
     "data offset must be kept) or gets a WRITE-held fd (decide 0) to decide with and pass "
     "to unhold()."},
    {"let_go", (PyCFunction)(void (*)(void))shmstep_let_go, METH_FASTCALL,
     "let_go(handle, path): end this process's hold now (children forked earlier keep "
     "theirs); release() later only checks for the last holder."},
    {"unhold", shmstep_unhold, METH_O, "unhold(fd): drop the WRITE on fd and close it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shmstep_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "procshare._backends.posix._shmstep",
    .m_doc = "The hot open and close steps of procshare's POSIX segments.",
    .m_size = -1,
    .m_methods = shmstep_methods,
};

PyMODINIT_FUNC
PyInit__shmstep(void)
{
    if (PyType_Ready(&Mapping_Type) < 0 || PyType_Ready(&Handle_Type) < 0) {
        return NULL;
    }
    static int atfork_set = 0;
    if (!atfork_set) {
        int rc = pthread_atfork(holds_before_fork, NULL, NULL);
        if (rc != 0) {
            errno = rc;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        atfork_set = 1;
    }
    if (str_release == NULL) {
        str_release = PyUnicode_InternFromString("release");
        if (str_release == NULL) {
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&shmstep_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&Mapping_Type);
    if (PyModule_AddObject(module, "Mapping", (PyObject *)&Mapping_Type) < 0) {
        Py_DECREF(&Mapping_Type);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&Handle_Type);
    if (PyModule_AddObject(module, "Handle", (PyObject *)&Handle_Type) < 0) {
        Py_DECREF(&Handle_Type);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "SLOW", 0) < 0 ||
        PyModule_AddIntConstant(module, "RELEASED", RELEASED) < 0 ||
        PyModule_AddIntConstant(module, "REMOVED", REMOVED) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
