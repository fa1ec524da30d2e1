"""Locks, semaphores, events and queues of the cluster: Dask's named objects.

``ps.interprocess_lock("m")`` in a ``ps.cluster()`` block is Dask's
``Lock("procshare/<namespace>/lock/m")``, and so on for ``Semaphore``,
``Event`` and ``Queue``; every process of the block (the client and each
task) opening the same name meets the same object. The wrappers add what
procshare promises on top of Dask's: ownership by thread (releasing a lock
you do not hold is a ``UsageError``), ``reentrant=``, timeouts that raise
``LockTimeout`` / ``WaitTimeout`` in ``with``, ``queue.Empty`` /
``queue.Full`` as ``QueueEmpty`` / ``QueueFull``, items of any picklable
type, and the coherence of shared views (taking a lock or a semaphore makes
the views read fresh; releasing it publishes what was written under it).
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import distributed

from procshare._dask import shared
from procshare._dask.runtime import DaskRuntime, dask_object
from procshare._engine.names import validate_name
from procshare._locks import Decorates, LockMethods
from procshare.errors import (
    LockTimeout,
    NotOnCluster,
    QueueEmpty,
    QueueFull,
    SharedTypeError,
    UsageError,
    WaitTimeout,
)

_INSTEAD = {
    "condition": (
        "Dask has no condition variable. Wait for a ps.interprocess_event('NAME') (set() by "
        "the producer, clear() by whoever consumes), or pass work through a "
        "ps.interprocess_queue('NAME')"
    ),
    "barrier": (
        "Dask has no barrier. Let the parties end and join them (ps.children() waits for "
        "all its tasks), or count arrivals with a ps.interprocess_queue and release them "
        "with a ps.interprocess_event"
    ),
    "rwlock": (
        "Dask has no reader-writer lock. Use ps.interprocess_lock('NAME') for readers and "
        "writers alike (readers then take turns), or ps.interprocess_semaphore('NAME', N) "
        "to let N readers in at once"
    ),
}


def unsupported(what: str) -> NotOnCluster:
    """The error for a primitive that has no Dask counterpart."""
    return NotOnCluster(f"ps.interprocess_{what}()", _INSTEAD[what])


class _Owners:
    """Which thread of this process holds which lock, and how many times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, tuple[int, int]] = {}  # dask name -> (thread, count)


_owners = _Owners()


class ClusterLock(LockMethods):
    """``ps.interprocess_lock(name)`` on the cluster (a Dask ``Lock``).

    Same use as on one host: ``with``, a decorator, ``acquire(timeout)`` /
    ``release()`` / ``locked()``. The differences: a holder that dies is not
    reported (no ``OwnerDied``): Dask gives its lock to the next acquirer
    once the dead holder's lease expires (``distributed.scheduler.locks.
    lease-timeout``, 30 s by default), and the shared views it was writing
    under the lock keep what was published before it took the lock.
    ``on_owner_death=`` is accepted and never called; ``mark_consistent()``
    does nothing. Its properties and decorator are the local lock's
    (:class:`~procshare._locks.LockMethods`).
    """

    def __init__(
        self, rt: DaskRuntime, name: str, *, timeout: float | None, reentrant: bool
    ) -> None:
        validate_name(name)
        self._name = name
        self._dname = rt.dask_name("lock", name)
        client = rt.client
        self._lock: distributed.Lock = dask_object(
            rt,
            "lock",
            self._dname,
            lambda: distributed.Lock(
                self._dname, scheduler_rpc=client.scheduler, loop=client.loop
            ),
        )
        self._timeout = timeout
        self._reentrant = reentrant
        self._closed = False

    def _is_closed(self) -> bool:
        return self._closed

    def owned(self) -> bool:
        """Whether the calling thread holds it."""
        held = _owners.held.get(self._dname)
        return held is not None and held[0] == threading.get_ident()

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock; ``False`` if ``timeout`` seconds pass first."""
        if self._closed:
            raise UsageError(f"lock {self._name!r} was used after close(); open it again")
        me = threading.get_ident()
        held = _owners.held.get(self._dname)
        if held is not None and held[0] == me:
            if self._reentrant:
                _owners.held[self._dname] = (me, held[1] + 1)
                return True
            if timeout is None:
                raise UsageError(
                    f"lock {self._name!r} is already held by this thread and is not "
                    "reentrant: acquiring it again would wait forever. Release it first, "
                    "or open it with reentrant=True"
                )
            return False
        if not self._lock.acquire(timeout=timeout):
            return False
        with _owners.lock:
            _owners.held[self._dname] = (me, 1)
        shared.coherence.acquired()
        return True

    def release(self) -> None:
        """Release the lock; the calling thread must hold it (else ``UsageError``)."""
        me = threading.get_ident()
        held = _owners.held.get(self._dname)
        if held is None or held[0] != me:
            raise UsageError(
                f"cannot release lock {self._name!r}: the calling thread does not hold it"
            )
        if held[1] > 1:
            _owners.held[self._dname] = (me, held[1] - 1)
            return
        try:
            shared.coherence.releasing()  # publish what was written under it first
        finally:
            with _owners.lock:
                del _owners.held[self._dname]
            self._lock.release()
            shared.coherence.released()

    def locked(self) -> bool:
        """Whether anyone holds it now."""
        return bool(self._lock.locked())

    def mark_consistent(self) -> None:
        """Nothing to confirm on the cluster: no ``OwnerDied`` is ever raised."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> ClusterLock:
        if not self.acquire(self._timeout):
            raise LockTimeout(self._name, timeout=self._timeout)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_lock, (self._name, self._timeout, self._reentrant))

    def __repr__(self) -> str:
        return f"<ClusterLock {self._name!r} (Dask Lock {self._dname!r})>"


def _reopen_lock(name: str, timeout: float | None, reentrant: bool) -> Any:
    import procshare as ps

    return ps.interprocess_lock(name, timeout=timeout, reentrant=reentrant)


class ClusterSemaphore(Decorates):
    """``ps.interprocess_semaphore(name, value)`` on the cluster (a Dask ``Semaphore``).

    Units held by a task whose worker dies come back when its lease expires;
    nobody is told (no ``HolderDied``).
    """

    def __init__(self, rt: DaskRuntime, name: str, value: int, *, timeout: float | None) -> None:
        validate_name(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"semaphore value must be a positive int, not {value!r}")
        self._name = name
        self._dname = rt.dask_name("semaphore", name)
        self._timeout = timeout
        self._value = value
        client = rt.client
        sem = dask_object(
            rt,
            f"semaphore{value}",
            self._dname,
            lambda: distributed.Semaphore(
                max_leases=value,
                name=self._dname,
                scheduler_rpc=client.scheduler,
                loop=client.loop,
            ),
        )
        try:
            sem.register()
        except ValueError as exc:  # "Inconsistent max leases"
            raise SharedTypeError(
                name, f"a semaphore of {value}", "a semaphore of another value", str(exc)
            ) from None
        self._sem: distributed.Semaphore = sem

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> int:
        """Units available now."""
        return self._value - int(self._sem.get_value())

    def acquire(self, timeout: float | None = None) -> bool:
        if not self._sem.acquire(timeout=timeout):
            return False
        shared.coherence.acquired()
        return True

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            shared.coherence.releasing()
            try:
                self._sem.release()
            except RuntimeError as exc:
                raise UsageError(
                    f"cannot release semaphore {self._name!r}: this process holds no unit "
                    f"of it ({exc})"
                ) from None
            shared.coherence.released()

    def close(self) -> None:
        pass

    def __enter__(self) -> ClusterSemaphore:
        if not self.acquire(self._timeout):
            raise WaitTimeout(self._name, "semaphore", self._timeout)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<ClusterSemaphore {self._name!r} value={self._value} (Dask)>"


class ClusterEvent:
    """``ps.interprocess_event(name)`` on the cluster (a Dask ``Event``)."""

    def __init__(self, rt: DaskRuntime, name: str) -> None:
        validate_name(name)
        self._name = name
        self._event = distributed.Event(rt.dask_name("event", name), client=rt.client)

    @property
    def name(self) -> str:
        return self._name

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return bool(self._event.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._event.wait(timeout))

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ClusterEvent {self._name!r} (Dask)>"


# Dask's own timed Queue.get / put raise TimeoutError inside the scheduler's
# handler, which logs it as an ERROR; a queue that is empty for a moment is no
# error. These run on the scheduler, on the same asyncio queue Dask's use.


async def _take(name: str, timeout: float | None, dask_scheduler: Any = None) -> tuple[bool, Any]:
    q = dask_scheduler.extensions["queues"].queues[name]
    try:
        if timeout is None:
            record = await q.get()
        elif timeout <= 0:
            record = q.get_nowait()
        else:
            record = await asyncio.wait_for(q.get(), timeout)
    except (asyncio.QueueEmpty, TimeoutError):
        return False, None
    return True, record["value"]


async def _give(name: str, data: bytes, timeout: float | None, dask_scheduler: Any = None) -> bool:
    q = dask_scheduler.extensions["queues"].queues[name]
    record = {"type": "msgpack", "value": data}
    try:
        if timeout is None:
            await q.put(record)
        elif timeout <= 0:
            q.put_nowait(record)
        else:
            await asyncio.wait_for(q.put(record), timeout)
    except (asyncio.QueueFull, TimeoutError):
        return False
    return True


class ClusterQueue:
    """``ps.interprocess_queue(name, maxsize)`` on the cluster (a Dask ``Queue``).

    Items are pickled into bytes (Dask's queue holds msgpack data), so any
    picklable object goes. A task that dies between taking an item and
    using it loses that item (the one-host queue cannot lose it).
    """

    def __init__(self, rt: DaskRuntime, name: str, maxsize: int) -> None:
        validate_name(name)
        self._name = name
        self._maxsize = maxsize
        self._queue = distributed.Queue(
            rt.dask_name("queue", name), client=rt.client, maxsize=maxsize
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def put(self, obj: object, block: bool = True, timeout: float | None = None) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        client = self._queue.client
        if not client.run_on_scheduler(_give, self._queue.name, data, 0 if not block else timeout):
            raise QueueFull(self._name)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        client = self._queue.client
        ok, data = client.run_on_scheduler(_take, self._queue.name, 0 if not block else timeout)
        if not ok:
            raise QueueEmpty(self._name)
        return pickle.loads(data)

    def put_nowait(self, obj: object) -> None:
        self.put(obj, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def qsize(self) -> int:
        return int(self._queue.qsize())

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self._maxsize > 0 and self.qsize() >= self._maxsize

    def __iter__(self) -> Iterator[Any]:
        """The items ready now; ends when none is left (it does not wait)."""
        while True:
            try:
                yield self.get_nowait()
            except QueueEmpty:
                return

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ClusterQueue {self._name!r} (Dask)>"
