"""Front end for processes: ``@forked``, ``Child`` and the ``children()`` scope.

Argument checking, handles and context managers only; forking, waiting and
reaping live in :mod:`procshare._engine.children`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import types
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from procshare import _runtime
from procshare._engine import accel as _accel
from procshare._engine import children as _children
from procshare._engine import core as _core
from procshare._engine import get_engine
from procshare._engine import scopes as _scopes
from procshare._engine.children import ChildrenPart, Record, current_children
from procshare._engine.scopes import CANCEL_GRACE, ScopeCancelled, ScopeState
from procshare._exit_status import ExitStatus, Outcome
from procshare._scope import ChildrenMethods
from procshare.errors import ChildRaised, JoinTimeout

__all__ = ["CANCEL_GRACE", "Child", "Children", "ExitStatus", "children", "forked"]

P = ParamSpec("P")
R = TypeVar("R")


def _positive_timeout(timeout: float | None, what: str) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{what} must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what} must be a number of seconds >= 0 or None, not {timeout!r}")
    return float(timeout)


def _release_what_waited() -> None:
    """On the way out of an interruption that reaped children: release now the
    segments and locks the parent closed while those children had them (SPEC 2:
    Ctrl-C releases what the parent held), never masking the interruption."""
    with contextlib.suppress(Exception):  # a warning raised as an error must not win
        _poll_if_asked()


def _poll_if_asked() -> None:
    """``get_engine().poll()``, with no call unless a part asked for
    housekeeping (a dropped handle, a release that waited for children):
    join runs this after every fork, where each object touched costs a
    copy-on-write page fault."""
    engine = _core._engine  # None in a fresh child until it uses procshare
    if engine is not None and (engine.pending or engine.kept):
        get_engine().poll()


class Child(_accel.HandleBase, Generic[R]):
    """Handle of one forked child, returned by calling a :func:`forked` function.

    ``join()`` gives the function's return value (or raises a
    :class:`~procshare.ChildError`); ``wait()`` gives an :class:`ExitStatus`
    without raising. Used as a context manager, a ``Child`` joins on exit.

    A handle dropped without ``join()`` does not leave a zombie: the child
    keeps running, and is reaped at the next call into procshare after it
    has exited (a failure then gives a ``RuntimeWarning``), or at
    interpreter exit.

    Leaving a ``with`` block by ``KeyboardInterrupt`` (or another exception
    that is not an :class:`Exception`) stops the child (``SIGTERM``, which it
    turns into :class:`~procshare.Cancelled` and unwinds; ``SIGKILL`` if it is
    still running after ``CANCEL_GRACE``), reaps it and lets the interruption
    propagate, as a :func:`children` scope does.
    """

    # _part and _rec are the base's (with __weakref__): the backend's C join
    # and the C start read and write them in place (see _engine/accel.py).
    __slots__ = ()

    def __init__(self, part: ChildrenPart, rec: Record) -> None:
        self._part = part
        self._rec = rec

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._rec.pid

    @property
    def name(self) -> str:
        """The child's name (``name=`` of :func:`forked`, else the function's name)."""
        return self._rec.name

    @property
    def daemon(self) -> bool:
        """Whether interpreter exit terminates this child instead of waiting for it."""
        return self._rec.daemon

    # Every method that looks at the child is a call into procshare: each
    # also runs the housekeeping parts asked for (reaping children whose
    # handles were dropped, SPEC 1; releases that waited for children), join
    # and wait after their own wait. This process's engine, not
    # self._part.engine: a handle inherited by a fork must not run its
    # parent's housekeeping here.

    @property
    def running(self) -> bool:
        """Whether the child has not ended yet (reaps it if it has)."""
        _poll_if_asked()
        return not self._part.advance(self._rec)

    @property
    def exitcode(self) -> int | None:
        """``None`` while running; then the exit status, or minus the signal number."""
        _poll_if_asked()
        rec = self._rec
        if not self._part.advance(rec) or rec.exit is None:
            return None
        return rec.exit.exitcode

    @property
    def cancelled(self) -> bool:
        """Whether its ``children()`` scope stopped it after another child failed."""
        rec = self._rec
        return bool(rec.cancelled) and rec.done and not self._part.outcome(rec)[0]

    def join(self, timeout: float | None = None) -> R:
        """Wait for the child and return its function's return value.

        Raises:
            JoinTimeout: ``timeout`` seconds passed; the child is left running.
            ChildRaised: the function raised (its traceback is in the message).
            ChildExited: the child exited with a non-zero status.
            ChildKilled: a signal ended the child.
            ChildTimeout: the ``timeout=`` given to :func:`forked` ran out.
        """
        # (At run time the base's join takes the common case and calls
        # _join for the rest: this method is deleted after the class.)
        return self._join(timeout)

    def _join(self, timeout: float | None = None) -> R:
        """join(), the Python path: every case (the reference for the fast one)."""
        if timeout is not None:  # (no call otherwise: each object touched while
            # the child still shares our pages is a copied page)
            timeout = _positive_timeout(timeout, "join(timeout=)")
        done = self._part.wait(self._rec, timeout)
        # Housekeeping after this child's own wait: a warning about another
        # child raised as an error (-W error) cannot leave this one unjoined.
        _poll_if_asked()
        if not done:
            raise JoinTimeout(pid=self.pid, name=self.name, timeout=timeout)
        return self._result()

    def _joined(self) -> R:
        """The end of join() after the C join reaped a child that sent
        something, or did not exit 0."""
        _poll_if_asked()
        return self._result()

    def _result(self) -> R:
        ok, value = self._part.outcome(self._rec)
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait for the child to end and describe how it ended; never raises a
        child's failure. Returns ``None`` if ``timeout`` seconds pass first."""
        timeout = _positive_timeout(timeout, "wait(timeout=)")
        rec = self._rec
        done = self._part.wait(rec, timeout)
        _poll_if_asked()  # after: see join()
        if not done:
            return None
        ok, error = self._part.outcome(rec)
        exit_ = rec.exit
        outcome: Outcome
        if ok:
            outcome, error = "returned", None
        elif rec.timed_out:
            outcome = "timed out"
        elif rec.cancelled:
            outcome = "cancelled"
        elif exit_ is None:
            outcome = "lost"
        elif exit_.signal is not None:
            outcome = "killed"
        elif isinstance(error, ChildRaised):
            outcome = "raised"
        else:
            outcome = "exited"
        return ExitStatus(
            pid=rec.pid,
            name=rec.name,
            exitcode=None if exit_ is None else exit_.exitcode,
            signal=None if exit_ is None else exit_.signal,
            outcome=outcome,
            error=error,
        )

    def terminate(self) -> None:
        """Send ``SIGTERM`` (a no-op once the child has ended and been reaped).

        The child turns it into :class:`~procshare.Cancelled` at its next
        bytecode and unwinds (its ``with`` blocks exit, its locks are
        released); unless it catches that, it then ends by ``SIGTERM``."""
        _poll_if_asked()
        self._part.signal(self._rec, signal.SIGTERM)

    def kill(self) -> None:
        """Send ``SIGKILL`` (a no-op once the child has ended and been reaped)."""
        _poll_if_asked()
        self._part.signal(self._rec, signal.SIGKILL)

    def __enter__(self) -> Child[R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            # Ctrl-C (or SystemExit & co) in the block: waiting for the child to
            # finish on its own could take forever. Stop and reap it, as a
            # children() scope does (it is cancelled: it unwinds), and let the
            # interruption propagate.
            reason = _scopes.interrupted(exc)
            self._part.terminate_all([self._rec], cancel=reason, grace=CANCEL_GRACE)
            _release_what_waited()
            return
        try:
            if exc is None:
                self.join()
                return
            # The block failed: still join (no zombie), but let the block's
            # error propagate, noting the child's own failure on it.
            status = self.wait()
        except BaseException as interrupted:
            if not isinstance(interrupted, Exception):  # Ctrl-C while joining
                reason = _scopes.interrupted(interrupted)
                self._part.terminate_all([self._rec], cancel=reason, grace=CANCEL_GRACE)
                _release_what_waited()
            raise
        if status is not None and status.error is not None:
            exc.add_note(f"procshare: meanwhile {status.error}")

    def __repr__(self) -> str:
        rec = self._rec
        exit_ = rec.exit
        if not rec.done:
            state = "running"
        else:  # from the record: a repr is no call into procshare, it never reaps
            state = f"exitcode={None if exit_ is None else exit_.exitcode}"
        return f"<Child {rec.name!r} pid={rec.pid} {state}>"

    # (A handle dropped unjoined: the base's finalizer calls part.drop(rec).)


# The join above is for readers and type checkers; at run time the base's (the
# backend's C join, or PyHandle's) takes the common case, Child._join the rest.
delattr(Child, "join")


class Children(ChildrenMethods[Child[Any]]):
    """The scope returned by :func:`children`: owns every child forked in its block.

    Its properties (``limit``, ``cancel_on_error``, ``children``, ``results``)
    are :class:`~procshare._scope.ChildrenMethods`', shared with the cluster's
    scope."""

    def __init__(
        self, *, limit: int | None, cancel_on_error: bool, progress: bool = False
    ) -> None:
        self._limit = limit
        self._cancel_on_error = cancel_on_error
        self._progress = progress
        self._bar: Any = None  # a procshare._progress.Bar while the scope shows one
        self._counted: set[Record] = set()  # children already shown as ended
        self._part: ChildrenPart | None = None
        self._scope: ScopeState | None = None
        self._handles: list[Child[Any]] = []
        self._results: list[Any] | None = None

    def _started(self) -> list[Child[Any]]:
        scope = self._scope
        if scope is not None and len(self._handles) < len(scope.records):
            part = self._part
            assert part is not None
            self._handles.extend(Child(part, r) for r in scope.records[len(self._handles) :])
        return self._handles

    def __enter__(self) -> Children:
        if self._scope is not None:
            raise self._entered_twice()
        if self._progress:  # before any fork: a missing tqdm fails here, not at the exit
            from procshare._progress import Bar

            self._bar = Bar(0, "ps.children()", unit="child")
        part = current_children()
        self._part = part
        self._scope = _scopes.enter(part, self._limit, self._cancel_on_error)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        part, scope = self._part, self._scope
        assert part is not None
        assert scope is not None
        try:
            if self._bar is not None and exc is None:
                try:
                    self._watch(part, scope)
                except BaseException as interrupted:
                    _scopes.leave(part, scope, interrupted)  # stops and reaps them all
                    raise
            _scopes.leave(part, scope, exc)
        except BaseException:
            _release_what_waited()  # Ctrl-C while waiting: children are reaped
            raise
        finally:
            if self._bar is not None:
                self._count(part, scope)
                self._bar.close()
        handles = self.children
        if exc is not None and not isinstance(exc, Exception | ScopeCancelled):
            _release_what_waited()
            return False  # KeyboardInterrupt & co propagate as they are
        # A call into procshare reaps dropped children (SPEC 1); after the
        # scope's own are joined, so a warning raised as an error (-W error)
        # cannot leave those behind.
        _poll_if_asked()
        failed = set(scope.failures)
        errors: list[Exception] = []
        if isinstance(exc, Exception):
            errors.append(exc)
        for rec in scope.records:
            if rec in failed:
                _, error = part.outcome(rec)
                errors.append(error)
        if not errors:
            self._results = [part.outcome(h._rec)[1] for h in handles]
            return isinstance(exc, ScopeCancelled) and exc.scope is scope
        cancelled = 0
        if scope.cancelling and any(r.cancelled for r in scope.records):
            cancelled = sum(1 for h in handles if h.cancelled)
        # `from None`: the block's exception is inside the group already; as the
        # group's context too it would be printed twice.
        raise self._failures(errors, len(failed), len(scope.records), exc, cancelled) from None

    def _count(self, part: ChildrenPart, scope: ScopeState) -> bool:
        """Move the bar to the children that ended; whether one of them failed."""
        bar = self._bar
        counted = self._counted
        failed = False
        bar.total(len(scope.records))
        for r in scope.records:
            if r.done and r not in counted:
                counted.add(r)
                ok = r.cancelled or part.outcome(r)[0]
                failed = failed or not ok
                bar.item(ok)
        return failed or bar.failed > 0

    def _watch(self, part: ChildrenPart, scope: ScopeState) -> None:
        """Wait for the scope's children, showing each as it ends; stop at the
        first failure if the scope cancels the rest (leaving the scope does that)."""
        while True:
            if self._count(part, scope) and self._cancel_on_error:
                return
            running = [r for r in scope.records if not r.done]
            if not running:
                return
            part.wait_any(running, None)
            for r in running:
                part.advance(r)

    def __repr__(self) -> str:
        n = 0 if self._scope is None else len(self._scope.records)
        return f"<Children limit={self._limit} cancel_on_error={self._cancel_on_error} forked={n}>"


def children(
    *, limit: int | None = None, cancel_on_error: bool = True, progress: bool = False
) -> Children:
    """A scope that owns, joins and cancels every child forked inside it.

    Every :func:`forked` call made in the block, in the same thread, belongs
    to the scope. Leaving the block waits for all of them. If any failed, or
    the block itself raised, one :class:`ExceptionGroup` holding every
    failure (the block's own exception first, then the children's in fork
    order) is raised, even for a single failure. After a clean exit
    ``kids.results`` holds the return values in fork order.

    Args:
        limit: At most this many children of the scope run at once; a
            further ``@forked`` call waits for one to end. ``None``: no limit.
        cancel_on_error: On the first failure (a child's, or the block's own
            exception), cancel the other children: each gets ``SIGTERM``,
            which it turns into :class:`~procshare.Cancelled` and unwinds
            (its locks are released cleanly); one still running after a
            grace period of ``CANCEL_GRACE`` (1 s, counted again each time one
            of them ends) is killed. A child stopped this way is *cancelled*,
            not a failure: it is left out of the group and its handle's
            ``cancelled`` is true. A ``@forked`` call made in the block after
            that raises :class:`~procshare.Cancelled`, which the scope
            absorbs. ``False``: let every child finish.

        progress: While the block's exit waits, show a progress bar on stderr
            counting the children that ended, with the failed ones (needs
            ``pip install 'procshare[progress]'``).

    ``KeyboardInterrupt`` (Ctrl-C) from the block or while the scope waits
    cancels and reaps every child, then propagates as itself. (The children
    leave the terminal's own ``SIGINT`` to the parent.)
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError(f"children(limit=) must be a positive int or None, not {limit!r}")
    if limit is not None and limit < 1:
        raise ValueError(
            f"children(limit=) must be at least 1 (or None for no limit), not {limit}"
        )
    from procshare._progress import check_progress

    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.children(
            limit=limit, cancel_on_error=bool(cancel_on_error), progress=bool(progress)
        )
    return Children(
        limit=limit,
        cancel_on_error=bool(cancel_on_error),
        progress=check_progress(progress, "ps.children"),
    )


class _Forked(_accel.LauncherBase, Generic[P, R]):
    """A function decorated with :func:`forked`: calling it forks a child.

    A call is the base's (the backend's C start: see ``_engine/accel.py``),
    which takes the common case and calls :meth:`_call` for the rest.
    """

    def __init__(
        self, fn: Callable[P, R], name: str | None, timeout: float | None, daemon: bool
    ) -> None:
        self.__wrapped__ = fn
        self._fn = fn
        self._name = name or getattr(fn, "__qualname__", None) or repr(fn)
        self._timeout = timeout
        self._daemon = daemon
        # Above @staticmethod it must not bind: obj.method(x) calls fn(x).
        self._binds = not isinstance(fn, staticmethod)
        functools.update_wrapper(self, fn)

    if TYPE_CHECKING:

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Child[R]: ...

    def _call(self, *args: P.args, **kwargs: P.kwargs) -> Child[R]:
        """A call, the Python path: every case (the reference for the fast one)."""
        if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
            return rt.fork(self._fn, args, kwargs, self._name, self._timeout, self._daemon)
        # current_children() inlined: every Python call here runs again after
        # each fork, where each object touched is a copied page.
        part = _children._current
        if part is None or part.engine is not _core._engine:
            part = current_children()
        rec = part.start(self._fn, args, kwargs, self._name, self._timeout, self._daemon)
        return Child(part, rec)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """Decorating a method works: ``obj.method(...)`` forks with ``obj`` bound
        (a ``@staticmethod`` below ``@forked`` gets no instance)."""
        if instance is None or not self._binds:
            return self
        return types.MethodType(self, instance)

    def __repr__(self) -> str:
        return f"<forked function {self._name}>"

    # The C base's fields are not in __dict__: copies and pickles (cloudpickle
    # sends a @forked function a task calls to a cluster's workers) carry them.
    def __getstate__(self) -> dict[str, Any]:
        fields = ("_fn", "_name", "_timeout", "_daemon")
        return {**self.__dict__, **{k: getattr(self, k) for k in fields}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@overload
def forked(fn: Callable[P, R], /) -> _Forked[P, R]: ...
@overload
def forked(
    *, name: str | None = None, timeout: float | None = None, daemon: bool = False
) -> Callable[[Callable[P, R]], _Forked[P, R]]: ...
def forked(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    timeout: float | None = None,
    daemon: bool = False,
) -> _Forked[P, R] | Callable[[Callable[P, R]], _Forked[P, R]]:
    """Decorate a function so that calling it forks a child now and returns a :class:`Child`.

    The function runs in the child on a copy of the parent's memory, so it
    need not be picklable (closures work); only its return value (or
    exception) is pickled back. The child always ends with ``os._exit``
    after waiting for the non-daemon threads it started, flushing stdio and
    releasing what it opened itself: it never runs the parent's ``atexit``
    handlers and never returns into the caller.

    Outside any :func:`children` scope the caller owns the :class:`Child`:
    join it, or drop it and it is reaped once it ends (see :class:`Child`).

    Args:
        name: The child's name in handles and errors (default: the
            function's qualified name).
        timeout: Seconds the child may run. When they run out the child is
            cancelled (:class:`~procshare.Cancelled` is raised in it), killed
            if still running after ``CANCEL_GRACE``, and reaped, and
            ``join()`` raises :class:`~procshare.ChildTimeout`. The parent enforces it whenever
            it looks at the child (``join``, ``wait``, ``running``, a scope,
            any call into procshare for a dropped handle).
        daemon: At interpreter exit, still-running daemon children are
            cancelled (``SIGTERM``: they unwind; ``SIGKILL`` after 1 s);
            non-daemon children (the default) are waited for, unless the
            program is ending on an uncaught Ctrl-C. Both are reaped.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"forked(name=) must be a str or None, not {name!r}")
    timeout = _positive_timeout(timeout, "forked(timeout=)")

    def decorate(f: Callable[P, R]) -> _Forked[P, R]:
        if not callable(f):
            raise TypeError(f"@ps.forked decorates a function, not {f!r}")
        return _Forked(f, name, timeout, bool(daemon))

    if fn is None:
        return decorate
    return decorate(fn)


_accel.accelerate(Child, _poll_if_asked, vars(_runtime))
