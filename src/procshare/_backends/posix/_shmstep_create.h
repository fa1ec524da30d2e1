/* Part of _shmstep.c (included there, once): creating an object.
 *
 * create() makes the unnamed O_TMPFILE inode, holds, writes and maps it, and
 * for an object with nothing to initialise also publishes it and builds its
 * handle; publish() and adopt() are the steps segment.py calls otherwise.
 * Needs ofd(), MAGIC and the types of _shmstep_types.h.
 */
#define PWRITE_BYTES (64 << 10)

static int
write_all(int fd, const char *buf, size_t len, off_t offset)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, offset);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

/* Whether linkat(fd, "", ..., AT_EMPTY_PATH) works here: Linux 6.10+ allows it
 * for a descriptor the caller opened itself, older kernels only with
 * CAP_DAC_READ_SEARCH. Unknown (-1) until the first publish. It saves the
 * walk through /proc/self/fd/N, a third of what publishing costs. */
static int empty_path_ok = -1;

/* Link the unnamed inode fd to path: 0, or -1 with errno (EEXIST: taken). */
static int
link_object(int fd, const char *path)
{
    int rc = -1;
    int tried_empty = 0;
    int saved;
    Py_BEGIN_ALLOW_THREADS
#ifdef AT_EMPTY_PATH
    if (empty_path_ok != 0) {
        tried_empty = 1;
        rc = linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH);
    }
#endif
    if (rc != 0 && (!tried_empty || errno == ENOENT || errno == EPERM)) {
        if (tried_empty && errno != EEXIST) {
            empty_path_ok = 0; /* not allowed here: /proc from now on */
        }
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        rc = linkat(AT_FDCWD, proc, AT_FDCWD, path, AT_SYMLINK_FOLLOW);
    }
    else if (rc == 0) {
        empty_path_ok = 1;
    }
    saved = errno;
    Py_END_ALLOW_THREADS
    errno = saved;
    return rc;
}

/* create(dir, meta, flags, data_offset, data_size, total, mode, pid)
 *     -> None (no O_TMPFILE here) | (fd, mm, created_ns, st_dev, st_ino); pid is
 *     the creator recorded in the header (the caller's, known without a system
 *     call). fd holds the READ lock until publish() keeps or closes it.
 * create(..., pid, path, os_name) -> None (no O_TMPFILE) | False (the name is
 *     taken) | a handle: the same, for an object with nothing to initialise,
 *     published at once (one call instead of three, with the handle built
 *     here, as attach() builds it). */
/* The work of create() (see above); with init_lock, the data area is set up
 * as a lock (_lock_layout.h) after the mapping and before the publication. */
static PyObject *
create_object(const char *dir, PyObject *meta_obj, unsigned int flags, unsigned long long dataoff,
              unsigned long long datalen, unsigned long long total, unsigned int mode,
              unsigned int pid, const char *path, PyObject *os_name, int init_lock)
{
    const char *meta_buf = PyBytes_AS_STRING(meta_obj);
    Py_ssize_t meta_len = PyBytes_GET_SIZE(meta_obj);
    if (total < (unsigned long long)META_OFFSET + (unsigned long long)meta_len ||
        dataoff + datalen > total || dataoff < (unsigned long long)META_OFFSET + meta_len) {
        PyErr_SetString(PyExc_ValueError, "create(): the layout does not fit in total");
        return NULL;
    }
#ifndef O_TMPFILE
    Py_RETURN_NONE;
#else
    int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, (mode_t)mode);
    if (fd < 0) {
        if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL || errno == ENOENT) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, dir);
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    unsigned long long created =
        (unsigned long long)now.tv_sec * 1000000000ULL + (unsigned long long)now.tv_nsec;
    uint32_t metalen = (uint32_t)meta_len, creator = (uint32_t)pid;
    size_t head_len = (size_t)META_OFFSET + (size_t)meta_len;
    size_t buf_len = total <= PWRITE_BYTES ? (size_t)total : head_len;
    char *buf = PyMem_RawCalloc(1, buf_len);
    if (buf == NULL) {
        close(fd);
        return PyErr_NoMemory();
    }
    memcpy(buf, MAGIC, sizeof MAGIC);
    memcpy(buf + 8, &flags, 4);
    memcpy(buf + 12, &metalen, 4);
    uint64_t v = dataoff;
    memcpy(buf + 16, &v, 8);
    v = datalen;
    memcpy(buf + 24, &v, 8);
    v = created;
    memcpy(buf + 32, &v, 8);
    memcpy(buf + 40, &creator, 4);
    memcpy(buf + META_OFFSET, meta_buf, (size_t)meta_len);
    int rc = ofd(fd, F_OFD_SETLK, F_RDLCK); /* a new inode: nothing conflicts */
    if (rc == 0 && total > PWRITE_BYTES) {
        rc = posix_fallocate(fd, 0, (off_t)total);
        if (rc != 0) {
            errno = rc;
            rc = -1;
        }
    }
    if (rc == 0) {
        rc = write_all(fd, buf, buf_len, 0);
    }
    PyMem_RawFree(buf);
    struct stat st;
    if (rc == 0) {
        rc = fstat(fd, &st); /* the identity release() checks the name against */
    }
    if (rc == 0 && (st.st_mode & 07777) != (mode_t)mode) {
        /* The umask narrowed what open() was asked, owner bits included (a
         * umask of 0277 would make the object read-only for its own user's
         * attachers): set the mode asked for. */
        rc = fchmod(fd, (mode_t)mode);
    }
    if (rc != 0) {
        int saved = errno;
        close(fd);
        errno = saved; /* EFBIG (the file-size limit) stays EFBIG: segment.py says which */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *mm = mapping_new(fd, (Py_ssize_t)total);
    if (mm == NULL) {
        close(fd);
        return NULL;
    }
    if (path == NULL) {
        PyObject *result = Py_BuildValue("(iNKKK)", fd, mm, created,
                                         (unsigned long long)st.st_dev,
                                         (unsigned long long)st.st_ino);
        if (result == NULL) {
            close(fd);
        }
        return result;
    }
    if (init_lock) {
        int failed = lock_memory_initialise(((MappingObject *)mm)->data + dataoff);
        if (failed != 0) {
            Py_DECREF(mm);
            close(fd);
            errno = failed;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    /* Nothing (more) to initialise: build the handle and publish now. */
    PyObject *handle = handle_make(handle_type, os_name, mm, (unsigned long long)st.st_dev,
                                   (unsigned long long)st.st_ino, meta_obj, flags & 1,
                                   (Py_ssize_t)dataoff, (Py_ssize_t)datalen, created, pid,
                                   (int)pid);
    Py_DECREF(mm); /* the handle holds it (or, on failure, it unmaps) */
    if (handle == NULL) {
        close(fd);
        return NULL;
    }
    rc = link_object(fd, path);
    int saved = errno;
    if (rc == 0 && fd_room()) {
        ((HandleObject *)handle)->fd = fd; /* epoch: handle_make's, taken after the lock */
        fd_holds++;
    }
    else {
        close(fd);
    }
    if (rc == 0) {
        return handle;
    }
    Py_DECREF(handle); /* unmaps: no hold left on the unnamed inode */
    if (saved == EEXIST) {
        Py_RETURN_FALSE;
    }
    errno = saved;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
#endif
}

static PyObject *
shmstep_create(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *dir;
    PyObject *meta_obj;
    unsigned int flags, mode, pid;
    unsigned long long dataoff, datalen, total;
    const char *path = NULL;
    PyObject *os_name = NULL;
    if (!PyArg_ParseTuple(args, "ySIKKKII|yU", &dir, &meta_obj, &flags, &dataoff, &datalen,
                          &total, &mode, &pid, &path, &os_name)) {
        return NULL;
    }
    if (path != NULL && (os_name == NULL || handle_type == NULL)) {
        PyErr_SetString(PyExc_TypeError, "create(): path needs os_name (and set_handle_type())");
        return NULL;
    }
    return create_object(dir, meta_obj, flags, dataoff, datalen, total, mode, pid, path, os_name,
                         0);
}


/* publish(fd, path[, handle, epoch]) -> bool: name the unnamed inode fd;
 * False if the name is taken. Closes fd, unless handle (the object's new
 * handle) may keep it for its hold (see _shmstep_holds.h; epoch: fork_epoch
 * when the READ hold was taken); the mapping made by create() keeps the
 * hold otherwise. */
static PyObject *
shmstep_publish(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    const char *path;
    PyObject *owner = NULL;
    unsigned long epoch = 0;
    if (!PyArg_ParseTuple(args, "iy|O!k", &fd, &path, &Handle_Type, &owner, &epoch)) {
        return NULL;
    }
    int rc = link_object(fd, path);
    int saved = errno;
    if (rc == 0 && owner != NULL && ((HandleObject *)owner)->fd < 0 && fd_room()) {
        ((HandleObject *)owner)->fd = fd;
        ((HandleObject *)owner)->epoch = epoch;
        fd_holds++;
    }
    else {
        close(fd);
    }
    errno = saved;
    if (rc == 0) {
        Py_RETURN_TRUE;
    }
    if (errno == EEXIST) {
        Py_RETURN_FALSE;
    }
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
}

/* adopt(handle, fd, epoch) -> bool: let handle keep fd (READ held on it since
 * fork_epoch was epoch) for its hold if there is room; False: the caller
 * closes fd and the mapping keeps the hold. */
static PyObject *
shmstep_adopt(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *owner;
    int fd;
    unsigned long epoch;
    if (!PyArg_ParseTuple(args, "O!ik", &Handle_Type, &owner, &fd, &epoch)) {
        return NULL;
    }
    HandleObject *handle = (HandleObject *)owner;
    if (fd < 0 || handle->fd >= 0 || handle->closed || !fd_room()) {
        Py_RETURN_FALSE;
    }
    handle->fd = fd;
    handle->epoch = epoch;
    fd_holds++;
    Py_RETURN_TRUE;
}

/* link_mode() -> the current mode; link_mode(m) sets it: 1 AT_EMPTY_PATH, 0 the
 * /proc/self/fd path, -1 find out at the next publish (tests use both ways). */
static PyObject *
shmstep_link_mode(PyObject *Py_UNUSED(module), PyObject *args)
{
    int mode = -2;
    if (!PyArg_ParseTuple(args, "|i", &mode)) {
        return NULL;
    }
    int old = empty_path_ok;
    if (mode != -2) {
        empty_path_ok = mode < 0 ? -1 : mode > 0;
    }
    return PyLong_FromLong(old);
}
