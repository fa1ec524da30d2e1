"""Front end for pools: ``ps.map``, ``ps.imap`` and ``ps.pool``.

Argument checking, iterators and handles; the workers, their channels and
the scheduling live in :mod:`procshare._engine.pool`.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from procshare import _runtime
from procshare._engine import core as _core
from procshare._engine.children import current_children
from procshare._engine.jobs import Job
from procshare._engine.pool import Core
from procshare._process import _positive_timeout, _release_what_waited
from procshare._progress import Bar, check_progress
from procshare.errors import ChildError, ChildTimeout, JoinTimeout, UsageError

__all__ = ["Pool", "Submitted", "imap", "map", "pool"]

T = TypeVar("T")
R = TypeVar("R")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_workers(workers: object, what: str) -> int:
    if workers is None:
        return _usable_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"{what}(workers=) must be a positive int or None, not {workers!r}")
    if workers < 1:
        raise ValueError(f"{what}(workers=) must be at least 1 (or None: one per CPU)")
    return workers


def _check_chunksize(chunksize: object, what: str) -> int | None:
    if chunksize is None:
        return None
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"{what}(chunksize=) must be a positive int or None, not {chunksize!r}")
    if chunksize < 1:
        raise ValueError(f"{what}(chunksize=) must be at least 1 (or None: chosen for you)")
    return chunksize


def _fn_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _failures(job: Job, what: str) -> ExceptionGroup[ChildError] | None:
    """The job's failures as one group (items in index order), or ``None``."""
    errors: list[ChildError] = [make() for _, make in sorted(job.errors, key=lambda e: e[0])]
    broken = job.core.broken
    if broken is not None and (job.not_run or not job.finished or not errors):
        errors.append(broken())
    if job.timed_out and not any(isinstance(e, ChildTimeout) for e in errors):
        errors.append(
            ChildTimeout(
                "the timeout= of the whole map ran out before all its items ran",
                timeout=job.timeout,
                name=job.name,
            )
        )
    if not errors:
        return None
    total = job.total if job.total is not None else job.next_index
    parts = [f"{job.n_failed} of {total} items failed"]
    if job.timed_out:
        parts.append(f"its timeout of {job.timeout} s ran out with {job.not_run} items not run")
    if broken is not None:
        parts.append("the pool's initializer failed, so the pool is closed")
    return ExceptionGroup(f"{what}({job.name}): " + ", ".join(parts), errors)


def _results(job: Job, what: str, bar: Bar | None) -> Iterator[Any]:
    """Yield ``job``'s values as they come (in order, or as they arrive), then
    raise its failures as one group. Runs the pool while it waits."""
    core = job.core
    failed: set[int] = set()
    next_out = 0
    try:
        while True:
            if job.ordered:
                results = job.results
                while True:
                    if next_out in results:
                        yield results.pop(next_out)
                    elif len(failed) < len(job.errors):
                        failed.update(i for i, _ in job.errors)
                        if next_out not in failed:
                            break
                    elif next_out not in failed:
                        break
                    next_out += 1
            else:
                while job.arrived:
                    yield job.arrived.popleft()[1]
            if job.finished or core.broken is not None:
                break
            core.step(None, job)
        # Whatever is left (items not run leave gaps), in order.
        for index in sorted(job.results):
            yield job.results.pop(index)
        while job.arrived:
            yield job.arrived.popleft()[1]
    finally:
        core.finish(job)
        if bar is not None:
            bar.close()
    group = _failures(job, what)
    if group is not None:
        raise group


def _job(
    core: Core,
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    *,
    star: bool,
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    progress: bool,
    what: str,
) -> tuple[Job, Bar | None]:
    fkey = core.register_function(fn)
    job = Job(
        core,
        fkey,
        _fn_name(fn),
        iterable,
        star=star,
        chunksize=chunksize,
        ordered=ordered,
        timeout=timeout,
        on_item=None,
    )
    bar = None
    if progress:
        bar = Bar(job.total, f"{what}({job.name})")
        job.on_item = bar.item
    core.add(job)
    return job, bar


def _own_pool(  # noqa: PLR0917 - private, called once
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    workers: int,
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    progress: bool,
    what: str,
) -> Iterator[Any]:
    """The generator behind ``ps.map`` and ``ps.imap``: a pool for this call only."""
    core = Core(current_children(), workers=workers, name=f"{what}({_fn_name(fn)})")
    job: Job | None = None
    try:
        job, bar = _job(
            core,
            fn,
            iterable,
            star=False,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            progress=progress,
            what=what,
        )
        if job.total is not None:
            # No more workers than items: each fork costs a millisecond or more.
            core.n_workers = max(1, min(workers, job.total))
        yield from _results(job, what, bar)
    finally:
        # Left early (an imap not read to its end), or by Ctrl-C: cancel what
        # still runs (the engine's terminate path). Either way, reap everyone.
        try:
            core.shutdown(cancel=job is None or not job.finished)
        finally:
            # A call into procshare: releases that waited for these workers go now.
            _release_what_waited()


def map(
    fn: Callable[[T], R],
    iterable: Iterable[T],
    *,
    workers: int | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    progress: bool = False,
) -> list[R]:
    """``[fn(x) for x in iterable]``, run by forked workers; the results in order.

    Workers are forked at the call, so ``fn`` and what it captures need no
    pickling (lambdas, closures, open views and locks work), and a sequence
    (``list``, ``tuple``, ``range``, numpy array) is not sent at all: the
    workers inherited it and index it themselves. Other iterables are
    pickled, item by item, as are the results.

    Args:
        workers: How many worker processes (default: the usable CPUs; never
            more than there are items).
        chunksize: Items sent to a worker at a time (default: chosen for you,
            so both many tiny items and a few slow ones are fast).
        ordered: ``False`` gives the results in completion order.
        timeout: Seconds the whole map may take; then the running items fail
            with :class:`~procshare.ChildTimeout` (their workers are cancelled
            and reaped) and the items not started are not run.
        progress: Show a progress bar on stderr with done and failed counts
            (needs ``pip install 'procshare[progress]'``).

    Raises:
        ExceptionGroup: after every item ran, one group holding every item's
            failure: :class:`~procshare.ChildRaised` for an item that raised,
            :class:`~procshare.ChildKilled` for the item a worker was running
            when a signal killed it (the worker is replaced and the map goes
            on), :class:`~procshare.ChildTimeout` for ``timeout``.
    """
    return builtins.list(
        _start(fn, iterable, workers, chunksize, ordered, timeout, progress, "ps.map")
    )


def imap(
    fn: Callable[[T], R],
    iterable: Iterable[T],
    *,
    workers: int | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    progress: bool = False,
) -> Iterator[R]:
    """The lazy form of :func:`map`: an iterator of the results as they are ready.

    Workers start at the first ``next()``; items are taken from ``iterable``
    as workers need them, so it can be endless. With ``ordered=False`` the
    results come in completion order. Items that failed are left out; their
    failures are raised together as one ``ExceptionGroup`` when the iterator
    ends. Leaving it early (``break``, ``close()``, or dropping it) cancels
    what still runs and reaps the workers. A sequence is read as it was when
    the workers were forked (at the first ``next()``): changing it while the
    iterator runs changes nothing in the workers.
    """
    return _start(fn, iterable, workers, chunksize, ordered, timeout, progress, "ps.imap")


def _start(  # noqa: PLR0917 - private: the checked arguments of map() and imap()
    fn: Callable[[T], R],
    iterable: Iterable[T],
    workers: int | None,
    chunksize: int | None,
    ordered: bool,
    timeout: float | None,
    progress: bool,
    what: str,
) -> Iterator[R]:
    if not callable(fn):
        raise TypeError(f"{what}() needs a callable first, not {fn!r}")
    n = _check_workers(workers, what)
    size = _check_chunksize(chunksize, what)
    limit = _positive_timeout(timeout, f"{what}(timeout=)")
    show = check_progress(progress, what)
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.imap(fn, iterable, size, bool(ordered), limit, show, what)
    return _own_pool(fn, iterable, n, size, bool(ordered), limit, show, what)


class Submitted(Generic[R]):
    """Handle of one :meth:`Pool.submit` call: ``join()`` gives ``fn(*args)``."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self.joined = False

    @property
    def done(self) -> bool:
        """Whether the call has ended (it does not wait, and runs nothing)."""
        return self._job.finished

    def join(self, timeout: float | None = None) -> R:
        """Wait for the call and return its value, as :meth:`Child.join` does.

        Raises:
            JoinTimeout: ``timeout`` seconds passed; the call goes on.
            ChildRaised / ChildKilled / ...: the call failed (see :func:`map`).
        """
        limit = _positive_timeout(timeout, "join(timeout=)")
        job = self._job
        core = job.core
        deadline = None if limit is None else time.monotonic() + limit
        while not job.finished and core.broken is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise JoinTimeout(
                    "a call submitted to a ps.pool; join() again to keep waiting",
                    name=job.item_name(0),
                    timeout=limit,
                )
            if core.closed:
                break
            core.step(deadline, job)
        self.joined = True
        core.finish(job)
        if job.errors:
            raise job.errors[0][1]()
        if 0 in job.results:
            return job.results[0]  # type: ignore[no-any-return]
        if core.broken is not None:
            raise core.broken()
        raise UsageError(
            f"{job.item_name(0)} never ran: its pool was closed (its block ended by an "
            "exception) before a worker took it; join() before the block ends"
        )

    def __repr__(self) -> str:
        return f"<Submitted {self._job.item_name(0)} done={self.done}>"


class PoolMethods:
    """The public methods of a pool wherever it runs (:class:`Pool` here, the
    cluster's ``ClusterPool``): their signatures, documentation and argument
    checks, written once. A subclass says whether it can be used now
    (``_live``) and runs the checked calls (``_imap``; ``submit``)."""

    _workers: int

    @property
    def workers(self) -> int:
        """How many worker processes the pool runs."""
        return self._workers

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        progress: bool = False,
    ) -> list[R]:
        """:func:`procshare.map` on this pool's workers."""
        return builtins.list(
            self._checked(fn, iterable, chunksize, ordered, timeout, progress, "pool.map")
        )

    def imap(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """:func:`procshare.imap` on this pool's workers.

        A function the workers were not forked with is sent pickled (a
        module-level function pickles as its name); one that does not pickle
        (a lambda or closure made after the pool's first call) makes the pool
        replace its workers with fresh forks, which run ``initializer`` again.
        A sequence is sent pickled, unless the workers are forked after it.
        """
        return self._checked(fn, iterable, chunksize, ordered, timeout, progress, "pool.imap")

    def _checked(  # noqa: PLR0917 - private: the arguments of map() and imap()
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
        what: str,
    ) -> Iterator[R]:
        self._check_call(what, fn)
        size = _check_chunksize(chunksize, what)
        limit = _positive_timeout(timeout, f"{what}(timeout=)")
        show = check_progress(progress, what)
        return self._imap(fn, iterable, size, bool(ordered), limit, show, what)

    def _check_call(self, what: str, fn: object) -> None:
        """``pool.<what>(fn, ...)`` may run: the pool is usable here, ``fn`` is callable."""
        self._live(what)
        if not callable(fn):
            raise TypeError(f"{what}() needs a callable first, not {fn!r}")

    def _live(self, what: str) -> object:
        """Raise ``UsageError`` if ``pool.<what>()`` cannot run now (outside the block...)."""
        raise NotImplementedError

    def _imap(  # noqa: PLR0917 - the checked arguments of map() and imap()
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
        what: str,
    ) -> Iterator[R]:
        raise NotImplementedError


def outside_block(what: str) -> UsageError:
    """The error of a pool used outside its ``with`` block."""
    return UsageError(
        f"{what}() outside its `with ps.pool() as pool:` block; "
        "use the pool inside the block, or make a new one"
    )


def unjoined(errors: list[Exception]) -> ExceptionGroup[Exception]:
    """The error of a pool's exit: the failures of the submitted calls nobody joined."""
    return ExceptionGroup(
        f"ps.pool: {len(errors)} submitted calls failed and were not joined", errors
    )


class Pool(PoolMethods):
    """Forked workers kept for many calls: returned by :func:`pool`.

    A pool belongs to the process, and is meant for the thread, that made it:
    its calls are not thread-safe (use one pool per thread).
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
    ) -> None:
        self._workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._core: Core | None = None
        self._submitted: list[Submitted[Any]] = []

    def _live(self, what: str) -> Core:
        core = self._core
        if core is None or core.closed:
            raise outside_block(what)
        if core.part.engine.pid != _core.current_pid():
            raise UsageError(
                f"{what}() in a process that inherited the pool through a fork; "
                "only the process that made it can use it (make a new pool here)"
            )
        return core

    def _imap(  # noqa: PLR0917 - the checked arguments of map() and imap()
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
        what: str,
    ) -> Iterator[R]:
        job, bar = _job(
            self._live(what),
            fn,
            iterable,
            star=False,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            progress=progress,
            what=what,
        )
        return self._iterate(job, what, bar)

    def _iterate(self, job: Job, what: str, bar: Bar | None) -> Iterator[Any]:
        done = False
        try:
            yield from _results(job, what, bar)
            done = True
        finally:
            if not done and not job.finished:
                job.core.cancel(job)  # left early: stop its items, replace those workers

    def submit(self, fn: Callable[..., R], *args: Any) -> Submitted[R]:
        """Run ``fn(*args)`` on a worker; returns a handle whose ``join()`` gives the
        value. The pool's exit waits for every submitted call, and raises the
        failures of those nobody joined as one ``ExceptionGroup``."""
        self._check_call("pool.submit", fn)
        core = self._live("pool.submit")
        fkey = core.register_function(fn)
        job = Job(
            core,
            fkey,
            _fn_name(fn),
            [args],
            star=True,
            chunksize=1,
            ordered=True,
            timeout=None,
            on_item=None,
        )
        core.add(job)
        handle: Submitted[R] = Submitted(job)
        self._submitted.append(handle)
        core.fill()
        return handle

    def __enter__(self) -> Pool:
        if self._core is not None:
            raise UsageError("a ps.pool() can be entered only once; make a new one")
        self._core = Core(
            current_children(),
            workers=self._workers,
            name="ps.pool",
            initializer=self._initializer,
            initargs=self._initargs,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        core = self._core
        assert core is not None
        if exc is not None:
            # The block failed (or Ctrl-C): stop what runs, reap, propagate.
            try:
                core.shutdown(cancel=True)
            finally:
                _release_what_waited()
            return
        try:
            while any(not h._job.finished for h in self._submitted) and core.broken is None:
                core.step(None)
        except BaseException:
            core.shutdown(cancel=True)
            _release_what_waited()
            raise
        # An imap left unfinished in the block: nobody will read the rest.
        core.shutdown(cancel=any(not j.finished for j in core.jobs))
        _release_what_waited()
        errors: list[Exception] = []
        for h in self._submitted:
            if not h.joined:
                errors += [make() for _, make in h._job.errors]
        if core.broken is not None and not errors:
            errors.append(core.broken())
        if errors:
            raise unjoined(errors)

    def __repr__(self) -> str:
        state = "new" if self._core is None else ("closed" if self._core.closed else "open")
        return f"<Pool workers={self._workers} {state}>"


def pool(
    workers: int | None = None,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Pool:
    """Forked workers kept for many ``pool.map`` / ``pool.imap`` / ``pool.submit`` calls.

    Use it as ``with ps.pool(workers=4) as pool:``. Workers are forked at the
    pool's first call (so they inherit what exists by then: the function,
    a sequence, open views and locks) and run ``initializer(*initargs)``
    first. A worker killed mid-item fails that item and is replaced. Leaving
    the block waits for submitted calls, then lets every worker go and reaps
    it; leaving it by an exception or Ctrl-C cancels what still runs.

    Args:
        workers: How many worker processes (default: the usable CPUs).
        initializer: Called in each worker when it starts. If it raises, the
            pool is closed and its calls fail with that error.
        initargs: Arguments for ``initializer``.
    """
    n = _check_workers(workers, "ps.pool")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"ps.pool(initializer=) must be callable or None, not {initializer!r}")
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.pool(n, initializer, tuple(initargs))
    return Pool(n, initializer, tuple(initargs))
