from typing import Any, overload

SLOW: int
RELEASED: int
REMOVED: int

class Mapping:
    @property
    def closed(self) -> bool: ...
    @property
    def exported(self) -> bool: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Handle:
    os_name: str
    mm: Mapping
    meta: bytes
    st_dev: int
    st_ino: int
    created_ns: int
    data_offset: int
    data_size: int
    creator_pid: int
    opener_pid: int
    persist: bool
    closed: bool
    @property
    def fd(self) -> int: ...
    _data: memoryview | None
    def __init__(
        self,
        os_name: str,
        mm: Mapping,
        st_dev: int,
        st_ino: int,
        meta: bytes,
        persist: bool,
        data_offset: int,
        data_size: int,
        created_ns: int,
        creator_pid: int,
        opener_pid: int,
        /,
    ) -> None: ...
    @property
    def data(self) -> memoryview: ...

def set_handle_type(cls: type[Handle], /) -> None: ...
def attach(path: bytes, meta: bytes, os_name: str, opener_pid: int, /) -> Handle | int | None: ...
def map(fd: int, size: int, /) -> Mapping: ...
def release(handle: Handle, path: bytes, pid: int, decide: bool | int, /) -> int: ...
def close_lock(handle: Handle, /) -> bool: ...
def set_paths(globals: dict[str, Any], /) -> None: ...
def let_go(handle: Handle, path: bytes, /) -> None: ...
def adopt(handle: Handle, fd: int, epoch: int, /) -> bool: ...
def descriptors() -> tuple[int, int]: ...
def set_descriptor_budget(n: int, /) -> int: ...
def spares() -> list[tuple[int, int]]: ...
def drop_spares() -> int: ...
def fork_epoch() -> int: ...
def unhold(fd: int, /) -> None: ...
@overload
def create(
    dir: bytes,
    meta: bytes,
    flags: int,
    data_offset: int,
    data_size: int,
    total: int,
    mode: int,
    pid: int,
    /,
) -> tuple[int, Mapping, int, int, int] | None: ...
@overload
def create(
    dir: bytes,
    meta: bytes,
    flags: int,
    data_offset: int,
    data_size: int,
    total: int,
    mode: int,
    pid: int,
    path: bytes,
    os_name: str,
    /,
) -> Handle | bool | None: ...
def publish(fd: int, path: bytes, handle: Handle = ..., epoch: int = ..., /) -> bool: ...
def link_mode(mode: int = ..., /) -> int: ...
def anonymous(size: int, reserve: bool, /) -> Mapping: ...
