from collections.abc import Callable
from typing import Any

from procshare._backends.api_segment import SegmentHandle
from procshare._engine.segments import Layout

def valid(obj: object, /) -> bool: ...
def prefix(namespace: str, uid: int, /) -> str: ...
def os_name(kind: str, name: str, namespace: str, uid: int, /) -> str: ...
def blake2b_hex(data: bytes, digest_size: int, /) -> str: ...

class OpenSegment:
    name: str
    namespace: str
    handle: SegmentHandle
    created: bool
    layout: Layout
    view: Callable[[], Any] | None
    closed: bool
    forks: int
    def __init__(
        self, name: str, namespace: str, handle: SegmentHandle, created: bool, layout: Layout
    ) -> None: ...

def record_offsets() -> tuple[type[OpenSegment], int, int, int, int]: ...
def lock_setup(conf: dict[str, object], /) -> None: ...
def open_lock(engine: object, name: str, user: int, mode: int, /) -> Any: ...
