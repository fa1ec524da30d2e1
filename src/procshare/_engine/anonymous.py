"""The engine's anonymous objects: segments and locks without a name, and private namespaces.

An anonymous segment (``ps.shared(kind)``) or lock (``ps.interprocess_lock()``)
is shared memory with no name anywhere: the backend maps it shared, every
child forked while it is open inherits the mapping, and the kernel frees it
with its last mapping, whatever ended the processes that had it. So nothing
here counts holders, defers a release for children, or reclaims orphans:

* closing a segment unmaps this process's mapping at once; children forked
  while it was open keep their own copies of the mapping until they close
  them or exit;
* a lock is an ordinary robust-mutex lock entry (:mod:`.locks`) whose memory
  is an anonymous segment; it lives in a locks part of its own, never in the
  by-name cache, so nothing can open it by name;
* a semaphore, event, condition, barrier, rwlock or queue is a sync object
  (:mod:`.sync`) whose data area is an anonymous segment of this part.

Each anonymous lock and sync object gets a label for messages,
``"(anonymous #N)"`` (:func:`new_label`), which is not a valid name.

Private namespaces (``with ps.namespace():``) are fresh random names; when
their block ends every object left in them is removed by name
(:func:`remove_namespace`).
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable

from procshare._backends.api_segment import SegmentHandle
from procshare._engine import names
from procshare._engine.core import Engine, current_pid, get_engine
from procshare._engine.locks import LockEntry, LocksPart
from procshare._engine.segments import Initialiser, Layout, OpenSegment, close_newest_first
from procshare.errors import MappingLimit, SharedMemoryFull

#: What anonymous objects are called in messages. Not a valid name (names are
#: ``A-Z a-z 0-9 . _ -``), so it can never be confused with a real one.
LABEL = "(anonymous)"
#: The namespace recorded for anonymous objects: none (not a valid namespace).
NO_NAMESPACE = ""

# Module-level, so a forked child goes on counting where its parent was when
# it forked: its own objects never share a label with one it inherited.
_numbers = itertools.count(1)


def new_label() -> str:
    """A label for a new anonymous lock or sync object: ``"(anonymous #N)"``."""
    return f"{LABEL[:-1]} #{next(_numbers)})"


class AnonymousPart:
    """The engine part holding this process's anonymous segments (an ``EnginePart``).

    It closes what is still open at interpreter exit (newest first), as the
    named segments' part does; a forked child starts with an empty one and
    never unmaps what it inherited before it exits.
    """

    order = 20

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._open: dict[int, OpenSegment] = {}

    def open(self, layout: Layout, initial: Initialiser) -> OpenSegment:
        """Create a new anonymous segment holding ``layout``, zeroed or set to ``initial``."""
        backend = self.engine.backend
        try:
            handle = backend.segment_create_anonymous(
                data_size=layout.size, init=_initialiser(initial)
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SharedMemoryFull(
                    LABEL, requested=layout.size, available=backend.anonymous_space()
                ) from None
            if exc.errno == errno.EFBIG:
                raise SharedMemoryFull(
                    LABEL, requested=layout.size, file_size_limit=backend.segment_size_limit()
                ) from None
            if exc.errno == errno.ENOMEM:  # a mapping refused (vm.max_map_count)
                usage = backend.mapping_limit()
                mappings, limit = (None, None) if usage is None else usage
                raise MappingLimit(LABEL, mappings=mappings, limit=limit) from None
            raise
        rec = OpenSegment(LABEL, NO_NAMESPACE, handle, True, layout)
        self._open[id(rec)] = rec
        return rec

    def close(self, rec: OpenSegment) -> None:
        """Close ``rec`` (idempotent): its view stops working and this process's
        mapping goes (an inherited one only stops working, see the module)."""
        if self._open.pop(id(rec), None) is not rec:
            return
        rec.closed = True
        ref, rec.view = rec.view, None
        view = None if ref is None else ref()
        if view is not None:
            view._ps_invalidate()  # later uses raise SegmentClosed
        if self.engine.pid != current_pid():
            return  # inherited: the child's copy of the mapping goes with the child
        self.engine.backend.segment_close(rec.handle, keep=None)

    def held(self) -> list[OpenSegment]:
        """Every anonymous segment this process holds open, oldest first."""
        return list(self._open.values())

    # -- EnginePart ---------------------------------------------------------

    def poll(self) -> None:
        pass  # nothing waits: closing is immediate

    def shutdown(self) -> None:
        close_newest_first(self.held(), self.close, "anonymous segments")


def _initialiser(initial: Initialiser) -> Callable[[memoryview], None] | None:
    if initial is None:
        return None  # new memory is zeroed already
    if isinstance(initial, bytes):
        blob = initial

        def copy(data: memoryview) -> None:
            data[: len(blob)] = blob

        return copy
    return initial


def segments_part(engine: Engine | None = None) -> AnonymousPart:
    """This process's anonymous segments part."""
    return (engine or get_engine()).part("anonymous", AnonymousPart)


class AnonymousLocksPart(LocksPart):
    """Anonymous locks: the locks part's lifetime rules (users, never unmapped
    while a thread holds or waits for the lock, closed at the next call into
    procshare once garbage collected, left to the kernel at exit if held), over
    anonymous memory, and never in the by-name cache."""

    def _close_handle(self, handle: SegmentHandle) -> None:
        # (No name to remove, nothing to keep for a next opener: the memory
        # goes with its last mapping.)
        self.backend.segment_close(handle, keep=None)

    def open(self, name: str, user: int, mode: int) -> LockEntry:
        """A new anonymous lock entry with ``user`` registered (``name`` and
        ``mode`` are ignored: it has neither)."""
        return self.open_anonymous(user)

    def open_anonymous(self, user: int) -> LockEntry:
        backend = self.backend
        handle: SegmentHandle = backend.segment_create_anonymous(
            data_size=backend.lock_data_size, init=backend.lock_init
        )
        # Numbered, in a namespace no name can have: poll() and shutdown() find
        # it, and closing forgets it, as any entry; no by-name open ever does.
        label = new_label()
        try:
            entry = LockEntry(label, NO_NAMESPACE, "", handle, backend.lock_attach(handle), self)
        except BaseException:
            backend.segment_close(handle, keep=None)
            raise
        entry.users.add(user)
        self._entries[(NO_NAMESPACE, label)] = entry
        return entry


def locks_part(engine: Engine | None = None) -> AnonymousLocksPart:
    """This process's anonymous locks part."""
    return (engine or get_engine()).part("anonymous-locks", AnonymousLocksPart)


def open_lock(user: int) -> LockEntry:
    """A new anonymous robust lock, with ``user`` (a lock object's ``id``) as its user."""
    return locks_part().open_anonymous(user)


# -- private namespaces -------------------------------------------------------


def fresh_namespace() -> str:
    """A namespace nobody else uses: ``run-`` + this pid + 12 random hex digits."""
    return f"run-{os.getpid()}-{os.urandom(6).hex()}"


def remove_namespace(namespace: str) -> list[str]:
    """Remove every object left in ``namespace`` by name (held or not: holders
    keep their memory, as with ``ps.unlink``); the OS names removed."""
    backend = get_engine().backend
    prefix = names.namespace_prefix(namespace)
    removed = []
    for os_name in sorted(backend.os_objects()):
        if os_name.startswith(prefix) and backend.segment_unlink(os_name):
            removed.append(os_name)
    return removed
