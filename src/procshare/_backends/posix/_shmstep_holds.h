/* Part of _shmstep.c (included there, once, before _shmstep_types.h): what a
 * hold keeps, and the idle mappings kept for the next open.
 *
 * A hold is a READ OFD lock on the holder byte of an open file description.
 * Two ways to keep that description alive, chosen per hold at its open:
 *
 * - with its descriptor (the common case): closing tries WRITE on that same
 *   descriptor (is this the last holder?), with no new open of the name. A
 *   process keeps descriptors only while the holds that keep one are fewer
 *   than a quarter of its soft RLIMIT_NOFILE (256 of the usual 1,024), so
 *   three quarters stay the program's own, and never more than FD_BUDGET_MAX
 *   (1,024) however high the limit: every fork copies the descriptor table,
 *   and a program that raised its limit may still select() on descriptors
 *   below 1,024;
 * - beyond that, with its mapping only (the descriptor is closed once the
 *   object is mapped, and the mapping keeps the description): a process
 *   holds as many objects as it may have mappings (vm.max_map_count), and
 *   closing opens the name again to try WRITE on a new description.
 *
 * Fork: a child shares the parent's descriptions, so the parent must not
 * drop a READ a child may still count on. Every fork() bumps fork_epoch (a
 * pthread_atfork handler, so os.fork, procshare's fork step and any C fork
 * alike); a hold opened before the last fork is closed the mapping way
 * (close the descriptor, unmap, try WRITE on a new description), which ends
 * this process's part of the hold and leaves the children theirs.
 *
 * Spares: a close that leaves the object to other holders may keep its small
 * mapping (at most SPARES of them, each at most SPARE_BYTES) for the next
 * open of the same object, which then skips mmap and munmap, a third of an
 * attach. A spare is never a hold: only a hold that kept its descriptor
 * becomes one, after its READ was dropped explicitly on that descriptor, so
 * the description the spare keeps alive carries no lock. The inode cannot be
 * reused while the spare maps it, so (st_dev, st_ino) names it safely.
 */
#include <pthread.h>
#include <sys/resource.h>

/* Bumped in the parent by every fork() (see above). */
static unsigned long fork_epoch = 0;

static void
holds_before_fork(void)
{
    fork_epoch++;
}

/* Holds of this process that keep their descriptor (inherited ones included:
 * a forked child has those descriptors open too). */
static long fd_holds = 0;
/* A quarter of the soft RLIMIT_NOFILE, at most FD_BUDGET_MAX, refreshed every
 * FD_REFRESH asks (-1: not read yet); fd_budget_fixed >= 0 replaces it (tests). */
static long fd_budget = -1;
static long fd_budget_fixed = -1;
static unsigned int fd_asks = 0;
#define FD_REFRESH 8
#define FD_BUDGET_MAX 1024L

/* Whether a new hold may keep its descriptor. getrlimit costs ~0.6 us, a
 * tenth of a close: it is read again every FD_REFRESH asks, so a limit
 * lowered meanwhile (setrlimit in a child) is followed within as many opens. */
static int
fd_room(void)
{
    if (fd_budget_fixed >= 0) {
        return fd_holds < fd_budget_fixed;
    }
    if (fd_budget < 0 || ++fd_asks >= FD_REFRESH) {
        struct rlimit rl;
        fd_asks = 0;
        if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
            rl.rlim_cur / 4 > (rlim_t)FD_BUDGET_MAX) {
            fd_budget = FD_BUDGET_MAX;
        }
        else {
            fd_budget = (long)(rl.rlim_cur / 4);
        }
    }
    return fd_holds < fd_budget;
}

#define SPARES 16
#define SPARE_BYTES (64 << 10)

typedef struct {
    unsigned long long dev, ino;
    void *data;
    size_t size;
} Spare;

static Spare spares[SPARES];
static int spare_next = 0; /* the slot the next spare goes to (the oldest) */

/* Keep data (size bytes of the object dev/ino, lock-free) as a spare; the
 * oldest spare is unmapped to make room. */
static void
spare_put(unsigned long long dev, unsigned long long ino, void *data, size_t size)
{
    Spare *slot = &spares[spare_next];
    spare_next = (spare_next + 1) % SPARES;
    if (slot->data != NULL) {
        munmap(slot->data, slot->size);
    }
    slot->dev = dev;
    slot->ino = ino;
    slot->data = data;
    slot->size = size;
}

/* A spare of the object dev/ino of this size, taken out of the list; or NULL. */
static void *
spare_take(unsigned long long dev, unsigned long long ino, size_t size)
{
    for (int i = 0; i < SPARES; i++) {
        Spare *slot = &spares[i];
        if (slot->data != NULL && slot->ino == ino && slot->dev == dev && slot->size == size) {
            void *data = slot->data;
            slot->data = NULL;
            return data;
        }
    }
    return NULL;
}

/* Unmap every spare; how many there were. */
static int
spares_drop(void)
{
    int dropped = 0;
    for (int i = 0; i < SPARES; i++) {
        if (spares[i].data != NULL) {
            munmap(spares[i].data, spares[i].size);
            spares[i].data = NULL;
            dropped++;
        }
    }
    return dropped;
}

/* mmap the whole object shared; at vm.max_map_count (ENOMEM) the spares go
 * first, then it is tried once more. */
static void *
map_shared(int fd, size_t size)
{
    void *data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (data == MAP_FAILED && errno == ENOMEM && spares_drop() > 0) {
        data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    return data;
}

/* -- introspection, for tests and listings ----------------------------------- */

/* descriptors() -> (holds keeping a descriptor, how many may; -1 unknown yet). */
static PyObject *
shmstep_descriptors(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return Py_BuildValue("(ll)", fd_holds, fd_budget_fixed >= 0 ? fd_budget_fixed : fd_budget);
}

/* set_descriptor_budget(n) -> previous: at most n holds keep a descriptor;
 * n < 0: a quarter of the soft RLIMIT_NOFILE again (tests cross the line). */
static PyObject *
shmstep_set_descriptor_budget(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long old = fd_budget_fixed;
    fd_budget_fixed = n < 0 ? -1 : n;
    return PyLong_FromLong(old);
}

/* spares() -> [(st_dev, st_ino)]: the objects this process keeps a spare of. */
static PyObject *
shmstep_spares(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    PyObject *out = PyList_New(0);
    for (int i = 0; out != NULL && i < SPARES; i++) {
        if (spares[i].data == NULL) {
            continue;
        }
        PyObject *key = Py_BuildValue("(KK)", spares[i].dev, spares[i].ino);
        if (key == NULL || PyList_Append(out, key) < 0) {
            Py_XDECREF(key);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(key);
    }
    return out;
}

/* drop_spares() -> int: unmap every spare; how many there were. */
static PyObject *
shmstep_drop_spares(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return PyLong_FromLong(spares_drop());
}

/* fork_epoch() -> int: bumped by every fork() (see _shmstep_holds.h). */
static PyObject *
shmstep_fork_epoch(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return PyLong_FromUnsignedLong(fork_epoch);
}
