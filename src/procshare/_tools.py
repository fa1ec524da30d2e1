"""Front end for the engine's tools: ``ps.segments()``."""

from __future__ import annotations

from procshare._engine import get_engine
from procshare._engine.inspect import SegmentInfo, list_objects


def segments(namespace: str | None = None) -> list[SegmentInfo]:
    """Every live segment, lock and coordination object (semaphore, event,
    condition, barrier, rwlock, queue) of ``namespace`` (default: the current
    namespace).

    Each :class:`SegmentInfo` gives the name, its type (``"segment"``,
    ``"lock"`` or the family), what it holds, its size, the pids holding it
    open, the pid holding the lock (for locks), its age, and the state of a
    coordination object (``state``). ``python -m procshare ls`` prints the
    same list.

    An object listed as ``"temporary"`` is a creation in progress, or one
    whose creator died before publishing it: ``python -m procshare gc``
    removes the abandoned ones.
    """
    get_engine().poll()  # every call into procshare reaps dropped children (SPEC 1)
    return list_objects(namespace)


__all__ = ["SegmentInfo", "segments"]
