"""What the engine needs from a backend to fork, supervise and reap children.

Owned by the processes work (issue 3); see ``posix/process.py``.
"""

from __future__ import annotations

from typing import Protocol


class ProcessBackend(Protocol):
    """Fork, wait and signal primitives. Filled in by the processes work."""
