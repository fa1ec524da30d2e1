"""One named procshare object on tmpfs: its layout, its paths, and an open of it.

Layout of an object (all little-endian native, 64-byte aligned data)::

    0   magic   b"PRCSHR\\0\\1"
    8   flags   u32   bit 0: persist
    12  metalen u32
    16  dataoff u64
    24  datalen u64
    32  created u64   time.time_ns() at creation
    40  creator u32   pid of the creator
    64  meta    the engine's metadata
    dataoff     data  (zeroed, then filled by the creator's init)

An open (:class:`PosixSegment`) is a shared mapping of the whole object and,
while the process is far below its descriptor limit, the descriptor the
READ lock that counts it as a holder was taken on; beyond that limit the
mapping alone keeps that lock's open file description alive (the
descriptor is closed once the object is mapped; see ``segment.py`` for the
protocol, ``_shmstep_holds.h`` for the choice, ``_shmstep.c`` for the C
steps). This module is what the rest of the backend shares: the
layout, the OS paths, the handle, the OFD lock requests on the holder byte,
and a read of an object that takes no hold (:func:`peek_data`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import struct

from procshare._backends.posix import _ofd

try:
    from procshare._backends.posix import _shmstep
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "procshare's C helper for segments (procshare._backends.posix._shmstep) is not "
        "built: reinstall procshare with a C compiler available (`pip install -e .` in a "
        "checkout, or `pip install procshare`)"
    ) from exc

Mapping = _shmstep.Mapping

SHM_DIR = "/dev/shm"
SHM_DIR_BYTES = SHM_DIR.encode()

MAGIC = b"PRCSHR\x00\x01"
HEADER = struct.Struct("@8sIIQQQI")
META_OFFSET = 64
ALIGN = 64
FLAG_PERSIST = 1


# This process's pid, kept current across fork: getpid() is a real system call
# (glibc stopped caching it), and open/close would make several. Refreshed in
# every child by _shmstep.refresh_pid (registered by segment.py, which hands
# _shmstep these globals).
_pid = os.getpid()


def current_pid() -> int:
    return _pid


# OS name -> the path as bytes, for the C steps (inherited by forked children).
path_bytes: dict[str, bytes] = {}


def remember_path(os_name: str) -> bytes:
    path = path_of(os_name).encode()
    if len(path_bytes) >= 4096:
        path_bytes.clear()
    path_bytes[os_name] = path
    return path


def path_of(os_name: str) -> str:
    if not os_name.startswith("/") or "/" in os_name[1:]:
        raise ValueError(f"bad OS name {os_name!r}")
    return SHM_DIR + os_name


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class PosixSegment(_shmstep.Handle):
    """One open of one object. Implements :class:`SegmentHandle`.

    Its fields live in the C base type (``_shmstep.Handle``: ``os_name``,
    ``mm``, ``st_dev``, ``st_ino``, ``meta``, ``persist``, ``data_offset``,
    ``data_size``, ``created_ns``, ``creator_pid``, ``opener_pid``,
    ``closed``, ``fd``, and ``data``), which the C attach step fills in directly: in a
    freshly forked child a Python ``__init__`` storing them one by one touched
    (and so copied) a page for nearly every object it stored. Built from
    Python with the same fields, positionally, in that order.

    The hold is ``fd`` (the descriptor READ is held on, kept while there is
    room) or, when ``fd`` is -1, ``mm``: while it is mapped this process
    counts as a holder. ``st_dev`` / ``st_ino`` identify the object, so that
    closing never mistakes a newer object under the same name for it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<PosixSegment {self.os_name} {self.data_size} bytes ({state})>"

    @property
    def address(self) -> int:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm, self.data_offset))

    def drop_data(self) -> None:
        """Let go of ``data``, so that only buffers the user took keep the
        mapping exported (views made with ``memoryview(data)`` or
        ``data[...]`` share data's managed buffer; only a buffer exported from
        ``data`` itself, ``numpy.frombuffer(data)``, makes release() refuse)."""
        # (try/except rather than contextlib.suppress: this runs on every close,
        # and in a forked child every object touched costs a page fault.)
        if self._data is not None:
            try:  # noqa: SIM105 - see above
                self._data.release()
            except BufferError:
                pass
            self._data = None

    def release_mapping(self) -> None:
        """Unmap if nothing exported from the mapping is alive; else leave it
        mapped until those buffers are collected (closing never pulls memory
        out from under a live buffer). Unmapping ends this open's hold."""
        self.drop_data()
        try:  # noqa: SIM105 - see drop_data
            self.mm.close()
        except BufferError:
            pass


def read_header(mm: object, os_name: str) -> tuple[int, bytes, int, int, int, int]:
    """``(flags, meta, dataoff, datalen, created_ns, creator_pid)`` of an object's
    first bytes (a mapping or ``bytes``); ``OSError(EBADMSG)`` if it is not ours."""
    magic, flags, metalen, dataoff, datalen, created, creator = HEADER.unpack_from(
        mm,  # type: ignore[arg-type]
        0,
    )
    if magic != MAGIC:
        raise OSError(errno.EBADMSG, f"{os_name} is not a procshare object (bad magic)")
    with memoryview(mm) as view:  # type: ignore[arg-type]
        meta = bytes(view[META_OFFSET : META_OFFSET + metalen])
    return flags, meta, dataoff, datalen, created, creator


def map_object(fd: int, os_name: str, st: os.stat_result | None = None) -> PosixSegment:
    """Map the object open on ``fd`` (whose locks the mapping then keeps) and
    read its header; ``OSError(EBADMSG)`` if it is not a procshare object."""
    if st is None:
        st = os.fstat(fd)
    if st.st_size < META_OFFSET:
        raise OSError(errno.EBADMSG, f"{os_name} is too small to be a procshare object")
    mm = _shmstep.map(fd, st.st_size)
    try:
        flags, meta, dataoff, datalen, created, creator = read_header(mm, os_name)
        if dataoff > st.st_size or datalen > st.st_size - dataoff:
            raise OSError(errno.EBADMSG, f"{os_name} is not a procshare object (bad sizes)")
    except BaseException:
        mm.close()
        raise
    return PosixSegment(
        os_name,
        mm,
        st.st_dev,
        st.st_ino,
        meta,
        bool(flags & FLAG_PERSIST),
        dataoff,
        datalen,
        created,
        creator,
        _pid,
    )


def peek_data(os_name: str, size: int) -> bytes | None:
    """Up to ``size`` bytes of the data of the object ``os_name``, read with
    ``pread`` and no hold taken (so nothing is reclaimed and no lifetime
    changes); ``None`` if it is gone or is not a procshare object. What the
    lister and the state peeks of locks and sync objects read."""
    try:
        # O_NONBLOCK: a FIFO someone put under the name must not hang us.
        fd = os.open(path_of(os_name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, HEADER.size, 0)
        try:
            _flags, _meta, dataoff, datalen, _created, _creator = read_header(head, os_name)
        except (OSError, struct.error):  # too short, or not a procshare object
            return None
        want = min(size, datalen)
        data = os.pread(fd, want, dataoff)
        return data if len(data) == want else None
    finally:
        os.close(fd)


# -- OFD lock requests on the holder byte (see _ofd) ---------------------------

# The three lock requests on byte 0 (HOLD), packed once: open and close are hot.
RDLCK_HOLD = _ofd.FLOCK.pack(_ofd.READ, 0, _ofd.HOLD, 1, 0)
WRLCK_HOLD = _ofd.FLOCK.pack(_ofd.WRITE, 0, _ofd.HOLD, 1, 0)
UNLCK_HOLD = _ofd.FLOCK.pack(_ofd.UNLOCK, 0, _ofd.HOLD, 1, 0)
_UNLCK_TYPE = UNLCK_HOLD[:2]


def write_free(fd: int) -> bool:
    """Whether a WRITE on byte 0 would be granted now (``F_OFD_GETLK``).

    Only an observation, like a failed :func:`try_lock` (which changes nothing
    either): callers still take WRITE with :func:`try_lock`, which decides.
    """
    return fcntl.fcntl(fd, fcntl.F_OFD_GETLK, WRLCK_HOLD)[:2] == _UNLCK_TYPE


def try_lock(fd: int, request: bytes) -> bool:
    """One non-blocking OFD lock request; ``False`` if it conflicts."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


# -- out of room ---------------------------------------------------------------


def raise_no_room(exc: OSError, os_name: str, total: int) -> None:
    """Re-raise a creation's out-of-room error as one of the backend API's two.

    ``ENOSPC`` means no room left, and so does ``EFBIG`` for a size beyond
    the largest file the filesystem can hold. ``EFBIG`` for an object above
    the process's file-size limit (``ulimit -f``) is that limit, which more
    free memory would not cure: it stays ``EFBIG`` so the engine can say so.
    """
    limit = segment_size_limit()
    if exc.errno == errno.EFBIG and limit is not None and total > limit:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), os_name) from None
    if exc.errno in (errno.ENOSPC, errno.EFBIG):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os_name) from None


def segment_size_limit() -> int | None:
    """This process's limit on the size of a file it writes, or ``None``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def mapping_usage() -> tuple[int, int] | None:
    """``(mappings this process has, vm.max_map_count)``, or ``None`` if unknown."""
    try:
        with open("/proc/sys/vm/max_map_count", "rb") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            count = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except (OSError, ValueError):
        return None
    return count, limit


_shmstep.set_handle_type(PosixSegment)
