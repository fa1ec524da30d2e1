"""Errors of locks and the coordination families (SPEC 4, 4b)."""

from __future__ import annotations

import queue as _queue
import threading as _threading
from typing import ClassVar

from procshare.errors._base import (
    _NamedError,
)

# --------------------------------------------------------------------------
# Locks (SPEC section 4)


class LockTimeout(_NamedError, TimeoutError):
    """The lock could not be taken within ``timeout`` seconds."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "timeout", "detail")

    def __init__(self, name: str = "", timeout: float | None = None, detail: str = "") -> None:
        self.timeout = timeout
        super().__init__(name, detail)

    def _message(self) -> str:
        return (
            f"could not take lock {self.name!r} within {self.timeout} s{self._tail()}; "
            "another holder keeps it (see `python -m procshare ls`), or raise the timeout"
        )


class OwnerDied(_NamedError):
    """The previous holder of a lock died while holding it.

    ``held`` says whether the caller holds the lock now (``acquire()``
    raises with the lock held; ``with`` raises after releasing it
    unconfirmed). ``owner_pid`` is the dead holder's pid when known.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "owner_pid", "held", "detail", "thread_ended")

    def __init__(
        self,
        name: str = "",
        owner_pid: int | None = None,
        held: bool = False,
        detail: str = "",
        thread_ended: bool = False,
    ) -> None:
        self.owner_pid = owner_pid
        self.held = held
        #: The holder was a thread that ended while its process lives on, not a
        #: process that died.
        self.thread_ended = thread_ended
        super().__init__(name, detail)

    def _who(self) -> str:
        if self.owner_pid is None:
            return "its previous holder died"
        if self.thread_ended:
            return (
                f"a thread of pid {self.owner_pid} ended (pid {self.owner_pid} itself is "
                "still running)"
            )
        return f"pid {self.owner_pid} died"

    def _message(self) -> str:
        who = self._who()
        if self.held:
            todo = (
                "you hold the lock now: repair the data it protects, call "
                "lock.mark_consistent(), then release()"
            )
        else:
            todo = (
                "the lock was released unconfirmed: take it with acquire(), repair the data, "
                "call lock.mark_consistent(); or pass on_owner_death=repair or 'warn'"
            )
        return (
            f"lock {self.name!r}: {who} while holding it, so the data it protects may "
            f"be half-updated{self._tail()}; {todo}"
        )


# --------------------------------------------------------------------------
# The coordination families (SPEC section 4b)


class HolderDied(OwnerDied):
    """A process died holding part of a semaphore or rwlock; what it held came back.

    ``what`` is ``"semaphore"`` or ``"rwlock"``. Raised, like
    :class:`OwnerDied` for locks, to the next acquirer that gets what came
    back: by ``acquire()`` with it held (``held=True``), by ``with`` after
    giving it back (``held=False``). Only that acquirer is told.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "owner_pid", "held", "what", "detail")

    def __init__(
        self,
        name: str = "",
        owner_pid: int | None = None,
        held: bool = False,
        what: str = "semaphore",
        detail: str = "",
    ) -> None:
        self.what = what
        super().__init__(name, owner_pid, held, detail)

    def _message(self) -> str:
        who = "a process" if self.owner_pid is None else f"pid {self.owner_pid}"
        part = "a unit of it" if self.what == "semaphore" else "it for writing"
        if self.held:
            todo = "you hold it now: check the data it protects, then release()"
        else:
            todo = "it was given back: take it again with acquire() to check the data"
        return (
            f"{self.what} {self.name!r}: {who} died holding {part}, so the data it "
            f"protects may be half-updated{self._tail()}; {todo}"
        )


class WaitTimeout(_NamedError, TimeoutError):
    """A ``with`` block on a semaphore or rwlock could not start within ``timeout`` seconds."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "what", "timeout", "detail")

    def __init__(
        self,
        name: str = "",
        what: str = "semaphore",
        timeout: float | None = None,
        detail: str = "",
    ) -> None:
        self.what = what
        self.timeout = timeout
        super().__init__(name, detail)

    def _message(self) -> str:
        return (
            f"could not take {self.what} {self.name!r} within {self.timeout} s{self._tail()}; "
            "its holders keep it (see `python -m procshare ls`), or raise the timeout"
        )


class BrokenBarrier(_NamedError, _threading.BrokenBarrierError):
    """The barrier is broken: a wait timed out, a party died, or ``reset()`` ran
    while this party waited. ``threading.BrokenBarrierError`` too."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "reason", "detail")

    def __init__(self, name: str = "", reason: str = "", detail: str = "") -> None:
        self.reason = reason
        super().__init__(name, detail)

    def _message(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (
            f"barrier {self.name!r} is broken{why}{self._tail()}; every party waiting was "
            "told; call reset() once all parties agree to start again"
        )


class QueueEmpty(_NamedError, _queue.Empty):
    """``get`` found no item (within ``timeout``). Also ``queue.Empty``."""

    def _message(self) -> str:
        return (
            f"queue {self.name!r} is empty{self._tail()}: no item was ready in time "
            "(get() waits for one; get_nowait() does not)"
        )


class QueueFull(_NamedError, _queue.Full):
    """``put`` found no room (within ``timeout``). Also ``queue.Full``."""

    def _message(self) -> str:
        return (
            f"queue {self.name!r} is full{self._tail()}: no room came free in time "
            "(put() waits for room; a larger maxsize= or capacity= makes more)"
        )
