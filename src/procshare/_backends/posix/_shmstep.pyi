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
def release(handle: Handle, path: bytes, pid: int, decide: bool, /) -> int: ...
def let_go(mm: Mapping, path: bytes, st_dev: int, st_ino: int, /) -> None: ...
def unhold(fd: int, /) -> None: ...
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
def publish(fd: int, path: bytes, /) -> bool: ...
def link_mode(mode: int = ..., /) -> int: ...
def anonymous(size: int, reserve: bool, /) -> Mapping: ...
