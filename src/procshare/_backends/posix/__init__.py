"""The POSIX (Linux) backend: tmpfs objects, OFD locks, robust pthread mutexes, fork."""

from __future__ import annotations

from procshare._backends.posix.channel import PosixChannels
from procshare._backends.posix.lock import PosixLocks
from procshare._backends.posix.process import PosixProcesses
from procshare._backends.posix.segment import PosixSegment, PosixSegments
from procshare._backends.posix.sync import PosixSync


class PosixBackend(PosixProcesses, PosixSegments, PosixLocks, PosixSync, PosixChannels):
    """Every POSIX primitive procshare uses, behind the :class:`Backend` protocol."""

    name = "posix"


__all__ = ["PosixBackend", "PosixSegment"]
