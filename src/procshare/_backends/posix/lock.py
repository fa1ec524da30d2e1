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
from procshare._backends.posix import _shmstep
from procshare._backends.posix.segment import PosixSegment, close_lock, peek_data

try:
    from procshare._backends.posix._robustmutex import (
        DATA_SIZE,
        STATE_MAGIC,
        STATE_OFFSET,
        Guard,
        attach,
        holding,
        initialise,
        keep,
        needs_keeping,
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

# Set in the lock word by a thread about to sleep on it; cleared by the
# release that finds nobody left to wake (glibc's robust mutexes).
FUTEX_WAITERS = 0x80000000

# our state words after the mutex (see _lock_layout.h)
_STATE = struct.Struct("@IIiiiI")

#: ``lock_needs_keeping(data, offset)``: whether the lock memory at ``offset``
#: of ``data`` records a death nobody has confirmed yet: a holder died holding
#: it (the kernel marked the word ``FUTEX_OWNER_DIED``, or left a dead
#: thread's id in it), it was released unconfirmed, or foreign code poisoned
#: it. Such an object is kept even with no living holder, so the next process
#: to open it is told. C (``_lock_layout.h``), the one rule the close of a
#: lock object's last hold in ``_shmstep`` applies too.
lock_needs_keeping: Callable[[Any, int], bool] = needs_keeping


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
    #: Whether a thread of this process may hold a lock now; False proves that
    #: none does (the C end of a forked child asks this, see _forkfast.c).
    lock_holding = staticmethod(holding)
    #: ``lock_close(handle) -> removed``: ``segment_close(handle,
    #: keep=lock_keep)`` in one C call, the keep rule read by the last holder
    #: from the object itself (``_shmstep.close_lock``): a lock object is often
    #: closed at the end of a freshly forked child.
    lock_close: Callable[[SegmentHandle], bool] = staticmethod(close_lock)  # type: ignore[assignment]
    #: ``lock_create_fast(os_name, meta, mode) -> handle | None | NotImplemented``:
    #: ``segment_create(os_name, meta=meta, data_size=lock_data_size, mode=mode,
    #: persist=False, init=lock_init)`` in one C call (None: the name is taken;
    #: NotImplemented: not here, nothing done), for the engine's C open by name.
    lock_create_fast = staticmethod(_shmstep.create_lock)

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
