"""The condition variable shared between processes: a generation futex word,
wake-up tokens and the robust lock it is used with (glibc's process-shared
condvar is not robust: a waiter that dies consumes a signal). Built on the
families' handle in :mod:`procshare._sync`.

A waiter killed while it waits must not take a notify with it. The kernel
hands a ``FUTEX_WAKE`` to whichever sleepers are queued, and a process sent
``SIGKILL`` stays queued until it next runs, so a ``notify(1)`` right after
a kill could wake only the dying process (measured: 44 of 100 tries when the
victim was not reaped yet), and the live waiter slept on. So a wake-up is a
*token*, not the kernel's wake: ``notify(n)`` grants up to ``n`` tokens
(never more than there are waits without one), bumps the generation (the
futex word waiters sleep on) and wakes ``n`` sleepers; a waiter returns
``True`` only by taking a token after a notify that came since it began to
wait. A dying process runs no more code, so it takes none: a token that the
kernel's wake left untaken is taken by a live waiter within one liveness
slice (waiters sleep in slices of ``LIVENESS`` seconds, as the other
families' do).

Each waiting process records its waits in a slot (``(pid, start time)``,
counter A = its threads in ``wait()``; a slot is claimed under the object's
own mutex), so that a dead waiter's waits are taken off the count (a sweep,
at most once per slice per handle, when a wait begins) and ``repr`` and
``ls`` count only live waiters. The count is raised before the slot and
lowered after it, both with the condition's lock held, so a process killed
in between leaves the count too high (a spare token: a spurious wake-up at
most), never too low (a lost one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self, TypeVar, overload

from procshare import _runtime
from procshare._engine import sync as _sync
from procshare._engine.sync import A, SyncObject, w
from procshare._locks import (
    InterprocessLock,
    _check_anonymous_mode,
    _check_timeout,
    interprocess_lock,
)
from procshare._shared import _refuse_anonymous_as_name
from procshare._sync import _deadline, _Handle, _Holding, _no_init
from procshare.errors import AnonymousError, UsageError

R = TypeVar("R")

# words: 0 generation, one per notify (waiters sleep on it), 1 waits in
# progress (a dead waiter's until a sweep), 2 tokens granted and not taken.
# Slot counter A: this process's threads in wait().
_C_GEN, _C_WAITERS, _C_TOKENS = w(0), w(1), w(2)


class InterprocessCondition(_Handle):
    """A condition variable shared between processes (see
    :func:`interprocess_condition`)."""

    _family = "condition"

    def __init__(
        self,
        name: str | None = None,
        lock: InterprocessLock | str | None = None,
        *,
        mode: int = 0o600,
    ) -> None:
        if isinstance(name, InterprocessLock) and lock is None:
            name, lock = None, name  # ps.interprocess_condition(lock), as threading's
        if name is None:
            _check_anonymous_mode("condition", mode)
        else:
            _refuse_anonymous_as_name(name, "ps.interprocess_condition('NAME', ...)")
        #: The lock this condition opened itself (closed with it), if any.
        self._own_lock: InterprocessLock | None = None
        if lock is None:
            # Named: the lock named like the condition, so every process that
            # opens the condition by name gets the same lock. Anonymous: a new
            # anonymous lock, shared with the same children as the condition.
            lock = self._own_lock = interprocess_lock(name, mode=mode)
        elif isinstance(lock, str):
            lock = self._own_lock = interprocess_lock(lock, mode=mode)
        elif not isinstance(lock, InterprocessLock):
            raise TypeError(
                "lock must be a ps.interprocess_lock(), a lock name or None (the lock "
                f"named like the condition), not {type(lock).__name__}"
            )
        elif name is not None and lock.anonymous:
            raise AnonymousError(
                "an anonymous lock",
                f"the lock of the named condition {name!r}",
                named="ps.interprocess_lock('NAME'); or make the condition anonymous "
                "too: ps.interprocess_condition(lock=lock)",
                detail="other processes open the condition by its name, and could not "
                "reach the lock",
            )
        self._lock = lock
        self._holding = _Holding()
        self._last_sweep = 0.0
        try:
            self._open(name, "condition", _sync.CONDITION_SLOTS * _sync.SLOT_SIZE, _no_init, mode)
            self._slots = _sync.Slots(self._obj.words, _sync.TABLES, _sync.CONDITION_SLOTS)
        except BaseException:
            if self._own_lock is not None:
                self._own_lock.close()
            raise

    def close(self) -> None:
        """Stop using the condition (and the lock it opened itself, if it did)."""
        super().close()
        if self._own_lock is not None:
            self._own_lock.close()

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._lock,), {}

    @property
    def lock(self) -> InterprocessLock:
        """The robust lock the condition is used with."""
        return self._lock

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the condition's lock (see :meth:`InterprocessLock.acquire`)."""
        return self._lock.acquire(timeout)

    def release(self) -> None:
        """Release the condition's lock."""
        self._lock.release()

    def __enter__(self) -> Self:
        self._lock.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.__exit__(*exc_info)

    def _owned(self, what: str) -> None:
        if not self._lock.owned():
            raise UsageError(
                f"cannot {what} condition {self.name!r}: the calling thread does not hold "
                f"its lock {self._lock.name!r}; use `with cond:` around it"
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify (``timeout`` seconds at most), take
        the lock again; ``False`` if the time ran out.

        As with POSIX condition variables, a wait may also return without a
        notify meant for it: check the state you wait for (:meth:`wait_for`).
        """
        wait = _check_timeout(timeout)
        obj = self._live()
        words = obj.words
        self._owned("wait() on")
        i = self._enter(obj)
        gen = words.load(_C_GEN)
        deadline = _deadline(wait)
        depth = 0
        woken = False
        try:
            while self._lock.owned():  # a reentrant lock is released all the way
                self._lock.release()
                depth += 1
            while True:
                now = words.load(_C_GEN)
                if now != gen and _take(words):  # a notify since this wait began
                    woken = True
                    break
                if not _sync.wait_word(obj, _C_GEN, now, deadline):
                    break  # the time ran out
        finally:
            try:
                for _ in range(depth):
                    self._lock.acquire()
            finally:
                self._slots.add(i, A, -1)
                words.add(_C_WAITERS, -1)
                _cap_tokens(words)
        return woken

    def _enter(self, obj: SyncObject) -> int:
        """Count a wait of this thread (lock held); its slot's index."""
        words = obj.words
        if words.load(_C_WAITERS) and time.monotonic() - self._last_sweep > _sync.LIVENESS:
            self._sweep(obj)
        i = self._holding.find(obj, self._slots, False)
        if i < 0:  # this process's first wait: claim a slot, under the table's mutex
            obj.lock()
            try:
                i = self._holding.find(obj, self._slots, True)
            finally:
                obj.unlock()
        words.add(_C_WAITERS, 1)  # before the slot: see the module's docstring
        self._slots.add(i, A, 1)
        return i

    def _sweep(self, obj: SyncObject) -> None:
        """Take the waits of dead processes off the count (lock held)."""
        self._last_sweep = time.monotonic()
        obj.lock()
        try:
            gone = sum(waits for _pid, waits, _b in self._slots.sweep(obj.alive) if waits > 0)
        finally:
            obj.unlock()
        if gone:
            obj.words.add(_C_WAITERS, -gone)
            _cap_tokens(obj.words)

    def wait_for(self, predicate: Callable[[], R], timeout: float | None = None) -> R:
        """Wait until ``predicate()`` is true (``timeout`` seconds at most); return
        its last value."""
        wait = _check_timeout(timeout)
        deadline = _deadline(wait)
        result = predicate()
        while not result:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self.wait(left)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiters (of any process). The caller holds the lock."""
        words = self._live().words
        self._owned("notify() on")
        waiters = words.load(_C_WAITERS)
        if waiters:
            tokens = words.load(_C_TOKENS)
            grant = waiters - tokens if n < 0 else min(n, waiters - tokens)
            if grant > 0:
                words.add(_C_TOKENS, grant)
            words.add(_C_GEN, 1)
            words.wake(_C_GEN, n)

    def notify_all(self) -> None:
        """Wake every waiter. The caller holds the lock."""
        self.notify(-1)


def _take(words: Any) -> bool:
    """Take a wake-up token if one is left; whether this call took it."""
    while True:
        tokens = words.load(_C_TOKENS)
        if not tokens:
            return False
        if words.cas(_C_TOKENS, tokens, tokens - 1):
            return True


def _cap_tokens(words: Any) -> None:
    """Drop the tokens beyond the waits in progress (a waiter that left, or died,
    without taking one): they would wake later waiters spuriously."""
    while True:
        tokens, waiters = words.load(_C_TOKENS), words.load(_C_WAITERS)
        if tokens <= waiters or words.cas(_C_TOKENS, tokens, waiters):
            return


@overload
def interprocess_condition(
    name: str | None = None, lock: InterprocessLock | str | None = None, *, mode: int = 0o600
) -> InterprocessCondition: ...
@overload
def interprocess_condition(lock: InterprocessLock, /) -> InterprocessCondition: ...
def interprocess_condition(
    name: str | InterprocessLock | None = None,
    lock: InterprocessLock | str | None = None,
    *,
    mode: int = 0o600,
) -> InterprocessCondition:
    """Open the named condition variable ``name``, creating it if needed; without
    a name, create an anonymous one.

    ``lock``: the robust lock it is used with: a ``ps.interprocess_lock()``,
    a lock name, or ``None`` for the lock named like the condition (so
    ``ps.interprocess_lock(name)`` is its lock in every process). An
    anonymous condition (``ps.interprocess_condition()``, or
    ``ps.interprocess_condition(lock)``) takes any lock, and a new anonymous
    one when ``lock`` is ``None``; a named condition refuses an anonymous
    lock (:class:`~procshare.AnonymousError`): the other processes that open
    it by name could not reach that lock.
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.unsupported("condition")  # type: ignore[no-any-return]
    return InterprocessCondition(name, lock, mode=mode)  # type: ignore[arg-type]
