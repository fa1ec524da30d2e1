"""What the engine needs from a backend to provide robust named locks.

Owned by the locks work (issue 5); see ``posix/lock.py``.
"""

from __future__ import annotations

from typing import Protocol


class LockBackend(Protocol):
    """Robust mutex primitives living in segment memory. Filled in by the locks work."""
