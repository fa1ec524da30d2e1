"""Errors of the cluster front end (SPEC 8)."""

from __future__ import annotations

from typing import ClassVar

from procshare.errors._base import (
    ProcshareError,
)
from procshare.errors._children import ChildKilled

# --------------------------------------------------------------------------
# The cluster front end (SPEC 8)


class NotOnCluster(ProcshareError, NotImplementedError):
    """Something that exists on one host has no faithful form on a Dask cluster.

    Raised inside ``with ps.cluster(...):`` for a numpy kind of
    ``ps.shared``, an anonymous object, a condition, barrier or rwlock. The
    message says what to use instead.
    """

    _fields: ClassVar[tuple[str, ...]] = ("what", "instead", "detail")

    def __init__(self, what: str = "", instead: str = "", detail: str = "") -> None:
        #: What was asked for: ``"ps.shared('a', numpy.float64, shape=...)"``.
        self.what = what
        #: What to use on the cluster instead.
        self.instead = instead
        super().__init__(detail)

    def _message(self) -> str:
        return (
            f"{self.what} is not available inside `with ps.cluster(...)`"
            + (f" ({self.detail})" if self.detail else "")
            + f": {self.instead}"
        )


class ClusterUnreachable(ProcshareError, ConnectionError):
    """``ps.cluster(address)`` found no Dask scheduler answering at ``address``.

    Raised when the client for the block cannot connect within ``timeout``
    seconds (nothing listening, a wrong host or port, a firewall). A
    ``ConnectionError``, so an ``OSError`` too, as Dask's own failure was.
    """

    _fields: ClassVar[tuple[str, ...]] = ("address", "timeout", "detail")

    def __init__(self, address: str = "", timeout: float | None = None, detail: str = "") -> None:
        #: The scheduler address that did not answer.
        self.address = address
        #: Seconds the connection was tried for (``None``: Dask's configured
        #: ``distributed.comm.timeouts.connect``).
        self.timeout = timeout
        super().__init__(detail)

    def _message(self) -> str:
        waited = (
            "within Dask's connect timeout (distributed.comm.timeouts.connect)"
            if self.timeout is None
            else f"within {self.timeout:g} s"
        )
        return (
            f"no Dask scheduler answered at {self.address!r} {waited}"
            + (f" ({self.detail})" if self.detail else "")
            + ": start one there (`dask scheduler`, which listens on port 8786), check the "
            "host and port, or pass ps.cluster() a connected distributed.Client; "
            "ps.cluster(address, timeout=SECONDS) waits longer for a scheduler still starting"
        )


class WorkerDied(ChildKilled):
    """A task's Dask worker died under it, on every try the scheduler allowed.

    A :class:`ChildKilled` (not exported on its own): ``except ps.ChildKilled``
    catches the cluster's form of "the process running it was killed". Dask
    retries a task whose worker died on another worker, up to the scheduler's
    ``distributed.scheduler.allowed-failures`` (3 by default) times; this is
    raised when those ran out (Dask's ``KilledWorker``), so the function may
    have run, in part, more than once.
    """

    def _message(self) -> str:
        return (
            f"task {self.name!r} lost its Dask worker on every try: the worker process died "
            "while running it (out of memory, a segfault, a kill), and the scheduler's "
            "retries (distributed.scheduler.allowed-failures) ran out. It may have run in part "
            "more than once; make it idempotent, or give it less memory to use"
            + (f" ({self.detail})" if self.detail else "")
        )
