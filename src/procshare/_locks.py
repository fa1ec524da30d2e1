"""Front end for locks: ``interprocess_lock()``.

Built by issue 5. Until then every entry point says so instead of pretending.
"""

from __future__ import annotations

from typing import Any


class InterprocessLock:
    """A named, robust lock shared between processes and threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("procshare: interprocess_lock() is not built yet (issue 5)")


def interprocess_lock(*args: Any, **kwargs: Any) -> InterprocessLock:
    """Open the named robust lock ``name``."""
    return InterprocessLock(*args, **kwargs)
