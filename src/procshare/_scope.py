"""The public face of a ``ps.children()`` scope wherever it runs.

:class:`ChildrenMethods` is written once for :class:`procshare.Children`
(forked children, :mod:`procshare._process`) and the cluster's
``ClusterChildren`` (Dask tasks, :mod:`procshare._dask.tasks`): the
read-only properties and their documentation, the rule that a scope is
entered once, ``results`` after a clean exit, and the ``ExceptionGroup``
that leaving a failed block raises. Each subclass keeps only how its
children run, wait and end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from procshare.errors import UsageError

H = TypeVar("H")


class ChildrenMethods(Generic[H]):
    """What every ``ps.children()`` scope shows (``H``: its children's handle
    type). A subclass sets ``_limit``, ``_cancel_on_error`` and ``_results``
    and says which handles it started (``_started``)."""

    _limit: int | None
    _cancel_on_error: bool
    #: The return values, once the block ended without failures.
    _results: list[Any] | None

    @property
    def limit(self) -> int | None:
        """At most this many children of the scope run at once (``None``: no limit)."""
        return self._limit

    @property
    def cancel_on_error(self) -> bool:
        """Whether the first failure terminates the scope's other children."""
        return self._cancel_on_error

    @property
    def children(self) -> list[H]:
        """Handles of the children started in the block, in the order they started."""
        return list(self._started())

    @property
    def results(self) -> list[Any]:
        """Return values of the children in the order they started, after a clean
        exit of the block."""
        if self._results is None:
            raise UsageError(
                "kids.results is known only after the `with ps.children()` block has ended "
                "without failures; inspect kids.children (each has wait()) otherwise"
            )
        return list(self._results)

    def _started(self) -> Sequence[H]:
        """The handles of the children started in the block so far, in order."""
        raise NotImplementedError

    @staticmethod
    def _entered_twice() -> UsageError:
        return UsageError("a ps.children() scope can be entered only once; make a new one")

    @staticmethod
    def _failures(
        errors: list[Exception], failed: int, started: int, block: object, cancelled: int
    ) -> ExceptionGroup[Exception]:
        """The group a failed block raises: ``errors`` (the block's own exception,
        ``block``, first if it raised one), ``failed`` of ``started`` children
        failed, ``cancelled`` cancelled by the scope."""
        what = [f"{failed} of {started} children failed"] if failed else []
        if isinstance(block, Exception):
            what.append(f"the block raised {type(block).__name__}")
        if cancelled:
            what.append(f"{cancelled} cancelled")
        return ExceptionGroup("ps.children(): " + ", ".join(what), errors)
