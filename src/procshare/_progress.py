"""Progress bars for ``ps.map(progress=True)`` and ``ps.children(progress=True)``.

tqdm is an optional extra (``procshare[progress]``): the core never imports
it, and asking for a bar without it raises :class:`~procshare.MissingDependency`.
"""

from __future__ import annotations

import sys
from typing import Any

from procshare.errors import MissingDependency


class Bar:
    """A bar on stderr counting done items, with the failed ones in its postfix."""

    def __init__(self, total: int | None, desc: str, unit: str = "item") -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            raise MissingDependency(
                module="tqdm", extra="progress", feature="progress=True"
            ) from None

        class _Quiet(tqdm):  # type: ignore[misc]
            # No monitor thread: a thread running at a fork is what procshare
            # warns about (and it would be copied half-way into every worker).
            monitor_interval = 0

        self._bar: Any = _Quiet(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True)
        self.done = 0
        self.failed = 0

    def item(self, ok: bool) -> None:
        """One item ended; a failure shows on the bar at once."""
        self.done += 1
        self._bar.update(1)
        if not ok:
            self.failed += 1
            self._bar.set_postfix_str(f"failed={self.failed}", refresh=True)  # drawn now

    def total(self, total: int) -> None:
        """The number of items became known (or grew)."""
        if self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def check_progress(progress: object, what: str) -> bool:
    if not isinstance(progress, bool):
        raise TypeError(f"{what}(progress=) must be True or False, not {progress!r}")
    return progress
