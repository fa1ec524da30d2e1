"""The locks part of the engine: a per-process cache of open locks.

Opening a lock object (open, OFD holder lock, map) costs tens of
microseconds; taking an uncontended lock costs well under one. So the engine
keeps every lock this process opened in a cache keyed by ``(namespace,
name)``, and every :class:`~procshare.InterprocessLock` of that name in this
process shares one :class:`LockEntry`. ``with ps.interprocess_lock("m"):``
inside a loop therefore opens the object once.

Lifetime: an entry counts its *users* (live lock objects). An entry with no
user is closed

* at once by ``close()`` of its last user (the last user out removes the
  object, when no other process holds it either);
* by the next call into procshare that does not use it (:meth:`LocksPart.poll`),
  when its last user was merely garbage collected: closing there rather than
  in the finalizer is what keeps a by-name ``with`` in a hot loop cheap;
* at interpreter exit.

By-name reuse: ``ps.interprocess_lock(name)`` with default options also
keeps the lock *object* it made in the engine's ``by_name`` (:func:`keep`),
by name, with the namespace and ``$PROCSHARE_NAMESPACE`` it was made for,
and hands it out again to the next such call while nobody else refers to
it (:func:`reuse`, one C call for the POSIX backend): a by-name ``with`` in
a loop then builds and finalizes no object. Keeping sets ``engine.kept``,
so the engine's next housekeeping (:meth:`LocksPart.poll`) empties the
cache, and the last by-name use still ends at the next call into procshare
that is not a reuse: an object nobody refers to dies there, and its entry
is closed as above; one someone still refers to just stops being handed
out. A reuse runs no housekeeping, so it declines when some is pending
(``engine.pending``): the ordinary path then runs it.

An entry that a thread of this process holds is never closed: the kernel
walks a held robust mutex when the thread exits, so its memory must stay
mapped. At exit such a lock is left to the kernel, which releases it and
marks its holder dead, so the next acquirer is told (``OwnerDied``); the
exiting process is warned, naming it (:func:`held_here`; a forked child
reports it to its parent instead, see ``transport.child_main``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procshare._backends import get_backend
from procshare._backends.api_lock import (
    BUSY,
    NOT_OWNER,
    NOT_RECOVERABLE,
    OK,
    OWNER_DIED,
    SELF_HELD,
    TIMEDOUT,
    UNCONFIRMED,
    LockHandle,
)
from procshare._backends.api_segment import SegmentHandle
from procshare._engine import _cengine, names
from procshare._engine import core as _core
from procshare._engine import segments as _segments
from procshare._engine.core import get_engine
from procshare.errors import SharedTypeError

if TYPE_CHECKING:
    from procshare._engine.core import Engine

__all__ = [
    "BUSY",
    "NOT_OWNER",
    "NOT_RECOVERABLE",
    "OK",
    "OWNER_DIED",
    "SELF_HELD",
    "TIMEDOUT",
    "UNCONFIRMED",
    "LockEntry",
    "LockGuard",
    "LocksPart",
    "locks_part",
    "owner_of",
    "wait_acquire",
]


def _guard_base() -> type:
    """The backend's guard class; the Python reference if no backend loads.

    ``import procshare`` must work without a usable backend (``--help``,
    docs, ``procshare.errors``); the engine then says what is wrong at the
    first real use, and a lock object never exists to need the C guard.
    """
    try:
        return get_backend().lock_guard
    except (ImportError, RuntimeError):
        from procshare._backends.api_lock import PyLockGuard

        return PyLockGuard


if TYPE_CHECKING:
    from procshare._backends.api_lock import PyLockGuard as LockGuard
else:
    #: Base class of the front end's lock object: the backend's ``with``, in C
    #: (see ``PyLockGuard`` for the contract and why).
    LockGuard = _guard_base()

#: Longest single blocking wait: between slices Python runs signal handlers,
#: so Ctrl-C interrupts a wait within this many seconds.
SLICE = 0.1

KEY = "locks"


def _refs_when_alone() -> int:
    """What ``sys.getrefcount`` says, in :func:`reuse_in_python`, of an object
    only a tuple refers to (the interpreter's own references to arguments
    differ between versions: measured, not assumed)."""
    kept = (object(),)
    (obj,) = kept
    return sys.getrefcount(obj)


#: 0 where reference counts cannot say "nobody else refers to it" (a build
#: without the GIL, whose counts are not exact): no reuse then.
ALONE = 0 if getattr(sys, "_is_gil_enabled", lambda: True)() is False else _refs_when_alone()

#: What the engine's ``by_name`` keeps per name: (namespace, raw
#: ``$PROCSHARE_NAMESPACE``, lock object).
Kept = tuple[object, object, Any]


def reuse_in_python(name: object) -> Any:
    """The lock object the current engine keeps for ``name`` if it is for the
    current namespace and ``$PROCSHARE_NAMESPACE``, the engine has no
    housekeeping pending (the slow path, a call into procshare like any
    other, runs it) and nobody but the cache refers to it; else ``None``. The
    reference for the backend's ``lock_reuse`` (in C for the POSIX backend)."""
    engine = _core._engine
    if engine is None or engine.pending:
        return None
    try:
        hit = engine.by_name.get(name)  # type: ignore[call-overload]
    except TypeError:  # unhashable: not a name
        return None
    if hit is None:
        return None
    ns, env, lock = hit
    if ns is not names._namespace.get() or env is not names.env_raw():
        return None
    return lock if ALONE and sys.getrefcount(lock) == ALONE else None


def keep_in_python(name: object, lock: object) -> None:
    """Keep ``lock``, just made by name by this process, for :func:`reuse_in_python`,
    and ask the engine's next housekeeping to drop it. The reference for the
    backend's ``lock_keep_for_reuse``."""
    engine = _core._engine
    if engine is None or not ALONE or name.__class__ is not str:
        return
    engine.by_name[name] = (names._namespace.get(), names.env_raw(), lock)
    engine.kept = True


def _backend_functions() -> tuple[Callable[[object], Any], Callable[[object, object], None]]:
    try:
        backend = get_backend()
    except (ImportError, RuntimeError):
        return reuse_in_python, keep_in_python
    reuse = getattr(backend, "lock_reuse", None)
    keep = getattr(backend, "lock_keep_for_reuse", None)
    setup = getattr(backend, "lock_reuse_setup", None)
    if reuse is None or keep is None or setup is None:
        return reuse_in_python, keep_in_python
    setup(vars(_core), names._namespace, names._ENV_DATA, names._ENV_KEY)
    return reuse, keep


#: ``reuse(name)`` and ``keep(name, lock)``: see :func:`reuse_in_python` and
#: :func:`keep_in_python`.
reuse, keep = _backend_functions()


def _taken_here_function() -> Callable[[], bool]:
    try:
        taken: Callable[[], bool] | None = getattr(get_backend(), "lock_taken_here", None)
    except (ImportError, RuntimeError):
        taken = None
    return taken if taken is not None else lambda: True  # no shortcut: look at every lock


_taken_here = _taken_here_function()


def _lock_meta(name: str, namespace: str, origin: str | None = None) -> bytes:
    """The metadata of a new lock object: the JSON ``json.dumps(..., sort_keys=True)``
    writes, formatted directly. Names and namespaces are validated to
    ``A-Z a-z 0-9 . _ -``, which JSON never escapes, and the json module is
    a lot of code to run for the first time in a forked child. ``origin`` is
    recorded as for segments (``segments.encode_meta``)."""
    if origin is None or origin == namespace:
        return f'{{"kind": "lock", "name": "{name}", "namespace": "{namespace}"}}'.encode()
    return (
        f'{{"kind": "lock", "name": "{name}", "namespace": "{namespace}", "origin": "{origin}"}}'
    ).encode()


class LockEntry:
    """One open lock object, shared by every lock object of that name in this process.

    A plain slotted class (not attrs): one is built in every forked child
    that opens a lock, where each separately compiled method costs pages.
    """

    __slots__ = (
        "closed",
        "closed_at",
        "forks",
        "handle",
        "mutex",
        "name",
        "namespace",
        "os_name",
        "part",
        "users",
    )

    def __init__(  # noqa: PLR0917 - positional: built on every open of a new name
        self,
        name: str,
        namespace: str,
        os_name: str,
        handle: SegmentHandle,
        mutex: LockHandle,
        part: LocksPart,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.os_name = os_name
        self.handle = handle
        self.mutex = mutex
        self.part = part
        #: ``id()`` of the live lock objects using this entry (set operations are atomic).
        self.users: set[int] = set()
        self.closed = False
        #: The engine's fork counts when opened (below any fork under way in
        #: another thread) and when last left without a user: children forked
        #: in between inherited it and may be using it.
        self.forks = part.engine.forks - part.engine.forking
        self.closed_at = 0

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.users)} user(s)"
        return f"<LockEntry {self.namespace}/{self.name} {self.os_name} ({state})>"

    def dead_pid(self) -> int | None:
        """The pid recorded for the holder that died (``None`` if it died before recording)."""
        pid = self.mutex.state()[4]
        return pid or None

    def owner_pid(self) -> int | None:
        return self.mutex.state()[2] or None


class LocksPart:
    """Per-process cache of open locks (an :class:`~procshare._engine.core.EnginePart`).

    Slotted: the C open and end (``_cengine``) read its fields at their
    offsets, with no lookup that would write pages in a fresh child.
    """

    __slots__ = ("_entries", "backend", "engine", "fast", "maybe_idle")

    order = 10

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = backend = engine.backend
        self._entries: dict[tuple[str, str], LockEntry] = {}
        #: set when an entry may have lost its last user (a lock object was collected)
        self.maybe_idle = False
        #: What the C open (``_cengine``) calls, found once, here (in the parent,
        #: for the part a forked child adopts, which then looks nothing up):
        #: the backend's one-call open and lock creation (``None`` where it has
        #: none; the Python open uses ``segment_open`` and ``segment_create``),
        #: ``lock_data_size`` and ``lock_attach``. A test that replaces one of
        #: these on the backend replaces it here too.
        self.fast = (
            getattr(backend, "segment_open_fast", None),
            getattr(backend, "lock_create_fast", None),
            backend.lock_data_size,
            backend.lock_attach,
        )

    # -- opening and closing -------------------------------------------------

    def open(self, name: str, user: int, mode: int) -> LockEntry:
        """The entry for ``name`` in the current namespace, registering ``user`` on it."""
        key = (names.current_namespace(), name)
        entry = self._entries.get(key)
        if entry is not None:
            # Register first, then check: a concurrent close marks the entry
            # closed before it looks at the users (see _close_if_idle).
            entry.users.add(user)
            if not entry.closed:
                return entry
            entry.users.discard(user)
        with self.engine.lock:
            entry = self._entries.get(key)
            if entry is None or entry.closed:
                entry = self._open_new(key[0], name, mode)
                self._entries[key] = entry
            entry.users.add(user)
            return entry

    def _open_new(self, namespace: str, name: str, mode: int) -> LockEntry:
        backend = self.backend
        if namespace not in _segments.swept_namespaces:
            _segments.reclaim_orphans(namespace, self.engine)
        # (segments.os_name() remembers names per user, and a forked child
        # inherits what its parent worked out.)
        os_name = _segments.os_name(names.LOCK, name, namespace)
        meta = _lock_meta(name, namespace, names.env_namespace())
        # Open, else create; a racing creator or closer can make both miss once.
        try:
            while True:
                handle = backend.segment_open(os_name, keep_orphan=backend.lock_keep, meta=meta)
                if handle is None:
                    handle = backend.segment_create(
                        os_name,
                        meta=meta,
                        data_size=backend.lock_data_size,
                        mode=mode,
                        persist=False,
                        init=backend.lock_init,
                    )
                if handle is not None:
                    break
        except OSError as exc:
            if exc.errno != errno.EBADMSG:
                error = _segments.storage_error(
                    exc, name, backend, requested=backend.lock_data_size, what="lock"
                )
                if error is not None:
                    raise error from None
                raise
            raise _not_a_lock(name, "something that is not a procshare object") from None
        if handle.data_size < backend.lock_data_size:
            backend.segment_close(handle, keep=_keep_everything)
            raise _not_a_lock(name, "a procshare object too small to be a lock")
        return LockEntry(name, namespace, os_name, handle, backend.lock_attach(handle), self)

    def drop_user(self, entry: LockEntry, user: int, *, close: bool) -> None:
        """``user`` stops using ``entry``; with ``close``, close it now if it was the last."""
        entry.users.discard(user)
        if close and not entry.users:
            entry.closed_at = self.engine.forks
            self._close_if_idle(entry)

    def close_if_unused(self, entry: LockEntry) -> None:
        """Close ``entry`` if no lock object uses it and no thread holds or waits for it."""
        if not entry.users and self.engine.pid == os.getpid():
            entry.closed_at = self.engine.forks
            self._close_if_idle(entry)

    def _close_if_idle(self, entry: LockEntry) -> bool:
        with self.engine.lock:
            if entry.closed:
                return True
            entry.closed = True
            if entry.users or entry.mutex.in_use():
                entry.closed = False
                if not entry.users:
                    self.note_idle()  # held: look again at the next poll
                return False
            key = (entry.namespace, entry.name)
            if self._entries.get(key) is entry:
                del self._entries[key]
            entry.mutex.detach()
            engine = self.engine
            if engine.forks > entry.forks or engine.forking > 0:  # (else no child has it)
                # Children forked while it was in use share this process's hold
                # and may be using it: released once they are reaped (the one
                # mechanism segments use too).
                backend, handle = self.backend, entry.handle
                backend.segment_let_go(handle)  # later children inherit no hold
                engine.release_after_children(
                    entry.forks,
                    lambda: self._close_handle(handle),
                    closed=max(entry.closed_at, entry.forks),
                )
                return True
            self._close_handle(entry.handle)
            return True

    def _close_handle(self, handle: SegmentHandle) -> None:
        """End this process's hold on a lock object; the last holder removes
        it unless it must be kept (the backend's ``lock_close``)."""
        self.backend.lock_close(handle)

    def forget_by_name(self, lock: object) -> None:
        """``lock`` was closed: never hand it out again."""
        cache = self.engine.by_name
        for name, kept in list(cache.items()):
            if kept[2] is lock:
                cache.pop(name, None)

    def _drop_by_name(self) -> None:
        """Stop reusing the kept by-name objects. One nobody else refers to dies
        here (its finalizer marks its entry idle); one in use lives on, as any
        lock object does."""
        cache = self.engine.by_name
        while cache:
            try:
                cache.popitem()
            except KeyError:  # another thread emptied it meanwhile
                return

    def note_idle(self) -> None:
        """An entry may have lost its last user: close it at the next call into procshare."""
        self.maybe_idle = True
        self.engine.pending = True

    def entries(self) -> list[LockEntry]:
        return list(self._entries.values())

    def held_and_awaited(self) -> list[str]:
        """Names of the locks the calling thread holds that someone seems to wait for."""
        return [
            entry.name
            for entry in self.entries()
            if not entry.closed
            and entry.mutex.owned()
            and self.backend.lock_contended(entry.mutex)
        ]

    # -- EnginePart ----------------------------------------------------------

    def poll(self) -> None:
        """Stop reusing by-name objects; close entries whose users have all
        been garbage collected."""
        if self.engine.by_name:
            self._drop_by_name()
        if not self.maybe_idle:
            return
        self.maybe_idle = False
        for entry in list(self._entries.values()):
            if not entry.users:
                self._close_if_idle(entry)

    def shutdown(self) -> None:
        """Close every entry no thread of this process holds; leave held ones to the kernel."""
        self._drop_by_name()
        for entry in list(self._entries.values()):
            entry.users.clear()
            self._close_if_idle(entry)


def held_here() -> list[str]:
    """Names of the locks a thread of this process holds now, through lock
    objects it opened or inherited across a fork (for the warnings at exit).

    Runs at the end of every forked child: first one question to the backend
    (has a thread of this process taken any lock?), then a plain loop that
    builds nothing while nothing is held (each object touched there is a
    copied page)."""
    held: list[str] = []
    if not _taken_here():
        return held
    for engine in (*_core._inherited, _core._engine):
        for key in (KEY, "anonymous-locks"):  # named, then anonymous (_engine/anonymous.py)
            part = None if engine is None else engine.existing_part(key)
            if isinstance(part, LocksPart):
                for entry in part._entries.values():
                    if entry.mutex.held_here() and not entry.closed and entry.name not in held:
                        held.append(entry.name)
    return held


def _warn_held_at_exit() -> None:
    """At interpreter exit: a lock still held is released by the kernel as its
    holder ends, and the next acquirer is told OwnerDied. Say so now, by name."""
    held = held_here()
    if held:
        warnings.warn(
            f"procshare: process {os.getpid()} is exiting while holding interprocess lock "
            f"{', '.join(map(repr, held))}; the next process to take it will be told "
            "ps.OwnerDied. Release every lock before exiting: use `with lock:` rather "
            "than acquire(), or release() in a `finally:`.",
            RuntimeWarning,
            stacklevel=1,
        )


# Registered after the engine's shutdown (core imports first), so it runs
# before it: atexit runs handlers last in, first out.
atexit.register(_warn_held_at_exit)


def locks_part(engine: Engine | None = None) -> LocksPart:
    engine = get_engine() if engine is None else engine
    return engine.part(KEY, LocksPart)


def _keep_everything(handle: SegmentHandle) -> bool:
    return True  # (closing something that is not ours to judge)


#: ``open_lock(engine, name, user, mode)``: :meth:`LocksPart.open` of ``engine``'s
#: locks part, in C (``_cengine.c``; the Python methods stay the reference and
#: take whatever is unusual): a lock is often first opened by name in a freshly
#: forked child, where the eight Python functions of these steps copied pages.
open_lock = _cengine.open_lock
_cengine.lock_setup(
    {
        "nsvar": names._namespace,
        "env": names._ENV_DATA,
        "env_key": names._ENV_KEY,
        "default_namespace": names._DEFAULT_NAMESPACE,
        "current_namespace": names.current_namespace,
        "env_namespace": names.env_namespace,
        "segments": vars(_segments),
        "locks_part": locks_part,
        "LockEntry": LockEntry,
        "keep_all": _keep_everything,
        "LocksPart": LocksPart,
        "RLock": type(threading.RLock()),
    }
)


_core.prebuild_part(KEY, LocksPart)  # (a forked child adopts it ready-made)


def wait_acquire(mutex: LockHandle, reentrant: bool, timeout: float | None) -> int:
    """Take ``mutex`` within ``timeout`` seconds (``None``: forever), in slices.

    Each slice is one blocking wait with the GIL released. A holder that dies
    wakes one waiter at once (the kernel does it), so there is no polling
    delay; slicing only lets Ctrl-C and other signal handlers run.
    """
    rc = mutex.acquire(reentrant, -1.0)
    if rc != BUSY or timeout == 0:
        return rc
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if deadline is None:
            wait = SLICE
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return TIMEDOUT
            wait = min(SLICE, left)
        rc = mutex.acquire(reentrant, wait)
        if rc != TIMEDOUT:
            return rc


# -- for listing (procshare._engine.inspect) ---------------------------------


def _not_a_lock(name: str, found: str) -> SharedTypeError:
    return SharedTypeError(
        name,
        expected="a lock",
        found=found,
        detail=f"remove it with `python -m procshare rm --lock {name}`",
    )


def owner_of(os_name: str) -> int | None:
    """The pid recorded as holding the lock object ``os_name`` now, if any
    (cleared on release; a holder that died leaves its pid, so the lister
    shows who it was). Only looks: listing never reclaims anything."""
    return get_engine().backend.lock_owner(os_name)


#: ``new_lock(name, mode)``: the front end's lock object for ``name`` with the
#: default options, built in C without running its ``__init__`` (which stays
#: the reference; ``_cengine_new.h``), its entry opened as :func:`open_lock`
#: opens it; NotImplemented, nothing done, for a name that is not valid.
new_lock = _cengine.new_lock


def new_lock_setup(lock_type: type) -> None:
    """Tell :func:`new_lock` the front end's lock class (once, after defining it).
    A class whose guard is not the backend's C one (no usable backend) is not
    taken: :func:`new_lock` then declines and the constructor runs."""
    with contextlib.suppress(TypeError):  # (its _m a Python slot, not the C guard's)
        _cengine.new_lock_setup(lock_type, LockEntry)
