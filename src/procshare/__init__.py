"""procshare: multi-processing on POSIX as a decorator and a ``with`` block.

This module only re-exports; the work lives in private modules. The public
surface is exactly ``__all__``, and ``tests/test_exports.py`` checks that it
matches the API reference in ``docs/api.md``.
"""

from __future__ import annotations

# Coordination: semaphore, event, condition, barrier, rwlock, queue (issue 15)
from procshare._barrier import InterprocessBarrier as InterprocessBarrier
from procshare._barrier import interprocess_barrier as interprocess_barrier

# Coordination (issue 15)
from procshare._condition import InterprocessCondition as InterprocessCondition
from procshare._condition import interprocess_condition as interprocess_condition

# Shared data: number kinds (issue 4)
from procshare._kinds import Scalar as Scalar
from procshare._kinds import f32 as f32
from procshare._kinds import f64 as f64
from procshare._kinds import i8 as i8
from procshare._kinds import i16 as i16
from procshare._kinds import i32 as i32
from procshare._kinds import i64 as i64
from procshare._kinds import u8 as u8
from procshare._kinds import u16 as u16
from procshare._kinds import u32 as u32
from procshare._kinds import u64 as u64

# Locks (issue 5)
from procshare._locks import InterprocessLock as InterprocessLock
from procshare._locks import interprocess_lock as interprocess_lock

# Namespaces
from procshare._namespace import namespace as namespace

# Pools (issue 14)
from procshare._pool import Pool as Pool
from procshare._pool import Submitted as Submitted
from procshare._pool import imap as imap
from procshare._pool import map as map
from procshare._pool import pool as pool

# Processes (issue 3)
from procshare._process import Child as Child
from procshare._process import Children as Children
from procshare._process import ExitStatus as ExitStatus
from procshare._process import children as children
from procshare._process import forked as forked

# Coordination (issue 15)
from procshare._queue import InterprocessQueue as InterprocessQueue
from procshare._queue import interprocess_queue as interprocess_queue

# Beyond one machine: the cluster front end (issue 17)
from procshare._runtime import cluster as cluster

# Coordination (issue 15)
from procshare._rwlock import InterprocessRWLock as InterprocessRWLock
from procshare._rwlock import interprocess_rwlock as interprocess_rwlock

# Shared data (issue 4)
from procshare._shared import Segment as Segment
from procshare._shared import shared as shared
from procshare._shared import unlink as unlink
from procshare._sync import InterprocessEvent as InterprocessEvent
from procshare._sync import InterprocessSemaphore as InterprocessSemaphore
from procshare._sync import interprocess_event as interprocess_event
from procshare._sync import interprocess_semaphore as interprocess_semaphore

# Tools
from procshare._tools import SegmentInfo as SegmentInfo
from procshare._tools import segments as segments

# Shared data: typed views (issue 16)
from procshare._views import ScalarView as ScalarView

# Errors (and Cancelled, which is not one: a BaseException)
from procshare.errors import AnonymousError as AnonymousError
from procshare.errors import BrokenBarrier as BrokenBarrier
from procshare.errors import Cancelled as Cancelled
from procshare.errors import ChildError as ChildError
from procshare.errors import ChildExited as ChildExited
from procshare.errors import ChildKilled as ChildKilled
from procshare.errors import ChildRaised as ChildRaised
from procshare.errors import ChildTimeout as ChildTimeout
from procshare.errors import ClusterUnreachable as ClusterUnreachable

# Errors where the system refuses (SPEC 3, 5)
from procshare.errors import DescriptorLimit as DescriptorLimit
from procshare.errors import ForkError as ForkError
from procshare.errors import HolderDied as HolderDied
from procshare.errors import InvalidName as InvalidName
from procshare.errors import JoinTimeout as JoinTimeout
from procshare.errors import LockTimeout as LockTimeout
from procshare.errors import MappingLimit as MappingLimit
from procshare.errors import MissingDependency as MissingDependency
from procshare.errors import NotOnCluster as NotOnCluster
from procshare.errors import OwnerDied as OwnerDied
from procshare.errors import ProcshareError as ProcshareError
from procshare.errors import QueueEmpty as QueueEmpty
from procshare.errors import QueueFull as QueueFull
from procshare.errors import SegmentClosed as SegmentClosed
from procshare.errors import SegmentExists as SegmentExists
from procshare.errors import SegmentNotFound as SegmentNotFound
from procshare.errors import SharedMemoryFull as SharedMemoryFull
from procshare.errors import SharedMemoryUnavailable as SharedMemoryUnavailable
from procshare.errors import SharedTypeError as SharedTypeError
from procshare.errors import UsageError as UsageError
from procshare.errors import WaitTimeout as WaitTimeout

__version__ = "0.1.0.dev0"

__all__ = [  # noqa: RUF022 - plain sorted(), which tests/test_exports.py checks
    "AnonymousError",
    "BrokenBarrier",
    "Cancelled",
    "Child",
    "ChildError",
    "ChildExited",
    "ChildKilled",
    "ChildRaised",
    "ChildTimeout",
    "Children",
    "ClusterUnreachable",
    "DescriptorLimit",
    "ExitStatus",
    "ForkError",
    "HolderDied",
    "InterprocessBarrier",
    "InterprocessCondition",
    "InterprocessEvent",
    "InterprocessLock",
    "InterprocessQueue",
    "InterprocessRWLock",
    "InterprocessSemaphore",
    "InvalidName",
    "JoinTimeout",
    "LockTimeout",
    "MappingLimit",
    "MissingDependency",
    "NotOnCluster",
    "OwnerDied",
    "Pool",
    "ProcshareError",
    "QueueEmpty",
    "QueueFull",
    "Scalar",
    "ScalarView",
    "Segment",
    "SegmentClosed",
    "SegmentExists",
    "SegmentInfo",
    "SegmentNotFound",
    "SharedMemoryFull",
    "SharedMemoryUnavailable",
    "SharedTypeError",
    "Submitted",
    "UsageError",
    "WaitTimeout",
    "children",
    "cluster",
    "f32",
    "f64",
    "forked",
    "i16",
    "i32",
    "i64",
    "i8",
    "imap",
    "interprocess_barrier",
    "interprocess_condition",
    "interprocess_event",
    "interprocess_lock",
    "interprocess_queue",
    "interprocess_rwlock",
    "interprocess_semaphore",
    "map",
    "namespace",
    "pool",
    "segments",
    "shared",
    "u16",
    "u32",
    "u64",
    "u8",
    "unlink",
]
