/* The memory of a procshare lock object, shared by _robustmutex.c (which
 * takes and releases it) and _shmstep.c (whose close of a lock object's last
 * hold decides whether to remove it): one definition of the layout and of
 * the "must be kept" rule.
 *
 * Inside the lock object's data area, 64-byte aligned:
 *
 *   0   pthread_mutex_t  robust, process-shared, error-checking
 *   64  lock_state       our own words
 *
 * glibc's pthread_mutex_t begins with three ints: __lock (the futex word:
 * the holder's kernel tid, FUTEX_OWNER_DIED, FUTEX_WAITERS), __count and
 * __owner. */
#ifndef PROCSHARE_LOCK_LAYOUT_H
#define PROCSHARE_LOCK_LAYOUT_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define STATE_OFFSET 64
#define DATA_SIZE 128
#define STATE_MAGIC 0x6b4c5350u /* "PSLk" */

#define FUTEX_TID_MASK 0x3fffffffu
#define FUTEX_OWNER_DIED 0x40000000u
/* glibc's __owner of a mutex unlocked after EOWNERDEAD without
 * pthread_mutex_consistent() (by code that is not procshare): poisoned. */
#define LOCK_NOTRECOVERABLE_OWNER 0x7ffffffe

typedef struct {
    uint32_t magic;
    uint32_t unconfirmed; /* 1 from a holder's death until mark_consistent() */
    int32_t owner_pid;    /* holder's pid while held, else 0 */
    int32_t owner_tid;    /* holder's kernel tid while held, else 0 */
    int32_t dead_pid;     /* pid of the last holder that died (0 if unknown) */
    uint32_t deaths;      /* holders that died while holding, ever */
} lock_state;

/* Whether the DATA_SIZE bytes of lock memory at `mem` record a death nobody
 * has confirmed yet, so that the object must be kept even with no living
 * holder and the next process to open it is told: a holder died holding it
 * (the kernel marked the word FUTEX_OWNER_DIED, or left a dead thread's id
 * in it), it was released unconfirmed, or foreign code poisoned it. Memory
 * that is not one of our locks (no magic) needs no keeping. */
static inline int
lock_memory_needs_keeping(const unsigned char *mem)
{
    uint32_t word;
    int32_t owner;
    lock_state state;
    memcpy(&word, mem, sizeof word);
    memcpy(&owner, mem + 2 * sizeof(uint32_t), sizeof owner);
    memcpy(&state, mem + STATE_OFFSET, sizeof state);
    if (state.magic != STATE_MAGIC) {
        return 0;
    }
    if (owner == LOCK_NOTRECOVERABLE_OWNER) {
        return 1; /* reported until someone removes it (`procshare rm --lock`) */
    }
    return (word & (FUTEX_OWNER_DIED | FUTEX_TID_MASK)) != 0 || state.unconfirmed != 0;
}

/* Set up a fresh lock in the DATA_SIZE bytes at `mem` (a new object's, before
 * it is published): a robust, process-shared, error-checking mutex and our
 * words. 0, or an errno value. */
static inline int
lock_memory_initialise(void *mem)
{
    pthread_mutexattr_t attr;
    int rc;
    memset(mem, 0, DATA_SIZE);
    if ((rc = pthread_mutexattr_init(&attr)) != 0) {
        return rc;
    }
    if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) != 0 ||
        (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)) != 0 ||
        (rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK)) != 0 ||
        (rc = pthread_mutex_init((pthread_mutex_t *)mem, &attr)) != 0) {
        pthread_mutexattr_destroy(&attr);
        return rc;
    }
    pthread_mutexattr_destroy(&attr);
    ((lock_state *)((char *)mem + STATE_OFFSET))->magic = STATE_MAGIC;
    return 0;
}

#endif
