"""Robust process-shared mutexes on POSIX. Owned by issue 5."""

from __future__ import annotations


class PosixLocks:
    """The lock half of the POSIX backend."""
