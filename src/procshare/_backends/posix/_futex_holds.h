/* Included by _futex.c: the uncontended paths of the semaphore and the rwlock.
 *
 * procshare/_sync.py and procshare/_rwlock.py are the reference and do every
 * other case (waiting, telling a death, repairing, errors): each function
 * here answers -1 ("go slow") whenever the case is not the plain one, so
 * the Python path, under the same mutex, decides. Layout as in
 * _futex_ring.h: the mutex at 0, the family's words at 128 + 4 * i, holder
 * slots of 32 bytes (pid, start lo, start hi, a, b) at 192.
 */
#define SLOTS_AT 192
enum { H_PID = 0, H_SLO = 4, H_SHI = 8, H_A = 12, H_B = 16 };

/* The slot of (pid, start), trying `hint` first; with `claim`, a free slot
 * (or one whose process holds nothing) becomes this process's. -1: none. */
static long
find_slot(WordsObject *self, uint32_t pid, uint64_t start, long hint, long nslots, int claim)
{
    if (SLOTS_AT + nslots * 32 > self->view.len) {
        return -1;
    }
#define SLOT(i) (SLOTS_AT + (Py_ssize_t)(i) * 32)
#define MINE(i)                                                                               \
    (ld(self, SLOT(i) + H_PID) == pid && ld(self, SLOT(i) + H_SLO) == (uint32_t)start &&     \
     ld(self, SLOT(i) + H_SHI) == (uint32_t)(start >> 32))
    if (hint >= 0 && hint < nslots && MINE(hint)) {
        return hint;
    }
    long idle = -1;
    for (long i = 0; i < nslots; i++) {
        if (MINE(i)) {
            return i;
        }
        if (idle < 0 && (ld(self, SLOT(i) + H_PID) == 0 ||
                         (ld(self, SLOT(i) + H_A) == 0 && ld(self, SLOT(i) + H_B) == 0))) {
            idle = i;
        }
    }
    if (!claim || idle < 0) {
        return -1;
    }
    /* As Slots.claim: counters first, the pid last. */
    st(self, SLOT(idle) + H_A, 0);
    st(self, SLOT(idle) + H_B, 0);
    st(self, SLOT(idle) + H_SLO, (uint32_t)start);
    st(self, SLOT(idle) + H_SHI, (uint32_t)(start >> 32));
    st(self, SLOT(idle) + H_PID, pid);
    return idle;
}

static void
slot_add(WordsObject *self, long i, int field, int32_t delta)
{
    __atomic_fetch_add(at32(self, SLOT(i) + field), (uint32_t)delta, __ATOMIC_SEQ_CST);
}

static int32_t
slot_get(WordsObject *self, long i, int field)
{
    return (int32_t)ld(self, SLOT(i) + field);
}

/* Parse (op, pid, start, hint, nslots); take the mutex. 0: go slow. */
static int
hold_begin(WordsObject *self, PyObject *const *args, Py_ssize_t nargs, long *op, uint32_t *pid,
           uint64_t *start, long *hint, long *nslots)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "hold(op, pid, start, hint, nslots)");
        return -1;
    }
    *op = PyLong_AsLong(args[0]);
    *pid = (uint32_t)PyLong_AsUnsignedLong(args[1]);
    *start = PyLong_AsUnsignedLongLong(args[2]);
    *hint = PyLong_AsLong(args[3]);
    *nslots = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) {
        return -1;
    }
    if (check_open(self) < 0) {
        return -1;
    }
    if (ld(self, R_REPAIR) || !ring_lock(self)) {
        return 0;
    }
    if (ld(self, R_REPAIR)) {
        ring_unlock(self);
        return 0;
    }
    return 1;
}

enum { SEM_TAKE = 1, SEM_GIVE = 2, READ_TAKE = 3, READ_GIVE = 4, WRITE_TAKE = 5, WRITE_GIVE = 6 };
/* semaphore words */
#define SEM_COUNT W(0)
#define SEM_SEQ W(1)
#define SEM_WAITERS W(2)
#define SEM_EXTRA W(4)
#define SEM_DIED W(5)
/* rwlock words */
#define RW_READERS W(0)
#define RW_WPID W(1)
#define RW_WLO W(2)
#define RW_WHI W(3)
#define RW_WWAIT W(4)
#define RW_SEQ W(5)
#define RW_WAITERS W(6)
#define RW_DIED W(7)

static long
hold_op(WordsObject *self, long op, uint32_t pid, uint64_t start, long hint, long nslots)
{
    long i;
    switch (op) {
    case SEM_TAKE: {
        uint32_t count = ld(self, SEM_COUNT);
        if (count == 0 || ld(self, SEM_DIED)) {
            return -1;
        }
        if ((i = find_slot(self, pid, start, hint, nslots, 1)) < 0) {
            return -1;
        }
        slot_add(self, i, H_A, 1);
        st(self, SEM_COUNT, count - 1);
        return i;
    }
    case SEM_GIVE:
        i = find_slot(self, pid, start, hint, nslots, 0);
        if (i >= 0 && slot_get(self, i, H_A) > 0) {
            slot_add(self, i, H_A, -1);
        }
        else {
            __atomic_fetch_add(at32(self, SEM_EXTRA), 1, __ATOMIC_SEQ_CST);
        }
        __atomic_fetch_add(at32(self, SEM_COUNT), 1, __ATOMIC_SEQ_CST);
        if (ld(self, SEM_WAITERS)) {
            __atomic_fetch_add(at32(self, SEM_SEQ), 1, __ATOMIC_SEQ_CST);
            wake(self, SEM_SEQ, 1);
        }
        return i < 0 ? -2 : i;
    case READ_TAKE:
        if (ld(self, RW_WPID) || ld(self, RW_DIED)) {
            return -1;
        }
        if ((i = find_slot(self, pid, start, hint, nslots, 1)) < 0) {
            return -1;
        }
        if (ld(self, RW_WWAIT) && slot_get(self, i, H_A) == 0) {
            return -1; /* a writer waits: new readers queue behind it */
        }
        slot_add(self, i, H_A, 1);
        __atomic_fetch_add(at32(self, RW_READERS), 1, __ATOMIC_SEQ_CST);
        return i;
    case READ_GIVE:
        i = find_slot(self, pid, start, hint, nslots, 0);
        if (i < 0 || slot_get(self, i, H_A) <= 0) {
            return -1; /* not held: the Python path says so */
        }
        slot_add(self, i, H_A, -1);
        if (__atomic_fetch_sub(at32(self, RW_READERS), 1, __ATOMIC_SEQ_CST) == 1 &&
            ld(self, RW_WAITERS)) {
            __atomic_fetch_add(at32(self, RW_SEQ), 1, __ATOMIC_SEQ_CST);
            wake(self, RW_SEQ, INT32_MAX);
        }
        return i;
    case WRITE_TAKE:
        if (ld(self, RW_WPID) || ld(self, RW_READERS) || ld(self, RW_DIED)) {
            return -1;
        }
        st(self, RW_WLO, (uint32_t)start);
        st(self, RW_WHI, (uint32_t)(start >> 32));
        st(self, RW_WPID, pid); /* last: the hold is this process's */
        return -2;
    case WRITE_GIVE:
        if (ld(self, RW_WPID) != pid) {
            return -1;
        }
        st(self, RW_WPID, 0);
        if (ld(self, RW_WAITERS)) {
            __atomic_fetch_add(at32(self, RW_SEQ), 1, __ATOMIC_SEQ_CST);
            wake(self, RW_SEQ, INT32_MAX);
        }
        return -2;
    default:
        return -1;
    }
}

/* hold(op, pid, start, hint, nslots) -> done: the slot used (>= 0) or -2 (no
 * slot); -1: nothing done, go slow. */
static PyObject *
Words_hold(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long op, hint, nslots;
    uint32_t pid;
    uint64_t start;
    self->busy++; /* (see Words_ring_put) */
    int rc = hold_begin(self, args, nargs, &op, &pid, &start, &hint, &nslots);
    long result = -1;
    if (rc > 0) {
        result = hold_op(self, op, pid, start, hint, nslots);
        ring_unlock(self);
    }
    self->busy--;
    settle(self);
    if (rc < 0) {
        return NULL;
    }
    return PyLong_FromLong(result);
}
#undef SLOT
#undef MINE

/* HoldGuard: the base class of the semaphore and of the rwlock's read and
 * write sides, whose `with` is C (as the lock's Guard in _robustmutex.c, and
 * for the same reasons: speed, and no signal handler can run between taking
 * the hold and the block starting).
 *
 * Fields (set by the front end): _hw the Words (anything else: always slow),
 * _htake / _hgive the hold() operations, _hslots the slot count, _hhint the
 * last slot used, _hpid / _hstart this process's token. In a process whose
 * pid is not _hpid (a forked child) and whenever hold() answers "go slow",
 * __enter__ returns self._enter_slow() and __exit__ calls self._exit_slow(). */
static pid_t holds_pid;

static void
holds_after_fork(void)
{
    holds_pid = getpid();
}

typedef struct {
    PyObject_HEAD
    PyObject *w;
    int take, give;
    int nslots;
    int hint;
    unsigned int pid;
    unsigned long long start;
} HoldGuardObject;

static int
HoldGuard_traverse(HoldGuardObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->w);
    return 0;
}

static int
HoldGuard_clear(HoldGuardObject *self)
{
    Py_CLEAR(self->w);
    return 0;
}

static void
HoldGuard_dealloc(HoldGuardObject *self)
{
    PyObject_GC_UnTrack(self);
    HoldGuard_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject WordsType;

/* One fast hold operation: >= -2 done (slot or -2), -1 go slow. */
static long
guard_op(HoldGuardObject *self, int op)
{
    PyObject *w = self->w;
    if (w == NULL || !Py_IS_TYPE(w, &WordsType) || (pid_t)self->pid != holds_pid) {
        return -1;
    }
    WordsObject *words = (WordsObject *)w;
    if (!words->has_view || words->detaching || ld(words, R_REPAIR)) {
        return -1;
    }
    Py_INCREF(w);
    words->busy++; /* (see Words_ring_put) */
    long rc = -1;
    if (ring_lock(words)) {
        if (!ld(words, R_REPAIR)) {
            rc = hold_op(words, op, self->pid, self->start, self->hint, self->nslots);
        }
        ring_unlock(words);
    }
    words->busy--;
    settle(words);
    Py_DECREF(w);
    if (rc >= 0) {
        self->hint = (int)rc;
    }
    return rc;
}

static PyObject *
HoldGuard_enter(HoldGuardObject *self, PyObject *Py_UNUSED(ignored))
{
    if (guard_op(self, self->take) != -1) {
        return Py_NewRef(self);
    }
    return PyObject_CallMethod((PyObject *)self, "_enter_slow", NULL);
}

static PyObject *
HoldGuard_exit(HoldGuardObject *self, PyObject *const *Py_UNUSED(args),
               Py_ssize_t Py_UNUSED(nargs))
{
    if (guard_op(self, self->give) != -1) {
        Py_RETURN_NONE;
    }
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_exit_slow", NULL);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef HoldGuard_methods[] = {
    {"__enter__", (PyCFunction)HoldGuard_enter, METH_NOARGS, "Take the hold."},
    {"__exit__", (PyCFunction)(void (*)(void))HoldGuard_exit, METH_FASTCALL,
     "Give back the hold taken by __enter__."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef HoldGuard_members[] = {
    {"_hw", T_OBJECT, offsetof(HoldGuardObject, w), 0, "the futex words (or None)"},
    {"_htake", T_INT, offsetof(HoldGuardObject, take), 0, "hold() operation of __enter__"},
    {"_hgive", T_INT, offsetof(HoldGuardObject, give), 0, "hold() operation of __exit__"},
    {"_hslots", T_INT, offsetof(HoldGuardObject, nslots), 0, "holder slots"},
    {"_hhint", T_INT, offsetof(HoldGuardObject, hint), 0, "the slot last used"},
    {"_hpid", T_UINT, offsetof(HoldGuardObject, pid), 0, "this process's token: pid"},
    {"_hstart", T_ULONGLONG, offsetof(HoldGuardObject, start), 0, "token: start time"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HoldGuardType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "procshare._backends.posix._futex.HoldGuard",
    .tp_doc = "Base of the semaphore and rwlock sides: `with` in C (see _futex_holds.h).",
    .tp_basicsize = sizeof(HoldGuardObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)HoldGuard_dealloc,
    .tp_traverse = (traverseproc)HoldGuard_traverse,
    .tp_clear = (inquiry)HoldGuard_clear,
    .tp_methods = HoldGuard_methods,
    .tp_members = HoldGuard_members,
};
