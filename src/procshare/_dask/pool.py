"""``ps.map`` / ``ps.imap`` / ``ps.pool`` on the cluster: items as Dask tasks.

Without ``chunksize`` each item is one task, as ``client.map`` makes them
(a sized iterable is submitted in one ``client.map``-style batch; any other
is fed as tasks finish, so it may be endless). With ``chunksize=N`` a task
runs N items and reports each one's outcome. Failures are the one-host
ones: ``ChildRaised`` matching the item's exception, ``ChildKilled`` (a
:class:`~procshare.errors.WorkerDied`) for an item whose worker died, and
``ChildTimeout`` for what the ``timeout=`` stopped; all raised together as
one ``ExceptionGroup`` after the results.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import distributed

from procshare import _runtime
from procshare._dask import tasks
from procshare._dask.runtime import DaskRuntime, worker_runtime
from procshare._engine import names
from procshare._pool import PoolMethods, _fn_name, outside_block, unjoined
from procshare.errors import ChildError, ChildTimeout, JoinTimeout, UsageError

#: Items in flight for an iterable of unknown length, per worker thread.
_WINDOW_PER_THREAD = 4
#: Longest single wait, so that Ctrl-C and the timeout are seen.
_SLICE = 0.2


def run_chunk(
    fn: Callable[[Any], Any], items: list[Any], ctx: tuple[str, str]
) -> list[tuple[bool, Any, str]]:
    """A task of ``chunksize`` items: each one's ``(ok, value or exception, traceback)``."""
    import traceback

    namespace, block = ctx
    out: list[tuple[bool, Any, str]] = []
    with _runtime.use(worker_runtime(block)), names.use_namespace(namespace):
        for item in items:
            try:
                out.append((True, fn(item), ""))
            except Exception as exc:
                frames = traceback.extract_tb(exc.__traceback__)[1:]  # not run_chunk's own
                out.append((False, exc, "".join(traceback.format_list(frames))))
    return out


class _Task:
    """One submitted task: items ``start .. start+count-1``."""

    __slots__ = ("count", "future", "start")

    def __init__(self, future: distributed.Future[Any], start: int, count: int) -> None:
        self.future = future
        self.start = start
        self.count = count


def _submit(
    rt: DaskRuntime, fn: Callable[[Any], Any], batch: list[Any], start: int, chunked: bool
) -> list[_Task]:
    """Submit ``batch`` (items from index ``start``): one task per item, or one chunk."""
    client = rt.client
    ctx = rt.context()
    name = _fn_name(fn)
    if chunked:
        key = tasks.task_key(f"{name}-chunk")
        fut = client.submit(run_chunk, fn, batch, ctx, key=key, pure=False)
        return [_Task(fut, start, len(batch))]
    keys = [tasks.task_key(name) for _ in batch]
    # The shape of client.map(fn, items): one argument per task, the function
    # (with the caller's context) as the task's callable.
    futs = client.map(tasks.InContext(fn, ctx), batch, key=keys, pure=False)
    return [_Task(f, start + i, 1) for i, f in enumerate(futs)]


def imap(  # noqa: PLR0917 - the checked arguments of ps.map / ps.imap
    rt: DaskRuntime,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any],
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    progress: bool,
    what: str,
) -> Iterator[Any]:
    """The iterator of ``ps.imap`` (and, listed, ``ps.map``) on the cluster."""
    bar = None
    if progress:
        from procshare._progress import Bar

        bar = Bar(None, what, unit="item")
    return _results(rt, fn, iterable, chunksize, ordered, timeout, bar, what)


def _results(  # noqa: PLR0917
    rt: DaskRuntime,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any],
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    bar: Any,
    what: str,
) -> Iterator[Any]:
    name = _fn_name(fn)
    # ps.map and pool.map (a list, in order, no bar): nothing is yielded before
    # the end anyway, so wait for every item and fetch them all at once.
    whole = (
        what in {"ps.map", "pool.map"} and ordered and bar is None and hasattr(iterable, "__len__")
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    chunk = chunksize or 1
    chunked = chunksize is not None and chunksize > 1
    source = iter(iterable)
    sized = hasattr(iterable, "__len__")
    if sized:
        window = None  # all at once, as client.map does
    else:
        threads = sum(rt.client.nthreads().values()) or 1
        window = threads * _WINDOW_PER_THREAD
    pending: deque[_Task] = deque()  # in submission order
    next_index = 0
    exhausted = False
    errors: dict[int, ChildError] = {}
    ready: dict[int, Any] = {}  # ordered: results waiting for their turn
    next_out = 0
    total_failed = 0
    timed_out = False

    def feed() -> None:
        nonlocal next_index, exhausted
        while not exhausted and (window is None or len(pending) < window):
            if chunked:
                want = chunk
            elif window is None:
                want = 10**12  # a sized iterable: every item now, as client.map does
            else:
                want = window - len(pending)
            batch = list(itertools.islice(source, want))
            if not batch:
                exhausted = True
                return
            pending.extend(_submit(rt, fn, batch, next_index, chunked))
            next_index += len(batch)
        if bar is not None:
            bar.total(next_index)

    def settle(done: list[_Task]) -> list[tuple[int, bool, Any]]:
        """The outcomes of finished tasks' items, ``(index, ok, value or error)``;
        the values of all of them fetched in one ``gather``, as ``client.map``
        users do (one round trip per item would double the cost)."""
        finished = [t for t in done if t.future.status == "finished"]
        values = rt.client.gather([t.future for t in finished]) if finished else []
        out: list[tuple[int, bool, Any]] = []
        for task, value in zip(finished, values, strict=True):
            if not chunked:
                out.append((task.start, True, value))
                continue
            for off, (ok, got, tb) in enumerate(value):
                index = task.start + off
                if ok:
                    out.append((index, True, got))
                else:
                    out.append((index, False, tasks.raised(got, None, f"{name}[{index}]", tb)))
        for task in done:
            if task.future.status != "finished":
                err = tasks.task_error(task.future, f"{name}[{task.start}]")
                out += [(task.start + off, False, err) for off in range(task.count)]
        out.sort(key=lambda o: o[0])
        return out

    try:
        feed()
        while pending or not exhausted:
            if not pending:
                feed()
                continue
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                for task in pending:
                    task.future.cancel()
                    for off in range(task.count):
                        index = task.start + off
                        errors[index] = ChildTimeout(
                            "the timeout= of the whole map ran out before this item ended "
                            "(its Dask task was cancelled)",
                            timeout=timeout,
                            pid=None,
                            name=f"{name}[{index}]",
                        )
                pending.clear()
                break
            done = [t for t in pending if t.future.done()]
            if not done or (whole and len(done) < len(pending)):
                left = _SLICE if deadline is None else deadline - time.monotonic()
                left = max(0.001, min(left, _SLICE))
                if whole:
                    # ps.map wants the list: wait for all, then one gather, as
                    # client.gather(client.map(...)) does.
                    tasks.wait_futures([t.future for t in pending], left)
                    continue
                # Tasks end about in submission order: watch the oldest ones.
                watch = [t.future for t in itertools.islice(pending, 1 if ordered else 64)]
                tasks.wait_futures(watch, left, first=True)
                continue
            taken = set(map(id, done))
            pending = deque(t for t in pending if id(t) not in taken)
            for index, ok, value in settle(done):
                if bar is not None:
                    bar.item(ok)
                if not ok:
                    errors[index] = value
                    total_failed += 1
                elif ordered:
                    ready[index] = value
                else:
                    yield value
            if ordered:
                while next_out in ready or next_out in errors:
                    if next_out in ready:
                        yield ready.pop(next_out)
                    next_out += 1
            feed()
        for index in sorted(ready):
            yield ready.pop(index)
    finally:
        for task in pending:  # left early (break, close): stop what is left
            task.future.cancel()
        if bar is not None:
            bar.close()
    if errors:
        parts = [f"{total_failed} of {next_index} items failed"]
        if timed_out:
            parts.append(f"its timeout of {timeout} s ran out")
        raise ExceptionGroup(
            f"{what}({name}): " + ", ".join(parts), [errors[i] for i in sorted(errors)]
        )


class ClusterSubmitted:
    """Handle of one ``pool.submit`` on the cluster: ``join()`` gives ``fn(*args)``."""

    def __init__(self, child: tasks.ClusterChild) -> None:
        self._child = child
        self.joined = False

    @property
    def done(self) -> bool:
        return self._child.done

    def join(self, timeout: float | None = None) -> Any:
        try:
            value = self._child.join(timeout)
        except JoinTimeout:
            raise
        except BaseException:
            self.joined = True
            raise
        self.joined = True
        return value

    def __repr__(self) -> str:
        return f"<ClusterSubmitted {self._child.name!r} {'done' if self.done else 'running'}>"


class ClusterPool(PoolMethods):
    """``ps.pool()`` on the cluster: the cluster's workers are the pool.

    ``workers`` is kept for the signature (the cluster decides how many run);
    ``initializer(*initargs)`` runs once on every worker connected when the
    block starts (``client.run``); if it raises, entering the block raises.
    ``map`` and ``imap``, with their argument checks, are the local pool's.
    """

    def __init__(
        self,
        rt: DaskRuntime,
        workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
    ) -> None:
        self._rt = rt
        self._workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._open: bool | None = None
        self._submitted: list[ClusterSubmitted] = []

    def _live(self, what: str) -> None:
        if not self._open:
            raise outside_block(what)

    def _imap(  # noqa: PLR0917 - the checked arguments of map() and imap()
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
        what: str,
    ) -> Iterator[Any]:
        return imap(self._rt, fn, iterable, chunksize, ordered, timeout, progress, what)

    def submit(self, fn: Callable[..., Any], *args: Any) -> ClusterSubmitted:
        self._check_call("pool.submit", fn)
        rt = self._rt
        name = _fn_name(fn)
        future = rt.client.submit(
            tasks.run_task, fn, args, {}, rt.context(), key=tasks.task_key(name), pure=False
        )
        handle = ClusterSubmitted(tasks.ClusterChild(rt, future, name, None))
        self._submitted.append(handle)
        return handle

    def __enter__(self) -> ClusterPool:
        if self._open is not None:
            raise UsageError("a ps.pool() can be entered only once; make a new one")
        if self._initializer is not None:
            client = self._rt.client
            try:
                client.run(self._initializer, *self._initargs)
            except Exception as exc:
                raise tasks.raised(exc, exc.__traceback__, "ps.pool initializer") from None
        self._open = True
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._open = False
        if exc is not None:
            for h in self._submitted:
                h._child.kill()
            return
        errors: list[Exception] = []
        for h in self._submitted:
            h._child.wait_done(None)
            if not h.joined:
                err = h._child.error()
                if err is not None:
                    errors.append(err)
        if errors:
            raise unjoined(errors)

    def __repr__(self) -> str:
        state = {None: "new", True: "open", False: "closed"}[self._open]
        return f"<ClusterPool (Dask) {state}>"
