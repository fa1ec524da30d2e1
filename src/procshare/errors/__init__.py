"""The whole public exception hierarchy of procshare.

Every error is a :class:`ProcshareError` *and* the builtin exception a user
would already catch for that situation (``TimeoutError``,
``FileExistsError``, ``TypeError``, ...), so ``except TimeoutError:`` keeps
working when procshare is dropped into existing code.

Errors cross process boundaries (a child's failure is raised in the parent),
so every class keeps its facts as attributes and pickles with them intact.
The message is *derived* from those fields, never stored on its own, so a
round trip through :mod:`pickle` cannot make the text and the fields
disagree.
"""

from __future__ import annotations

from procshare.errors._base import AnonymousError, MissingDependency, ProcshareError, UsageError
from procshare.errors._children import (
    Cancelled,
    ChildError,
    ChildExited,
    ChildKilled,
    ChildRaised,
    ChildTimeout,
    ForkError,
    JoinTimeout,
    signal_name,
)
from procshare.errors._cluster import ClusterUnreachable, NotOnCluster, WorkerDied
from procshare.errors._data import (
    DescriptorLimit,
    InvalidName,
    MappingLimit,
    SegmentClosed,
    SegmentExists,
    SegmentNotFound,
    SharedMemoryFull,
    SharedMemoryUnavailable,
    SharedTypeError,
)
from procshare.errors._sync import (
    BrokenBarrier,
    HolderDied,
    LockTimeout,
    OwnerDied,
    QueueEmpty,
    QueueFull,
    WaitTimeout,
)

__all__ = [
    "AnonymousError",
    "BrokenBarrier",
    "Cancelled",
    "ChildError",
    "ChildExited",
    "ChildKilled",
    "ChildRaised",
    "ChildTimeout",
    "ClusterUnreachable",
    "DescriptorLimit",
    "ForkError",
    "HolderDied",
    "InvalidName",
    "JoinTimeout",
    "LockTimeout",
    "MappingLimit",
    "MissingDependency",
    "NotOnCluster",
    "OwnerDied",
    "ProcshareError",
    "QueueEmpty",
    "QueueFull",
    "SegmentClosed",
    "SegmentExists",
    "SegmentNotFound",
    "SharedMemoryFull",
    "SharedMemoryUnavailable",
    "SharedTypeError",
    "UsageError",
    "WaitTimeout",
    "WorkerDied",
    "signal_name",
]

# One home for the names users see in tracebacks, reprs and pickles
# (procshare.errors.ChildRaised), whichever file of the package defines them.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
