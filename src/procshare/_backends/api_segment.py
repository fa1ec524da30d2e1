"""What the engine needs from a backend to keep named shared-memory objects.

A *segment object* is a named, mapped region that stays alive while at least
one process holds it open, where "holds" is counted by the kernel so that a
process killed by any signal stops holding it. A hold must not need a file
descriptor (a process may hold far more objects than ``ulimit -n``); on
POSIX a hold keeps its descriptor while the process is far below its
descriptor limit (closing is cheaper on it) and is the mapping alone beyond
that. Locks reuse the same objects
for their backing memory.

Every object starts with a small frame that the backend owns (magic, flags,
sizes, the engine's metadata); the engine sees only ``meta`` and the data
area.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import attrs


class SegmentHandle(Protocol):
    """One open of one object by this process."""

    @property
    def os_name(self) -> str: ...
    @property
    def meta(self) -> bytes:
        """The engine's metadata, exactly as given at creation."""
        ...

    @property
    def persist(self) -> bool: ...
    @property
    def data_size(self) -> int: ...
    @property
    def data(self) -> memoryview:
        """A writable view of the data area (``data_size`` bytes, 64-byte aligned)."""
        ...

    @property
    def address(self) -> int:
        """The address of the data area in this process (for ctypes and mutexes)."""
        ...

    @property
    def opener_pid(self) -> int:
        """The pid that opened it; other pids (forked children) must not close it."""
        ...

    @property
    def closed(self) -> bool: ...


@attrs.frozen
class SegmentInfo:
    """What a listing knows about one object without opening it for use."""

    os_name: str
    meta: bytes
    size: int
    persist: bool
    created_ns: int
    creator_pid: int
    holders: tuple[int, ...]
    temporary: bool = False


@attrs.frozen
class NativeKind:
    """What a backend knows about a native (ctypes) kind given to ``ps.shared``."""

    #: Depends only on the memory layout: ``"i64"``, ``"struct{x:i32@0,y:f64@8}:16"``.
    canonical: str
    #: For messages: the type's name.
    describe: str
    size: int
    align: int
    category: Literal["scalar", "struct", "array"]
    #: For a scalar: the :mod:`struct` / ``memoryview.cast`` format with the same
    #: layout (the front end then serves it like ``ps.i64``), else ``None``.
    format: str | None


# Called with an object that no living process holds (its last holder died, or
# two last holders closed at once): return True to keep it (persistent data, a
# lock whose owner died), False to have it reclaimed.
KeepOrphan = Callable[[SegmentHandle], bool]


class SegmentBackend(Protocol):
    def segment_create(
        self,
        os_name: str,
        *,
        meta: bytes,
        data_size: int,
        mode: int,
        persist: bool,
        init: Callable[[memoryview], None] | None = None,
    ) -> SegmentHandle | None:
        """Create, initialise and publish the object atomically.

        Nobody can open ``os_name`` before ``init`` has returned, and a creator
        killed during ``init`` leaves nothing under ``os_name``. Returns
        ``None`` if ``os_name`` already exists. Raises ``OSError(ENOSPC)``
        when the memory cannot be reserved (never a ``SIGBUS`` later),
        ``OSError(EFBIG)`` when the object is larger than
        ``segment_size_limit()``, and ``PermissionError`` when the namespace
        is not ours.
        """
        ...

    def segment_open(
        self, os_name: str, *, keep_orphan: KeepOrphan, meta: bytes = b""
    ) -> SegmentHandle | None:
        """Attach to a live object; ``None`` if there is none.

        An object found with no living holder is passed to ``keep_orphan``;
        when that returns ``False`` it is removed and ``None`` returned, so
        stale data is never served as live. ``meta`` is the metadata the
        caller expects: when the object's equals it, ``handle.meta`` may be
        that very object (so comparing them costs nothing).
        """
        ...

    def segment_close(self, handle: SegmentHandle, *, keep: KeepOrphan | None) -> bool:
        """Stop holding ``handle``; remove the object if this was the last holder
        and neither ``persist`` nor ``keep`` says to keep it (``None``: keep
        nothing, which lets the backend decide without calling back). Returns whether
        the object was removed. A no-op (returning ``False``) for a handle
        opened by another pid, so a forked child never releases what it
        inherited. The mapping stays valid while buffers exported from
        ``handle.data`` are alive.
        """
        ...

    def segment_let_go(self, handle: SegmentHandle) -> None:
        """Stop holding ``handle`` in this process now, though children forked
        while it was open keep holding it: called when a close must wait for
        them, so that children forked from now on do not inherit a hold. The
        :meth:`segment_close` that follows, once they are reaped, only
        decides whether this was the last holder. Buffers exported from
        ``handle.data`` keep working."""
        ...

    def segment_create_anonymous(
        self, *, data_size: int, init: Callable[[memoryview], None] | None = None
    ) -> SegmentHandle:
        """Create an *anonymous* object: shared memory with no name anywhere.

        It is shared with every child forked while this process has it open
        (the mapping is inherited), invisible to every other process, and
        freed by the kernel when the last process that has it mapped lets go
        or exits, however it ended: nothing is ever left to reclaim. Its
        handle has no name (``os_name`` is ``""``, ``meta`` is empty, never
        ``persist``), is closed with :meth:`segment_close` like any other
        (``keep`` is ignored: nobody can open it again), and in a forked
        child closing an inherited handle only marks it closed. ``init``
        fills the zeroed data before anyone else can see it. Raises
        ``OSError(ENOSPC)`` when the memory cannot be had (checked at
        creation for large objects, never a ``SIGBUS`` later), and
        ``OSError(EFBIG)`` above ``segment_size_limit()`` where the
        platform counts it.
        """
        ...

    def anonymous_space(self) -> int | None:
        """Bytes anonymous objects may still take now, if the platform can tell."""
        ...

    def segment_unlink(
        self, os_name: str, *, identity: tuple[int, int, int] | None = None
    ) -> bool:
        """Remove the name now, whoever holds it (mappings stay valid). With
        ``identity`` (from :meth:`object_identity`), only if the name still is
        that object: one a concurrent program made since is left alone."""
        ...

    def object_identity(self, os_name: str) -> tuple[int, int, int] | None:
        """``(owner uid, device, inode)`` of whatever is under ``os_name`` (a
        procshare object or not), or ``None`` if nothing is: for leak checks."""
        ...

    def segment_holders(self, names: set[str], *, mapped: bool = False) -> dict[str, list[int]]:
        """Pids that hold each OS name open (any object, procshare's or not), as
        far as the platform lets us see; with ``mapped``, also those that only
        map it. For listings and leak checks, never for lifetime decisions."""
        ...

    def segment_list(self, prefix: str) -> list[SegmentInfo]:
        """Every object (and leftover temporary) whose OS name starts with ``prefix``."""
        ...

    def os_objects(self) -> frozenset[str]:
        """The OS names of every object this backend keeps anywhere (segments, lock
        memory, temporaries, of any namespace and user): what a leak check compares.
        """
        ...

    def segment_collect(self, prefix: str, *, keep: KeepOrphan, junk: bool = True) -> list[str]:
        """Remove every object under ``prefix`` that no living process holds and
        ``keep`` does not keep (``keep`` sees ``persist`` objects too and
        decides about them); with ``junk``, also every temporary nobody holds
        (abandoned, or one a creator has made but not yet held: only for a
        command a person runs) and what is not a readable procshare object.
        Returns the OS names removed.
        """
        ...

    def segment_space(self) -> int | None:
        """Bytes free for new objects now, if the platform can tell (for messages)."""
        ...

    def segment_store_problem(self) -> str | None:
        """Why this process cannot keep named objects at all (``"/dev/shm is
        mounted read-only"``), or ``None`` if nothing is visibly wrong: asked
        after a creation or open failed, for the message."""
        ...

    def descriptor_limit(self) -> int | None:
        """How many descriptors this process may have open (``ulimit -n``), if limited.

        An open object keeps none: opening and closing need one for a moment."""
        ...

    def mapping_limit(self) -> tuple[int, int] | None:
        """``(mappings this process has, the most it may have)`` where the platform
        counts them (Linux: ``vm.max_map_count``), else ``None``. Every open
        object is one mapping; creating or opening one past the limit fails
        with ``OSError(ENOMEM)``."""
        ...

    def segment_size_limit(self) -> int | None:
        """The largest object this process may create, if limited (``ulimit -f``).

        ``segment_create`` fails with ``OSError(EFBIG)`` for an object above it,
        and with ``OSError(ENOSPC)`` for one that does not fit in free memory.
        """
        ...

    def native_kind(self, kind: object) -> NativeKind | None:
        """Describe ``kind`` if it is a native (ctypes) type, else ``None``.

        Raises ``TypeError`` for native types that cannot be shared (pointers).
        """
        ...

    def native_view(self, kind: object, buffer: memoryview) -> Any:
        """A ``kind`` object over ``buffer``; it pins the buffer while alive."""
        ...

    def native_bytes(self, kind: object, initial: object) -> bytes:
        """``initial`` converted to the bytes of a ``kind``; ``TypeError`` if it cannot be."""
        ...
