"""Listing and collecting the objects of a namespace (``ps.segments()``, ``ls``, ``gc``, ``rm``).

Every object's frame stores the engine's metadata. Segments and locks both
write it as UTF-8 JSON with at least ``name``, ``namespace`` and ``kind``;
anything else (a foreign file under our prefix, a half-built temporary) is
listed with what can be known and never trusted as data.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import attrs

from procshare._engine import locks as _locks
from procshare._engine import names
from procshare._engine import sync as _sync
from procshare._engine.core import get_engine
from procshare._engine.segments import decode_meta, orphan_keeper

ObjectType = Literal[
    "segment",
    "lock",
    "temporary",
    "unknown",
    # the coordination families (issue 15)
    "semaphore",
    "event",
    "condition",
    "barrier",
    "rwlock",
    "queue",
]


@attrs.frozen
class SegmentInfo:
    """One live object of a namespace, as ``ps.segments()`` reports it."""

    #: The name given to ``ps.shared`` / ``ps.interprocess_lock`` (``None`` if unreadable).
    name: str | None
    namespace: str | None
    #: ``"segment"``, ``"lock"``, ``"temporary"`` (a creation in progress or abandoned),
    #: a coordination family (``"semaphore"``, ``"event"``, ``"condition"``,
    #: ``"barrier"``, ``"rwlock"``, ``"queue"``) or ``"unknown"``.
    type: ObjectType
    #: What the object holds, as recorded at creation (e.g. ``"u64"``, ``"numpy float64[1000]"``).
    kind: str
    #: Bytes of memory the object takes.
    size: int
    #: Pids of the processes that have it open (those this user may see).
    holders: tuple[int, ...]
    #: For a lock: the pid recorded as holding it, if any.
    owner: int | None
    persist: bool
    #: Seconds since creation.
    age: float
    os_name: str
    #: For a semaphore, event, condition, barrier, rwlock or queue: its state
    #: now (``"value=2 waiters=0"``, ``"set"``, ``"items=3"`` ...); else ``None``.
    state: str | None = None


def _namespace(namespace: str | None) -> str:
    """``namespace`` checked (``InvalidName`` saying "namespace"), or the current one."""
    if namespace is None:
        return names.current_namespace()
    return names.validate_name(namespace, "namespace")


def _elsewhere(meta: dict[str, object], namespace: str) -> bool:
    """Whether an object under ``namespace``'s prefix records another namespace.

    The prefix is a 28-bit hash, so two namespaces can share it (rarely, but
    a search finds a pair in a second); what an object records settles it.
    Objects that record nothing (junk, a creation in progress) stay listed.
    """
    owner = meta.get("namespace")
    return isinstance(owner, str) and owner != namespace


def _type_of(os_name: str, temporary: bool, meta: dict[str, object] | None = None) -> ObjectType:
    if temporary:
        return "temporary"
    kind_char = os_name[len(names.PREFIX) + 7 : len(names.PREFIX) + 8]
    if kind_char == names.SYNC:
        family = (meta or {}).get("kind")
        return family if family in _sync.FAMILIES else "unknown"  # type: ignore[return-value]
    return {names.SEGMENT: "segment", names.LOCK: "lock"}.get(kind_char, "unknown")  # type: ignore[return-value]


def list_objects(namespace: str | None = None) -> list[SegmentInfo]:
    """Every object of ``namespace`` (default: the current one), sorted by name."""
    engine = get_engine()
    ns = _namespace(namespace)
    now = time.time_ns()
    out = []
    for info in engine.backend.segment_list(names.namespace_prefix(ns)):
        meta = decode_meta(info.meta)
        if _elsewhere(meta, ns):
            continue
        kind_type = _type_of(info.os_name, info.temporary, meta)
        name = meta.get("name")
        out.append(
            SegmentInfo(
                name=name if isinstance(name, str) else None,
                namespace=meta.get("namespace", ns),
                type=kind_type,
                kind=str(meta.get("kind", "?")),
                size=info.size,
                holders=info.holders,
                owner=_locks.owner_of(info.os_name) if kind_type == "lock" else None,
                persist=info.persist,
                age=max(0.0, (now - info.created_ns) / 1e9) if info.created_ns else 0.0,
                os_name=info.os_name,
                state=_sync.state_of(info.os_name, kind_type)
                if kind_type in _sync.FAMILIES
                else None,
            )
        )
    return sorted(out, key=lambda i: (i.type, i.name or "", i.os_name))


def collect(namespace: str | None = None, *, everything: bool = False) -> list[str]:
    """Remove what no living process holds; return the OS names removed.

    Kept unless ``everything``: ``persist=True`` segments (meant to outlive
    their users) and locks whose holder died (kept so the next user is told).
    """
    engine = get_engine()
    ns = _namespace(namespace)
    keep = orphan_keeper(ns, engine.backend, everything=everything)
    return engine.backend.segment_collect(names.namespace_prefix(ns), keep=keep)


def remove(
    name: str, *, lock: bool = False, namespace: str | None = None, sync: bool = False
) -> bool:
    """Remove the segment (or lock, or with ``sync`` the semaphore, event,
    condition, barrier, rwlock or queue) ``name`` now, whoever holds it."""
    engine = get_engine()
    names.validate_name(name)
    ns = _namespace(namespace)
    kind = names.SYNC if sync else names.LOCK if lock else names.SEGMENT
    return engine.backend.segment_unlink(names.os_name(kind, name, ns))


def namespace_objects(namespace: str | None = None) -> frozenset[str]:
    """The OS names of every object of ``namespace`` (default: the current one).

    Segments, lock memory and abandoned temporaries all count. Only names are
    listed: nothing is opened, locked or removed, so looking cannot change
    what is seen (the demo's "nothing left behind" check).
    """
    prefix = names.namespace_prefix(namespace)
    return frozenset(n for n in get_engine().backend.os_objects() if n.startswith(prefix))


# -- for the pytest plugin (procshare.testing) --------------------------------


@attrs.frozen
class ObjectRecord:
    """What a leak check knows about one object of the backend (any namespace,
    procshare's or not), read without taking a hold or reclaiming anything."""

    os_name: str
    #: ``(owner uid, device, inode)``: whose it is, and which object exactly.
    identity: tuple[int, int, int]
    #: Whether it is a procshare object (its frame is readable); else a raw file.
    procshare: bool
    #: The decoded metadata (``name``, ``namespace``, ``kind``, ``origin`` ...).
    meta: dict[str, Any]
    persist: bool
    #: The pid recorded as its creator (0 if unknown).
    creator_pid: int
    #: When it was created (``time.time_ns()``; 0 if unknown).
    created_ns: int
    #: Pids that have it open or mapped (those this user may see).
    holders: tuple[int, ...]


def every_object() -> frozenset[str]:
    """The OS names of every object the backend keeps, of every namespace and user."""
    return get_engine().backend.os_objects()


def describe_objects(os_names: frozenset[str]) -> list[ObjectRecord]:
    """A record for each of ``os_names`` still there, sorted by OS name."""
    if not os_names:
        return []
    backend = get_engine().backend
    ours = {n for n in os_names if n.startswith(names.PREFIX)}
    listed = {i.os_name: i for i in backend.segment_list(names.PREFIX) if i.os_name in ours}
    holders = backend.segment_holders(set(os_names), mapped=True)
    out = []
    for os_name in sorted(os_names):
        identity = backend.object_identity(os_name)
        if identity is None:
            continue  # gone already
        info = listed.get(os_name)
        meta = decode_meta(info.meta) if info is not None else {}
        out.append(
            ObjectRecord(
                os_name=os_name,
                identity=identity,
                procshare=info is not None and (bool(info.meta) or info.temporary),
                meta=meta,
                persist=info is not None and info.persist,
                creator_pid=info.creator_pid if info is not None else 0,
                created_ns=info.created_ns if info is not None else 0,
                holders=tuple(sorted(holders.get(os_name, []))),
            )
        )
    return out


def remove_objects(records: list[ObjectRecord]) -> None:
    """Remove each object, if its name still is the object described (a name a
    concurrent program reused meanwhile is left alone)."""
    backend = get_engine().backend
    for rec in records:
        backend.segment_unlink(rec.os_name, identity=rec.identity)
