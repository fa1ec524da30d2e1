"""Backends: the only code that touches the operating system.

Only modules in this package may import ``posix_ipc``, ``fcntl`` or
``ctypes``, or call ``os.fork``; ``tests/test_layering.py`` enforces it.
"""

from __future__ import annotations

import functools
import os

from procshare._backends.base import Backend


@functools.cache
def get_backend() -> Backend:
    """The backend for this platform (``PROCSHARE_BACKEND`` may name one)."""
    wanted = os.environ.get("PROCSHARE_BACKEND", "posix")
    if wanted == "posix":
        from procshare._backends.posix import PosixBackend

        return PosixBackend()
    raise RuntimeError(
        f"unknown procshare backend {wanted!r} (from PROCSHARE_BACKEND); available: 'posix'"
    )


__all__ = ["Backend", "get_backend"]
