from mmap import mmap

SLOW: int

def attach(
    path: bytes, meta: bytes, /
) -> int | tuple[int, mmap, int, int, int, int, int, bytes, int, int] | None: ...
def release(fd: int, /) -> bool: ...
def create(
    dir: bytes,
    meta: bytes,
    flags: int,
    data_offset: int,
    data_size: int,
    total: int,
    mode: int,
    /,
) -> tuple[int, mmap, int] | None: ...
def publish(fd: int, path: bytes, /) -> bool: ...
