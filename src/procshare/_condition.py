"""The condition variable shared between processes: a sequence-counter futex
word plus the robust lock it is used with (glibc's process-shared condvar is
not robust: a waiter that dies consumes a signal). Built on the families'
handle in :mod:`procshare._sync`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self, TypeVar, overload

from procshare import _runtime
from procshare._engine.sync import w
from procshare._locks import (
    InterprocessLock,
    _check_anonymous_mode,
    _check_timeout,
    interprocess_lock,
)
from procshare._shared import _refuse_anonymous_as_name
from procshare._sync import _deadline, _Handle, _no_init
from procshare.errors import AnonymousError, UsageError

R = TypeVar("R")

_C_SEQ, _C_WAITERS = w(0), w(1)


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
        try:
            self._open(name, "condition", 0, _no_init, mode)
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
        words = self._live().words
        self._owned("wait() on")
        seq = words.load(_C_SEQ)
        words.add(_C_WAITERS, 1)
        depth = 0
        try:
            while self._lock.owned():  # a reentrant lock is released all the way
                self._lock.release()
                depth += 1
            woken = words.wait(_C_SEQ, seq, wait)
        finally:
            words.add(_C_WAITERS, -1)
            for _ in range(depth):
                self._lock.acquire()
        return woken

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
        if words.load(_C_WAITERS):
            words.add(_C_SEQ, 1)
            words.wake(_C_SEQ, n)

    def notify_all(self) -> None:
        """Wake every waiter. The caller holds the lock."""
        self.notify(-1)


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
