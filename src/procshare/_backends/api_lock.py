"""What the engine needs from a backend to provide robust named locks.

A lock lives in a small segment object (see :mod:`.api_segment`): the
backend initialises its memory at creation (``lock_init``, passed as the
segment's ``init``), wraps an open segment in a :class:`LockHandle`
(``lock_attach``), and says whether an object nobody holds must be kept
because a holder died and nobody has confirmed the repair (``lock_keep``,
passed as ``keep`` / ``keep_orphan``), so a later opener is still told.

The hot path (an uncontended ``acquire``/``release``) is one call each into
the handle; everything else (timeouts, slicing long waits, the owner-died
protocol) is the engine's and front end's work on top of these result codes.
"""

from __future__ import annotations

from typing import Any, Protocol, Self

from procshare._backends.api_segment import SegmentHandle

# Result codes of LockHandle.acquire / release / mark_consistent.
OK = 0  #: acquired (or one more nesting level), released, confirmed
BUSY = 1  #: a try (timeout < 0) found it held by someone else
TIMEDOUT = 2  #: a timed wait ran out
OWNER_DIED = 3  #: acquired; its holder died holding it just now; the lock is unconfirmed
UNCONFIRMED = 4  #: acquired; an earlier holder died and nobody confirmed the repair yet
SELF_HELD = 5  #: the calling thread already holds it and reentrant is false
NOT_OWNER = 6  #: release / mark_consistent by a thread that does not hold it
NOT_RECOVERABLE = 7  #: the mutex was poisoned (by code outside procshare)


class LockHandle(Protocol):
    """One process's handle on one lock's memory.

    Ownership is per thread (the kernel thread id, so a forked child never
    owns what its parent held). All methods are cheap and non-blocking except
    ``acquire`` with ``timeout >= 0``, which must release the GIL.
    """

    def acquire(self, reentrant: bool, timeout: float, /) -> int:
        """Take the lock. ``timeout < 0``: try once; else wait up to ``timeout`` seconds.

        Returns a result code. On ``OWNER_DIED`` and ``UNCONFIRMED`` the lock
        is held by the caller. A reentrant acquire by the holder nests.
        """
        ...

    def release(self) -> int:
        """Undo one acquire: ``OK``, or ``NOT_OWNER``. Unconfirmed stays unconfirmed."""
        ...

    def mark_consistent(self) -> int:
        """Clear the unconfirmed state (holder only): ``OK`` or ``NOT_OWNER``."""
        ...

    def owned(self) -> bool:
        """Whether the calling thread holds it."""
        ...

    def held_here(self) -> bool:
        """Whether any thread of this process holds it through this handle."""
        ...

    def in_use(self) -> bool:
        """Whether a thread of this process holds it or waits for it through this handle
        (its memory must then stay mapped: see ``detach``)."""
        ...

    def locked(self) -> bool:
        """Whether anybody (any process, any thread) holds it now."""
        ...

    def state(self) -> tuple[int, int, int, int, int, int, int]:
        """Raw shared state, for listings: (word, unconfirmed, owner_pid, owner_tid,
        dead_pid, deaths, magic)."""
        ...

    def detach(self) -> None:
        """Let go of the memory. Raises ``RuntimeError`` while ``in_use()``."""
        ...


class PyLockGuard:
    """The contract of ``LockBackend.lock_guard``, written in Python.

    The front end's lock object derives from the backend's guard class and
    sets ``_m`` (its :class:`LockHandle`, or a stand-in with the same
    ``acquire``/``release`` once the lock object is closed) and
    ``_reentrant``. ``with lock:`` then runs:

    * ``__enter__``: ``rc = _m.acquire(_reentrant, -1.0)``; ``OK`` returns
      the lock object, any other code returns ``self._enter_slow(rc)``;
    * ``__exit__``: ``rc = _m.release()``; any code but ``OK`` calls
      ``self._not_owner("release")``.

    A backend should implement both in C (or whatever its interpreter cannot
    interrupt): between a Python ``__enter__``'s acquire and its return a
    signal handler may raise (``KeyboardInterrupt``), and then no
    ``__exit__`` releases the lock; likewise before a Python ``__exit__``'s
    release. This class is that implementation without the guarantee, for
    reference and for the backend contract tests.
    """

    __slots__ = ("_m", "_reentrant")

    _m: Any
    _reentrant: bool

    def __enter__(self) -> Self:
        rc = self._m.acquire(self._reentrant, -1.0)
        if rc == OK:
            return self
        return self._enter_slow(rc)  # type: ignore[attr-defined,no-any-return]

    def __exit__(self, *exc_info: object) -> None:
        if self._m.release() != OK:
            self._not_owner("release")  # type: ignore[attr-defined]


class LockBackend(Protocol):
    """Robust mutex primitives living in segment memory."""

    #: bytes of segment data a lock needs
    lock_data_size: int

    #: Base class of the front end's lock object: ``with`` on it (see
    #: :class:`PyLockGuard` for the contract, and why it belongs in C).
    lock_guard: type

    def lock_init(self, data: memoryview) -> None:
        """Initialise a fresh lock in ``data`` (the ``init`` of ``segment_create``)."""
        ...

    def lock_attach(self, handle: SegmentHandle) -> LockHandle:
        """Wrap the memory of an open lock object."""
        ...

    def lock_keep(self, handle: SegmentHandle) -> bool:
        """Whether a lock object with no living holder must be kept (a holder died
        holding it, or it was released unconfirmed), so a later opener is told."""
        ...

    def lock_close(self, handle: SegmentHandle) -> bool:
        """Close an open lock object's handle as ``segment_close(handle,
        keep=lock_keep)`` does (the last holder removes it unless it must be
        kept); whether it was removed. A backend may do it in one step."""
        ...

    def lock_holding(self) -> bool:
        """Whether a thread of this process may hold a lock now. False is a
        promise that none does; True may err (a thread that died holding one)."""
        ...

    def lock_owner(self, os_name: str) -> int | None:
        """The pid recorded as holding the lock object ``os_name`` (the last
        holder's, if it died holding it); ``None`` if free, missing or not a
        lock. Read-only: takes no hold and never reclaims an orphan (listing
        must not change what it lists)."""
        ...

    def lock_contended(self, mutex: LockHandle) -> bool:
        """Whether another thread or process is waiting for the lock now.

        A hint for diagnostics, never for correctness: a waiter that just gave
        up may still count until the next release.
        """
        ...
