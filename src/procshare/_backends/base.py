"""The backend interface: everything the engine may ask of the operating system.

The engine talks to exactly one object satisfying :class:`Backend`. A new
platform is one new module under ``_backends/`` implementing it and passing
``tests/test_backend_contract.py``.
"""

from __future__ import annotations

from typing import Protocol

from procshare._backends.api_channel import ChannelBackend
from procshare._backends.api_lock import LockBackend
from procshare._backends.api_process import ProcessBackend
from procshare._backends.api_segment import SegmentBackend
from procshare._backends.api_sync import SyncBackend


class Backend(ProcessBackend, SegmentBackend, LockBackend, SyncBackend, ChannelBackend, Protocol):
    """Processes, segments, locks, the coordination primitives and worker
    channels of one platform."""

    @property
    def name(self) -> str:
        """A short name for messages and listings (``"posix"``)."""
        ...
