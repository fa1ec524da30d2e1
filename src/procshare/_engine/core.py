"""The per-process engine: one registry of everything this process holds.

There is exactly one :class:`Engine` per process. It is created on first use,
replaced by an empty one in every forked child (the child never closes,
unlinks or releases what it inherited: those belong to the parent), and shut
down at interpreter exit, releasing what it holds in a fixed order:
children first (they may still use segments and locks), then locks, then
segments.

Each area (children, locks, segments) keeps its own state in an
:class:`EnginePart` created lazily by :meth:`Engine.part`. The engine itself
holds no OS state and makes no OS calls; parts reach the OS only through
``engine.backend``.
"""

from __future__ import annotations

import atexit
import operator
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from procshare._backends import Backend, get_backend
from procshare._engine import _cengine


class EnginePart(Protocol):
    """One area's state inside the engine."""

    #: Shutdown order: lower runs first (children 0, locks 10, segments 20).
    order: int

    def poll(self) -> None:
        """Housekeeping (e.g. reaping) run by the next call into procshare after
        the part set ``engine.pending``."""

    def shutdown(self) -> None:
        """Release everything this part holds. Must be safe to call twice."""


P = TypeVar("P", bound=EnginePart)


class _Deferred:
    """A release waiting for children: see :meth:`Engine.release_after_children`."""

    __slots__ = ("closed", "opened", "release")

    def __init__(self, opened: int, closed: int, release: Callable[[], object]) -> None:
        self.opened = opened
        self.closed = closed
        self.release = release


_order = operator.attrgetter("order")


class Engine:
    """One process's registry (a plain slotted class: one is built in every
    forked child that calls into procshare, where each separately compiled
    attrs method would cost copied pages)."""

    __slots__ = (
        "_closed",
        "_deferred",
        "_parts",
        "backend",
        "by_name",
        "deferred",
        "forking",
        "forks",
        "kept",
        "lock",
        "pending",
        "pid",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self._parts: dict[str, EnginePart] = {}
        #: Set by a part that has housekeeping for the next call into procshare.
        self.pending = False
        #: Set by a part that keeps objects for reuse until the next call into
        #: procshare that is not a reuse (the by-name locks, _engine/locks.py):
        #: that poll drops them, but a reuse itself runs housekeeping only if
        #: ``pending`` asks for it.
        self.kept = False
        #: The by-name lock objects kept for reuse: name -> (namespace, raw
        #: ``$PROCSHARE_NAMESPACE``, lock object); see _engine/locks.py. Here,
        #: on the engine, because the reuse check reads it from the current
        #: engine in one C call: a forked child, whose engine is new, never
        #: sees its parent's.
        self.by_name: dict[str, tuple[object, object, Any]] = {}
        #: Children forked so far (``@forked``); a segment or lock records the
        #: count when opened, so children forked later are known to hold it too.
        self.forks = 0
        #: Forks under way (numbered, not yet recorded as live children).
        self.forking = 0
        #: Segments and locks closed here whose release waits for such children
        #: (the length of ``_deferred``; read without the lock by ChildrenPart).
        self.deferred = 0
        self._deferred: list[_Deferred] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<procshare Engine pid={self.pid} parts={sorted(self._parts)}>"

    def part(self, key: str, factory: Callable[[Engine], P]) -> P:
        """The part stored under ``key``, created with ``factory(engine)`` on first use."""
        found = self._parts.get(key)
        if found is None:
            with self.lock:
                found = self._parts.get(key)
                if found is None:
                    found = factory(self)
                    self._parts[key] = found
        return found  # type: ignore[return-value]

    def children_between(self, opened: int, closed: int) -> bool:
        """Whether a child forked while something was open (fork count above
        ``opened`` and at most ``closed``) is still unreaped: it inherited it
        and may still use it. A fork under way counts (its child is not
        recorded yet), so the answer errs on the side of waiting."""
        if self.forking > 0:
            return True
        if closed <= opened:
            return False
        part = self._parts.get("children")
        between: Callable[[int, int], bool] | None = getattr(part, "forked_between", None)
        return between is not None and between(opened, closed)

    def release_after_children(
        self, opened: int, release: Callable[[], object], closed: int | None = None
    ) -> bool:
        """Run ``release`` now, or once the children forked while the object was
        open are reaped; return whether it ran now.

        ``opened`` is the fork count when the object was opened (below any fork
        under way then), ``closed`` when it was last used (default: now).
        Children numbered in between inherited it: they share this process's
        hold (the same open file description), so releasing it now would let
        the name go, and a later opener make a second object, while they still
        use it. A waiting release runs at the first call into procshare after
        such a child is reaped (:meth:`poll`), or at shutdown. One mechanism
        for segments and locks alike.
        """
        if self.forks <= opened and self.forking <= 0:
            release()  # (no child forked since it was opened)
            return True
        if self.pid != os.getpid():
            # A forked child before procshare's own after-fork hook ran (a
            # collection in an earlier hook): the engine is the parent's, and
            # its lock may be held by a thread that does not exist here.
            return False
        with self.lock:
            # Counted first: a child reaped from now on wakes the release
            # (ChildrenPart._finish sets ``pending``), so none slips in between.
            self.deferred += 1
            if self.children_between(opened, self.forks if closed is None else closed):
                self._deferred.append(
                    _Deferred(opened, self.forks if closed is None else closed, release)
                )
                self.pending = True  # a reap meanwhile found nothing listed yet
                return False
            self.deferred -= 1
        release()
        return True

    def release_deferred(self, *, everything: bool = False) -> None:
        """Run the waiting releases no child needs any more (all of them with
        ``everything``, at shutdown), one at a time: one that fails leaves the
        rest listed for the next call (or, at shutdown, runs the rest, then
        raises)."""
        failed: BaseException | None = None
        while True:
            with self.lock:  # two threads polling must not release one twice
                item = next(
                    (
                        d
                        for d in self._deferred
                        if everything or not self.children_between(d.opened, d.closed)
                    ),
                    None,
                )
                if item is None:
                    if failed is not None:
                        raise failed
                    return
                self._deferred.remove(item)
                self.deferred -= 1
            try:
                item.release()
            except BaseException as exc:
                if everything:
                    failed = failed or exc
                    continue
                if self._deferred:
                    self.pending = True  # the others at the next call
                raise

    def existing_part(self, key: str) -> EnginePart | None:
        """The part stored under ``key`` if one was made (never makes one)."""
        return self._parts.get(key)

    def poll(self) -> None:
        """Run the parts' housekeeping if one asked for it (every call into
        procshare calls this, so it costs one attribute test otherwise)."""
        if not self.pending and not self.kept:
            return
        self.pending = self.kept = False
        error: BaseException | None = None
        for part in list(self._parts.values()):
            try:
                part.poll()
            except BaseException as exc:  # the others' housekeeping still runs
                error = error or exc
        if self._deferred:
            try:
                self.release_deferred()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def shutdown(self) -> None:
        """Release everything, in order. Errors of one part do not stop the others."""
        # os.getpid(), not the cached pid: releasing in a process that only
        # inherited this engine (forked behind Python's back) would release
        # the parent's holds on the open file descriptions they share.
        if self._closed or self.pid != os.getpid():
            return
        self._closed = True
        # Exiting: no fork is under way any more (one interrupted half-way must
        # not make every release wait for a child that never was).
        self.forking = 0
        errors: list[BaseException] = []
        for part in sorted(self._parts.values(), key=_order):
            try:
                part.shutdown()
            except BaseException as exc:
                errors.append(exc)
        # Last, after the parts' closes (which may defer too): children are
        # shut down first, so nothing waits any more.
        if self._deferred:
            try:
                self.release_deferred(everything=True)
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise BaseExceptionGroup("procshare engine shutdown failed", errors)


_engine: Engine | None = None
_engine_lock = threading.Lock()
# Engines inherited across fork are kept referenced, never shut down: their
# objects belong to the parent, and dropping them could run finalizers.
_inherited: list[Engine] = []


# This process's pid, kept current across fork: getpid() is a real system
# call (glibc stopped caching it) and sits on every hot path below.
_pid = os.getpid()


def current_pid() -> int:
    """``os.getpid()`` without the system call."""
    return _pid


def get_engine_py() -> Engine:
    """This process's engine, created on first use (the reference of the C
    :func:`get_engine`, ``_cengine_get.h``, which adopts a forked child's
    spare engine itself and calls :func:`_new_engine` for the rest)."""
    engine = _engine
    if engine is not None and engine.pid == _pid:
        return engine
    return _new_engine()


# A spare engine, parts included, built beside the first engine of a process
# and never used by it: a forked child adopts its inherited copy as its own
# engine (see _new_engine). Building an engine and its parts in a freshly
# forked child runs their constructors for the first time there, and every
# function object, code object and new record it touches is a copied page
# (~35 of them per child, measured with getrusage); adopting the copy writes
# only the few pages the spare's objects share.
_spare: Engine | None = None

#: (key, factory) of the parts a spare engine is built with: the by-name
#: segments and locks (registered by their modules, which import this one).
_prebuilt: list[tuple[str, Callable[[Engine], EnginePart]]] = []


def prebuild_part(key: str, factory: Callable[[Engine], EnginePart]) -> None:
    """Build part ``key`` with ``factory`` into every spare engine (see ``_spare``)."""
    _prebuilt.append((key, factory))


def _build_spare(backend: Backend) -> Engine:
    spare = Engine(backend)
    for key, factory in _prebuilt:
        spare._parts[key] = factory(spare)
    return spare


def _new_engine() -> Engine:
    global _engine, _spare
    with _engine_lock:
        pid = os.getpid()
        if _engine is None or _engine.pid != pid:
            if _engine is not None:
                _inherited.append(_engine)
            spare = _spare
            if spare is not None and spare.pid != pid:
                # A forked child (or a later descendant) of the process that
                # built it, which used it no more than any process ever does
                # (never): new and empty, as an engine made here would be.
                _spare = None
                spare.pid = pid
                _engine = spare
            else:
                _engine = Engine(get_backend())
                if _spare is None and not _inherited:
                    # Only the first process of a tree that uses procshare:
                    # a child building one for grandchildren that may never
                    # come would pay, in copied pages, what the spare saves.
                    _spare = _build_spare(_engine.backend)
        return _engine


def shutdown_engine() -> None:
    """Shut down this process's engine if it has one (interpreter exit, child exit)."""
    engine = _engine
    if engine is not None and engine.pid == _pid:
        engine.shutdown()


atexit.register(shutdown_engine)

_cengine.engine_setup(globals(), Engine, _new_engine, threading.Lock)
# What every child of this process runs first, raw os.fork children too: _pid
# refreshed, a new _engine_lock (another thread may have held this one at the
# fork), and the parent's engine moved to _inherited. In C: a Python function's
# frame, code and the modules it read were pages each child copied.
os.register_at_fork(after_in_child=_cengine.after_fork_child)
#: ``get_engine() -> Engine``: this process's engine, created on first use
#: (:func:`get_engine_py` in C: no Python frame in a fresh child's first call).
get_engine: Callable[[], Engine] = _cengine.get_engine
