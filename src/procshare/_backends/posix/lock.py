"""Robust process-shared mutexes on POSIX.

A lock is a ``PTHREAD_PROCESS_SHARED`` + ``PTHREAD_MUTEX_ROBUST`` (+
``ERRORCHECK``) pthread mutex in the data area of a segment object, plus a
few words of our own beside it (see ``_robustmutex.c`` for the layout and for
why the hot path is C rather than ``ctypes``).

Robust mutexes are what make "the holder died" both *survivable* (the kernel
releases a dead thread's robust mutexes, marking them ``FUTEX_OWNER_DIED``
and waking one waiter at once) and *visible* (the next locker gets
``EOWNERDEAD``). Semaphores deadlock when their holder dies; file locks are
released silently.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from procshare._backends.api_lock import LockHandle
from procshare._backends.api_segment import SegmentHandle
from procshare._backends.posix.segment import PosixSegment, peek_data

try:
    from procshare._backends.posix._robustmutex import (
        DATA_SIZE,
        STATE_MAGIC,
        STATE_OFFSET,
        Guard,
        attach,
        initialise,
        keep,
        reuse,
        reuse_setup,
        taken_here,
    )
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "procshare's C helper for locks (procshare._backends.posix._robustmutex) is not "
        "built: reinstall procshare with a C compiler available (`pip install -e .` in a "
        "checkout, or `pip install procshare`)"
    ) from exc

FUTEX_TID_MASK = 0x3FFFFFFF
FUTEX_OWNER_DIED = 0x40000000
# Set in the lock word by a thread about to sleep on it; cleared by the
# release that finds nobody left to wake (glibc's robust mutexes).
FUTEX_WAITERS = 0x80000000

# lock word (the mutex's first int) and glibc's owner field, then our state
# words (see _robustmutex.c)
_WORD = struct.Struct("@IIi")  # __lock, __count, __owner
# glibc's __owner value of a mutex unlocked after EOWNERDEAD without
# pthread_mutex_consistent() (by code that is not procshare): poisoned.
_NOTRECOVERABLE = 0x7FFFFFFE
_STATE = struct.Struct("@IIiiiI")


def lock_needs_keeping(data: Any, offset: int) -> bool:
    """Whether the lock memory at ``offset`` of ``data`` records a death nobody
    has confirmed yet.

    True when a holder died holding it (the kernel marked the word
    ``FUTEX_OWNER_DIED``, or left a dead thread's id in it), when it was
    released unconfirmed, or when foreign code poisoned it. Such an object is
    kept even with no living holder, so the next process to open it is told.
    """
    word, _count, owner = _WORD.unpack_from(data, offset)
    magic, unconfirmed, *_ = _STATE.unpack_from(data, offset + STATE_OFFSET)
    if magic != STATE_MAGIC:
        return False
    if owner == _NOTRECOVERABLE:
        return True  # keep reporting it until someone removes it (`procshare rm --lock`)
    return bool(word & (FUTEX_OWNER_DIED | FUTEX_TID_MASK)) or bool(unconfirmed)


class PosixLocks:
    """The lock half of the POSIX backend."""

    lock_data_size = DATA_SIZE
    lock_guard: type = Guard
    #: The by-name reuse check and keep, in C (see ``_robustmutex.c``, and
    #: ``procshare._engine.locks.reuse_in_python`` / ``keep_in_python``, the
    #: references).
    lock_reuse = staticmethod(reuse)
    lock_keep_for_reuse = staticmethod(keep)
    lock_reuse_setup = staticmethod(reuse_setup)
    #: Whether a thread of this process took any lock since it began or was
    #: forked (a forked child's exit skips looking at its locks when not).
    lock_taken_here = staticmethod(taken_here)

    #: ``lock_init(data)`` and ``lock_attach(handle)`` (``Mutex(handle.data)``):
    #: one C call each, no Python frame (a lock is often first created or
    #: opened in a freshly forked child, where each one copies pages).
    lock_init = staticmethod(initialise)
    lock_attach: Callable[[SegmentHandle], LockHandle] = staticmethod(attach)

    def lock_owner(self, os_name: str) -> int | None:
        # pread, not an open of the object: no hold is taken, no orphan
        # reclaimed, and junk under the name is simply nobody's.
        data = peek_data(os_name, DATA_SIZE)
        if data is None or len(data) < DATA_SIZE:
            return None
        state_magic, _unconfirmed, owner_pid, *_ = _STATE.unpack_from(data, STATE_OFFSET)
        return (owner_pid or None) if state_magic == STATE_MAGIC else None

    def lock_contended(self, mutex: LockHandle) -> bool:
        return bool(mutex.state()[0] & FUTEX_WAITERS)

    def lock_keep(self, handle: SegmentHandle) -> bool:
        assert isinstance(handle, PosixSegment)
        # Straight from the mapping: no memoryview built just to read two words.
        return lock_needs_keeping(handle.mm, handle.data_offset)
