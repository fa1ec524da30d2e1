/* Included by _futex.c: the queue's hot path on a Words object. */
/* ---------------------------------------------------------------------------
 * The queue's hot path (procshare/_queue.py is the reference and does every
 * unusual case: waiting, repairing, dead owners). Layout, shared with
 * _queue.py: the object's robust pthread mutex at offset 0; the family's
 * words at 128 + 4 * i; descriptors of 32 bytes (state, owner pid, owner
 * start lo/hi, start, pos, len, end); the ring. All counters wrap at 32
 * bits.
 *
 * The mutex is taken here with plain pthread calls (the same mutex the
 * engine's Mutex object takes on the slow path). A holder that died
 * (EOWNERDEAD) is never repaired here: the mutex is made consistent, the
 * REPAIR word set, and the call returns "go slow", where the engine's lock()
 * sees REPAIR and runs the Python repair before anything else.
 */
#define W(i) (128 + 4 * (i))
#define R_HEAD W(0)
#define R_TAIL W(1)
#define R_DHEAD W(2)
#define R_DTAIL W(3)
#define R_NOT_EMPTY W(4)
#define R_NOT_FULL W(5)
#define R_GETTERS W(6)
#define R_PUTTERS W(7)
/* W(11) once counted the READY records. A count kept beside the records
 * drifts for good when a producer dies between its commit and the count (no
 * lock is held there to repair it), so the count is now taken from the
 * records themselves: ring_ready(). */
#define R_REPAIR W(15)
enum { D_STATE = 0, D_PID = 4, D_SLO = 8, D_SHI = 12, D_START = 16, D_POS = 20, D_LEN = 24,
       D_END = 28 };
enum { S_FREE = 0, S_WRITING = 1, S_READY = 2, S_READING = 3 };

static inline uint32_t *
at32(WordsObject *self, Py_ssize_t offset)
{
    return (uint32_t *)((char *)self->view.buf + offset);
}

static inline uint32_t
ld(WordsObject *self, Py_ssize_t offset)
{
    return __atomic_load_n(at32(self, offset), __ATOMIC_SEQ_CST);
}

static inline void
st(WordsObject *self, Py_ssize_t offset, uint32_t value)
{
    __atomic_store_n(at32(self, offset), value, __ATOMIC_SEQ_CST);
}

static inline Py_ssize_t
desc(WordsObject *self, uint32_t seq)
{
    return self->ring_desc + (Py_ssize_t)(seq & (self->ring_slots - 1)) * 32;
}

static void
wake(WordsObject *self, Py_ssize_t offset, int n)
{
    syscall(SYS_futex, at32(self, offset), FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Take the object's mutex: 1 taken, 0 "go slow" (a holder died: flagged). */
static int
ring_lock(WordsObject *self)
{
    pthread_mutex_t *m = (pthread_mutex_t *)self->view.buf;
    int rc = pthread_mutex_trylock(m);
    if (rc == EBUSY) {
        /* Counted as busy: detach() from another thread meanwhile must not
         * let go of the memory this thread sleeps on. */
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_lock(m);
        Py_END_ALLOW_THREADS
        self->busy--;
    }
    if (rc == 0) {
        return 1;
    }
    if (rc == EOWNERDEAD) {
        st(self, R_REPAIR, 1);
        pthread_mutex_consistent(m);
        pthread_mutex_unlock(m);
    }
    return 0;
}

/* After a stretch with the GIL released: a detach() asked meanwhile by
 * another thread lets go of the memory now, once nobody uses it. */
static void
settle(WordsObject *self)
{
    if (self->busy == 0 && self->detaching && self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
}

static void
ring_unlock(WordsObject *self)
{
    pthread_mutex_unlock((pthread_mutex_t *)self->view.buf);
}

/* Move the head over freed records (mutex held); the head. */
static uint32_t
ring_advance(WordsObject *self)
{
    uint32_t head = ld(self, R_HEAD), tail = ld(self, R_TAIL);
    int moved = 0;
    while (head != tail) {
        Py_ssize_t d = desc(self, head);
        if (ld(self, d + D_STATE) != S_FREE) {
            break;
        }
        st(self, R_DHEAD, ld(self, d + D_END));
        head++;
        moved = 1;
    }
    if (moved) {
        st(self, R_HEAD, head);
    }
    return head;
}

/* READY records between the head and the tail, read without the mutex: a
 * snapshot (what qsize() reports), or with first_only, whether there is one
 * (a get's cheap look before it takes the mutex). */
static uint32_t
ring_count_ready(WordsObject *self, int first_only)
{
    uint32_t head = ld(self, R_HEAD), used = ld(self, R_TAIL) - head, n = 0;
    if (used > self->ring_slots) {
        used = self->ring_slots; /* the head moved between the two loads */
    }
    for (uint32_t i = 0; i < used; i++) {
        if (ld(self, desc(self, head + i) + D_STATE) == S_READY) {
            n++;
            if (first_only) {
                break;
            }
        }
    }
    return n;
}

static void
own(WordsObject *self, Py_ssize_t d, uint32_t pid, uint64_t start, uint32_t state)
{
    st(self, d + D_PID, pid);
    st(self, d + D_SLO, (uint32_t)start);
    st(self, d + D_SHI, (uint32_t)(start >> 32));
    st(self, d + D_STATE, state);
}

static int
ring_ready(WordsObject *self)
{
    if (!self->has_view || self->detaching || self->ring_slots == 0) {
        PyErr_SetString(PyExc_ValueError, "futex words are detached or not set up as a ring");
        return 0;
    }
    if (ld(self, R_REPAIR)) {
        return -1; /* a repair is pending: the slow path does it */
    }
    return 1;
}

/* ring_setup(desc, data, slots, cap, maxsize) */
static PyObject *
Words_ring_setup(WordsObject *self, PyObject *args)
{
    Py_ssize_t d, data;
    unsigned int slots, cap, maxsize;
    if (!PyArg_ParseTuple(args, "nnIII", &d, &data, &slots, &cap, &maxsize)) {
        return NULL;
    }
    if (check_open(self) < 0) {
        return NULL;
    }
    if (slots == 0 || (slots & (slots - 1)) || cap == 0 || (cap & (cap - 1)) ||
        d < W(16) || d + (Py_ssize_t)slots * 32 > data || data + (Py_ssize_t)cap > self->view.len) {
        PyErr_SetString(PyExc_ValueError, "bad ring geometry");
        return NULL;
    }
    self->ring_desc = d;
    self->ring_data = data;
    self->ring_slots = slots;
    self->ring_cap = cap;
    self->ring_max = maxsize;
    Py_RETURN_NONE;
}

/* ring_put(parts, pid, start) -> True, or False: go the slow way (full, a
 * repair pending). Copies the parts (buffers) into one record. */
static PyObject *
impl_ring_put(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "ring_put(parts: tuple, pid, start)");
        return NULL;
    }
    int ready = ring_ready(self);
    if (ready <= 0) {
        return ready < 0 ? Py_NewRef(Py_False) : NULL;
    }
    unsigned long pid = PyLong_AsUnsignedLong(args[1]);
    unsigned long long start = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *parts = args[0];
    Py_ssize_t n = PyTuple_GET_SIZE(parts);
    Py_buffer views[8];
    if (n > 8) {
        return Py_NewRef(Py_False); /* many buffers: the Python path copies them */
    }
    Py_ssize_t got = 0, size = 0;
    PyObject *result = NULL;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(parts, got), &views[got], PyBUF_C_CONTIGUOUS) <
            0) {
            goto done;
        }
        size += views[got].len;
    }
    if (size > (Py_ssize_t)self->ring_cap) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    if (!ring_lock(self)) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    uint32_t head = ring_advance(self), tail = ld(self, R_TAIL);
    uint32_t used = tail - head, cap = self->ring_cap;
    uint32_t pos = ld(self, R_DTAIL), begin = pos, off = pos & (cap - 1);
    if (off + (uint32_t)size > cap) {
        pos += cap - off; /* skip the ring's end: padding */
    }
    uint32_t end = pos + (uint32_t)size;
    if (used >= self->ring_slots || (self->ring_max && used >= self->ring_max) ||
        end - ld(self, R_DHEAD) > cap) {
        ring_unlock(self);
        result = Py_NewRef(Py_False);
        goto done;
    }
    Py_ssize_t d = desc(self, tail);
    st(self, d + D_START, begin);
    st(self, d + D_POS, pos);
    st(self, d + D_LEN, (uint32_t)size);
    st(self, d + D_END, end);
    own(self, d, (uint32_t)pid, start, S_WRITING);
    st(self, R_DTAIL, end);
    st(self, R_TAIL, tail + 1);
    ring_unlock(self);
    /* The copy, outside the lock (GIL released for large records). */
    char *dst = (char *)self->view.buf + self->ring_data + (pos & (cap - 1));
    self->busy++;
    if (size > 65536) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            memcpy(dst, views[i].buf, views[i].len);
            dst += views[i].len;
        }
        Py_END_ALLOW_THREADS
    }
    else {
        for (Py_ssize_t i = 0; i < n; i++) {
            memcpy(dst, views[i].buf, views[i].len);
            dst += views[i].len;
        }
    }
    self->busy--;
    st(self, d + D_STATE, S_READY); /* the commit */
    __atomic_fetch_add(at32(self, R_NOT_EMPTY), 1, __ATOMIC_SEQ_CST);
    if (ld(self, R_GETTERS)) {
        wake(self, R_NOT_EMPTY, 1);
    }
    result = Py_NewRef(Py_True);
done:
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&views[i]);
    }
    return result;
}

/* ring_get(pid, start) -> (descriptor, offset, length) of the oldest READY
 * record, now READING by this process; None: go the slow way (empty, a
 * repair pending). Release it with ring_free(descriptor). */
static PyObject *
impl_ring_get(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ring_get(pid, start)");
        return NULL;
    }
    int ready = ring_ready(self);
    if (ready <= 0) {
        return ready < 0 ? Py_NewRef(Py_None) : NULL;
    }
    unsigned long pid = PyLong_AsUnsignedLong(args[0]);
    unsigned long long start = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (ring_count_ready(self, 1) == 0 || !ring_lock(self)) {
        Py_RETURN_NONE;
    }
    uint32_t seq = ring_advance(self), tail = ld(self, R_TAIL);
    for (; seq != tail; seq++) {
        Py_ssize_t d = desc(self, seq);
        if (ld(self, d + D_STATE) == S_READY) {
            own(self, d, (uint32_t)pid, start, S_READING);
            ring_unlock(self);
            uint32_t pos = ld(self, d + D_POS) & (self->ring_cap - 1);
            return Py_BuildValue("nnI", d, self->ring_data + (Py_ssize_t)pos, ld(self, d + D_LEN));
        }
    }
    ring_unlock(self);
    Py_RETURN_NONE;
}

/* ring_ready() -> READY records now (a snapshot, read without the mutex). */
static PyObject *
Words_ring_ready(WordsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->has_view || self->detaching || self->ring_slots == 0) {
        PyErr_SetString(PyExc_ValueError, "futex words are detached or not set up as a ring");
        return NULL;
    }
    return PyLong_FromUnsignedLong(ring_count_ready(self, 0));
}

/* ring_free(descriptor): the record was read; its space may be reused. */
static PyObject *
Words_ring_free(WordsObject *self, PyObject *arg)
{
    Py_ssize_t d = PyLong_AsSsize_t(arg);
    if (d == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (check_open(self) < 0) {
        return NULL;
    }
    if (d < self->ring_desc || d >= self->ring_data || (d - self->ring_desc) % 32) {
        PyErr_SetString(PyExc_ValueError, "not a descriptor of this ring");
        return NULL;
    }
    st(self, d + D_STATE, S_FREE);
    __atomic_fetch_add(at32(self, R_NOT_FULL), 1, __ATOMIC_SEQ_CST);
    if (ld(self, R_PUTTERS)) {
        wake(self, R_NOT_FULL, INT32_MAX);
    }
    Py_RETURN_NONE;
}


/* ring_put, counted busy throughout: a detach() from another thread while
 * this one has the GIL released (waiting for the mutex, copying) waits. */
static PyObject *
Words_ring_put(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    self->busy++;
    PyObject *result = impl_ring_put(self, args, nargs);
    self->busy--;
    settle(self);
    return result;
}

/* ring_get, counted busy throughout: a detach() from another thread while
 * this one has the GIL released (waiting for the mutex, copying) waits. */
static PyObject *
Words_ring_get(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    self->busy++;
    PyObject *result = impl_ring_get(self, args, nargs);
    self->busy--;
    settle(self);
    return result;
}
