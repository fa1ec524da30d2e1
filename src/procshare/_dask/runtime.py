"""The runtime of a ``with ps.cluster():`` block, in the client and in its tasks."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import distributed

from procshare import _runtime
from procshare._engine import names
from procshare.errors import ClusterUnreachable, NotOnCluster

#: Runtimes of the blocks whose tasks ran in this (worker) process, by block id.
_in_workers: dict[str, DaskRuntime] = {}
_in_workers_lock = threading.Lock()


class DaskRuntime:
    """Runs the front end on ``client`` (``None`` in a task: the worker's client).

    ``block`` names the ``ps.cluster()`` block: the tasks it starts run with
    a runtime of the same block, which reports the segments they create so
    that the block's end removes what a dead task left.
    """

    def __init__(self, client: distributed.Client | None, block: str) -> None:
        self._client = client
        self.block = block
        self._local = threading.local()  # the open children() scopes of each thread

    @property
    def client(self) -> distributed.Client:
        client = self._client
        if client is None:
            # In a task: the worker's own client (made once per worker process).
            client = self._client = distributed.get_client()
        return client

    @property
    def in_task(self) -> bool:
        """Whether this runtime runs inside a task (on a worker)."""
        try:
            distributed.get_worker()
        except ValueError:
            return False
        return True

    def dask_name(self, kind: str, name: str) -> str:
        """The Dask name of procshare object ``name``: namespace and kind included,
        so two namespaces (and a lock and a segment of one name) never meet."""
        return f"procshare/{names.current_namespace()}/{kind}/{name}"

    def context(self) -> tuple[str, str]:
        """What a task needs to run as its caller: the namespace and the block."""
        return (names.current_namespace(), self.block)

    def scopes(self) -> list[Any]:
        stack: list[Any] | None = getattr(self._local, "scopes", None)
        if stack is None:
            stack = self._local.scopes = []
        return stack

    # ---------------------------------------------------------------- processes

    def fork(  # noqa: PLR0917 - the arguments a @forked call was given
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        timeout: float | None,
        daemon: bool,
    ) -> Any:
        from procshare._dask import tasks

        return tasks.fork(self, fn, args, kwargs, name, timeout)

    def children(self, *, limit: int | None, cancel_on_error: bool, progress: bool) -> Any:
        from procshare._dask import tasks

        return tasks.ClusterChildren(self, limit, cancel_on_error, progress)

    # ---------------------------------------------------------------- pools

    def imap(  # noqa: PLR0917 - the checked arguments of ps.map / ps.imap
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
        what: str,
    ) -> Iterator[Any]:
        from procshare._dask import pool

        return pool.imap(self, fn, iterable, chunksize, ordered, timeout, progress, what)

    def pool(
        self,
        workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
    ) -> Any:
        from procshare._dask import pool

        return pool.ClusterPool(self, workers, initializer, initargs)

    # ---------------------------------------------------------------- sync

    def lock(
        self,
        name: str | None,
        *,
        timeout: float | None,
        reentrant: bool,
        on_owner_death: object,
    ) -> Any:
        from procshare._dask import sync

        if name is None:
            raise NotOnCluster(
                "an anonymous lock (ps.interprocess_lock() without a name)",
                "give it a name, ps.interprocess_lock('NAME'): tasks on other hosts open "
                "it by name",
            )
        return sync.ClusterLock(self, name, timeout=timeout, reentrant=reentrant)

    def semaphore(self, name: object, value: int, *, timeout: float | None) -> Any:
        from procshare._dask import sync

        return sync.ClusterSemaphore(self, _named(name, "semaphore"), value, timeout=timeout)

    def event(self, name: object) -> Any:
        from procshare._dask import sync

        return sync.ClusterEvent(self, _named(name, "event"))

    def queue(self, name: object, maxsize: int) -> Any:
        from procshare._dask import sync

        return sync.ClusterQueue(self, _named(name, "queue"), maxsize)

    def unsupported(self, what: str) -> Any:
        from procshare._dask import sync

        raise sync.unsupported(what)

    # ---------------------------------------------------------------- shared data

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
    ) -> Any:
        from procshare._dask import shared

        return shared.open_segment(self, name, kind, shape, size, initial, create, persist)

    def unlink(self, name: str) -> bool:
        from procshare._dask import shared

        return shared.unlink(self, name)

    def finish(self) -> None:
        """At the block's end: remove the segments its tasks created and left."""
        from procshare._dask import shared

        shared.remove_left_by_tasks(self)


# One Dask object per (client, name) in a process: a by-name lock in a loop
# registers with the scheduler once; the Dask lock's lease stays refreshed.
_objects: dict[tuple[str, str, str], Any] = {}
_objects_lock = threading.Lock()


def dask_object(rt: DaskRuntime, kind: str, name: str, make: Callable[[], Any]) -> Any:
    key = (rt.client.id, kind, name)
    obj = _objects.get(key)
    if obj is None:
        with _objects_lock:
            obj = _objects.get(key)
            if obj is None:
                obj = _objects[key] = make()
    return obj


def _named(name: object, what: str) -> str:
    """``name``, or ``NotOnCluster`` for the anonymous form (no name, or a
    number where the name goes: ``ps.interprocess_semaphore(3)``)."""
    if isinstance(name, str):
        return name
    raise NotOnCluster(
        f"an anonymous {what} (ps.interprocess_{what}() without a name)",
        f"give it a name, ps.interprocess_{what}('NAME', ...): tasks on other hosts open "
        "it by name",
    )


def worker_runtime(block: str) -> DaskRuntime:
    """The runtime tasks of ``block`` run with in this worker process."""
    rt = _in_workers.get(block)
    if rt is None:
        with _in_workers_lock:
            rt = _in_workers.setdefault(block, DaskRuntime(None, block))
    return rt


@contextlib.contextmanager
def cluster(client_or_address: Any, timeout: float | None = None) -> Iterator[distributed.Client]:
    """``ps.cluster()``: see :func:`procshare._runtime.cluster`."""
    own = None
    if isinstance(client_or_address, distributed.Client):
        if timeout is not None:
            raise TypeError(
                "ps.cluster(client, timeout=...): the timeout is how long to wait for the "
                "scheduler at an address; a distributed.Client is already connected"
            )
        client = client_or_address
    elif isinstance(client_or_address, str):
        try:
            client = own = distributed.Client(
                client_or_address,
                set_as_default=False,
                **({} if timeout is None else {"timeout": timeout}),
            )
        except OSError as exc:  # Dask's OSError / TimeoutError: nothing answered
            _stop_loop_of_failed_client(exc)
            raise ClusterUnreachable(client_or_address, timeout, str(exc)) from exc
    else:
        raise TypeError(
            "ps.cluster() takes a distributed.Client or a scheduler address such as "
            f"'tcp://10.0.0.5:8786', not {client_or_address!r}"
        )
    try:
        rt = DaskRuntime(client, f"b{uuid.uuid4().hex[:16]}")
        with _runtime.use(cast(_runtime.Runtime, rt)):
            try:
                yield client
            finally:
                rt.finish()
    finally:
        if own is not None:
            own.close()


def _stop_loop_of_failed_client(exc: BaseException) -> None:
    """Stop the IO loop thread of a ``Client`` whose constructor failed.

    distributed starts the client's loop thread before it connects and
    leaves it running when the connection fails (the caller never gets the
    object to close). The half-made client is ``self`` in a frame of the
    traceback; its loop runner is stopped as ``Client.close`` would.
    """
    tb = exc.__traceback__
    while tb is not None:
        made = tb.tb_frame.f_locals.get("self")
        if isinstance(made, distributed.Client):
            with contextlib.suppress(Exception):
                made._loop_runner.stop()
            return
        tb = tb.tb_next


@contextlib.contextmanager
def local_cluster(workers: int = 2) -> Iterator[distributed.Client]:
    """A ``LocalCluster`` of ``workers`` single-threaded worker processes and its
    client, closed at the end (what ``python -m procshare demo --cluster`` uses)."""
    with (
        distributed.LocalCluster(
            n_workers=workers,
            processes=True,
            threads_per_worker=1,
            dashboard_address=":0",  # any free port: never "8787 is in use"
        ) as lc,
        distributed.Client(lc, set_as_default=False) as client,
    ):
        yield client
