"""Fork, wait, signals and parent-death handling on POSIX. Owned by issue 3."""

from __future__ import annotations


class PosixProcesses:
    """The process half of the POSIX backend."""
