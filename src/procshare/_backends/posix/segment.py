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

Holders are counted by the kernel with OFD locks (see :mod:`._ofd`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import mmap
import os
import re
import stat
import struct
import time
from collections.abc import Callable

import attrs

from procshare._backends.api_segment import KeepOrphan, SegmentHandle, SegmentInfo
from procshare._backends.native_kinds import NativeKinds
from procshare._backends.posix import _ofd

SHM_DIR = "/dev/shm"

_MAGIC = b"PRCSHR\x00\x01"
_HEADER = struct.Struct("@8sIIQQQI")
_META_OFFSET = 64
_ALIGN = 64
FLAG_PERSIST = 1
# Above this size creation first compares with statvfs: on tmpfs, fallocate of
# a size between "free" and "filesystem size" fills RAM page by page before it
# fails, squeezing every other process for a moment.
_PRECHECK_BYTES = 1 << 20


def _path(os_name: str) -> str:
    if not os_name.startswith("/") or "/" in os_name[1:]:
        raise ValueError(f"bad OS name {os_name!r}")
    return SHM_DIR + os_name


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@attrs.define(eq=False)
class PosixSegment:
    """One open of one object. Implements :class:`SegmentHandle`."""

    os_name: str
    fd: int
    mm: mmap.mmap
    inode: tuple[int, int]
    meta: bytes
    persist: bool
    data_offset: int
    data_size: int
    created_ns: int
    creator_pid: int
    opener_pid: int = attrs.field(factory=os.getpid)
    closed: bool = False
    _data: memoryview | None = None

    @property
    def data(self) -> memoryview:
        if self._data is None:
            self._data = memoryview(self.mm)[self.data_offset : self.data_offset + self.data_size]
        return self._data

    @property
    def address(self) -> int:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm, self.data_offset))

    def release_mapping(self) -> None:
        """Unmap if nothing exported from the mapping is alive; else leave it mapped.

        A numpy array or memoryview taken from ``data`` keeps the mapping (and
        so the memory) valid until it is garbage collected: closing never
        pulls memory out from under a live buffer.
        """
        if self._data is not None:
            # Views made with memoryview(data) or data[...] share data's managed
            # buffer and keep the mmap exported; only a buffer exported from
            # ``data`` itself (numpy.frombuffer(data)) makes release() refuse.
            with contextlib.suppress(BufferError):
                self._data.release()
            self._data = None
        with contextlib.suppress(BufferError):
            self.mm.close()


def _read_header(mm: mmap.mmap, os_name: str) -> tuple[int, bytes, int, int, int, int]:
    magic, flags, metalen, dataoff, datalen, created, creator = _HEADER.unpack_from(mm, 0)
    if magic != _MAGIC:
        raise OSError(errno.EBADMSG, f"{os_name} is not a procshare object (bad magic)")
    meta = bytes(mm[_META_OFFSET : _META_OFFSET + metalen])
    return flags, meta, dataoff, datalen, created, creator


def _map(
    fd: int, os_name: str, opener_pid: int | None = None, st: os.stat_result | None = None
) -> PosixSegment:
    st = os.fstat(fd) if st is None else st
    if st.st_size < _META_OFFSET:
        raise OSError(errno.EBADMSG, f"{os_name} is too small to be a procshare object")
    mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        flags, meta, dataoff, datalen, created, creator = _read_header(mm, os_name)
    except BaseException:
        mm.close()
        raise
    return PosixSegment(
        os_name=os_name,
        fd=fd,
        mm=mm,
        inode=(st.st_dev, st.st_ino),
        meta=meta,
        persist=bool(flags & FLAG_PERSIST),
        data_offset=dataoff,
        data_size=datalen,
        created_ns=created,
        creator_pid=creator,
        opener_pid=os.getpid() if opener_pid is None else opener_pid,
    )


def _same_file(fd: int, path: str, inode: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it may have been unlinked)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if inode is None:
        fst = os.fstat(fd)
        inode = (fst.st_dev, fst.st_ino)
    return (st.st_dev, st.st_ino) == inode


def _unlink_if_same(fd: int, path: str, inode: tuple[int, int] | None = None) -> bool:
    if _same_file(fd, path, inode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            return True
    return False


# Whether this kernel and filesystem take O_TMPFILE (decided by the first creation).
_tmpfile_ok: bool | None = None


def _open_unnamed(mode: int) -> int | None:
    """An unnamed inode on the shm filesystem, or ``None`` where O_TMPFILE is missing."""
    global _tmpfile_ok
    if _tmpfile_ok is False or not hasattr(os, "O_TMPFILE"):
        return None
    try:
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, mode)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            _tmpfile_ok = False
            return None
        raise
    _tmpfile_ok = True
    return fd


def _publish_unnamed(fd: int, final: str) -> None:
    """Give the unnamed inode ``fd`` its name; ``FileExistsError`` if taken.

    ``linkat(AT_SYMLINK_FOLLOW)`` on ``/proc/self/fd/N`` is the unprivileged way
    to name an O_TMPFILE inode. CPython passes that flag only when a dir fd is
    given, so one is, though an absolute path makes the kernel ignore it.
    """
    os.link(f"/proc/self/fd/{fd}", final, src_dir_fd=fd, follow_symlinks=True)


def _check_space(os_name: str, total: int) -> None:
    if total <= _PRECHECK_BYTES:
        return
    try:
        vfs = os.statvfs(SHM_DIR)
    except OSError:
        return
    if total > vfs.f_bavail * vfs.f_frsize:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os_name)


class PosixSegments(NativeKinds):
    """The segment half of the POSIX backend."""

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
        final = _path(os_name)
        dataoff = _align(_META_OFFSET + len(meta))
        total = dataoff + max(data_size, 1)
        _check_space(os_name, total)
        fd_or_none = _open_unnamed(mode)
        tmp: str | None = None
        if fd_or_none is None:
            # Same namespace prefix, kind "t", random tail: `gc` finds abandoned ones.
            tmp = _path(
                os_name[:-21] + "t" + base64.b32encode(os.urandom(13)).decode()[:20].lower()
            )
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        else:
            fd = fd_or_none
        published = False
        try:
            _ofd.lock(fd, _ofd.READ, _ofd.HOLD)
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os_name) from None
                raise
            flags = FLAG_PERSIST if persist else 0
            header = _HEADER.pack(
                _MAGIC, flags, len(meta), dataoff, data_size, time.time_ns(), os.getpid()
            )
            os.pwrite(fd, header + bytes(_META_OFFSET - len(header)) + meta, 0)
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)  # the umask must not narrow what was asked
            seg = _map(fd, os_name, st=st)
            if init is not None:
                init(seg.data)
            try:
                if tmp is None:
                    _publish_unnamed(fd, final)
                else:
                    os.link(tmp, final)
            except FileExistsError:
                seg.release_mapping()
                return None
            published = True
            return seg
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            if not published:
                os.close(fd)

    def segment_open(self, os_name: str, *, keep_orphan: KeepOrphan) -> PosixSegment | None:
        path = _path(os_name)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            try:
                _ofd.lock(fd, _ofd.WRITE, _ofd.GUARD)
                st = os.fstat(fd)
                if not _same_file(fd, path, (st.st_dev, st.st_ino)):
                    # A closer removed it between our open and our guard: the
                    # name may already name a newer object, so look again.
                    os.close(fd)
                    continue
                orphaned = _ofd.try_lock(fd, _ofd.WRITE, _ofd.HOLD)
                seg = _map(fd, os_name, st=st)
                if orphaned:
                    if not seg.persist and not keep_orphan(seg):
                        os.unlink(path)
                        seg.release_mapping()
                        os.close(fd)
                        return None
                    _ofd.lock(fd, _ofd.READ, _ofd.HOLD)  # atomic downgrade
                else:
                    _ofd.lock(fd, _ofd.READ, _ofd.HOLD)
                _ofd.unlock(fd, _ofd.GUARD)
                return seg
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    def segment_close(self, handle: SegmentHandle, *, keep: KeepOrphan) -> bool:
        assert isinstance(handle, PosixSegment)
        if handle.closed:
            return False
        handle.closed = True
        if handle.opener_pid != os.getpid():
            # Inherited across fork: the description (and its lock) is the
            # parent's. Drop our references without touching the kernel state.
            return False
        fd = handle.fd
        removed = False
        try:
            _ofd.lock(fd, _ofd.WRITE, _ofd.GUARD)
            _ofd.unlock(fd, _ofd.HOLD)
            if (
                _ofd.try_lock(fd, _ofd.WRITE, _ofd.HOLD)
                and not handle.persist
                and not keep(handle)
            ):
                removed = _unlink_if_same(fd, _path(handle.os_name), handle.inode)
        finally:
            # The mmap holds a dup of fd: when a numpy array keeps the mapping
            # alive, the description (and the locks on it) outlives os.close(fd),
            # and a guard left there would block every opener. Unlock explicitly.
            handle.release_mapping()
            if not handle.mm.closed:
                with contextlib.suppress(OSError):
                    _ofd.unlock(fd, _ofd.HOLD)
                    _ofd.unlock(fd, _ofd.GUARD)
            os.close(fd)
        return removed

    def segment_unlink(self, os_name: str) -> bool:
        try:
            os.unlink(_path(os_name))
        except FileNotFoundError:
            return False
        return True

    def _holders(self, names: set[str]) -> dict[str, list[int]]:
        """Pids with a descriptor open on each name (what /proc lets us see).

        Matched by inode, not by link text: a creator's descriptor still
        shows the temporary name it was opened under.
        """
        found: dict[str, list[int]] = {n: [] for n in names}
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
        return found

    def segment_list(self, prefix: str) -> list[SegmentInfo]:
        entries = self._entries(prefix)
        holders = self._holders(set(entries))
        infos = []
        for os_name in sorted(entries):
            path = _path(os_name)
            temporary = _is_temp(os_name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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

    def segment_collect(self, prefix: str, *, keep: KeepOrphan) -> list[str]:
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
                _ofd.lock(fd, _ofd.WRITE, _ofd.GUARD)
                if not _ofd.try_lock(fd, _ofd.WRITE, _ofd.HOLD):
                    continue  # somebody living holds it
                if _is_temp(os_name):
                    doomed = True  # its creator died before publishing it
                else:
                    try:
                        seg = _map(fd, os_name)
                    except (OSError, ValueError):
                        doomed = True  # not a procshare object we can read: junk
                    else:
                        doomed = not keep(seg)  # keep decides about persist too
                        seg.release_mapping()
                if doomed and _unlink_if_same(fd, path):
                    removed.append(os_name)
            finally:
                os.close(fd)
        return removed


_TEMP_RE = re.compile(r"/ps.{7}t")


def _is_temp(os_name: str) -> bool:
    return bool(_TEMP_RE.match(os_name))
