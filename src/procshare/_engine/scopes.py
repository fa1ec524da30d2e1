"""``ps.children()`` scopes: which children a block owns, joining and cancelling them.

The engine's side of a ``with ps.children():`` block (a :class:`ScopeState`
on the forking thread's stack, kept by the children part) and the policy on
top of :class:`~procshare._engine.children.ChildrenPart`'s supervision:
waiting for a free slot under ``limit=``, noting failures in fork order, and
cancelling the rest on the first one (``cancel_on_error``), on ``Ctrl-C``
and on any other exception that leaves the block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from procshare._engine import segments as _segments
from procshare.errors import Cancelled

if TYPE_CHECKING:
    from procshare._engine.children import ChildrenPart
    from procshare._engine.transport import Record

__all__ = [
    "CANCEL_GRACE",
    "ScopeCancelled",
    "ScopeState",
    "admit",
    "cancel",
    "enter",
    "interrupted",
    "leave",
    "refresh",
]

#: Seconds a cancelled child gets to unwind between ``SIGTERM`` and ``SIGKILL``;
#: the period starts again each time one of the children cancelled together ends.
CANCEL_GRACE = 1.0


class ScopeCancelled(Cancelled):
    """Raised from a ``@forked`` call inside a scope that is being cancelled.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that an
    ``except Exception:`` in the block does not swallow it; the scope that
    raised it catches it at its exit and does not count it as a failure.
    """

    def __init__(self, scope: ScopeState) -> None:
        super().__init__(
            "this ps.children() scope is cancelling its children after a failure; "
            "no new child is started"
        )
        self.scope = scope


@attrs.define(eq=False)
class ScopeState:
    """The engine's side of one ``ps.children()`` block."""

    limit: int | None
    cancel_on_error: bool
    records: list[Record] = attrs.field(factory=list)
    running: list[Record] = attrs.field(factory=list)
    failures: list[Record] = attrs.field(factory=list)
    cancelling: bool = False


def refresh(part: ChildrenPart, scope: ScopeState) -> None:
    """Advance the scope's running children; note failures among the ones
    that ended (in fork order); cancel the rest if the scope says so."""
    # wait_any() and terminate_all() advance the children; here we only
    # look (no system calls per child on every fork under a limit).
    ended = [r for r in scope.running if r.done]
    if not ended:
        return
    scope.running = [r for r in scope.running if not r.done]
    for r in ended:
        if not (r.cancelled or part.outcome(r)[0]):
            scope.failures.append(r)
    if scope.failures and scope.cancel_on_error and not scope.cancelling:
        cancel(part, scope, "by its ps.children() scope after another child failed")


def cancel(part: ChildrenPart, scope: ScopeState, reason: str) -> None:
    scope.cancelling = True
    part.terminate_all(scope.running, cancel=reason, grace=CANCEL_GRACE)
    refresh(part, scope)


def admit(part: ChildrenPart, scope: ScopeState) -> None:
    """Before forking into ``scope``: wait for a free slot under its limit."""
    if scope.cancelling:
        raise ScopeCancelled(scope)
    if scope.limit is None:
        return
    while True:
        refresh(part, scope)
        if scope.cancelling:
            raise ScopeCancelled(scope)
        if len(scope.running) < scope.limit:
            return
        part.wait_any(scope.running, None)


def enter(part: ChildrenPart, limit: int | None, cancel_on_error: bool) -> ScopeState:
    part.poll()
    scope = ScopeState(limit=limit, cancel_on_error=cancel_on_error)
    part.scope_stack().append(scope)
    part.scoped += 1  # forks now look at the thread's stack (the C start does not)
    return scope


def leave(part: ChildrenPart, scope: ScopeState, exc: BaseException | None) -> None:
    """Join (or cancel) every child of ``scope``; take it off the stack.

    A ``KeyboardInterrupt`` (or any other non-``Exception``), from the
    block or while waiting, terminates and reaps every child; the caller
    then lets it propagate.
    """
    try:
        if exc is not None and not isinstance(exc, Exception | ScopeCancelled):
            scope.cancelling = True
            part.terminate_all(scope.running, cancel=interrupted(exc), grace=CANCEL_GRACE)
            return
        if exc is not None and not isinstance(exc, ScopeCancelled) and scope.cancel_on_error:
            cancel(
                part,
                scope,
                f"by its ps.children() scope after the block raised {type(exc).__name__}",
            )
        while True:
            refresh(part, scope)
            if not scope.running:
                return
            part.wait_any(scope.running, None)
    except BaseException as stopped:
        # Interrupted while joining: nothing may be left behind.
        scope.cancelling = True
        part.terminate_all(scope.running, cancel=interrupted(stopped), grace=CANCEL_GRACE)
        raise
    finally:
        stack = part.scope_stack()
        if scope in stack:
            stack.remove(scope)
            part.scoped -= 1
        _segments.reclaim_after_kills(scope.records)  # SPEC 3: a killed child's orphans


def interrupted(exc: BaseException) -> str:
    """Why a scope or the exit cancels children when ``exc`` interrupts it."""
    what = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
    return f"by its parent, interrupted by {what}"
