"""Front end for the coordination families: semaphore and event here, and the base
that the condition, barrier, rwlock and queue modules build on.

Each is a sync object (:mod:`procshare._engine.sync`): a robust mutex
guarding a few words and a table of per-process holder records, with waits
on a futex word. Written once here, on the engine's primitives; the queue is
in :mod:`procshare._queue`. Every family is named (``name`` given) or
anonymous (``name`` left out): :class:`_Handle` is the one place that tells
them apart.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from typing import Any, Self, overload

from procshare import _runtime
from procshare._engine import sync as _sync
from procshare._engine.core import current_pid
from procshare._engine.names import use_namespace, validate_name
from procshare._engine.sync import A, HoldGuard, SyncObject, w
from procshare._locks import Decorates, _check_anonymous_mode, _check_timeout
from procshare._shared import _refuse_anonymous_as_name
from procshare.errors import AnonymousError, HolderDied, UsageError, WaitTimeout

_MASK = 0xFFFFFFFF
# Operations of the backend's uncontended fast path (Words.hold).
SEM_TAKE, SEM_GIVE, READ_TAKE, READ_GIVE, WRITE_TAKE, WRITE_GIVE = range(1, 7)
#: Holder slots of a semaphore / rwlock: processes holding it at once.
SLOTS = 128


def _check_mode(mode: object) -> int:
    if type(mode) is not int or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits such as 0o600, got {mode!r}")
    return mode


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _number_first(
    family: str, name: object, number: Any, default: Any, param: str
) -> tuple[str | None, Any]:
    """``(name, number)`` of a call whose first argument may be the number of an
    anonymous object (``ps.interprocess_semaphore(3)``, as ``threading.Semaphore(3)``)."""
    if isinstance(name, int) and not isinstance(name, bool):
        if number is not default:
            raise TypeError(
                f"ps.interprocess_{family}({name!r}, {number!r}): a name goes first; "
                f"ps.interprocess_{family}('NAME', {number!r}) for a named {family}, "
                f"ps.interprocess_{family}({param}={number!r}) for an anonymous one"
            )
        return None, name
    return name, number  # type: ignore[return-value]  # (checked by _Handle._open)


def _repairer(handle: weakref.ref[_Handle]) -> Callable[[], None]:
    """The object's repair hook, holding its handle weakly: a bound method
    would make a cycle (handle -> object -> hook -> handle), and a dropped
    handle would keep its object open until the cycle collector ran."""

    def repair() -> None:
        live = handle()
        if live is not None:
            live._repair()

    return repair


class _Described:
    """The read-only facts of a family's object (``self._obj``), for its handle."""

    __slots__ = ()
    _family = ""
    _obj: SyncObject

    @property
    def name(self) -> str:
        """The object's name; for an anonymous one a label such as
        ``"(anonymous #2)"``, for messages only (nothing can open it)."""
        return self._obj.name

    @property
    def anonymous(self) -> bool:
        """Whether it has no name: shared only with the children forked while it
        is open, and freed by the kernel with the last process that has it."""
        return self._obj.anonymous

    @property
    def _ps_anonymous_what(self) -> str | None:
        """What an anonymous object is called when it is misused as a name."""
        return f"an anonymous {self._family}" if self._obj.anonymous else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._obj.closed


class _Handle(_Described):
    """What every family's object shares: name, close, pickling, repr; named or
    anonymous (``name=None``)."""

    def _open(self, name: str | None, layout: str, size: int, init: Any, mode: int) -> None:
        family = self._family
        if name is None:
            _check_anonymous_mode(family, mode)
        else:
            _refuse_anonymous_as_name(name, f"ps.interprocess_{family}('NAME', ...)")
            validate_name(name, f"{family} name")
            _check_mode(mode)
        self._obj = _sync.open_sync(family, name, layout=layout, size=size, init=init, mode=mode)
        self._obj.repair = _repairer(weakref.ref(self))

    def _repair(self) -> None:
        """Make the bookkeeping add up again after a process died changing it."""

    _token_pid = -1
    _token: tuple[int, int] = (0, 0)

    def _me(self) -> tuple[int, int]:
        """This process's token (cached per process)."""
        if self._token_pid != current_pid():
            self._token = self._obj.token()
            self._token_pid = current_pid()
        return self._token

    def close(self) -> None:
        """Stop using the object. The last user of the last process removes it."""
        self._obj.close()

    def _live(self) -> SyncObject:
        obj = self._obj
        if obj.closed:
            if obj.anonymous:
                raise UsageError(
                    f"{self._family} {obj.name!r} was used after close(); an anonymous "
                    f"{self._family} cannot be opened again: keep it open while the "
                    "processes that share it use it"
                )
            raise UsageError(
                f"{self._family} {obj.name!r} was used after close(); open it again by name"
            )
        return obj

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}

    def _reopen_type(self) -> type[Any]:
        return type(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling sends the name and parameters: the receiver opens it itself.
        # An anonymous object has nothing to send: its memory reaches only the
        # children forked while it is open.
        if self._obj.anonymous:
            raise AnonymousError(
                f"an anonymous {self._family}",
                "pickled",
                named=f"ps.interprocess_{self._family}('NAME', ...), opened by that name "
                "in the other process",
            )
        obj = self._live()
        return (_reopen, (self._reopen_type(), obj.namespace, obj.name, *self._args()))

    def __del__(self) -> None:
        obj = getattr(self, "_obj", None)
        if obj is not None and not obj.closed:
            with contextlib.suppress(Exception):  # a finalizer must not raise
                obj.close()

    def __repr__(self) -> str:
        obj = self._obj
        return f"<Interprocess{self._family.capitalize()} {obj.name!r} {obj.state()}>"


def _reopen(
    cls: type[Any], namespace: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    with use_namespace(namespace):
        return cls(name, *args, **kwargs)


# -- event ---------------------------------------------------------------------

# words: 0 flag (generation << 1 | set), 1 waiters
_E_FLAG, _E_WAITERS = w(0), w(1)


class InterprocessEvent(_Handle):
    """An event (as :class:`threading.Event`), shared between processes (see
    :func:`interprocess_event`).

    One futex word, woken all at once: nothing a dead process did can leave
    it inconsistent, and a waiter that dies just stops waiting.
    """

    _family = "event"

    def __init__(self, name: str | None = None, *, mode: int = 0o600) -> None:
        self._open(name, "event", 0, _no_init, mode)

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return bool(self._live().words.load(_E_FLAG) & 1)

    def set(self) -> None:
        """Set the flag and wake every waiter (of every process)."""
        words = self._live().words
        while True:
            v = words.load(_E_FLAG)
            if v & 1:
                return
            # A new generation: a waiter wakes on any change of the word.
            if words.cas(_E_FLAG, v, (v + 3) & _MASK):
                break
        if words.load(_E_WAITERS):
            words.wake(_E_FLAG, -1)

    def clear(self) -> None:
        """Clear the flag."""
        words = self._live().words
        while True:
            v = words.load(_E_FLAG)
            if not v & 1 or words.cas(_E_FLAG, v, v & ~1):
                return

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set (``timeout`` seconds at most); return it.

        Like :meth:`threading.Event.wait`, returns ``True`` when a ``set()``
        woke it even if the flag was cleared again since.
        """
        wait = _check_timeout(timeout)
        obj = self._live()
        words = obj.words
        v = words.load(_E_FLAG)
        if v & 1:
            return True
        if wait == 0:
            return False
        deadline = _deadline(wait)
        words.add(_E_WAITERS, 1)
        try:
            while words.load(_E_FLAG) == v:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                words.wait(_E_FLAG, v, left)
            return True
        finally:
            words.add(_E_WAITERS, -1)


def _no_init(data: memoryview, words: Any) -> None:
    pass


# -- semaphore -------------------------------------------------------------------

# words: 0 count, 1 release sequence, 2 waiters, 3 initial value, 4 releases by
# non-holders, 5 units come back from dead holders not told yet, 6 the last
# dead holder's pid. Slot counter A: units this process holds.
_S_COUNT, _S_SEQ, _S_WAITERS, _S_VALUE, _S_EXTRA, _S_DIED, _S_DEAD = (w(i) for i in range(7))


class _Holding:
    """A process's slot in a holder table, found again cheaply by a cached index."""

    __slots__ = ("index", "pid")

    def __init__(self) -> None:
        self.index = -1
        self.pid = 0

    def find(self, obj: SyncObject, slots: _sync.Slots, create: bool) -> int:
        token = obj.token()
        i = self.index
        if (
            self.pid == token[0]
            and i >= 0
            and slots.pid(i) == token[0]
            and slots.start(i) == token[1]
        ):
            return i
        i = slots.claim(token) if create else slots.find(token)
        if i < 0 and create:
            slots.sweep(obj.alive)  # (the caller's repair counts what comes back)
            i = slots.claim(token)
            if i < 0:
                if obj.family == "condition":
                    doing, why = "wait on it", "a dead one's waits are not counted"
                else:
                    doing, why = "hold it", "what a dead one held comes back"
                raise UsageError(
                    f"{obj.family} {obj.name!r}: more than {slots.count} processes {doing} "
                    f"at once; procshare records each of them so that {why}, and has no "
                    "room for another"
                )
        self.index, self.pid = i, token[0]
        return i


class InterprocessSemaphore(HoldGuard, _Handle, Decorates):
    """A counting semaphore shared between processes (see
    :func:`interprocess_semaphore`).

    ``with sem:`` is the backend's hold guard (C): one call takes a unit
    when one is free; anything else goes through :meth:`_enter_slow`.
    """

    _family = "semaphore"

    def __init__(
        self,
        name: str | None = None,
        value: int = 1,
        *,
        timeout: float | None = None,
        mode: int = 0o600,
    ) -> None:
        name, value = _number_first("semaphore", name, value, 1, "value")
        if type(value) is not int or value < 0:
            raise ValueError(f"a semaphore's value must be an int >= 0, got {value!r}")
        self._value = value
        self._timeout = _check_timeout(timeout)
        self._holding = _Holding()
        self._last_sweep = 0.0

        def init(data: memoryview, words: Any) -> None:
            words.store(_S_COUNT, value)
            words.store(_S_VALUE, value)

        self._open(name, f"semaphore value={value}", SLOTS * _sync.SLOT_SIZE, init, mode)
        self._slots = _sync.Slots(self._obj.words, _sync.TABLES, SLOTS)
        _arm(self, self._obj, SEM_TAKE, SEM_GIVE)

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._value,), {"timeout": self._timeout}

    @property
    def value(self) -> int:
        """Units available now."""
        return self._live().words.load(_S_COUNT)

    def _repair(self) -> None:
        words = self._obj.words
        count = words.load(_S_VALUE) + words.load(_S_EXTRA) - self._slots.total(A)
        words.store(_S_COUNT, max(0, count))

    def _reclaim(self, obj: SyncObject) -> None:
        """Give back the units of dead holders (mutex held)."""
        self._last_sweep = time.monotonic()
        words = obj.words
        for pid, units, _b in self._slots.sweep(obj.alive):
            if units > 0:
                words.add(_S_COUNT, units)
                words.add(_S_DIED, units)
                words.store(_S_DEAD, pid)
        if words.load(_S_COUNT) and words.load(_S_WAITERS):
            words.add(_S_SEQ, 1)
            words.wake(_S_SEQ, -1)

    def acquire(self, timeout: float | None = None) -> bool:
        """Take one unit; return whether it was taken within ``timeout`` seconds.

        ``0`` tries once; ``None`` uses the semaphore's ``timeout=``, and waits
        forever if that is ``None`` too. Raises :class:`~procshare.HolderDied`
        (an :class:`~procshare.OwnerDied`) *with the unit held* when the unit
        came back from a process that died holding it.
        """
        obj = self._live()
        words = obj.words
        pid, start = self._me()
        holding = self._holding
        rc = words.hold(SEM_TAKE, pid, start, holding.index, SLOTS)
        if rc >= 0:
            holding.index, holding.pid = rc, pid
            return True
        wait = self._timeout if timeout is None else _check_timeout(timeout)
        deadline = None
        swept = False
        while True:
            obj.lock()
            try:
                count = words.load(_S_COUNT)
                if (
                    count == 0
                    and not swept
                    and time.monotonic() - self._last_sweep > _sync.LIVENESS
                ):
                    self._reclaim(obj)
                    swept = True
                    count = words.load(_S_COUNT)
                if count > 0:
                    i = self._holding.find(obj, self._slots, True)
                    self._slots.add(i, A, 1)
                    words.store(_S_COUNT, count - 1)
                    died = words.load(_S_DIED)
                    if died:
                        words.store(_S_DIED, died - 1)
                        raise HolderDied(obj.name, words.load(_S_DEAD) or None, held=True)
                    return True
                seq = words.load(_S_SEQ)
                words.add(_S_WAITERS, 1)
            finally:
                obj.unlock()
            try:
                if wait == 0:
                    return False
                if deadline is None and wait is not None:
                    deadline = time.monotonic() + wait
                if not words.wait(_S_SEQ, seq, _slice(deadline)):
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    swept = False  # a slice went by: look at the holders again
            finally:
                words.add(_S_WAITERS, -1)

    def release(self, n: int = 1) -> None:
        """Give back ``n`` units (units this process holds first; beyond those,
        the semaphore grows, as :class:`threading.Semaphore` does)."""
        obj = self._live()
        words = obj.words
        if n == 1:
            pid, start = self._me()
            if words.hold(SEM_GIVE, pid, start, self._holding.index, SLOTS) != -1:
                return
        elif type(n) is not int or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        obj.lock()
        try:
            i = self._holding.find(obj, self._slots, False)
            held = self._slots.get(i, A) if i >= 0 else 0
            mine = min(held, n)
            if mine:
                self._slots.add(i, A, -mine)
            if n > mine:
                words.add(_S_EXTRA, n - mine)
            words.add(_S_COUNT, n)
            if words.load(_S_WAITERS):
                words.add(_S_SEQ, 1)
                words.wake(_S_SEQ, n)
        finally:
            obj.unlock()

    def close(self) -> None:
        """Stop using the semaphore. The last user of the last process removes it."""
        self._hw = None
        super().close()

    def _enter_slow(self) -> Self:
        """``with``'s path when the guard's single call could not take a unit."""
        _arm(self, self._live(), SEM_TAKE, SEM_GIVE)
        try:
            taken = self.acquire()
        except HolderDied as exc:
            self.release()
            raise HolderDied(exc.name, exc.owner_pid, held=False) from None
        if not taken:
            raise WaitTimeout(self.name, "semaphore", self._timeout)
        return self

    def _exit_slow(self) -> None:
        self.release()


def _arm(guard: HoldGuard, obj: SyncObject, take: int, give: int) -> None:
    """Set up ``guard``'s fast ``with`` for this process (again after a fork)."""
    guard._hw = obj.words
    guard._htake = take
    guard._hgive = give
    guard._hslots = SLOTS
    guard._hhint = -1
    guard._hpid, guard._hstart = obj.token()


def _slice(deadline: float | None) -> float:
    """How long one wait may sleep: a liveness slice, never past ``deadline``."""
    if deadline is None:
        return _sync.LIVENESS
    return max(0.0, min(_sync.LIVENESS, deadline - time.monotonic()))


def interprocess_event(name: str | None = None, *, mode: int = 0o600) -> InterprocessEvent:
    """Open the named event ``name`` (a :class:`threading.Event` for processes),
    creating it (clear) if needed; without a name, create an anonymous one.
    ``mode``: permission bits if this call creates a named one."""
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.event(name)
    return InterprocessEvent(name, mode=mode)


@overload
def interprocess_semaphore(
    name: str | None = None, value: int = 1, *, timeout: float | None = None, mode: int = 0o600
) -> InterprocessSemaphore: ...
@overload
def interprocess_semaphore(
    value: int, /, *, timeout: float | None = None
) -> InterprocessSemaphore: ...
def interprocess_semaphore(
    name: str | int | None = None,
    value: int = 1,
    *,
    timeout: float | None = None,
    mode: int = 0o600,
) -> InterprocessSemaphore:
    """Open the named counting semaphore ``name``, creating it with ``value`` units
    if needed; without a name, create an anonymous one.

    Args:
        name: 1 to 128 characters of ``A-Z a-z 0-9 . _ -``, in the current
            namespace. Leave it out for an anonymous semaphore
            (``ps.interprocess_semaphore(3)`` or ``value=3``): as robust,
            shared with every child forked while it is open and with nobody
            else, freed by the kernel with the last process that has it; it
            cannot be pickled or opened by name
            (:class:`~procshare.AnonymousError`).
        value: units at creation; every process must give the same value
            (else :class:`~procshare.SharedTypeError`).
        timeout: seconds ``with`` and the decorator wait before raising
            :class:`~procshare.WaitTimeout` (``None``: forever); also the
            default of :meth:`InterprocessSemaphore.acquire`.
        mode: permission bits if this call creates a named one.

    Units are recorded per holding process: units held by a process that
    dies come back, and the acquirer that gets one is told
    (:class:`~procshare.HolderDied`, an :class:`~procshare.OwnerDied`).
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.semaphore(name, value, timeout=timeout)
    return InterprocessSemaphore(name, value, timeout=timeout, mode=mode)  # type: ignore[arg-type]
