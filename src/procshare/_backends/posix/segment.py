"""Named shared-memory objects on Linux tmpfs, with kernel-counted holders.

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

Creation is atomic by publication: the object is built as an unnamed
``O_TMPFILE`` inode (or, where the kernel lacks that, under a random
temporary name), reserved with ``posix_fallocate`` (so a full ``/dev/shm``
fails *now* with ``ENOSPC`` rather than as a ``SIGBUS`` on first touch),
initialised, and only then hard-linked to its final name. ``link`` fails
with ``EEXIST`` atomically, so exactly one of many racing creators wins and
nobody ever opens a half-initialised object. A creator killed before the
link leaves nothing at all behind with ``O_TMPFILE`` (the kernel frees the
unnamed inode), and an abandoned named temporary that ``gc`` removes without.

Holders are counted by the kernel with OFD locks on byte 0 (see :mod:`._ofd`):
every holder keeps a READ lock there, so the kernel drops a dead holder's
hold with its descriptors, whatever killed it. A WRITE lock on byte 0 is
taken only for a moment, by a process that has found itself alone with the
object and decides whether to remove it; being exclusive, it stops anyone
from becoming a holder meanwhile. No other lock is needed:

* open: first try WRITE while holding nothing: it succeeds only if nobody
  holds the object, which makes it an orphan, and ``keep_orphan`` decides
  under that exclusive lock whether to remove it (then downgrade to READ,
  atomically). Otherwise take READ; if a remover has WRITE, wait for it, then
  see whether it unlinked the object meanwhile (``st_nlink == 0``: retry).
* close: drop READ, then try WRITE. Two last holders closing at once cannot
  both fail (whichever tries second sees the first gone); if both succeed in
  turn, the second finds the object already unlinked.
* an opener that slips in between a closer's drop and its try keeps the object
  alive, and the closer leaves it; an opener that arrives after a closer left
  finds an orphan and reclaims it, as if it had come a moment later.

Why no lock-free shortcut such as a counter in the header: a holder killed
by SIGKILL cannot decrement anything; the kernel releasing its locks is the
only count that stays right.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import resource
import stat
import struct
import time
from collections.abc import Callable

from procshare._backends.api_segment import KeepOrphan, SegmentHandle, SegmentInfo
from procshare._backends.native_kinds import NativeKinds
from procshare._backends.posix import _ofd

try:
    from procshare._backends.posix import _shmstep
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "procshare's C helper for segments (procshare._backends.posix._shmstep) is not "
        "built: reinstall procshare with a C compiler available (`pip install -e .` in a "
        "checkout, or `pip install procshare`)"
    ) from exc

_attach = _shmstep.attach
_Mapping = _shmstep.Mapping
# Idle mappings of objects this process closed without removing them, by
# (st_dev, st_ino), for the next open of the same object: opening a segment
# someone else holds in a loop then costs no mmap and munmap (a third of an
# attach here). Small ones only, and few: a kept mapping keeps its object's
# memory allocated after everybody else is gone, until it is evicted. Forked
# children inherit them (the memory is shared).
_spares: dict[tuple[int, int], _shmstep.Mapping] = {}
_SPARES = 16
_SPARE_BYTES = 64 << 10
_release = _shmstep.release
_create = _shmstep.create
_publish = _shmstep.publish

SHM_DIR = "/dev/shm"
_SHM_DIR_BYTES = SHM_DIR.encode()

_MAGIC = b"PRCSHR\x00\x01"
_HEADER = struct.Struct("@8sIIQQQI")
_META_OFFSET = 64
_ALIGN = 64
FLAG_PERSIST = 1
# Up to this size the whole object is written with one pwrite (which reserves
# the pages just as fallocate does, and fails with ENOSPC the same way).
_PWRITE_BYTES = 64 << 10
# Above this size creation first compares with statvfs: on tmpfs, fallocate of
# a size between "free" and "filesystem size" fills RAM page by page before it
# fails, squeezing every other process for a moment.
_PRECHECK_BYTES = 1 << 20


# This process's pid, kept current across fork: getpid() is a real system call
# (glibc stopped caching it), and open/close would make several.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def current_pid() -> int:
    return _pid


# OS name -> the path as bytes, for the C open step (inherited by forked children).
_path_bytes: dict[str, bytes] = {}


def _remember_path(os_name: str) -> bytes:
    path = _path(os_name).encode()
    if len(_path_bytes) >= 4096:
        _path_bytes.clear()
    _path_bytes[os_name] = path
    return path


def _path(os_name: str) -> str:
    if not os_name.startswith("/") or "/" in os_name[1:]:
        raise ValueError(f"bad OS name {os_name!r}")
    return SHM_DIR + os_name


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class PosixSegment:
    """One open of one object. Implements :class:`SegmentHandle`.

    A plain slotted class, not attrs: one is built on every open, and in a
    freshly forked child each separately compiled method it runs (attrs
    generates ``__init__`` apart from the module) costs copied pages.
    """

    __slots__ = (
        "_data",
        "closed",
        "created_ns",
        "creator_pid",
        "data_offset",
        "data_size",
        "fd",
        "inode",
        "meta",
        "mm",
        "opener_pid",
        "os_name",
        "persist",
    )

    def __init__(  # noqa: PLR0917 - positional: built on every open
        self,
        os_name: str,
        fd: int,
        mm: mmap.mmap | _shmstep.Mapping,
        inode: tuple[int, int] | None,  # (st_dev, st_ino) when known (not after create)
        meta: bytes,
        persist: bool,
        data_offset: int,
        data_size: int,
        created_ns: int,
        creator_pid: int,
        opener_pid: int,
    ) -> None:
        self.os_name = os_name
        self.fd = fd
        self.mm = mm
        self.inode = inode
        self.meta = meta
        self.persist = persist
        self.data_offset = data_offset
        self.data_size = data_size
        self.created_ns = created_ns
        self.creator_pid = creator_pid
        self.opener_pid = opener_pid
        self.closed = False
        self._data: memoryview | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<PosixSegment {self.os_name} fd={self.fd} {self.data_size} bytes ({state})>"

    @property
    def data(self) -> memoryview:
        if self._data is None:
            self._data = memoryview(self.mm)[self.data_offset : self.data_offset + self.data_size]
        return self._data

    @property
    def address(self) -> int:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm, self.data_offset))

    def release_mapping(self, *, spare: bool = False) -> None:
        """Unmap if nothing exported from the mapping is alive; else leave it mapped.

        A numpy array or memoryview taken from ``data`` keeps the mapping (and
        so the memory) valid until it is garbage collected: closing never
        pulls memory out from under a live buffer. With ``spare`` a small idle
        mapping is kept for the next open of the same object instead (see
        ``_spares``).
        """
        # (try/except rather than contextlib.suppress: this runs on every close,
        # and in a forked child every object touched costs a page fault.)
        if self._data is not None:
            # Views made with memoryview(data) or data[...] share data's managed
            # buffer and keep the mapping exported; only a buffer exported from
            # ``data`` itself (numpy.frombuffer(data)) makes release() refuse.
            try:  # noqa: SIM105 - see above
                self._data.release()
            except BufferError:
                pass
            self._data = None
        mm = self.mm
        if (
            spare
            and type(mm) is _Mapping
            and self.inode is not None
            and len(mm) <= _SPARE_BYTES
            and not mm.exported
            and not mm.closed
        ):
            if len(_spares) >= _SPARES:
                try:  # noqa: SIM105 - see above
                    _spares.pop(next(iter(_spares))).close()  # the oldest
                except (BufferError, KeyError, RuntimeError, StopIteration):
                    pass  # another thread evicted (or is evicting) it
            _spares[self.inode] = mm
            return
        try:  # noqa: SIM105 - see above
            mm.close()
        except BufferError:
            pass


class PosixAnonymous:
    """An anonymous segment: a ``MAP_SHARED`` mapping with no name anywhere.

    Implements :class:`SegmentHandle` with no header and no holder lock: the
    data is the whole mapping. Children forked while it is mapped inherit the
    mapping (fork copies it, still shared), and the kernel frees the memory
    with its last mapping, whatever ended the processes that had it: there is
    no name to leave behind in /dev/shm, and no count to keep.
    """

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


def _close_anonymous(handle: PosixAnonymous) -> bool:
    """Unmap, unless a buffer exported from the mapping is alive (a numpy array,
    a memoryview): it then stays mapped until that buffer and the mapping are
    collected. In a forked child an inherited handle is only marked closed; the
    child's copy of the mapping goes with the child."""
    if handle.closed:
        return False
    handle.closed = True
    if handle.opener_pid != _pid:
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


# Above this size an anonymous segment's pages are allocated at creation
# (memfd + fallocate: SharedMemoryFull now rather than memory pressure later);
# below it one mmap is all, and its pages come on first touch like any memory.
_ANON_RESERVE_BYTES = 1 << 20
_anonymous = _shmstep.anonymous


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


def peek_data(os_name: str, size: int) -> bytes | None:
    """Up to ``size`` bytes of the data of the object ``os_name``, read with
    ``pread`` and no hold taken (so nothing is reclaimed and no lifetime
    changes); ``None`` if it is gone or is not a procshare object. What the
    lister and the state peeks of locks and sync objects read."""
    try:
        # O_NONBLOCK: a FIFO someone put under the name must not hang us.
        fd = os.open(_path(os_name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, _HEADER.size, 0)
        try:
            _flags, _meta, dataoff, datalen, _created, _creator = _read_header(head, os_name)
        except (OSError, struct.error):  # too short, or not a procshare object
            return None
        want = min(size, datalen)
        data = os.pread(fd, want, dataoff)
        return data if len(data) == want else None
    finally:
        os.close(fd)


def _read_header(mm: mmap.mmap | bytes, os_name: str) -> tuple[int, bytes, int, int, int, int]:
    magic, flags, metalen, dataoff, datalen, created, creator = _HEADER.unpack_from(mm, 0)
    if magic != _MAGIC:
        raise OSError(errno.EBADMSG, f"{os_name} is not a procshare object (bad magic)")
    meta = bytes(mm[_META_OFFSET : _META_OFFSET + metalen])
    return flags, meta, dataoff, datalen, created, creator


def _map(
    fd: int,
    os_name: str,
    opener_pid: int | None = None,
    st: os.stat_result | None = None,
    size: int | None = None,
) -> PosixSegment:
    if size is None:
        st = os.fstat(fd) if st is None else st
        size = st.st_size
    if size < _META_OFFSET:
        raise OSError(errno.EBADMSG, f"{os_name} is too small to be a procshare object")
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        flags, meta, dataoff, datalen, created, creator = _read_header(mm, os_name)
    except BaseException:
        mm.close()
        raise
    return PosixSegment(
        os_name,
        fd,
        mm,
        None if st is None else (st.st_dev, st.st_ino),
        meta,
        bool(flags & FLAG_PERSIST),
        dataoff,
        datalen,
        created,
        creator,
        _pid if opener_pid is None else opener_pid,
    )


# Whether this kernel and filesystem take O_TMPFILE (decided by the first creation).
_tmpfile_ok: bool | None = None


def _raise_no_room(exc: OSError, os_name: str, total: int) -> None:
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


def _check_space(os_name: str, total: int) -> None:
    if total <= _PRECHECK_BYTES:
        return
    try:
        vfs = os.statvfs(SHM_DIR)
    except OSError:
        return  # missing: creating says so
    if vfs.f_flag & os.ST_RDONLY or not vfs.f_blocks:
        return  # read-only, or not a filesystem with space (creating says why): not "full"
    if total > vfs.f_bavail * vfs.f_frsize:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os_name)


# The three lock requests on byte 0 (HOLD), packed once: open and close are hot.
_RDLCK_HOLD = _ofd.FLOCK.pack(_ofd.READ, 0, _ofd.HOLD, 1, 0)
_WRLCK_HOLD = _ofd.FLOCK.pack(_ofd.WRITE, 0, _ofd.HOLD, 1, 0)
_UNLCK_HOLD = _ofd.FLOCK.pack(_ofd.UNLOCK, 0, _ofd.HOLD, 1, 0)


_UNLCK_TYPE = _UNLCK_HOLD[:2]


def _write_free(fd: int) -> bool:
    """Whether a WRITE on byte 0 would be granted now (``F_OFD_GETLK``).

    Only an observation, like a failed :func:`_try` (which changes nothing
    either): callers still take WRITE with :func:`_try`, which decides. It
    answers the common "somebody else holds it" without raising and catching
    an ``OSError``, which in a freshly forked child costs more than the system
    call (every interpreter object it touches is a copy-on-write page fault).
    """
    return fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WRLCK_HOLD)[:2] == _UNLCK_TYPE


def _try(fd: int, request: bytes) -> bool:
    """One non-blocking OFD lock request; ``False`` if it conflicts."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class PosixSegments(NativeKinds):
    """The segment half of the POSIX backend."""

    def segment_size_limit(self) -> int | None:
        return segment_size_limit()

    def segment_store_problem(self) -> str | None:
        where = SHM_DIR
        try:
            st = os.stat(where)
        except FileNotFoundError:
            return f"{where} does not exist"
        except OSError as exc:
            return f"{where} cannot be reached ({os.strerror(exc.errno or 0)})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{where} is not a directory"
        try:
            vfs = os.statvfs(where)
        except OSError:
            vfs = None
        if vfs is not None and vfs.f_flag & os.ST_RDONLY:
            return f"{where} is mounted read-only"
        if not os.access(where, os.W_OK | os.X_OK):
            return f"{where} is not writable by this user (uid {os.geteuid()})"
        return None

    def descriptor_limit(self) -> int | None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return None if soft == resource.RLIM_INFINITY else soft

    def segment_space(self) -> int | None:
        try:
            vfs = os.statvfs(SHM_DIR)
        except OSError:
            return None
        return vfs.f_bavail * vfs.f_frsize

    def segment_create(
        self,
        os_name: str,
        *,
        meta: bytes,
        data_size: int,
        mode: int,
        persist: bool,
        init: Callable[[memoryview], None] | None = None,
    ) -> PosixSegment | None:
        # No early "does it exist?" check: link() below decides atomically, and
        # the engine opens before it creates, so creating over a live name is rare.
        global _tmpfile_ok
        dataoff = _align(_META_OFFSET + len(meta))
        total = dataoff + (data_size or 1)
        if total > _PRECHECK_BYTES:
            _check_space(os_name, total)
        if _tmpfile_ok is False:
            return self._create_named(
                os_name, meta, data_size, mode, persist, init, dataoff, total
            )
        # O_TMPFILE: the unnamed object is made, held, written and mapped in C,
        # initialised here, then published (see _shmstep.c).
        try:
            made = _create(
                _SHM_DIR_BYTES,
                meta,
                FLAG_PERSIST if persist else 0,
                dataoff,
                data_size,
                total,
                mode,
                _pid,
            )
        except OSError as exc:
            _raise_no_room(exc, os_name, total)
            raise
        if made is None:  # this kernel or filesystem has no O_TMPFILE: name a temporary
            if not os.path.isdir(SHM_DIR):
                # ENOENT from a missing directory, not from a kernel without
                # O_TMPFILE: do not give up O_TMPFILE for good over it.
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), SHM_DIR)
            _tmpfile_ok = False
            return self._create_named(
                os_name, meta, data_size, mode, persist, init, dataoff, total
            )
        _tmpfile_ok = True
        fd, mm, created = made
        seg = PosixSegment(
            os_name, fd, mm, None, meta, persist, dataoff, data_size, created, _pid, _pid
        )
        published = False
        try:
            if init is not None:
                init(seg.data)
            path = _path_bytes.get(os_name)
            if path is None:
                path = _remember_path(os_name)
            published = _publish(fd, path)
        finally:
            if not published:
                seg.release_mapping()
                os.close(fd)
        return seg if published else None

    def _create_named(  # noqa: PLR0917
        self,
        os_name: str,
        meta: bytes,
        data_size: int,
        mode: int,
        persist: bool,
        init: Callable[[memoryview], None] | None,
        dataoff: int,
        total: int,
    ) -> PosixSegment | None:
        """Create under a random temporary name, then link it to its own (no O_TMPFILE)."""
        final = _path(os_name)
        # Same namespace prefix, kind "t", random tail: `gc` finds abandoned ones.
        tmp = _path(os_name[:-21] + "t" + os.urandom(10).hex())
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        published = False
        try:
            _ofd.lock(fd, _ofd.READ, _ofd.HOLD)
            flags = FLAG_PERSIST if persist else 0
            header = _HEADER.pack(
                _MAGIC, flags, len(meta), dataoff, data_size, time.time_ns(), _pid
            )
            head = header + bytes(_META_OFFSET - len(header)) + meta
            try:
                if total <= _PWRITE_BYTES:
                    os.pwrite(fd, head + bytes(total - len(head)), 0)
                else:
                    os.posix_fallocate(fd, 0, total)
                    os.pwrite(fd, head, 0)
            except OSError as exc:
                _raise_no_room(exc, os_name, total)
                raise
            # The umask narrows what open() was asked, owner bits included.
            os.fchmod(fd, mode)
            seg = _map(fd, os_name, size=total)
            if init is not None:
                init(seg.data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                seg.release_mapping()
                return None
            published = True
            return seg
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if not published:
                os.close(fd)

    def segment_open(
        self, os_name: str, *, keep_orphan: KeepOrphan, meta: bytes = b""
    ) -> PosixSegment | None:
        # The common case (somebody holds it, nobody is removing it) in one C
        # call; everything else through the protocol below.
        path_bytes = _path_bytes.get(os_name)
        if path_bytes is None:
            path_bytes = _remember_path(os_name)
        found = _attach(path_bytes, meta, _spares)
        if found is None:
            return None
        if type(found) is tuple:
            fd, mm, flags, dataoff, datalen, created, creator, found_meta, dev, ino = found
            return PosixSegment(
                os_name,
                fd,
                mm,
                (dev, ino),
                found_meta,
                bool(flags & FLAG_PERSIST),
                dataoff,
                datalen,
                created,
                creator,
                _pid,
            )
        return self._open_protocol(os_name, keep_orphan)

    def _open_protocol(self, os_name: str, keep_orphan: KeepOrphan) -> PosixSegment | None:
        path = _path(os_name)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            try:
                # WRITE first, holding nothing: it succeeds only if nobody holds
                # the object, i.e. it is an orphan. Two openers of one orphan
                # cannot both miss that: one wins, the other waits below.
                # (_write_free first: a cheap look that skips a WRITE bound to fail.)
                alone = _write_free(fd) and _try(fd, _WRLCK_HOLD)
                if not alone and not _try(fd, _RDLCK_HOLD):
                    # A remover holds WRITE: wait for its decision.
                    _ofd.lock(fd, _ofd.READ, _ofd.HOLD)
                st = os.fstat(fd)
                if st.st_nlink == 0:
                    # Removed between our open and our lock: the name may
                    # already name a newer object, so look again.
                    os.close(fd)
                    continue
                seg = _map(fd, os_name, st=st)
                if alone:
                    if not seg.persist and not keep_orphan(seg):
                        os.unlink(path)  # we hold WRITE: nobody can be attaching
                        seg.release_mapping()
                        os.close(fd)
                        return None
                    _try(fd, _RDLCK_HOLD)  # atomic downgrade, cannot fail
                return seg
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    def segment_close(self, handle: SegmentHandle, *, keep: KeepOrphan | None) -> bool:
        if type(handle) is PosixAnonymous:
            return _close_anonymous(handle)
        assert isinstance(handle, PosixSegment)
        if handle.closed:
            return False
        handle.closed = True
        if handle.opener_pid != _pid:
            # Inherited across fork: the description (and its lock) is the
            # parent's. Drop our references without touching the kernel state.
            return False
        fd = handle.fd
        removed = last = False
        try:
            if keep is None and not handle.persist:
                # Nothing to decide: C unlinks if we are the last holder.
                path = _path_bytes.get(handle.os_name)
                if path is None:
                    path = _remember_path(handle.os_name)
                state = _release(fd, path)
                last, removed = state != 0, state == 2
            else:
                last = _release(fd, None) != 0
                if (
                    last
                    and not handle.persist
                    and not (keep is not None and keep(handle))
                    and os.fstat(fd).st_nlink > 0  # not already unlinked (ps.unlink, a twin)
                ):
                    try:
                        os.unlink(_path(handle.os_name))
                        removed = True
                    except FileNotFoundError:
                        pass
        finally:
            mm = handle.mm
            handle.release_mapping(spare=not removed)
            if (last and not removed) or (type(mm) is not _Mapping and not mm.closed):
                # A WRITE we took on an object we keep, or an mmap.mmap still
                # pinned by a numpy array (it holds a dup of fd): either way the
                # description outlives os.close(fd) (a forked child may share
                # it too), and a WRITE left on it would stall every opener.
                try:  # noqa: SIM105 - hot path: contextlib costs page faults in a child
                    _try(fd, _UNLCK_HOLD)
                except OSError:
                    pass
            os.close(fd)
        return removed

    # -- anonymous segments (no name anywhere; see PosixAnonymous) -----------

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
            if exc.errno == errno.ENOMEM:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(anonymous)") from None
            _raise_no_room(exc, "(anonymous)", size)
            raise
        seg = PosixAnonymous(mm, data_size, _pid)
        if init is not None:
            try:
                init(seg.data)
            except BaseException:
                _close_anonymous(seg)
                raise
        return seg

    def anonymous_space(self) -> int | None:
        return anonymous_space()

    def segment_unlink(
        self, os_name: str, *, identity: tuple[int, int, int] | None = None
    ) -> bool:
        if identity is not None and self.object_identity(os_name) != identity:
            return False  # (a narrow race remains: unlink has no "if still this inode")
        try:
            os.unlink(_path(os_name))
        except FileNotFoundError:
            return False
        return True

    def object_identity(self, os_name: str) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(_path(os_name))
        except (OSError, ValueError):
            return None
        return (st.st_uid, st.st_dev, st.st_ino)

    def segment_holders(self, names: set[str], *, mapped: bool = False) -> dict[str, list[int]]:
        """Pids with a descriptor open on each name (what /proc lets us see),
        and with ``mapped`` those that only map it too.

        Descriptors are matched by inode, not by link text: a creator's
        descriptor still shows the temporary name it was opened under.
        Mappings are matched by path: a raw segment is often mapped with its
        descriptor already closed (``posix_ipc``).
        """
        found: dict[str, list[int]] = {n: [] for n in names}
        paths = {SHM_DIR + n: n for n in names} if mapped else {}
        by_inode: dict[tuple[int, int], str] = {}
        for name in names:
            try:
                st = os.stat(_path(name))
            except OSError:
                continue
            by_inode[(st.st_dev, st.st_ino)] = name
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fd_dir = f"/proc/{entry}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            seen: set[str] = set()
            for fdname in fds:
                try:
                    st = os.stat(f"{fd_dir}/{fdname}")
                except OSError:
                    continue
                hit = by_inode.get((st.st_dev, st.st_ino))
                if hit is not None and hit not in seen:
                    seen.add(hit)
                    found[hit].append(int(entry))
            if paths:
                try:
                    with open(f"/proc/{entry}/maps") as maps:
                        for line in maps:
                            hit = paths.get(line.rstrip("\n").split(" ", 5)[-1].strip())
                            if hit is not None and hit not in seen:
                                seen.add(hit)
                                found[hit].append(int(entry))
                except OSError:
                    pass
        return found

    def segment_list(self, prefix: str) -> list[SegmentInfo]:
        entries = self._entries(prefix)
        holders = self.segment_holders(set(entries))
        infos = []
        for os_name in sorted(entries):
            path = _path(os_name)
            temporary = _is_temp(os_name)
            try:
                # O_NONBLOCK: a FIFO someone put under our prefix must not hang ls.
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                flags, meta, created, creator = 0, b"", 0, 0
                if size >= _META_OFFSET:
                    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                    try:
                        flags, meta, _, _, created, creator = _read_header(mm, os_name)
                    except OSError:
                        pass
                    finally:
                        mm.close()
            finally:
                os.close(fd)
            infos.append(
                SegmentInfo(
                    os_name=os_name,
                    meta=meta,
                    size=size,
                    persist=bool(flags & FLAG_PERSIST),
                    created_ns=created,
                    creator_pid=creator,
                    holders=tuple(sorted(holders.get(os_name, []))),
                    temporary=temporary,
                )
            )
        return infos

    def _entries(self, prefix: str) -> list[str]:
        base = prefix.lstrip("/")
        try:
            names = os.listdir(SHM_DIR)
        except FileNotFoundError:
            return []
        return ["/" + n for n in names if n.startswith(base)]

    def os_objects(self) -> frozenset[str]:
        try:
            return frozenset("/" + n for n in os.listdir(SHM_DIR))
        except FileNotFoundError:
            return frozenset()

    def segment_collect(self, prefix: str, *, keep: KeepOrphan, junk: bool = True) -> list[str]:
        removed = []
        for os_name in self._entries(prefix):
            path = _path(os_name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                if not _try(fd, _WRLCK_HOLD):
                    continue  # somebody living holds it (or is deciding about it)
                if _is_temp(os_name):
                    # Its creator died before publishing it, or (a moment after
                    # its creation, before its READ hold) is still making it:
                    # only `gc`, asked by a person, takes that chance.
                    doomed = junk
                else:
                    try:
                        seg = _map(fd, os_name)
                    except (OSError, ValueError):
                        doomed = junk  # not a procshare object we can read: junk
                    else:
                        doomed = not keep(seg)  # keep decides about persist too
                        seg.release_mapping()
                if doomed and os.fstat(fd).st_nlink > 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        removed.append(os_name)
            finally:
                os.close(fd)
        return removed


_TEMP_RE = re.compile(r"/ps.{7}t")


def _is_temp(os_name: str) -> bool:
    return bool(_TEMP_RE.match(os_name))
