"""Front end for ``ps.interprocess_rwlock()``: shared readers, one writer, writers first.

Bookkeeping (guarded by the object's robust mutex): the number of read holds,
the writer's process token, the number of writers waiting, and a slot per
process recording its own read holds (``A``) and waiting writers (``B``). A
waiter that is not woken checks once per liveness slice whether a recorded
process died, and takes back what it held: its read holds, its place among
the waiting writers (so readers are not kept out for good), or the write
hold, which the next acquirer is told about (:class:`~procshare.HolderDied`):
the data may be half-written.

Writers are not starved: once a writer waits, new readers wait behind it
(a process that already holds a read hold may take another, so nesting
never deadlocks against a waiting writer).
"""

from __future__ import annotations

import time
from typing import Any, Self

from procshare import _runtime
from procshare._engine import sync as _sync
from procshare._engine.sync import A, B, HoldGuard, SyncObject, w
from procshare._locks import Decorates, _check_timeout
from procshare._sync import (
    READ_GIVE,
    READ_TAKE,
    SLOTS,
    WRITE_GIVE,
    WRITE_TAKE,
    _arm,
    _Described,
    _Handle,
    _Holding,
    _no_init,
    _slice,
)
from procshare.errors import HolderDied, UsageError, WaitTimeout

# words: 0 read holds, 1 writer pid, 2-3 writer start time, 4 writers waiting,
# 5 release sequence (waiters sleep on it), 6 waiters, 7 a dead writer not
# told yet, 8 its pid.
_READERS, _WPID, _WLO, _WHI, _WWAIT, _SEQ, _WAITERS, _DIED, _DEAD = (w(i) for i in range(9))


class InterprocessRWLock(_Described):
    """A reader-writer lock shared between processes (see
    :func:`interprocess_rwlock`).

    The handle holds its two sides, and the sides hold the object and its
    bookkeeping (:class:`_RWCore`), never the handle: a handle dropped
    without ``close()`` is released at once, as every other family's is,
    not when the cycle collector runs; a side kept on its own
    (``reader = ps.interprocess_rwlock("r").read``) keeps the object open.
    """

    __slots__ = ("__weakref__", "_core", "read", "write")
    _family = "rwlock"

    def __init__(
        self, name: str | None = None, *, timeout: float | None = None, mode: int = 0o600
    ) -> None:
        self._core = core = _RWCore(name, timeout, mode)
        #: ``with rw.read:`` - shared holds
        self.read = _Side(core, write=False)
        #: ``with rw.write:`` - the exclusive hold
        self.write = _Side(core, write=True)

    @property
    def _obj(self) -> SyncObject:  # type: ignore[override]  # (the core's, for _Described)
        return self._core._obj

    def close(self) -> None:
        """Stop using the rwlock. The last user of the last process removes it."""
        self.read._hw = self.write._hw = None
        self._core.close()

    @property
    def timeout(self) -> float | None:
        """Seconds ``with rw.read:`` / ``with rw.write:`` wait (``None``: forever)."""
        return self._core._timeout

    @property
    def readers(self) -> int:
        """Read holds now (all processes)."""
        return self._core._live().words.load(_READERS)

    @property
    def write_locked(self) -> bool:
        """Whether a process holds it for writing now."""
        return bool(self._core._live().words.load(_WPID))

    def __reduce__(self) -> tuple[Any, ...]:
        return self._core.__reduce__()

    def __repr__(self) -> str:
        return repr(self._core)


class _RWCore(_Handle):
    """The rwlock's object and bookkeeping, shared by its handle and both sides."""

    _family = "rwlock"

    def __init__(self, name: str | None, timeout: float | None, mode: int) -> None:
        self._timeout = _check_timeout(timeout)
        self._holding = _Holding()
        self._last_sweep = 0.0
        self._open(name, "rwlock", SLOTS * _sync.SLOT_SIZE, _no_init, mode)
        self._slots = _sync.Slots(self._obj.words, _sync.TABLES, SLOTS)

    def _reopen_type(self) -> type[Any]:
        return InterprocessRWLock  # what a receiver of the pickle opens

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {"timeout": self._timeout}

    def __repr__(self) -> str:
        obj = self._obj
        return f"<InterprocessRWLock {obj.name!r} {obj.state()}>"

    def _repair(self) -> None:
        words = self._obj.words
        words.store(_READERS, self._slots.total(A))
        words.store(_WWAIT, self._slots.total(B))

    def _sweep(self, obj: SyncObject) -> None:
        """Take back what dead processes held (mutex held)."""
        self._last_sweep = time.monotonic()
        words = obj.words
        changed = False
        for _pid, reads, writers in self._slots.sweep(obj.alive):
            if reads:
                words.add(_READERS, -reads)
            if writers:
                words.add(_WWAIT, -writers)
            changed = changed or bool(reads or writers)
        wpid = words.load(_WPID)
        if wpid:
            start = words.load(_WLO) | (words.load(_WHI) << 32)
            if not obj.alive((wpid, start)):
                words.store(_WPID, 0)
                words.store(_DIED, 1)
                words.store(_DEAD, wpid)
                changed = True
        if changed:
            words.add(_SEQ, 1)
            words.wake(_SEQ, -1)

    def _told(self, words: Any) -> HolderDied | None:
        if not words.load(_DIED):
            return None
        words.store(_DIED, 0)
        return HolderDied(self._obj.name, words.load(_DEAD) or None, held=True, what="rwlock")

    def _try(self, obj: SyncObject, write: bool, queued: bool) -> bool:
        """Take a hold if it can be had now (mutex held)."""
        words = obj.words
        if words.load(_WPID):
            return False
        if write:
            if words.load(_READERS):
                return False
            if queued:
                self._unqueue(obj)
            token = obj.token()
            words.store(_WLO, token[1] & 0xFFFFFFFF)
            words.store(_WHI, token[1] >> 32)
            words.store(_WPID, token[0])  # last: the hold is this process's
            return True
        i = self._holding.find(obj, self._slots, True)
        if words.load(_WWAIT) and not self._slots.get(i, A):
            return False  # a writer waits: new readers queue behind it
        self._slots.add(i, A, 1)
        words.add(_READERS, 1)
        return True

    def _unqueue(self, obj: SyncObject) -> None:
        i = self._holding.find(obj, self._slots, True)
        self._slots.add(i, B, -1)
        obj.words.add(_WWAIT, -1)

    def _acquire(self, write: bool, timeout: float | None) -> bool:
        obj = self._live()
        words = obj.words
        pid, start = self._me()
        holding = self._holding
        rc = words.hold(WRITE_TAKE if write else READ_TAKE, pid, start, holding.index, SLOTS)
        if rc != -1:
            if rc >= 0:
                holding.index, holding.pid = rc, pid
            return True
        wait = self._timeout if timeout is None else _check_timeout(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        queued = False
        while True:
            obj.lock()
            try:
                if self._try(obj, write, queued):
                    told = self._told(words)
                    if told is not None:
                        raise told
                    return True
                if time.monotonic() - self._last_sweep > _sync.LIVENESS:
                    self._sweep(obj)
                    if self._try(obj, write, queued):
                        told = self._told(words)
                        if told is not None:
                            raise told
                        return True
                if deadline is not None and time.monotonic() >= deadline:
                    if queued:
                        self._unqueue(obj)
                        words.add(_SEQ, 1)  # readers kept out for this writer may go
                        words.wake(_SEQ, -1)
                    return False
                if write and not queued:
                    i = self._holding.find(obj, self._slots, True)
                    self._slots.add(i, B, 1)
                    words.add(_WWAIT, 1)
                    queued = True
                seq = words.load(_SEQ)
                words.add(_WAITERS, 1)
            finally:
                obj.unlock()
            try:
                words.wait(_SEQ, seq, _slice(deadline))
            except BaseException:
                if queued:
                    obj.lock()
                    try:
                        self._unqueue(obj)
                        words.add(_SEQ, 1)
                        words.wake(_SEQ, -1)
                    finally:
                        obj.unlock()
                raise
            finally:
                words.add(_WAITERS, -1)

    def _release(self, write: bool) -> None:
        obj = self._live()
        words = obj.words
        pid, start = self._me()
        op = WRITE_GIVE if write else READ_GIVE
        if words.hold(op, pid, start, self._holding.index, SLOTS) != -1:
            return
        obj.lock()
        try:
            if write:
                if words.load(_WPID) != obj.token()[0]:
                    raise UsageError(
                        f"cannot release rwlock {obj.name!r} for writing: this process does "
                        "not hold it for writing"
                    )
                words.store(_WPID, 0)
                wake = True
            else:
                i = self._holding.find(obj, self._slots, False)
                if i < 0 or self._slots.get(i, A) <= 0:
                    raise UsageError(
                        f"cannot release rwlock {obj.name!r} for reading: this process "
                        "holds no read hold on it"
                    )
                self._slots.add(i, A, -1)
                wake = words.add(_READERS, -1) == 1
            if wake and words.load(_WAITERS):
                words.add(_SEQ, 1)
                words.wake(_SEQ, -1)
        finally:
            obj.unlock()


class _Side(HoldGuard, Decorates):
    """``rw.read`` or ``rw.write``: ``with``, decorator, ``acquire``/``release``.

    ``with`` is the backend's hold guard (C): one call when the hold can be
    had at once; anything else goes through :meth:`_enter_slow`.
    """

    __slots__ = ("_rw", "_write")

    def __init__(self, rw: _RWCore, *, write: bool) -> None:
        self._rw = rw
        self._write = write
        self._arm()

    def _arm(self) -> None:
        if write := self._write:
            _arm(self, self._rw._live(), WRITE_TAKE, WRITE_GIVE)
        else:
            _arm(self, self._rw._live(), READ_TAKE, READ_GIVE)
        del write

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the hold; whether it was taken within ``timeout`` seconds (``0``
        tries once; ``None``: the rwlock's ``timeout=``). Raises
        :class:`~procshare.HolderDied` with the hold taken when a writer died
        holding the lock since it was last taken."""
        return self._rw._acquire(self._write, timeout)

    def release(self) -> None:
        """Give the hold back (``RuntimeError`` if this process has none)."""
        self._rw._release(self._write)

    def _enter_slow(self) -> Self:
        """``with``'s path when the guard's single call could not take the hold."""
        rw = self._rw
        self._arm()
        try:
            taken = rw._acquire(self._write, None)
        except HolderDied as exc:
            rw._release(self._write)
            raise HolderDied(exc.name, exc.owner_pid, held=False, what="rwlock") from None
        if not taken:
            what = "rwlock (write)" if self._write else "rwlock (read)"
            raise WaitTimeout(rw.name, what, rw._timeout)
        return self

    def _exit_slow(self) -> None:
        self._rw._release(self._write)

    def __repr__(self) -> str:
        return f"<{'write' if self._write else 'read'} side of {self._rw!r}>"


def interprocess_rwlock(
    name: str | None = None, *, timeout: float | None = None, mode: int = 0o600
) -> InterprocessRWLock:
    """Open the named reader-writer lock ``name``, creating it if needed; without
    a name, create an anonymous one, shared with the children forked while it
    is open.

    ``with rw.read:`` takes a shared hold, ``with rw.write:`` the exclusive
    one; once a writer waits, new readers wait behind it. ``timeout``:
    seconds ``with`` waits before :class:`~procshare.WaitTimeout` (also the
    default of ``acquire``). What a dead process held comes back; a dead
    writer is told to the next acquirer (:class:`~procshare.HolderDied`).
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.unsupported("rwlock")  # type: ignore[no-any-return]
    return InterprocessRWLock(name, timeout=timeout, mode=mode)
