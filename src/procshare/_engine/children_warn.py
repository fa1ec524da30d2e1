"""What the children part tells the user about children it cannot report
otherwise: a wait that may be a deadlock, a dropped handle's failed child,
children that ended holding locks. A mixin of
:class:`~procshare._engine.children.ChildrenPart` (its own module, so the
part's module stays about forking, waiting and reaping).
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from procshare._engine import locks as _locks
from procshare._engine import userwarn

if TYPE_CHECKING:
    from procshare._engine.core import Engine
    from procshare._engine.transport import Record


class ChildrenWarnings:
    """The warnings of :class:`~procshare._engine.children.ChildrenPart`."""

    __slots__ = ()

    engine: Engine
    _lock: threading.RLock
    #: Children that said they ended holding locks, not yet warned about.
    _held_news: list[tuple[Record, list[str]]]

    def _warn_held_locks(self) -> None:
        """A wait for children has lasted DEADLOCK_WATCH seconds: warn if the
        waiting thread holds a lock somebody is waiting for."""
        from procshare._engine.children import DEADLOCK_WATCH  # (read when it warns: tests set it)

        held: list[str] = []
        for key in (_locks.KEY, "anonymous-locks"):  # named, then anonymous (.anonymous)
            part = self.engine.existing_part(key)
            if isinstance(part, _locks.LocksPart):
                held += part.held_and_awaited()
        if held:
            userwarn.warn(
                f"procshare: this thread has waited {DEADLOCK_WATCH:g} s for child processes "
                f"while it holds interprocess lock {', '.join(map(repr, held))}, which "
                "another process is waiting for. If that process is one of the children, "
                "neither can go on: the child waits for the lock and this thread for the "
                "child. Release the lock before waiting for children; to share a lock with "
                "children, open it in the parent without `with` (see 'Making it fast' in "
                "the seed scenario tutorial)."
            )

    def _warn_dropped(self, rec: Record) -> None:
        exit_ = rec.exit
        if rec.timed_out:
            what = f"was cancelled after its timeout of {rec.timeout} s"
        elif exit_ is not None and exit_.signal is not None:
            what = f"was killed by signal {exit_.signal}"
        elif exit_ is not None and exit_.status:
            what = f"ended with exit status {exit_.status} (an exception, or sys.exit)"
        else:
            return
        userwarn.warn(
            f"procshare: child {rec.name!r} (pid {rec.pid}) {what}, and its handle was "
            "dropped without join(), so nobody saw its error. Keep the Child and call "
            "join(), or fork it inside `with ps.children():`."
        )

    def _warn_quietly(self) -> None:
        if self._held_news:
            with contextlib.suppress(Exception):
                self._warn_held_at_end()

    def _warn_held_at_end(self) -> None:
        """Children said they ended holding interprocess locks (see ``_finish``)."""
        news: list[tuple[Record, list[str]]] = []
        with self._lock:
            while self._held_news:  # (one pop at a time: a child reaped meanwhile is kept)
                news.append(self._held_news.pop(0))
        for rec, names in news:
            userwarn.warn(
                f"procshare: child {rec.name!r} (pid {rec.pid}) ended while holding "
                f"interprocess lock {', '.join(map(repr, names))}; the next process to "
                "take it will be told ps.OwnerDied. Release every lock before the "
                "child's function returns: use `with lock:` rather than acquire()."
            )
