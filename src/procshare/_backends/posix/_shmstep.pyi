from mmap import mmap

SLOW: int

def attach(
    path: bytes, meta: bytes, /
) -> int | tuple[int, mmap, int, int, int, int, int, bytes, int, int] | None: ...
def release(fd: int, /) -> bool: ...
