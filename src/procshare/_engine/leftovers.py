"""What a namespace still has in the backend: the demo's and tests' leftover check.

The front end may not ask the backend directly (layering), so the check that
"nothing was left in shared memory" goes through here. It lists OS names
only; it never opens, locks or removes anything, so looking cannot change
what is seen.
"""

from __future__ import annotations

from procshare._engine import names
from procshare._engine.core import get_engine


def os_objects() -> frozenset[str]:
    """Every object the backend keeps, of any namespace and user (``/dev/shm`` on Linux)."""
    return get_engine().backend.os_objects()


def namespace_objects(namespace: str | None = None) -> frozenset[str]:
    """The OS names of every object of ``namespace`` (default: the current one).

    Segments, lock memory and abandoned temporaries all count: every OS name
    of a namespace starts with its prefix (see :mod:`procshare._engine.names`).
    """
    prefix = names.namespace_prefix(namespace)
    return frozenset(n for n in os_objects() if n.startswith(prefix))
