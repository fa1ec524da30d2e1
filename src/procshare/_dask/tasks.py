"""``@ps.forked`` calls as Dask tasks: the task body, the handle, the scope.

A task runs ``fn(*args, **kwargs)`` under the runtime and namespace of the
block that started it (:func:`run_task`), so a function written for one
host (``ps.shared``, ``ps.interprocess_lock`` by name) runs unchanged.
Dask carries a raised exception back; :func:`task_error` turns a task's end
into the error ``Child.join()`` raises on one host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import distributed
from distributed.client import ALL_COMPLETED, FIRST_COMPLETED, _wait

from procshare import _runtime
from procshare._dask.runtime import DaskRuntime, worker_runtime
from procshare._engine import names
from procshare._process import ExitStatus
from procshare._scope import ChildrenMethods
from procshare.errors import (
    Cancelled,
    ChildError,
    ChildKilled,
    ChildRaised,
    ChildTimeout,
    JoinTimeout,
    WorkerDied,
)

_HERE = os.path.dirname(os.path.abspath(__file__))

#: How long a scope waits in one call, so that Ctrl-C gets through.
_SLICE = 0.2


def run_task(fn: Callable[..., Any], args: Any, kwargs: Any, ctx: tuple[str, str]) -> Any:
    """The body of every task procshare submits: ``fn`` as its caller would run it."""
    namespace, block = ctx
    try:
        with _runtime.use(worker_runtime(block)), names.use_namespace(namespace):
            return fn(*args, **kwargs)
    finally:
        _rejoin_if_seceded()


class InContext:
    """``fn`` as a task's callable, run as :func:`run_task` runs it."""

    __slots__ = ("ctx", "fn")

    def __init__(self, fn: Callable[..., Any], ctx: tuple[str, str]) -> None:
        self.fn = fn
        self.ctx = ctx

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run_task(self.fn, args, kwargs, self.ctx)

    def __reduce__(self) -> tuple[Any, ...]:
        return (InContext, (self.fn, self.ctx))


def wait_futures(
    futures: list[distributed.Future[Any]], timeout: float, *, first: bool = False
) -> None:
    """Wait up to ``timeout`` seconds for all (``first``: any) of ``futures``.

    ``distributed.wait`` would ask for the *default* client; a ``ps.cluster()``
    client need not be it, so wait through the futures' own client.
    """
    if not futures:
        return
    when = FIRST_COMPLETED if first else ALL_COMPLETED
    _secede_once()
    with contextlib.suppress(TimeoutError):
        futures[0].client.sync(_wait, futures, timeout=timeout, return_when=when)


_secession = threading.local()


def _secede_once() -> None:
    """In a task (a ``@forked`` function that starts and waits for its own
    tasks): give the worker's thread slot back before the first wait, so the
    tasks waited for can run there too (a single-threaded worker would
    deadlock). Once per task, as ``worker_client`` does: it rejoins when the
    task's function returns (:func:`run_task`)."""
    if getattr(_secession, "active", False) or not _in_task():
        return
    distributed.secede()
    _secession.active = True


def _rejoin_if_seceded() -> None:
    if getattr(_secession, "active", False):
        _secession.active = False
        distributed.rejoin()


def _in_task() -> bool:
    # Where the worker records the running task's key (distributed.utils
    # takes it from there).
    from dask.context import thread_state

    return getattr(thread_state, "key", None) is not None


def task_key(name: str) -> str:
    """A Dask key naming the function, unique per call."""
    return f"ps-{name}-{uuid.uuid4().hex}"


def raised(exc: BaseException, tb: object, name: str, text: str = "") -> ChildError:
    """The ``ChildRaised`` (matching the original type) of a task that raised;
    ``text``: its formatted traceback, when the worker formatted it."""
    if not text and isinstance(tb, TracebackType):
        # Without procshare's own task frame: the user's code starts the traceback.
        frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(_HERE)]
        text = "".join(traceback.format_list(frames))
    cls = ChildRaised.matching(type(exc)) if isinstance(exc, Exception) else ChildRaised
    err = cls(
        exc_type=type(exc).__name__,
        exc_message=str(exc),
        child_traceback=text,
        pid=None,
        name=name,
    )
    err.__cause__ = exc
    return err


def task_error(future: distributed.Future[Any], name: str) -> ChildError:
    """The error of a finished task that did not return: raised, or its worker died."""
    if future.status == "cancelled":
        return ChildKilled(
            "its Dask task was cancelled by Dask (the client or the cluster closed?)",
            pid=None,
            name=name,
            signal=signal.SIGTERM,
        )
    exc = future.exception()
    if isinstance(exc, distributed.KilledWorker):
        return WorkerDied(str(exc), pid=None, name=name)
    return raised(exc, future.traceback(), name)


def cancelled_error(name: str, how: str) -> ChildError:
    return ChildKilled(
        f"its Dask task was cancelled ({how}); a task already running on a worker runs "
        "there until it returns, since Dask cannot stop a running task",
        pid=None,
        name=name,
        signal=signal.SIGTERM,
    )


class ClusterChild:
    """A ``@ps.forked`` call run as a Dask task: the ``Child`` of the cluster.

    ``pid`` is ``None`` (the task runs in a worker's thread, not in a
    process of its own); ``key`` is the Dask key. ``terminate()`` and
    ``kill()`` cancel the task: one still queued never runs, one already
    running goes on to its end on its worker (Dask cannot stop a running
    task) and its result is dropped.
    """

    def __init__(
        self, rt: DaskRuntime, future: distributed.Future[Any], name: str, timeout: float | None
    ) -> None:
        self._rt = rt
        self._future = future
        self._name = name
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._stopped: str | None = None  # how it was stopped: "cancelled", "timed out"...
        self._scope_cancelled = False
        self._error: tuple[ChildError | None] | None = None  # once known

    pid = None
    daemon = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def key(self) -> str:
        """The task's Dask key."""
        return str(self._future.key)

    @property
    def future(self) -> distributed.Future[Any]:
        """The task's ``distributed.Future[Any]``."""
        return self._future

    @property
    def done(self) -> bool:
        """Whether the task ended (or was stopped); looks, never waits."""
        if self._stopped is not None or self._future.done():
            return True
        return self._check_deadline()

    def _check_deadline(self) -> bool:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._stop("timed out")
            return True
        return False

    def _stop(self, how: str) -> None:
        if self._stopped is None and not self._future.done():
            self._stopped = how
            self._future.cancel(force=True)  # force: fire_and_forget also wants it

    @property
    def running(self) -> bool:
        """Whether the task has not ended yet."""
        return not self.done

    @property
    def ok(self) -> bool:
        return self.done and self._stopped is None and self._future.status == "finished"

    @property
    def exitcode(self) -> int | None:
        """``None`` while it runs; ``0`` if it returned, ``1`` otherwise."""
        if not self.done:
            return None
        return 0 if self.ok else 1

    @property
    def cancelled(self) -> bool:
        """Whether its ``children()`` scope cancelled it after another failure."""
        return self._scope_cancelled

    def wait_done(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: forever) for the end."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            limits = [_SLICE]
            if end is not None:
                limits.append(end - time.monotonic())
            if self._deadline is not None:
                limits.append(self._deadline - time.monotonic())
            left = max(0.0, min(limits))
            if end is not None and left <= 0 and time.monotonic() >= end:
                return False
            wait_futures([self._future], max(left, 0.001))
        return True

    def error(self) -> ChildError | None:
        """The error ``join()`` raises, or ``None``; for a task that ended."""
        known = self._error
        if known is None:
            known = self._error = (self._find_error(),)
        return known[0]

    def _find_error(self) -> ChildError | None:
        if self._stopped == "timed out":
            return ChildTimeout(
                "its Dask task was cancelled; one already running on a worker runs there "
                "until it returns",
                timeout=self._timeout,
                pid=None,
                name=self._name,
            )
        if self._stopped is not None:
            return cancelled_error(self._name, self._stopped)
        if self._future.status == "finished":
            return None
        return task_error(self._future, self._name)

    def join(self, timeout: float | None = None) -> Any:
        """The function's return value; raises its failure as ``Child.join`` does."""
        if not self.wait_done(timeout):
            raise JoinTimeout(pid=None, name=self._name, timeout=timeout)
        err = self.error()
        if err is not None:
            raise err
        return self._future.result()

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """An ``ExitStatus`` once the task ended (never raises its failure)."""
        if not self.wait_done(timeout):
            return None
        err = self.error()
        if err is None:
            outcome = "returned"
        elif self._stopped == "timed out":
            outcome = "timed out"
        elif self._stopped is not None:
            outcome = "cancelled"
        elif isinstance(err, ChildKilled):
            outcome = "killed"
        else:
            outcome = "raised"
        return ExitStatus(
            pid=None,  # type: ignore[arg-type]  # no process of its own
            name=self._name,
            exitcode=0 if err is None else 1,
            signal=None,
            outcome=outcome,  # type: ignore[arg-type]
            error=err,
        )

    def terminate(self) -> None:
        """Cancel the task (see the class)."""
        self._stop("terminated")

    def kill(self) -> None:
        """Cancel the task (see the class)."""
        self._stop("killed")

    def __enter__(self) -> ClusterChild:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self._stop("interrupted")
            return
        if exc is None:
            self.join()
            return
        status = self.wait()
        if status is not None and status.error is not None:
            exc.add_note(f"procshare: meanwhile {status.error}")

    def __repr__(self) -> str:
        state = "running" if not self.done else f"exitcode={self.exitcode}"
        return f"<ClusterChild {self._name!r} key={self.key} {state}>"


def fork(  # noqa: PLR0917 - the arguments of Runtime.fork
    rt: DaskRuntime,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
    timeout: float | None,
) -> ClusterChild:
    """Submit one ``@ps.forked`` call; it belongs to this thread's innermost scope."""
    scopes = rt.scopes()
    scope: ClusterChildren | None = scopes[-1] if scopes else None
    if scope is not None:
        scope.wait_for_slot()
    future = rt.client.submit(
        run_task, fn, args, kwargs, rt.context(), key=task_key(name), pure=False
    )
    # A dropped handle must not cancel the task: on one host a dropped Child
    # keeps running (Dask forgets a task nobody holds a future of).
    distributed.fire_and_forget(future)
    child = ClusterChild(rt, future, name, timeout)
    if scope is not None:
        scope.handles.append(child)
    return child


class _ScopeCancelled(Cancelled):
    """A ``@forked`` call in a cluster scope that is cancelling (absorbed by the scope)."""


class ClusterChildren(ChildrenMethods[ClusterChild]):
    """``ps.children()`` on the cluster: the same rules over tasks.

    Leaving the block waits for every task; failures (and the block's own
    exception) come out as one ``ExceptionGroup``; ``cancel_on_error``
    cancels the rest on the first failure (they count as cancelled, not
    failed); ``limit=N`` keeps at most N of its tasks submitted at once.
    Its properties are the local scope's (:class:`ChildrenMethods`).
    """

    def __init__(
        self, rt: DaskRuntime, limit: int | None, cancel_on_error: bool, progress: bool
    ) -> None:
        self._rt = rt
        self._limit = limit
        self._cancel_on_error = cancel_on_error
        self._progress = progress
        self.handles: list[ClusterChild] = []
        self._results: list[Any] | None = None
        self._entered = False
        self._cancelling = False
        self._bar: Any = None

    def _started(self) -> list[ClusterChild]:
        return self.handles

    def _failed(self, child: ClusterChild) -> bool:
        return child.done and not child.cancelled and child.error() is not None

    def _cancel_rest(self) -> None:
        self._cancelling = True
        for child in self.handles:
            if not child.done:
                child._scope_cancelled = True
                child._stop("cancelled by its scope")

    def wait_for_slot(self) -> None:
        """Before a fork: refuse if cancelling; wait while ``limit`` tasks run."""
        if self._cancelling:
            raise _ScopeCancelled(
                "this ps.children() scope is cancelling its tasks after a failure; "
                "no new task is started"
            )
        if self._limit is None:
            return
        while True:
            running = [c for c in self.handles if not c.done]
            if len(running) < self._limit:
                return
            self._wait_some(running)
            if self._cancel_on_error and any(self._failed(c) for c in self.handles):
                self._cancel_rest()
                raise _ScopeCancelled("this ps.children() scope is cancelling its tasks")

    def _wait_some(self, running: list[ClusterChild]) -> None:
        deadlines = [c._deadline for c in running if c._deadline is not None]
        left = _SLICE
        if deadlines:
            left = max(0.001, min(left, min(deadlines) - time.monotonic()))
        wait_futures([c.future for c in running], left, first=True)

    def __enter__(self) -> ClusterChildren:
        if self._entered:
            raise self._entered_twice()
        self._entered = True
        if self._progress:
            from procshare._progress import Bar

            self._bar = Bar(0, "ps.children()", unit="task")
        self._rt.scopes().append(self)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        scopes = self._rt.scopes()
        if scopes and scopes[-1] is self:
            scopes.pop()
        try:
            if exc is not None and not isinstance(exc, Exception | _ScopeCancelled):
                self._cancel_rest()  # Ctrl-C & co: stop the tasks, propagate as it is
                return False
            if isinstance(exc, Exception) and self._cancel_on_error:
                self._cancel_rest()
            self._wait_all()
        except BaseException:
            self._cancel_rest()
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
        errors: list[Exception] = []
        if isinstance(exc, Exception):
            errors.append(exc)
        failed = 0
        for child in self.handles:
            if not child.cancelled:
                err = child.error()
                if err is not None:
                    errors.append(err)
                    failed += 1
        if not errors:
            self._results = self._rt.client.gather([c.future for c in self.handles])
            return isinstance(exc, _ScopeCancelled)
        cancelled = sum(1 for c in self.handles if c.cancelled)
        raise self._failures(errors, failed, len(self.handles), exc, cancelled) from None

    def _wait_all(self) -> None:
        counted: set[int] = set()
        while True:
            running = [c for c in self.handles if not c.done]
            if self._bar is not None:
                self._bar.total(len(self.handles))
                for i, c in enumerate(self.handles):
                    if c.done and i not in counted:
                        counted.add(i)
                        self._bar.item(c.cancelled or c.error() is None)
            failed = any(self._failed(c) for c in self.handles)
            if self._cancel_on_error and not self._cancelling and failed:
                self._cancel_rest()
                continue
            if not running:
                return
            self._wait_some(running)

    def __repr__(self) -> str:
        return (
            f"<ClusterChildren limit={self._limit} cancel_on_error={self._cancel_on_error} "
            f"started={len(self.handles)}>"
        )
