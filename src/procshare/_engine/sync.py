"""The engine's side of the coordination families: named sync objects.

A semaphore, event, condition, barrier, rwlock or queue is a segment object
(same names, namespaces, modes, kernel-counted lifetime, ``ls``/``gc``/``rm``
as ``ps.shared``), opened through the segments part with its own kind letter
(:data:`names.SYNC`) and ``"kind"`` in its metadata (``"semaphore"`` ...).
Its data area is laid out as::

    0     robust mutex (the backend's, sync_mutex_size bytes): guards the
          family's bookkeeping; a process killed while holding it makes the
          next locker repair the bookkeeping (``SyncObject.repair``)
    128   16 words of the family (see the W_* offsets below)
    192   the family's tables: holder slots, or a queue's descriptors and ring

Holder slots (:class:`Slots`) are what lets a family survive a dead
participant: each records a process token ``(pid, start time)`` and what that
process holds (semaphore units, read holds, ...). The kernel's robust-futex
list only protects one-owner lock words, so a count shared by many holders
needs such records plus a liveness test (``backend.process_alive``), run by
a waiter that cannot go on (never on the fast path).

An *anonymous* sync object (``ps.interprocess_semaphore()`` and the others
without a name) is the same data area in an anonymous segment
(:mod:`.anonymous`): shared with the children forked while it is open, freed
by the kernel with its last mapping, never in a listing. Nothing below
depends on the name: the holder slots' liveness test is the process token,
not anything tied to the mapping or to a file description (a fork shares
those), so a child that inherited the mapping is a holder like any other
process, and a dead one is found the same way.

Waiting is ``Words.wait`` on a futex word in slices of :data:`LIVENESS`
seconds: a release wakes a waiter at once; the slice only bounds how long a
dead holder's units stay unnoticed. Signals (Ctrl-C) interrupt a wait at
once, whatever the slice.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from procshare._backends import get_backend
from procshare._backends.api_lock import LockHandle
from procshare._backends.api_sync import ProcessToken, Words
from procshare._engine import anonymous as _anonymous
from procshare._engine import names
from procshare._engine import segments as _segments
from procshare._engine.core import get_engine
from procshare._engine.locks import BUSY, OK, OWNER_DIED, UNCONFIRMED, wait_acquire
from procshare.errors import UsageError

if TYPE_CHECKING:
    from procshare._engine.core import Engine

#: Byte offset of the family's words (after the robust mutex).
WORDS = 128
#: Byte offset of the family's tables.
TABLES = 192
#: Seconds between liveness checks of a waiter that is not woken.
LIVENESS = 0.2


def _hold_guard_base() -> type:
    """The backend's hold guard; the Python reference if no backend loads
    (``import procshare`` must work without one: see ``locks._guard_base``)."""
    try:
        return get_backend().sync_hold_guard
    except (ImportError, RuntimeError):
        from procshare._backends.api_sync import PyHoldGuard

        return PyHoldGuard


if TYPE_CHECKING:
    from procshare._backends.api_sync import PyHoldGuard

    HoldGuard = PyHoldGuard
else:
    #: Base class of the semaphore and the rwlock's sides: their ``with``, in C.
    HoldGuard = _hold_guard_base()

FAMILIES = ("semaphore", "event", "condition", "barrier", "rwlock", "queue")


def w(i: int) -> int:
    """Byte offset of the family's word ``i``."""
    return WORDS + 4 * i


#: Set (to 1) by a C fast path that took the mutex from a dead holder and
#: left the repair to :meth:`SyncObject.lock`.
REPAIR = w(15)

SLOT_SIZE = 32
# Slot fields (byte offsets inside a slot)
_PID, _START_LO, _START_HI, _A, _B = 0, 4, 8, 12, 16


class Slots:
    """A table of per-process holder records in a sync object.

    Each slot: ``pid`` (0: free), start time (two words), and two counters
    ``a`` and ``b`` whose meaning is the family's. Every change is one word
    store, ordered so that a process killed between two stores leaves a
    table that still adds up (a claimed slot counts nothing until its
    counter is written). Callers hold the object's mutex.
    """

    __slots__ = ("count", "offset", "words")

    def __init__(self, words: Words, offset: int, count: int) -> None:
        self.words = words
        self.offset = offset
        self.count = count

    def _at(self, i: int) -> int:
        return self.offset + i * SLOT_SIZE

    def find(self, token: ProcessToken) -> int:
        """The slot of ``token``, or -1."""
        words = self.words
        pid, start = token
        for i in range(self.count):
            at = self._at(i)
            if words.load(at + _PID) == pid and self.start(i) == start:
                return i
        return -1

    def start(self, i: int) -> int:
        at = self._at(i)
        return self.words.load(at + _START_LO) | (self.words.load(at + _START_HI) << 32)

    def pid(self, i: int) -> int:
        return self.words.load(self._at(i) + _PID)

    def claim(self, token: ProcessToken) -> int:
        """The slot of ``token``, claiming one if it has none (-1: full).

        A free slot, else one whose process holds nothing now (the C fast
        paths in the backend choose the same way)."""
        i = self.find(token)
        if i >= 0:
            return i
        words = self.words
        pid, start = token
        chosen = next((i for i in range(self.count) if words.load(self._at(i) + _PID) == 0), -1)
        if chosen < 0:  # a slot whose process holds nothing now (it finds itself another)
            chosen = next(
                (i for i in range(self.count) if not self.get(i, _A) and not self.get(i, _B)), -1
            )
        if chosen < 0:
            return -1
        at = self._at(chosen)
        words.store(at + _A, 0)
        words.store(at + _B, 0)
        words.store(at + _START_LO, start & 0xFFFFFFFF)
        words.store(at + _START_HI, start >> 32)
        words.store(at + _PID, pid)  # last: the slot is now this process's
        return chosen

    def get(self, i: int, field: int) -> int:
        value = self.words.load(self._at(i) + field)
        return value - (1 << 32) if value >= 1 << 31 else value

    def add(self, i: int, field: int, delta: int) -> None:
        self.words.add(self._at(i) + field, delta)

    def free(self, i: int) -> None:
        """Give the slot up (its counters first, so it never counts twice)."""
        at = self._at(i)
        self.words.store(at + _A, 0)
        self.words.store(at + _B, 0)
        self.words.store(at + _PID, 0)

    def release_if_idle(self, i: int) -> None:
        if self.get(i, _A) == 0 and self.get(i, _B) == 0:
            self.free(i)

    def total(self, field: int) -> int:
        return sum(self.get(i, field) for i in range(self.count) if self.pid(i))

    def sweep(self, alive: Callable[[ProcessToken], bool]) -> list[tuple[int, int, int]]:
        """Free the slots of dead processes; ``[(pid, a, b)]`` of what they held."""
        dead = []
        for i in range(self.count):
            pid = self.pid(i)
            if pid and not alive((pid, self.start(i))):
                dead.append((pid, self.get(i, _A), self.get(i, _B)))
                self.free(i)
        return dead


A, B = _A, _B


class SyncObject:
    """One open of a sync object by this process (named or anonymous)."""

    __slots__ = (
        "__weakref__",
        "anonymous",
        "backend",
        "family",
        "key",
        "mutex",
        "name",
        "namespace",
        "os_name",
        "part",
        "rec",
        "repair",
        "words",
    )

    def __init__(
        self,
        family: str,
        rec: _segments.OpenSegment,
        part: _segments.SegmentsPart | _anonymous.AnonymousPart,
        engine: Engine,
        label: str | None = None,
    ) -> None:
        self.family = family
        self.rec = rec
        #: The part that closes ``rec``: the one that opened it, also in a
        #: forked child (whose own part never had it).
        self.part = part
        #: Whether it has no name (``label`` given: what messages call it).
        self.anonymous = label is not None
        self.name = rec.name if label is None else label
        self.namespace = rec.namespace
        self.os_name = rec.handle.os_name
        #: Tells this object from every other one open in this process (an
        #: anonymous object has no OS name).
        self.key = self.os_name or f"{label} {id(rec):x}"
        self.backend = engine.backend
        data = rec.handle.data
        self.mutex: LockHandle = self.backend.sync_mutex(data)
        self.words: Words = self.backend.sync_words(data)
        #: Called with the mutex held after a process died holding it.
        self.repair: Callable[[], None] = _nothing

    @property
    def data(self) -> memoryview:
        return self.rec.handle.data

    @property
    def closed(self) -> bool:
        return self.rec.closed

    def lock(self) -> None:
        """Take the bookkeeping mutex (repairing after a dead holder)."""
        rc = self.mutex.acquire(False, -1.0)
        if rc == BUSY:
            rc = wait_acquire(self.mutex, False, None)
        if rc == OK and not self.words.load(REPAIR):
            return
        if rc in (OK, OWNER_DIED, UNCONFIRMED):
            try:
                self.repair()
                # (A C fast path that met a dead holder flags REPAIR instead.)
                self.words.store(REPAIR, 0)
            except BaseException:
                self.mutex.release()
                raise
            if rc != OK:
                self.mutex.mark_consistent()
            return
        if rc != OK:
            fix = (
                "make a new one (an anonymous object goes with its last process)"
                if self.anonymous
                else f"remove it with `python -m procshare rm --sync {self.name}`"
            )
            raise UsageError(
                f"{self.family} {self.name!r}: its internal lock failed (code {rc}); {fix}"
            )

    def unlock(self) -> None:
        self.mutex.release()

    def token(self) -> ProcessToken:
        return self.backend.process_token()

    def alive(self, token: ProcessToken) -> bool:
        return self.backend.process_alive(token)

    def gone(self, token: ProcessToken) -> bool:
        """Certainly dead (no process has its pid; cheap). ``False`` says nothing."""
        return self.backend.process_gone(token)

    def state(self) -> str:
        """A short description of its state (as ``ls`` shows a named one)."""
        if self.rec.closed:
            return "closed"
        if self.anonymous:
            return describe(self.data[: state_size(self.family)].tobytes(), self.family)
        return state_of(self.os_name, self.family)

    def close(self) -> None:
        """Stop using the object (the last user of the last process removes a
        named one; the kernel frees an anonymous one with its last mapping)."""
        if self.rec.closed:
            return
        part = sync_part()
        part.closing(self)
        if not self.mutex.in_use():
            self.mutex.detach()
        self.words.detach()  # deferred by the backend while a thread waits
        self.part.close(self.rec)


def _nothing() -> None:
    pass


def wait_word(obj: SyncObject, offset: int, seen: int, deadline: float | None) -> bool:
    """Sleep while word ``offset`` holds ``seen``, at most one liveness slice and
    never past ``deadline`` (monotonic). False when the deadline has passed."""
    if deadline is None:
        obj.words.wait(offset, seen, LIVENESS)
        return True
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    obj.words.wait(offset, seen, min(left, LIVENESS))
    return True


def _meta(family: str, name: str, namespace: str, layout: str) -> bytes:
    return json.dumps(
        {"name": name, "namespace": namespace, "kind": family, "layout": layout},
        separators=(",", ":"),
    ).encode()


def open_sync(
    family: str,
    name: str | None,
    *,
    layout: str,
    size: int,
    init: Callable[[memoryview, Words], None],
    mode: int,
) -> SyncObject:
    """Open the sync object ``name`` of ``family`` in the current namespace,
    creating it (``init`` fills in its words) if there is none; ``name=None``
    creates an anonymous one (``mode`` is then ignored: it has no name to be
    opened by).

    ``layout`` names the family's parameters (``"semaphore value=3"``): opening
    an existing object with other parameters raises ``SharedTypeError``.
    """
    engine = get_engine()
    engine.poll()
    backend = engine.backend
    total = TABLES + size
    shape = _segments.Layout(layout=layout, kind=family, size=total)

    def initialise(data: memoryview) -> None:
        backend.sync_mutex_init(data)
        words = backend.sync_words(data)
        try:
            init(data, words)
        finally:
            words.detach()

    if name is None:
        anonymous = _anonymous.segments_part(engine)
        rec = anonymous.open(shape, initialise)
        try:
            obj = SyncObject(family, rec, anonymous, engine, _anonymous.new_label())
        except BaseException:
            anonymous.close(rec)
            raise
    else:
        namespace = names.current_namespace()
        named = _segments.segments_part(engine)
        rec = named.open(
            name,
            namespace,
            _segments.os_name(names.SYNC, name, namespace),
            _meta(family, name, namespace, layout),
            shape,
            create=None,
            initial=initialise,
            persist=False,
            mode=mode,
        )
        obj = SyncObject(family, rec, named, engine)
    sync_part(engine).opened(obj)
    return obj


class SyncPart:
    """Per-process hooks of open sync objects: what a process does when it stops
    using one (a barrier party leaves its slot), at close and at exit."""

    order = 15  # after children (0) and locks (10), before segments (20)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[SyncObject] = weakref.WeakSet()
        #: SyncObject.key -> (users here, what to run when the last one goes)
        self._leave: dict[str, tuple[int, Callable[[], None]]] = {}

    def opened(self, obj: SyncObject) -> None:
        self._open.add(obj)

    def on_leave(self, obj: SyncObject, action: Callable[[], None]) -> None:
        """Run ``action`` once this process stops using ``obj``'s object (by its
        last close here, or at exit); registered once per object and process."""
        with self._lock:
            users, _old = self._leave.get(obj.key, (0, action))
            self._leave[obj.key] = (users, action)

    def closing(self, obj: SyncObject) -> None:
        others = any(o is not obj and o.key == obj.key and not o.closed for o in self._open)
        if others:
            return
        with self._lock:
            entry = self._leave.pop(obj.key, None)
        if entry is not None and self.engine.pid == os.getpid():
            entry[1]()

    def poll(self) -> None:
        pass

    def shutdown(self) -> None:
        with self._lock:
            actions = [action for _users, action in self._leave.values()]
            self._leave.clear()
        for action in actions:
            action()


def sync_part(engine: Engine | None = None) -> SyncPart:
    return (engine or get_engine()).part("sync", SyncPart)


# -- for listings (procshare._engine.inspect) -------------------------------


def peek(os_name: str, size: int = TABLES) -> bytes | None:
    """The first ``size`` bytes of a sync object's data, without holding it."""
    return get_engine().backend.sync_peek(os_name, size)


#: Holder slots a condition has (procshare._condition): ``ls`` counts the live
#: waiters in them.
CONDITION_SLOTS = 128


def state_size(family: str) -> int:
    """How many bytes of a sync object :func:`describe` reads."""
    return TABLES + CONDITION_SLOTS * SLOT_SIZE if family == "condition" else TABLES


def state_of(os_name: str, family: str) -> str:
    """A short description of a sync object's state for ``ls`` (read-only)."""
    data = peek(os_name, state_size(family))
    return "?" if data is None else describe(data, family)


def _live_waits(data: bytes, count: int) -> int:
    """Counter A summed over the slots of living processes (read-only: a dead
    process's slot is left for the next waiter's sweep)."""
    alive = get_engine().backend.process_alive
    total = 0
    for i in range(count):
        at = TABLES + i * SLOT_SIZE
        if at + SLOT_SIZE > len(data):
            break
        pid, lo, hi, a = (
            int.from_bytes(data[at + f : at + f + 4], "little")
            for f in (_PID, _START_LO, _START_HI, _A)
        )
        if pid and a and a < 1 << 31 and alive((pid, lo | hi << 32)):
            total += a
    return total


def describe(data: bytes, family: str) -> str:
    """A short description of the state held in a sync object's first bytes."""
    if len(data) < TABLES:
        return "?"
    word: Callable[[int], int] = lambda i: int.from_bytes(data[w(i) : w(i) + 4], "little")  # noqa: E731
    describe: dict[str, Callable[[], str]] = {
        "semaphore": lambda: f"value={word(0)} waiters={word(2)}",
        "event": lambda: f"{'set' if word(0) & 1 else 'clear'} waiters={word(1)}",
        "condition": lambda: f"waiters={_live_waits(data, CONDITION_SLOTS)}",
        "barrier": lambda: (
            f"{word(0)}/{word(4)} waiting{' broken' if word(2) else ''} generation={word(1)}"
        ),
        "rwlock": lambda: f"readers={word(0)} writer={word(1) or '-'} writers_waiting={word(4)}",
        "queue": lambda: f"items={(word(1) - word(0)) & 0xFFFFFFFF} waiters={word(6) + word(7)}",
    }
    fn = describe.get(family)
    return fn() if fn is not None else "?"
