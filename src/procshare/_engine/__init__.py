"""The engine: per-process registry of segments, locks and children.

The front end calls only into this package; this package calls the OS only
through :func:`procshare._backends.get_backend`.
"""

from __future__ import annotations

from procshare._engine.core import Engine, EnginePart, get_engine, shutdown_engine

__all__ = ["Engine", "EnginePart", "get_engine", "shutdown_engine"]
