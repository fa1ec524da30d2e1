"""How a child ended: :class:`ExitStatus`, what :meth:`procshare.Child.wait` returns.

(Its own module only to keep ``_process.py`` short; ``procshare.ExitStatus``
is the public name.)
"""

from __future__ import annotations

from typing import Literal

import attrs

from procshare.errors import ChildError

__all__ = ["ExitStatus", "Outcome"]

Outcome = Literal["returned", "raised", "exited", "killed", "timed out", "cancelled", "lost"]


@attrs.frozen(eq=False)
class ExitStatus:
    """How a child ended, as returned by :meth:`Child.wait` (which never raises).

    Attributes:
        pid: The child's process id.
        name: The child's name.
        exitcode: The exit status, or minus the signal number when a signal
            ended the child (the :mod:`multiprocessing` convention); ``None``
            if the status was lost because something else reaped the child.
        signal: The number of the signal that ended the child, or ``None``.
        outcome: ``"returned"``, ``"raised"``, ``"exited"`` (non-zero status),
            ``"killed"``, ``"timed out"``, ``"cancelled"`` (by its scope, or
            its parent's Ctrl-C) or
            ``"lost"``.
        error: The exception :meth:`Child.join` would raise, or ``None`` when
            the child returned normally.
    """

    pid: int
    name: str
    exitcode: int | None
    signal: int | None
    outcome: Outcome
    error: ChildError | None

    @property
    def ok(self) -> bool:
        """Whether the child returned normally (``join()`` gives its value)."""
        return self.error is None
