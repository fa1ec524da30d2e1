"""What the engine needs from a backend for the coordination families.

Semaphores, events, conditions, barriers, rwlocks and queues are written
once, in Python (``procshare._sync``, ``procshare._queue``), on three
backend primitives living in a sync object's data area (a segment object,
see :mod:`.api_segment`):

* :class:`Words`: 32-bit words with atomic operations and a kernel wait/wake
  on them (a futex on Linux). A wait sleeps only while the word still holds
  the value the caller saw, so no wake is lost between looking and sleeping;
  a waiter that dies simply stops waiting. Waiting blocks in the kernel, and
  a signal handler that raises (Ctrl-C) interrupts it at once.
* a robust mutex (the lock backend's :class:`~.api_lock.LockHandle`), which
  guards a family's bookkeeping: a process killed half-way through an update
  makes the next locker see ``OWNER_DIED`` and repair it.
* process tokens: ``(pid, start)`` pairs that tell a dead process (or a
  reused pid) from a living one, for the per-holder records that let units
  held by a dead process come back.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Self

from procshare._backends.api_lock import LockHandle


class Words(Protocol):
    """32-bit words at 4-byte aligned byte offsets of a shared buffer."""

    def load(self, offset: int, /) -> int: ...
    def store(self, offset: int, value: int, /) -> None: ...
    def cas(self, offset: int, expected: int, new: int, /) -> bool:
        """Store ``new`` if the word holds ``expected``; whether it did."""
        ...

    def add(self, offset: int, delta: int, /) -> int:
        """Add ``delta`` (wrapping at 32 bits); the value before."""
        ...

    def wait(self, offset: int, expected: int, timeout: float | None, /) -> bool:
        """Sleep while the word holds ``expected``, up to ``timeout`` seconds
        (``None``: forever), with the GIL released. ``True`` when woken or
        when the word did not hold ``expected`` (maybe spuriously: look
        again); ``False`` when the time ran out. A signal runs Python's
        handlers; one that raises ends the wait with its exception."""
        ...

    def wake(self, offset: int, n: int, /) -> int:
        """Wake up to ``n`` sleepers on the word (``n < 0``: all); how many woke."""
        ...

    # The queue's fast path: a put or get that need not wait, in one call. A
    # backend may always answer "go slow" (False / None): the front end's
    # Python path (procshare._queue) does the same work, and every unusual case.

    def ring_setup(self, desc: int, data: int, slots: int, cap: int, maxsize: int, /) -> None:
        """Describe the queue in these words (see ``procshare._queue``)."""
        ...

    def ring_put(self, parts: tuple[Any, ...], pid: int, start: int, /) -> bool:
        """Reserve, copy ``parts`` (buffers) in as one record, commit; ``False``:
        go slow (no room, a repair pending, ...)."""
        ...

    def ring_get(self, pid: int, start: int, /) -> tuple[int, int, int] | None:
        """Claim the oldest ready record: (descriptor, offset, length); ``None``:
        go slow. Free it with :meth:`ring_free` once read."""
        ...

    def ring_free(self, desc: int, /) -> None:
        """The record of ``desc`` was read: its space may be reused."""
        ...

    def ring_ready(self) -> int:
        """Ready records between the ring's head and tail now, counted from the
        descriptors without the mutex (a snapshot: ``qsize()``)."""
        ...

    def hold(self, op: int, pid: int, start: int, hint: int, nslots: int, /) -> int:
        """The uncontended path of a semaphore's or rwlock's acquire or release
        (``op``: see ``procshare._sync``), under the words' mutex, for process
        ``(pid, start)`` whose holder slot was last ``hint``. Returns the slot
        used (``>= 0``) or ``-2`` when done; ``-1`` when nothing was done and the
        front end's Python path must decide (a backend may always answer -1)."""
        ...

    def in_use(self) -> bool:
        """Whether a thread of this process waits on these words now."""
        ...

    def detach(self) -> None:
        """Let go of the memory (deferred until the last waiter of this process
        has returned). Later calls raise ``ValueError``."""
        ...


#: (pid, start): a process, told apart from a later process with the same pid.
ProcessToken = tuple[int, int]


class PyHoldGuard:
    """The contract of ``SyncBackend.sync_hold_guard``, written in Python.

    The front end's semaphore and rwlock sides derive from the backend's
    hold guard and set ``_hw`` (their :class:`Words`, or ``None`` once
    closed), ``_htake`` / ``_hgive`` (the :meth:`Words.hold` operations of
    ``__enter__`` / ``__exit__``), ``_hslots``, ``_hhint`` and their process
    token ``_hpid`` / ``_hstart``. ``with`` then runs ``hold`` once, and
    calls the front end's ``_enter_slow()`` / ``_exit_slow()`` when it
    answers "go slow" or when this process is not ``_hpid`` (a forked
    child). A backend should implement it in C, like the lock's guard (see
    :class:`~procshare._backends.api_lock.PyLockGuard` for why); this is
    that implementation without the guarantee, for reference.
    """

    __slots__ = ("_hgive", "_hhint", "_hpid", "_hslots", "_hstart", "_htake", "_hw")

    _hw: Words | None
    _htake: int
    _hgive: int
    _hslots: int
    _hhint: int
    _hpid: int
    _hstart: int

    def _fast(self, op: int) -> bool:
        w: Words | None = getattr(self, "_hw", None)
        if w is None or self._hpid != os.getpid():
            return False
        rc = w.hold(op, self._hpid, self._hstart, self._hhint, self._hslots)
        if rc >= 0:
            self._hhint = rc
        return rc != -1

    def __enter__(self) -> Self:
        if self._fast(self._htake):
            return self
        return self._enter_slow()  # type: ignore[attr-defined,no-any-return]

    def __exit__(self, *exc_info: object) -> None:
        if not self._fast(self._hgive):
            self._exit_slow()  # type: ignore[attr-defined]


class SyncBackend(Protocol):
    """Primitives the coordination families are built on."""

    #: bytes of a sync object's data a robust mutex takes (64-byte multiple)
    sync_mutex_size: int

    #: Base class of the semaphore and the rwlock's sides: ``with`` through
    #: :meth:`Words.hold` (see :class:`PyHoldGuard`).
    sync_hold_guard: type

    def sync_words(self, data: memoryview) -> Words:
        """Wrap ``data`` (4-byte aligned) as futex words."""
        ...

    def sync_mutex_init(self, data: memoryview) -> None:
        """Initialise a robust mutex in the first ``sync_mutex_size`` bytes of
        ``data`` (at creation, before the object is published)."""
        ...

    def sync_mutex(self, data: memoryview) -> LockHandle:
        """The robust mutex in the first ``sync_mutex_size`` bytes of ``data``."""
        ...

    def process_token(self) -> ProcessToken:
        """This process's token (recomputed after a fork)."""
        ...

    def process_alive(self, token: ProcessToken) -> bool:
        """Whether the process of ``token`` is still running. A zombie counts as
        dead; a pid reused by another process is not ``token``'s process."""
        ...

    def process_gone(self, token: ProcessToken) -> bool:
        """Whether no process has ``token``'s pid: a cheap test (one system
        call, no ``/proc``) whose ``True`` is certain and whose ``False`` says
        nothing (the process may be alive, a zombie, or another one reusing
        the pid). For a quick look where :meth:`process_alive` is too dear."""
        ...

    def sync_peek(self, os_name: str, size: int) -> bytes | None:
        """The first ``size`` bytes of the data of object ``os_name``, read
        without taking a hold (for listings); ``None`` if it is missing or
        not a procshare object."""
        ...
