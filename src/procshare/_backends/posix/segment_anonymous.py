"""Anonymous segments: a ``MAP_SHARED`` mapping with no name anywhere.

No header, no holder lock, no descriptor: the data is the whole mapping.
Children forked while it is mapped inherit the mapping (fork copies it, still
shared), and the kernel frees the memory with its last mapping, whatever
ended the processes that had it: there is no name to leave behind in
/dev/shm, and no count to keep.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from procshare._backends.posix import _shmstep, segment_object
from procshare._backends.posix.segment_object import mapping_usage, raise_no_room

# Above this size an anonymous segment's pages are allocated at creation
# (memfd + fallocate: SharedMemoryFull now rather than memory pressure later);
# below it one mmap is all, and its pages come on first touch like any memory.
_ANON_RESERVE_BYTES = 1 << 20
_anonymous = _shmstep.anonymous


class PosixAnonymous:
    """An anonymous segment. Implements :class:`SegmentHandle` (see the module)."""

    __slots__ = ("_data", "closed", "data_size", "mm", "opener_pid")

    os_name = ""
    meta = b""
    persist = False
    data_offset = 0

    def __init__(self, mm: _shmstep.Mapping, data_size: int, opener_pid: int) -> None:
        self.mm = mm
        self.data_size = data_size
        self.opener_pid = opener_pid
        self.closed = False
        self._data: memoryview | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<PosixAnonymous {self.data_size} bytes ({state})>"

    @property
    def data(self) -> memoryview:
        if self._data is None:
            self._data = memoryview(self.mm)[: self.data_size]
        return self._data

    @property
    def address(self) -> int:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))


def close_anonymous(handle: PosixAnonymous) -> bool:
    """Unmap, unless a buffer exported from the mapping is alive (a numpy array,
    a memoryview): it then stays mapped until that buffer and the mapping are
    collected. In a forked child an inherited handle is only marked closed; the
    child's copy of the mapping goes with the child."""
    if handle.closed:
        return False
    handle.closed = True
    if handle.opener_pid != segment_object._pid:
        return False
    if handle._data is not None:
        try:  # noqa: SIM105 - every close: contextlib costs page faults in a child
            handle._data.release()
        except BufferError:
            pass
        handle._data = None
    try:  # noqa: SIM105 - see above
        handle.mm.close()
    except BufferError:
        pass
    return True


def anonymous_space() -> int | None:
    """Bytes of memory an anonymous segment may still take: available RAM and
    free swap (``/proc/meminfo``), capped by this process's cgroup limit."""
    try:
        with open("/proc/meminfo", "rb") as f:
            info = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        space = (int(info[b"MemAvailable"].split()[0]) + int(info[b"SwapFree"].split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    try:
        with open("/proc/self/cgroup", "rb") as f:
            path = next(ln[3:] for ln in f.read().splitlines() if ln.startswith(b"0::"))
        base = b"/sys/fs/cgroup" + path.rstrip(b"/")
        with open(base + b"/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit != b"max":
            with open(base + b"/memory.current", "rb") as f:
                used = int(f.read().strip())
            space = min(space, max(0, int(limit) - used))
    except (OSError, StopIteration, ValueError):
        pass
    return space


def _at_map_count_limit() -> bool:
    """Whether this process has (about) as many mappings as vm.max_map_count allows."""
    usage = mapping_usage()
    return usage is not None and usage[0] >= usage[1] - 8


class PosixAnonymousSegments:
    """The anonymous half of the POSIX segments (a mixin of ``PosixSegments``)."""

    def segment_create_anonymous(
        self, *, data_size: int, init: Callable[[memoryview], None] | None = None
    ) -> PosixAnonymous:
        size = data_size or 1
        reserve = size > _ANON_RESERVE_BYTES
        if reserve:
            # fallocate on a memfd really allocates: asking for more than the
            # memory can hold would fill RAM page by page before it fails.
            space = self.anonymous_space()
            if space is not None and size > space:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(anonymous)")
        try:
            mm = _anonymous(size, reserve)
        except OSError as exc:
            if exc.errno == errno.ENOMEM and not _at_map_count_limit():
                # Out of memory for the pages: "does not fit" (a mapping refused
                # at vm.max_map_count stays ENOMEM: the engine names that limit).
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(anonymous)") from None
            raise_no_room(exc, "(anonymous)", size)
            raise
        seg = PosixAnonymous(mm, data_size, segment_object._pid)
        if init is not None:
            try:
                init(seg.data)
            except BaseException:
                close_anonymous(seg)
                raise
        return seg

    def anonymous_space(self) -> int | None:
        return anonymous_space()
