"""Front end for locks: ``ps.interprocess_lock()``.

Argument checking, the ``with`` / decorator / ``acquire`` protocols and the
owner-died policy live here. The engine keeps the open lock objects
(:mod:`procshare._engine.locks`); the hot path, one ``acquire`` and one
``release`` on the engine's lock handle, is the only place this module calls
through to a handle directly, because every extra Python call is a sizeable
part of an uncontended lock's cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

from procshare import _runtime
from procshare._engine import anonymous as _anonymous
from procshare._engine import children as _children
from procshare._engine import get_engine, userwarn
from procshare._engine import locks as _engine_locks
from procshare._engine import segments as _segments
from procshare._engine.locks import (
    BUSY,
    NOT_OWNER,
    NOT_RECOVERABLE,
    OK,
    OWNER_DIED,
    SELF_HELD,
    TIMEDOUT,
    UNCONFIRMED,
    LockEntry,
    LockGuard,
)
from procshare._engine.names import _valid, use_namespace, validate_name
from procshare._shared import _refuse_anonymous_as_name
from procshare.errors import AnonymousError, LockTimeout, OwnerDied, ProcshareError, UsageError

P = ParamSpec("P")
R = TypeVar("R")

OnOwnerDeath = Callable[["InterprocessLock"], object] | Literal["warn"] | None


# Names already validated (a by-name lock in a hot loop validates once).
_valid_names: set[str] = set()

# The by-name reuse of lock objects (see interprocess_lock, and the engine's
# by_name in _engine/locks.py).
_reuse = _engine_locks.reuse
_keep = _engine_locks.keep
_new_lock = _engine_locks.new_lock
#: The default ``mode=``: compared by identity, so an explicit ``mode=0o600``
#: (an equal int, not this object) takes the checked path.
_MODE = 0o600


class _LockClosedError(ProcshareError, ValueError):
    """A lock object was used after ``close()``."""


class _Closed:
    """Stands in for the lock handle after ``close()``.

    Taking the lock again says the object is closed. What a thread of this
    process still holds (or was waiting for when another thread closed the
    object) can still be released and confirmed: closing must never strand a
    held lock. The engine keeps the memory mapped until then.
    """

    __slots__ = ("entry", "name")

    def __init__(self, name: str, entry: LockEntry | None = None) -> None:
        self.name = name
        self.entry = entry

    def _fail(self) -> Any:
        if self.name.startswith(_anonymous.LABEL[:-1]):
            raise _LockClosedError(
                f"lock {self.name!r} was used after close(); an anonymous lock cannot be "
                "opened again: keep it open while the processes that share it use it"
            )
        raise _LockClosedError(
            f"lock {self.name!r} was used after close(); open it again with "
            f"ps.interprocess_lock({self.name!r})"
        )

    def _held(self) -> LockEntry | None:
        entry = self.entry
        if entry is None or entry.closed or not entry.mutex.owned():
            return None
        return entry

    def acquire(self, reentrant: bool, timeout: float, /) -> int:
        return self._fail()  # type: ignore[no-any-return]

    def release(self) -> int:
        entry = self._held()
        if entry is None:
            return self._fail()  # type: ignore[no-any-return]
        rc = entry.mutex.release()
        if not entry.mutex.in_use():
            entry.part.close_if_unused(entry)
        return rc

    def mark_consistent(self) -> int:
        entry = self._held()
        if entry is None:
            return self._fail()  # type: ignore[no-any-return]
        return entry.mutex.mark_consistent()

    def owned(self) -> bool:
        return self._held() is not None

    def locked(self) -> bool:
        return self._fail()  # type: ignore[no-any-return]


def _check_timeout(timeout: object, what: str = "timeout") -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"{what} must be a number of seconds or None, not {type(timeout).__name__}"
        )
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(
            f"{what} must be >= 0 seconds (0 tries once) or None to wait forever, got {timeout!r}"
        )
    return float(timeout)


def _check_anonymous_mode(family: str, mode: object) -> None:
    """Refuse ``mode=`` for an anonymous lock or sync object: nobody opens it by name."""
    if mode != 0o600:
        raise TypeError(
            f"ps.interprocess_{family}(mode={mode!r}): an anonymous {family} has no name "
            "for other users to open it by, so it has no permission bits; name it to set them"
        )


class _Guarding(Protocol):
    def __enter__(self) -> object: ...
    def __exit__(self, *exc_info: Any) -> object: ...


class Decorates:
    """``@obj`` for every object used as ``with obj:`` (a lock, a semaphore, a
    side of an rwlock, here and on the cluster), written once."""

    __slots__ = ()

    def __call__(self: _Guarding, func: Callable[P, R]) -> Callable[P, R]:
        """Use it as a decorator: every call of ``func`` runs inside ``with`` it
        (holding the lock, a unit of the semaphore, the rwlock's side)."""

        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return func(*args, **kwargs)

        return guarded


class LockMethods(Decorates):
    """The read-only face of a lock wherever it runs (:class:`InterprocessLock`
    here, the cluster's ``ClusterLock``): properties, their documentation and
    the decorator, written once. A subclass sets ``_name``, ``_timeout`` and
    ``_reentrant`` and says whether it was closed (``_is_closed``)."""

    __slots__ = ()
    _name: str
    _timeout: float | None
    _reentrant: bool

    @property
    def name(self) -> str:
        """The lock's name."""
        return self._name

    @property
    def anonymous(self) -> bool:
        """Whether the lock has no name (``ps.interprocess_lock()``): shared only
        with the children forked while it is open. Its :attr:`name` is then a
        label such as ``"(anonymous #1)"``, which nothing can open."""
        return self._name.startswith(_anonymous.LABEL[:-1])

    @property
    def timeout(self) -> float | None:
        """Seconds ``with`` and :meth:`acquire` wait by default (``None``: forever)."""
        return self._timeout

    @property
    def reentrant(self) -> bool:
        """Whether the holding thread may acquire it again (and must release as often)."""
        return self._reentrant

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._is_closed()

    def _is_closed(self) -> bool:
        raise NotImplementedError


class InterprocessLock(LockGuard, LockMethods):
    """A named, robust lock shared between processes and between threads.

    Get one with :func:`interprocess_lock`. Use it as ``with lock:``, as a
    decorator (``@lock``), or with :meth:`acquire` / :meth:`release`.

    Ownership is per thread: the thread that acquired it must release it.
    A process forked while one of its threads holds the lock does not hold it
    in the child; the child blocks on it like any other process.

    If a holder dies while holding the lock (killed by any signal, or exiting
    without releasing it), the next acquirer gets the lock at once and is
    told with :class:`~procshare.OwnerDied` (see the Robustness page of the docs).

    The object is a *user* of the lock until :meth:`close`, garbage
    collection or process exit; when the last user of the last process is
    gone, the lock's object is removed.
    """

    # `with` itself (__enter__, __exit__) and the `_m` and `_reentrant` fields
    # come from the engine's LockGuard, in C: nothing can interrupt between
    # taking the mutex and the block starting (see PyLockGuard).
    __slots__ = (
        "__weakref__",
        "_entry",
        "_name",
        "_on_owner_death",
        "_timeout",
    )

    def __init__(
        self,
        name: str | None = None,
        *,
        timeout: float | None = None,
        reentrant: bool = False,
        on_owner_death: OnOwnerDeath = None,
        mode: int = 0o600,
    ) -> None:
        anonymous = name is None
        if name is None:
            name = _anonymous.LABEL  # until the engine numbers it
            _check_anonymous_mode("lock", mode)
        elif not _valid(name) and name not in _valid_names:
            # (_valid: a plain str of the allowed characters, checked in C,
            # which the anonymous label never is. The rest says what is wrong.)
            _refuse_anonymous_as_name(name, "ps.interprocess_lock('NAME')")
            validate_name(name, "lock name")
            if len(_valid_names) < 4096:
                _valid_names.add(name)
        self._name = name
        # (Each check is written to touch as little as possible when the
        # argument is the default: a lock is often first opened in a freshly
        # forked child, where every object touched is a copied page.)
        self._timeout = None if timeout is None else _check_timeout(timeout)
        if reentrant is not False and reentrant is not True:
            raise TypeError(f"reentrant must be True or False, not {reentrant!r}")
        self._reentrant = reentrant
        if not (on_owner_death is None or on_owner_death == "warn" or callable(on_owner_death)):
            raise ValueError(
                "on_owner_death must be None (raise OwnerDied), 'warn', or a function "
                f"repair(lock) that repairs the protected data; got {on_owner_death!r}"
            )
        self._on_owner_death = on_owner_death
        if type(mode) is not int or mode != 0o600:
            _segments.check_mode(mode)  # as ps.shared() checks it
        self._entry: LockEntry | None = None
        self._m = None
        engine = get_engine()
        try:
            if anonymous:
                entry = _anonymous.open_lock(id(self))
                self._name = entry.name  # "(anonymous #3)": for messages and repr
            else:
                # (LocksPart.open, in C: _engine/_cengine.c)
                entry = _engine_locks.open_lock(engine, name, id(self), mode)
        except BaseException:
            self._m = _Closed(name)  # a failed open leaves the object unusable
            raise
        self._entry = entry
        self._m = entry.mutex
        # After registering as a user, so housekeeping never closes our own entry.
        if engine.pending or engine.kept:  # (poll()'s own test, without the call)
            engine.poll()

    # -- the rest (`with` is LockGuard's, in C) ----------------------------------

    def _is_closed(self) -> bool:
        return self._entry is None

    def _enter_slow(self, rc: int) -> InterprocessLock:
        """``with``'s path for every outcome but an uncontended OK (LockGuard calls it)."""
        if rc not in (BUSY, OWNER_DIED, UNCONFIRMED):
            # Nothing was taken (SELF_HELD: this thread holds it already, maybe
            # in an enclosing block): refuse before the try below, which
            # releases what *this* call took.
            self._fail(rc)
        try:
            if rc == BUSY and self._timeout != 0:
                rc = _engine_locks.wait_acquire(self._m, self._reentrant, self._timeout)
            if rc == OK:
                return self
            if rc in (OWNER_DIED, UNCONFIRMED):
                self._owner_died_in_with()
                return self
        except BaseException:
            # The block will not run, so no __exit__ will release what this
            # call took (an interrupt that landed once the wait had the lock, a
            # warnings filter turning on_owner_death="warn" into an error).
            # Only BUSY, OWNER_DIED and UNCONFIRMED get here, and with them
            # this thread did not hold the lock before (a nested reentrant
            # acquire succeeds in LockGuard): holding it now means this call
            # took it. Release it, unconfirmed if a holder died.
            if self._m.owned():
                self._m.release()
            raise
        self._fail(rc)
        raise AssertionError("unreachable")

    def _owner_died(self, *, held: bool) -> OwnerDied:
        dead = self._dead_pid()
        # A holder that was a thread of a process still running (this one, or
        # another) ended without releasing; a process that died is another story.
        thread = dead is not None and _children.still_running(dead)
        return OwnerDied(self._name, owner_pid=dead, held=held, thread_ended=thread)

    def _owner_died_in_with(self) -> None:
        policy = self._on_owner_death
        if policy is None:
            # A block that never ran has no exit to release the lock: release
            # it here, unconfirmed, so the next acquirer is told too.
            told = self._owner_died(held=False)
            self._m.release()
            raise told
        if policy == "warn":
            who = self._owner_died(held=False)._who()
            userwarn.warn(
                f"lock {self._name!r}: {who} while holding it, so the data it protects "
                "may be half-updated; on_owner_death='warn' marked it consistent and went on"
            )
        else:
            assert callable(policy)
            try:
                policy(self)
            except BaseException:
                self._m.release()  # unconfirmed: the repair did not finish
                raise
        self._m.mark_consistent()

    def _dead_pid(self) -> int | None:
        entry = self._entry
        return None if entry is None else entry.dead_pid()

    def _fail(self, rc: int) -> None:
        if rc in (BUSY, TIMEDOUT):
            raise LockTimeout(self._name, timeout=self._timeout)
        if rc == SELF_HELD and self._reentrant:
            # Only a second handle on the same lock can say so: one this
            # process inherited across a fork and one it opened itself (the
            # engine shares one per name otherwise), which count holds apart.
            raise UsageError(
                f"lock {self._name!r} is already held by this thread through another lock "
                "object of that name, inherited across a fork; holds taken through an "
                "inherited object and through one opened in this process are counted apart, "
                "so they cannot nest. Nest through one object: the inherited one, or one "
                "opened by name in this process"
            )
        if rc == SELF_HELD:
            raise UsageError(
                f"lock {self._name!r} is already held by this thread; taking a non-reentrant "
                "lock again would deadlock. Release it first, or open it with "
                f"ps.interprocess_lock({self._name!r}, reentrant=True) to nest"
            )
        if rc == NOT_RECOVERABLE:
            raise UsageError(
                f"lock {self._name!r} was made unrecoverable by code outside procshare "
                "(a pthread unlock without pthread_mutex_consistent after a holder died); "
                f"remove it with `python -m procshare rm --lock {self._name}` and repair "
                "the data it protects"
            )
        raise UsageError(f"lock {self._name!r}: unexpected result code {rc}")

    def _not_owner(self, what: str) -> None:
        raise UsageError(
            f"cannot {what} lock {self._name!r}: the calling thread does not hold it "
            "(a lock is owned by the thread that acquired it; a forked child does not "
            "own what its parent held)"
        )

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock; return whether it was taken.

        ``timeout``: seconds to wait; ``0`` tries once; ``None`` uses the
        lock's own ``timeout=`` (and waits forever if that is ``None`` too).
        Returns ``False`` when the time runs out, and at once when the calling
        thread already holds this non-reentrant lock (as ``threading.Lock``
        does); only a wait without a timeout raises
        :class:`~procshare.UsageError` then, since it would never end.

        Raises :class:`~procshare.OwnerDied` *with the lock held* when a
        previous holder died holding it (or its death was never confirmed):
        repair the data it protects, call :meth:`mark_consistent`, then
        :meth:`release`.
        """
        wait = self._timeout if timeout is None else _check_timeout(timeout)
        m = self._m
        rc = m.acquire(self._reentrant, -1.0)
        if rc == BUSY and wait != 0:
            rc = _engine_locks.wait_acquire(m, self._reentrant, wait)
        if rc == OK:
            return True
        if rc in (BUSY, TIMEDOUT):
            return False
        if rc == SELF_HELD and wait is not None and not self._reentrant:
            # As threading.Lock: a try or a timed wait just fails. Only its
            # holder, this thread, could free it, so there is nothing to wait for.
            return False
        if rc in (OWNER_DIED, UNCONFIRMED):
            raise self._owner_died(held=True)
        self._fail(rc)
        raise AssertionError("unreachable")

    def release(self) -> None:
        """Release the lock (one level, for a reentrant lock held several times).

        Raises ``RuntimeError`` if the calling thread does not hold it. After
        :class:`~procshare.OwnerDied`, releasing without :meth:`mark_consistent`
        leaves the lock *unconfirmed*: the next acquirer is told again.
        """
        if self._m.release() == NOT_OWNER:
            self._not_owner("release")

    def mark_consistent(self) -> None:
        """Confirm that the data this lock protects is consistent again.

        Call it while holding the lock, after :class:`~procshare.OwnerDied`
        and your repair. Until someone does, every acquirer is told the
        holder died. Raises ``RuntimeError`` if the calling thread does not
        hold the lock.
        """
        if self._m.mark_consistent() == NOT_OWNER:
            self._not_owner("mark_consistent() on")

    def locked(self) -> bool:
        """Whether anybody (any process, any thread) holds the lock right now."""
        return bool(self._m.locked())

    def owned(self) -> bool:
        """Whether the calling thread holds the lock."""
        return bool(self._m.owned())

    def close(self) -> None:
        """Stop using the lock. The last user of the last process removes its object.

        A lock this thread still holds can be released after ``close()``
        (nothing else can be done with the object); its memory stays mapped
        until then. Safe to call twice. In a forked child, closing an inherited lock object
        only makes it unusable there; the parent keeps its lock.
        """
        entry = self._entry
        if entry is None:
            return
        self._entry = None
        self._m = _Closed(self._name, entry)
        part = entry.part
        if part.engine.pid == get_engine().pid:
            part.forget_by_name(self)
            part.drop_user(entry, id(self), close=True)

    def __del__(self) -> None:
        entry = getattr(self, "_entry", None)
        if entry is not None:
            entry.users.discard(id(self))
            if not entry.users:
                entry.closed_at = entry.part.engine.forks  # (see LocksPart.drop_user)
                entry.part.note_idle()

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling sends the name, not the memory: the receiving process opens
        # the same lock (same namespace) itself.
        entry = self._entry
        if self.anonymous:
            raise AnonymousError(
                "an anonymous lock",
                "pickled",
                named="ps.interprocess_lock('NAME'), opened by that name in the other process",
            )
        if entry is None:
            raise _LockClosedError(f"lock {self._name!r} was closed; a closed lock cannot be sent")
        options = (self._timeout, self._reentrant, self._on_owner_death)
        return (_reopen, (entry.namespace, self._name, *options))

    def __repr__(self) -> str:
        if self._entry is None:
            return f"<InterprocessLock {self._name!r} closed>"
        return f"<InterprocessLock {self._name!r} {'locked' if self._m.locked() else 'unlocked'}>"


def _reopen(
    namespace: str,
    name: str,
    timeout: float | None,
    reentrant: bool,
    on_owner_death: OnOwnerDeath,
) -> InterprocessLock:
    with use_namespace(namespace):
        return InterprocessLock(
            name, timeout=timeout, reentrant=reentrant, on_owner_death=on_owner_death
        )


_engine_locks.new_lock_setup(InterprocessLock)


def interprocess_lock(
    name: str | None = None,
    *,
    timeout: float | None = None,
    reentrant: bool = False,
    on_owner_death: OnOwnerDeath = None,
    mode: int = _MODE,
) -> InterprocessLock:
    """Open the named robust lock ``name``, creating it if needed; without a
    name, create an anonymous one.

    Args:
        name: 1 to 128 characters of ``A-Z a-z 0-9 . _ -``; the lock lives in
            the current namespace (``ps.namespace()`` / ``PROCSHARE_NAMESPACE``).
            Leave it out for an anonymous lock: as robust, shared with every
            child forked while it is open and with nobody else, freed by the
            kernel with its last holder; it cannot be pickled or opened by name.
        timeout: seconds ``with`` and the decorator wait before raising
            :class:`~procshare.LockTimeout` (``None``: forever). Also the
            default of :meth:`InterprocessLock.acquire`.
        reentrant: let the holding thread acquire it again (it must release
            it as many times).
        on_owner_death: what ``with`` and the decorator do when a previous
            holder died holding the lock. ``None`` (default): release it
            unconfirmed and raise :class:`~procshare.OwnerDied`. A function
            ``repair(lock)``: call it with the lock held, then mark the lock
            consistent and run the block. ``"warn"``: warn, mark it
            consistent, and run the block.
        mode: permission bits of the lock's object if this call creates it.

    Opening the same name again in the same process reuses the open object,
    so ``with ps.interprocess_lock("m"):`` is cheap inside a loop: with the
    default options, the call returns the lock object the previous such
    call made if nobody refers to it any more (a dict lookup), and
    housekeeping stops that reuse at the next call into procshare that is
    not one (see "Lifetime" on the Robustness page of the docs).
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.lock(name, timeout=timeout, reentrant=reentrant, on_owner_death=on_owner_death)
    if timeout is None and reentrant is False and on_owner_death is None and mode is _MODE:
        # The by-name path: one C call when the object the previous such
        # call made can be handed out again.
        lock = _reuse(name)
        if lock is not None:
            return lock  # type: ignore[no-any-return]
        # InterprocessLock(name), built in C (the constructor is the reference).
        lock = _new_lock(name, _MODE)
        if lock is NotImplemented:
            lock = InterprocessLock(name)  # (an invalid name: it says what is wrong)
        _keep(name, lock)  # (in C: a fresh child opening once runs no more Python)
        return lock  # type: ignore[no-any-return]
    return InterprocessLock(
        name, timeout=timeout, reentrant=reentrant, on_owner_death=on_owner_death, mode=mode
    )
