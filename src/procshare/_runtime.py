"""The runtime seam: which engine runs the front end, scoped by ``with ps.cluster():``.

Outside a cluster block nothing here is consulted beyond one integer: the
front-end functions (``forked`` calls, ``children``, ``map``/``imap``/``pool``,
``shared``, ``interprocess_*``) start with

```text
if _runtime.entered and (rt := _runtime.current.get()) is not None:
    return rt.<the same call>(...)
```

so the local path (the engine and the POSIX backend, today's behaviour) pays
one module-attribute load and a truth test. ``entered`` counts the cluster
blocks open in this process, in any thread; the context variable says
whether *this* thread (or asyncio task) is inside one, the way
``ps.namespace()`` is scoped.

The cluster runtime lives in :mod:`procshare._dask`, the only module that
imports ``distributed``; this module never imports it, so ``import
procshare`` and every local program stay free of Dask.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from procshare.errors import MissingDependency

if TYPE_CHECKING:
    from procshare._locks import InterprocessLock
    from procshare._pool import Pool
    from procshare._process import Child, Children
    from procshare._queue import InterprocessQueue
    from procshare._shared import Segment
    from procshare._sync import InterprocessEvent, InterprocessSemaphore

__all__ = ["Runtime", "cluster", "current", "entered"]


class Runtime(Protocol):
    """What a runtime other than the local one implements: the front end's
    public calls, with their arguments already checked where the front end
    checks them. The handles it returns have the methods of the local ones."""

    def fork(  # noqa: PLR0917 - the arguments a @forked call was given
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        timeout: float | None,
        daemon: bool,
    ) -> Child[Any]: ...

    def children(
        self, *, limit: int | None, cancel_on_error: bool, progress: bool
    ) -> Children: ...

    def imap(  # noqa: PLR0917 - the checked arguments of ps.map / ps.imap
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
        what: str,
    ) -> Iterator[Any]: ...

    def pool(
        self,
        workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
    ) -> Pool: ...

    def lock(
        self,
        name: str | None,
        *,
        timeout: float | None,
        reentrant: bool,
        on_owner_death: object,
    ) -> InterprocessLock: ...

    def semaphore(
        self, name: str | int | None, value: int, *, timeout: float | None
    ) -> InterprocessSemaphore: ...

    def event(self, name: str | None) -> InterprocessEvent: ...

    def queue(self, name: str | int | None, maxsize: int) -> InterprocessQueue: ...

    def unsupported(self, what: str) -> Any: ...

    def shared(
        self,
        name: object,
        kind: object,
        *,
        shape: object,
        size: object,
        initial: object,
        create: bool | None,
        persist: bool,
    ) -> Segment: ...

    def unlink(self, name: str) -> bool: ...


#: How many ``ps.cluster()`` blocks are open in this process (any thread):
#: while it is 0 the front end does not even look at ``current``.
entered = 0
_entered_lock = threading.Lock()

#: The runtime of this thread's innermost ``ps.cluster()`` block, if any.
current: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "procshare_runtime", default=None
)


@contextlib.contextmanager
def use(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` the current one for the block (this thread / task)."""
    global entered
    with _entered_lock:
        entered += 1
    token = current.set(runtime)
    try:
        yield runtime
    finally:
        current.reset(token)
        with _entered_lock:
            entered -= 1


def cluster(
    client_or_address: Any, *, timeout: float | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Run the front end on a Dask distributed cluster inside the block.

    ```text
    with ps.cluster("tcp://scheduler:8786"):   # or a distributed.Client
        with ps.children():
            for i in range(100):
                job(i)                          # a @ps.forked function: a Dask task
    ```

    Inside the block (in this thread), ``@ps.forked`` calls become Dask
    tasks (their handles keep ``join``, ``wait``, ``running``, ``kill``),
    ``ps.children()`` keeps its scope rules, ``ps.map`` / ``ps.imap`` /
    ``ps.pool`` run items as tasks, ``ps.interprocess_lock`` /
    ``_semaphore`` / ``_event`` / ``_queue`` are Dask's named ``Lock``,
    ``Semaphore``, ``Event`` and ``Queue``, and ``ps.shared`` of a number,
    attrs or bytes kind is a view kept in a Dask ``Variable``. Tasks run with
    the same runtime, so the function body is unchanged. Outside the block
    nothing changes. See the how-to "From one machine to a cluster" for the
    differences in failure semantics.

    Args:
        client_or_address: a ``distributed.Client`` (used as it is, and left
            open), or a scheduler address (a client is made for the block
            and closed at its end).
        timeout: with an address, seconds to wait for the scheduler to
            answer (default: Dask's ``distributed.comm.timeouts.connect``,
            30 s unless configured). Not accepted with a client.

    Yields:
        The ``distributed.Client`` in use.

    Raises:
        MissingDependency: ``distributed`` is not installed
            (``pip install 'procshare[dask]'``).
        ClusterUnreachable: no scheduler answered at the address in time.
    """
    if timeout is not None:
        # TypeError for what is not a number, as every other timeout= check.
        wrong = f"ps.cluster(timeout=) must be a number of seconds > 0 or None, not {timeout!r}"
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(wrong)
        if not timeout > 0:  # (NaN too)
            raise ValueError(wrong)
    made: contextlib.AbstractContextManager[Any] = _load_dask("ps.cluster()").cluster(
        client_or_address, None if timeout is None else float(timeout)
    )
    return made


def local_cluster(workers: int = 2) -> contextlib.AbstractContextManager[Any]:
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded worker
    processes and a client of it, closed at the end of the ``with`` block."""
    made: contextlib.AbstractContextManager[Any] = _load_dask(
        "a local Dask cluster"
    ).local_cluster(workers)
    return made


def _load_dask(feature: str) -> Any:
    try:
        from procshare import _dask
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in {"dask", "distributed"}:
            raise
        raise MissingDependency(module="distributed", extra="dask", feature=feature) from None
    return _dask
