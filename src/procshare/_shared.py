"""Front end for shared data: ``shared()`` and ``unlink()``.

Built by issue 4. Until then every entry point says so instead of pretending.
"""

from __future__ import annotations

from typing import Any, NoReturn


def _todo(what: str) -> NoReturn:
    raise NotImplementedError(f"procshare: {what} is not built yet (issue 4)")


def shared(*args: Any, **kwargs: Any) -> Any:
    """Create or attach a named, typed shared-memory segment."""
    _todo("shared()")


def unlink(name: str) -> bool:
    """Remove a segment now, typically one created with ``persist=True``."""
    _todo("unlink()")
