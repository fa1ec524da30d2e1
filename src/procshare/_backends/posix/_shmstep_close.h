/* Part of _shmstep.c (included there, once): closing a hold.
 *
 * release() and its helper release_kept(), let_go() and unhold(); the two
 * ways a hold is kept (its descriptor, or its mapping) are described in
 * _shmstep_holds.h. Needs ofd() and the types of _shmstep_types.h.
 */
#define RELEASED (-1) /* the hold ended; the object stays (others hold it, or it is gone) */
#define REMOVED (-2)  /* the hold ended, this was the last one, and the name was unlinked */

/* What the last holder does (release()'s `decide`): hand the WRITE-held
 * descriptor to the caller, unlink the name, or unlink it unless the lock
 * memory at the data offset must be kept (_lock_layout.h). */
#define DECIDE_CALLER 0
#define DECIDE_UNLINK 1
#define DECIDE_LOCK 2

static PyObject *str_release = NULL; /* "release", interned at import */

/* The last holder's end, WRITE held on fd and the name still its object:
 * DECIDE_CALLER hands fd over (unhold() ends it); else unlink the name
 * (DECIDE_LOCK: unless the lock at `lock_at` records an unconfirmed death,
 * read from the object itself) and let go of fd. `unlock`: drop WRITE first,
 * for a description that lives on in a mapping (the hold must end with the
 * close). */
static PyObject *
end_last(int fd, const char *path, int decide, int unlock, Py_ssize_t lock_at)
{
    if (decide == DECIDE_CALLER) {
        return PyLong_FromLong(fd);
    }
    if (decide == DECIDE_LOCK) {
        unsigned char mem[DATA_SIZE];
        ssize_t got = pread(fd, mem, sizeof mem, (off_t)lock_at);
        if (got < 0) {
            int saved = errno;
            ofd(fd, F_OFD_SETLK, F_UNLCK);
            close(fd);
            errno = saved;
            return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        }
        if ((size_t)got < sizeof mem || lock_memory_needs_keeping(mem)) {
            /* Kept for the next opener to be told (too short: not ours to judge). */
            ofd(fd, F_OFD_SETLK, F_UNLCK);
            close(fd);
            return PyLong_FromLong(RELEASED);
        }
    }
    /* We hold WRITE: nobody can be attaching, and the name is still ours. */
    int removed = unlink(path) == 0;
    int saved = errno;
    if (unlock) {
        ofd(fd, F_OFD_SETLK, F_UNLCK);
    }
    close(fd);
    if (!removed && saved != ENOENT) {
        errno = saved;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    return PyLong_FromLong(removed ? REMOVED : RELEASED);
}

/* The close of a hold that kept its descriptor fd, taken since the last fork
 * (nobody else shares fd's description): try WRITE on fd, granted only when
 * nobody holds the object any more; if refused, drop READ and try once more.
 * Two last holders that each only tried to upgrade would both be refused
 * and leave an orphan; whichever drops READ and tries second succeeds. A
 * holder that is not the last keeps a small mapping as a spare (its
 * description carries no lock now); the last one checks the object was not
 * unlinked meanwhile (fd is the object itself, so only st_nlink can tell)
 * and with `decide` unlinks it, else returns fd. */
static PyObject *
release_kept(HandleObject *handle, MappingObject *mm, int fd, const char *path, int decide)
{
    int exported = mm->data != NULL && mm->exports > 0;
    /* First upgrade READ to WRITE in place (atomic for OFD locks: a refusal
     * keeps READ): granted, nobody else holds the object, one call. */
    int rc = ofd(fd, F_OFD_SETLK, F_WRLCK);
    if (rc != 0 && (errno == EAGAIN || errno == EACCES)) {
        /* Somebody else holds it, or is closing at this very moment: drop READ,
         * then try again, so that of two last holders closing at once the
         * second to try sees the first gone. */
        rc = ofd(fd, F_OFD_SETLK, F_UNLCK);
        if (rc == 0) {
            rc = ofd(fd, F_OFD_SETLK, F_WRLCK);
        }
    }
    if (rc != 0) {
        if (errno != EAGAIN && errno != EACCES) {
            goto os_error;
        }
        /* Somebody else holds it. */
        if (!exported && mm->data != NULL) {
            if (mm->size <= SPARE_BYTES) {
                spare_put(handle->st_dev, handle->st_ino, mm->data, (size_t)mm->size);
            }
            else {
                munmap(mm->data, (size_t)mm->size);
            }
            mm->data = NULL;
        }
        close(fd);
        return PyLong_FromLong(RELEASED);
    }
    if (!exported && mm->data != NULL) {
        munmap(mm->data, (size_t)mm->size);
        mm->data = NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int saved = errno;
        ofd(fd, F_OFD_SETLK, F_UNLCK);
        errno = saved;
        goto os_error;
    }
    if (st.st_nlink == 0) {
        /* Unlinked meanwhile (ps.unlink): the name, if any, is another's. */
        ofd(fd, F_OFD_SETLK, F_UNLCK);
        close(fd);
        return PyLong_FromLong(RELEASED);
    }
    /* exported: the description lives on in mm */
    return end_last(fd, path, decide, exported, handle->data_offset);

os_error: {
    int saved = errno;
    close(fd);
    errno = saved;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
}
}

/* release(handle, path, pid, decide) -> RELEASED | REMOVED | fd
 *
 * Close `handle` (a no-op, RELEASED, if it is closed already or was opened by
 * another pid: a forked child never releases what it inherited): let go of
 * its data view, then end its hold and find out whether it was the last one.
 * A hold that kept its descriptor and was taken since the last fork is
 * released on that descriptor (release_kept). Otherwise the mapping keeps
 * the hold (a kept descriptor is closed first: children forked since share
 * its description and keep their part): open path anew (a description with
 * no lock), unmap (or, while buffers exported from the mapping are alive,
 * move it onto the new description with MAP_FIXED, same pages), then try
 * WRITE on the new description, granted only when nobody holds the object
 * any more. The last holder checks that the name still is its object
 * (st_dev, st_ino; not unlinked meanwhile) and decides (end_last): with
 * DECIDE_UNLINK unlinks it, with DECIDE_LOCK unlinks it unless its lock
 * memory must be kept, with DECIDE_CALLER returns the descriptor, WRITE
 * held, for the caller to decide and hand to unhold(). A persist object is
 * only let go of: its last holder never removes it. (The Python-facing
 * release() below takes handle, path, pid, decide.) */
static PyObject *
release_handle(HandleObject *handle, const char *path, long pid, int decide)
{
    if (handle->closed) {
        return PyLong_FromLong(RELEASED);
    }
    handle->closed = 1;
    if (handle->opener_pid != pid) {
        return PyLong_FromLong(RELEASED); /* inherited: the hold is shared with the parent */
    }
    if (handle->data != NULL && PyMemoryView_Check(handle->data) &&
        ((PyMemoryViewObject *)handle->data)->exports > 0) {
        /* A buffer exported from data itself (a lock's mutex keeps one,
         * numpy.frombuffer(data)): release() would refuse with a BufferError,
         * an exception object made and dropped in every child that closes a
         * lock (copied pages). The mapping stays while they live (let_go). */
        Py_CLEAR(handle->data);
    }
    if (handle->data != NULL) {
        /* Views made from data share its managed buffer; only a buffer exported
         * from data itself (numpy.frombuffer(data)) makes release() refuse. */
        PyObject *done = PyObject_CallMethodNoArgs(handle->data, str_release);
        if (done == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_BufferError)) {
                return NULL;
            }
            PyErr_Clear();
        }
        Py_XDECREF(done);
        Py_CLEAR(handle->data);
    }
    if (!Py_IS_TYPE(handle->mm, &Mapping_Type)) {
        PyErr_SetString(PyExc_TypeError, "release(): the handle's mm is not a Mapping");
        return NULL;
    }
    MappingObject *mm = (MappingObject *)handle->mm;
    int fd = handle_own_fd(handle);
    int alone = fd >= 0 && handle->epoch == fork_epoch; /* nobody shares fd's description */
    if (fd >= 0) {
        handle->fd = -1;
        fd_holds--;
    }
    if (handle->persist) {
        if (fd >= 0) {
            if (alone) {
                ofd(fd, F_OFD_SETLK, F_UNLCK); /* an exported mapping must not hold */
            }
            close(fd);
        }
        if (mm->data != NULL && mm->exports == 0) {
            munmap(mm->data, (size_t)mm->size);
            mm->data = NULL;
        }
        return PyLong_FromLong(RELEASED);
    }
    if (alone) {
        return release_kept(handle, mm, fd, path, decide);
    }
    if (fd >= 0) {
        close(fd); /* forked since the open: the mapping way below */
    }
    unsigned long long dev = handle->st_dev, ino = handle->st_ino;
    /* mm->data is NULL after let_go() unmapped it: only the check is left. */
    Py_BEGIN_ALLOW_THREADS
    fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    int exported = mm->data != NULL && mm->exports > 0;
    if (fd < 0) {
        int saved = errno;
        if (!exported && mm->data != NULL) {
            /* The hold ends anyway; if it was the last, the object is an orphan
             * the next procshare use of the namespace reclaims. */
            munmap(mm->data, (size_t)mm->size);
            mm->data = NULL;
        }
        if (saved == ENOENT) {
            return PyLong_FromLong(RELEASED); /* removed already (ps.unlink, a twin) */
        }
        errno = saved;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    struct stat st;
    if (exported) {
        if (fstat(fd, &st) != 0) {
            goto os_error;
        }
        if ((unsigned long long)st.st_dev != dev || (unsigned long long)st.st_ino != ino) {
            /* The name is another object now; ours is unlinked and its hold
             * stops nobody: it goes with the mapping. */
            close(fd);
            return PyLong_FromLong(RELEASED);
        }
        void *moved = mmap(mm->data, (size_t)mm->size, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_FIXED, fd, 0);
        if (moved == MAP_FAILED) {
            goto os_error;
        }
    }
    else if (mm->data != NULL) {
        munmap(mm->data, (size_t)mm->size);
        mm->data = NULL;
    }
    if (ofd(fd, F_OFD_SETLK, F_WRLCK) != 0) {
        if (errno == EAGAIN || errno == EACCES) {
            close(fd); /* somebody else holds it */
            return PyLong_FromLong(RELEASED);
        }
        goto os_error;
    }
    if (!exported && fstat(fd, &st) != 0) {
        goto unlock_error;
    }
    if (st.st_nlink == 0 || (unsigned long long)st.st_dev != dev ||
        (unsigned long long)st.st_ino != ino) {
        /* Ours was unlinked meanwhile; the name (if any) is another's. */
        ofd(fd, F_OFD_SETLK, F_UNLCK);
        close(fd);
        return PyLong_FromLong(RELEASED);
    }
    /* the description may live on in mm */
    return end_last(fd, path, decide, 1, handle->data_offset);

unlock_error: {
    int saved = errno;
    ofd(fd, F_OFD_SETLK, F_UNLCK);
    errno = saved;
}
os_error: {
    int saved = errno;
    close(fd);
    errno = saved;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
}
}

static PyObject *
shmstep_release(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyObject_TypeCheck(args[0], &Handle_Type) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "release() takes handle, path (bytes), pid, decide");
        return NULL;
    }
    long pid = PyLong_AsLong(args[2]);
    long decide = PyBool_Check(args[3]) ? (args[3] == Py_True) : PyLong_AsLong(args[3]);
    if ((pid == -1 || decide == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (decide < DECIDE_CALLER || decide > DECIDE_LOCK) {
        PyErr_SetString(PyExc_ValueError, "release(): decide is 0, 1 or 2");
        return NULL;
    }
    return release_handle((HandleObject *)args[0], PyBytes_AS_STRING(args[1]), pid, (int)decide);
}

/* Where close_lock() finds a handle's path and this process's pid: the
 * globals of segment_object.py (path_bytes, SHM_DIR_BYTES, _pid), read at
 * each call as the Python path reads them. Set by set_paths(). */
static PyObject *paths_g = NULL;
static PyObject *k_path_bytes, *k_pid, *k_shm_dir; /* its keys, interned by set_paths() */

static PyObject *
shmstep_set_paths(PyObject *Py_UNUSED(module), PyObject *globals)
{
    if (!PyDict_Check(globals)) {
        PyErr_SetString(PyExc_TypeError, "set_paths(segment_object globals)");
        return NULL;
    }
    if ((k_path_bytes == NULL && (k_path_bytes = PyUnicode_InternFromString("path_bytes")) == NULL) ||
        (k_pid == NULL && (k_pid = PyUnicode_InternFromString("_pid")) == NULL) ||
        (k_shm_dir == NULL && (k_shm_dir = PyUnicode_InternFromString("SHM_DIR_BYTES")) == NULL)) {
        return NULL;
    }
    Py_XSETREF(paths_g, Py_NewRef(globals));
    Py_RETURN_NONE;
}

/* refresh_pid(): segment_object._pid = getpid(), run in every forked child
 * (os.register_at_fork): in C, a hook whose call writes no code object,
 * frame or module of its own in a child (the Python one copied a few pages
 * in every child of the process, raw os.fork children included). */
static PyObject *
shmstep_refresh_pid(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    if (paths_g == NULL) {
        PyErr_SetString(PyExc_TypeError, "refresh_pid() after set_paths()");
        return NULL;
    }
    PyObject *pid = PyLong_FromLong((long)getpid());
    int rc = pid == NULL ? -1 : PyDict_SetItem(paths_g, k_pid, pid);
    Py_XDECREF(pid);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The path of os_name (new reference; remembered in path_bytes as
 * segment_object.remember_path does), this process's pid and (if dir_out is
 * not NULL) the objects' directory (borrowed), as the Python path finds them;
 * NULL with an exception set. */
static PyObject *
named_path(PyObject *os_name, long *pid, PyObject **dir_out)
{
    PyObject *known = paths_g == NULL ? NULL : PyDict_GetItemWithError(paths_g, k_path_bytes);
    PyObject *pidobj = known == NULL ? NULL : PyDict_GetItemWithError(paths_g, k_pid);
    PyObject *dir = pidobj == NULL ? NULL : PyDict_GetItemWithError(paths_g, k_shm_dir);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (known == NULL || !PyDict_Check(known) || pidobj == NULL || dir == NULL ||
        !PyBytes_Check(dir) || !PyUnicode_Check(os_name)) {
        PyErr_SetString(PyExc_TypeError, "segment_object's globals are not set up (set_paths)");
        return NULL;
    }
    *pid = PyLong_AsLong(pidobj);
    if (*pid == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (dir_out != NULL) {
        *dir_out = dir;
    }
    PyObject *path = PyDict_GetItemWithError(known, os_name); /* borrowed */
    if (path != NULL && PyBytes_Check(path)) {
        return Py_NewRef(path);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    const char *text = PyUnicode_AsUTF8(os_name);
    if (text == NULL) {
        return NULL;
    }
    if (text[0] != '/' || strchr(text + 1, '/') != NULL) {
        return PyErr_Format(PyExc_ValueError, "bad OS name %R", os_name);
    }
    path = PyBytes_FromFormat("%s%s", PyBytes_AS_STRING(dir), text);
    if (path != NULL) {
        if (PyDict_GET_SIZE(known) >= 4096) {
            PyDict_Clear(known);
        }
        if (PyDict_SetItem(known, os_name, path) < 0) {
            Py_CLEAR(path);
        }
    }
    return path;
}

/* Close a named object's handle with the path and pid found by named_path():
 * whether the last holder removed it (decide: what that holder does). */
static PyObject *
close_by_name(HandleObject *handle, int decide)
{
    long pid;
    PyObject *path = named_path(handle->os_name, &pid, NULL);
    if (path == NULL) {
        return NULL;
    }
    PyObject *state = release_handle(handle, PyBytes_AS_STRING(path), pid, decide);
    Py_DECREF(path);
    if (state == NULL) {
        return NULL;
    }
    long code = PyLong_AsLong(state);
    Py_DECREF(state);
    return PyBool_FromLong(code == REMOVED);
}

/* close_lock(handle) -> removed: close a lock object's handle as
 * segment_close(handle, keep=lock_keep) does, in one call: the last holder
 * removes the object unless its lock memory records an unconfirmed death. */
static PyObject *
shmstep_close_lock(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &Handle_Type)) {
        PyErr_SetString(PyExc_TypeError, "close_lock(handle) takes a POSIX segment handle");
        return NULL;
    }
    return close_by_name((HandleObject *)arg, DECIDE_LOCK);
}

/* close_named(handle) -> removed, or NotImplemented (nothing done) for a
 * handle that is not a named object's: segment_close(handle, keep=None) of
 * a named segment in one call (for the front end's C close). */
static PyObject *
shmstep_close_named(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &Handle_Type)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    return close_by_name((HandleObject *)arg, DECIDE_UNLINK);
}

/* open_named(os_name, meta) -> None | SLOW | handle: attach() with the path
 * and pid found as the Python segment_open finds them (one C call for the
 * backend's segment_open and for the C by-name opens above it). */
static PyObject *
shmstep_open_named(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "open_named(os_name, meta: bytes)");
        return NULL;
    }
    long pid;
    PyObject *path = named_path(args[0], &pid, NULL);
    if (path == NULL) {
        return NULL;
    }
    PyObject *pidobj = PyLong_FromLong(pid);
    PyObject *result = NULL;
    if (pidobj != NULL) {
        PyObject *call[4] = {path, args[1], args[0], pidobj};
        result = shmstep_attach(NULL, call, 4);
        Py_DECREF(pidobj);
    }
    Py_DECREF(path);
    return result;
}

/* let_go(handle, path) -> None: end this process's own hold now, while
 * children forked earlier keep theirs (they share the description): close
 * the descriptor the hold kept, if any, without touching its lock, and
 * unmap, or while buffers exported from the mapping are alive, move it onto
 * a new description of the same object (no lock on it). Either way a child
 * forked from now on inherits no hold; release() later only checks for the
 * last holder. Used when a close must wait for children (segment.py). */
static PyObject *
shmstep_let_go(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyObject_TypeCheck(args[0], &Handle_Type) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "let_go() takes handle, path (bytes)");
        return NULL;
    }
    HandleObject *handle = (HandleObject *)args[0];
    if (!Py_IS_TYPE(handle->mm, &Mapping_Type)) {
        PyErr_SetString(PyExc_TypeError, "let_go(): the handle's mm is not a Mapping");
        return NULL;
    }
    MappingObject *mm = (MappingObject *)handle->mm;
    const char *path = PyBytes_AS_STRING(args[1]);
    unsigned long long dev = handle->st_dev, ino = handle->st_ino;
    if (handle_own_fd(handle) >= 0) {
        close(handle->fd); /* the children's references keep the description and READ */
        handle->fd = -1;
        fd_holds--;
    }
    if (mm->data == NULL) {
        Py_RETURN_NONE;
    }
    if (mm->exports == 0) {
        munmap(mm->data, (size_t)mm->size);
        mm->data = NULL;
        Py_RETURN_NONE;
    }
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) {
            Py_RETURN_NONE; /* unlinked: its hold stops nobody */
        }
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    struct stat st;
    int rc = fstat(fd, &st);
    if (rc == 0 && (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino &&
        mmap(mm->data, (size_t)mm->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) ==
            MAP_FAILED) {
        rc = -1;
    }
    int saved = errno;
    close(fd);
    if (rc != 0) {
        errno = saved;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    Py_RETURN_NONE;
}

/* unhold(fd) -> None: drop the WRITE release() left on fd, and close it. */
static PyObject *
shmstep_unhold(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (value < 0 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "unhold(): not a descriptor");
        return NULL;
    }
    int fd = (int)value;
    int rc = ofd(fd, F_OFD_SETLK, F_UNLCK);
    int saved = errno;
    close(fd);
    if (rc != 0) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}
