"""Named shared-memory objects on Linux tmpfs, with kernel-counted holders.

The object's layout and the handle of an open are in :mod:`.segment_object`,
listings in :mod:`.segment_listing`, anonymous segments in
:mod:`.segment_anonymous`; this module is the lifetime protocol.

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
every holder keeps a READ lock there, on an open file description kept
alive by the holder's descriptor while the process is far below its
descriptor limit (fewer than a quarter of ``ulimit -n`` held that way), and
by its *mapping* alone beyond that: the descriptor is then closed as soon
as the object is mapped (a mapping holds its own reference to the
description, and an OFD lock lasts as long as the description). So the
kernel drops a dead holder's hold with its descriptors and mappings,
whatever killed it, and a process can hold as many objects as it may have
mappings (``vm.max_map_count``, 65,530 by default), whatever its descriptor
limit. ``_shmstep_holds.h`` says how the kind is chosen and what fork
changes. A WRITE lock on byte 0 is taken only for a moment, by a process
that has found itself alone with the object and decides whether to remove
it; being exclusive, it stops anyone from becoming a holder meanwhile. No
other lock is needed:

* open: first try WRITE while holding nothing: it succeeds only if nobody
  holds the object, which makes it an orphan, and ``keep_orphan`` decides
  under that exclusive lock whether to remove it (then downgrade to READ,
  atomically). Otherwise take READ; if a remover has WRITE, wait for it, then
  see whether it unlinked the object meanwhile (``st_nlink == 0``: retry).
  Then map, and keep the descriptor or close it.
* close, with the descriptor (taken since the last fork: nobody shares it):
  upgrade READ to WRITE on it; if refused, drop READ and try WRITE again.
  Two last holders closing at once cannot both fail (whichever tries second
  sees the first gone).
* close, without one (or after a fork, having closed it): open the name
  again (a new description, holding nothing), unmap (the READ goes with the
  old description), then try WRITE on the new one. The last holder removes
  the object only if the name still is that object (device and inode) and
  it is still linked: one made since under the same name is never taken
  for it.
* an opener that slips in between a closer's unmap and its try keeps the
  object alive, and the closer leaves it; an opener that arrives after a
  closer left finds an orphan and reclaims it, as if it had come a moment
  later.

A mapping that cannot be unmapped at close, because a buffer exported from
it (a numpy array, a memoryview) is alive, is left with no lock on its
description: READ is dropped on the kept descriptor, or, without one, the
mapping is moved onto the new description (``MAP_FIXED`` at the same
address, the same pages) before the WRITE is tried: the hold still ends at
close, and the buffer keeps working.

Why no lock-free shortcut such as a counter in the header: a holder killed
by SIGKILL cannot decrement anything; the kernel releasing its locks is the
only count that stays right.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
import time
from collections.abc import Callable

from procshare._backends.api_segment import KeepOrphan, SegmentHandle
from procshare._backends.native_kinds import NativeKinds
from procshare._backends.posix import _ofd, _shmstep, segment_object
from procshare._backends.posix.segment_anonymous import (
    PosixAnonymous,
    PosixAnonymousSegments,
    close_anonymous,
)
from procshare._backends.posix.segment_listing import PosixSegmentListing, is_temp
from procshare._backends.posix.segment_object import (
    FLAG_PERSIST,
    HEADER,
    MAGIC,
    META_OFFSET,
    RDLCK_HOLD,
    UNLCK_HOLD,
    WRLCK_HOLD,
    PosixSegment,
    align,
    current_pid,
    map_object,
    mapping_usage,
    path_bytes,
    path_of,
    peek_data,
    raise_no_room,
    remember_path,
    segment_size_limit,
    try_lock,
    write_free,
)

__all__ = ["PosixSegment", "PosixSegments", "close_lock", "current_pid", "peek_data"]

_release = _shmstep.release
_unhold = _shmstep.unhold
_let_go = _shmstep.let_go
_REMOVED = _shmstep.REMOVED
_create = _shmstep.create
_publish = _shmstep.publish
_adopt = _shmstep.adopt
_fork_epoch = _shmstep.fork_epoch
#: ``close_lock(handle) -> removed``: a lock object's close (the backend's
#: ``lock_close``), reading paths and the pid where the Python path does.
close_lock = _shmstep.close_lock
_open_named = _shmstep.open_named
_shmstep.set_paths(vars(segment_object))
# segment_object._pid refreshed in every child (raw os.fork too), in C.
os.register_at_fork(after_in_child=_shmstep.refresh_pid)

# Up to this size the whole object is written with one pwrite (which reserves
# the pages just as fallocate does, and fails with ENOSPC the same way).
_PWRITE_BYTES = 64 << 10
# Above this size creation first compares with statvfs: on tmpfs, fallocate of
# a size between "free" and "filesystem size" fills RAM page by page before it
# fails, squeezing every other process for a moment.
_PRECHECK_BYTES = 1 << 20

# Whether this kernel and filesystem take O_TMPFILE (decided by the first creation).
_tmpfile_ok: bool | None = None


def _check_space(os_name: str, total: int) -> None:
    if total <= _PRECHECK_BYTES:
        return
    try:
        vfs = os.statvfs(segment_object.SHM_DIR)
    except OSError:
        return  # missing: creating says so
    if vfs.f_flag & os.ST_RDONLY or not vfs.f_blocks:
        return  # read-only, or not a filesystem with space (creating says why): not "full"
    if total > vfs.f_bavail * vfs.f_frsize:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os_name)


class PosixSegments(PosixSegmentListing, PosixAnonymousSegments, NativeKinds):
    """The segment half of the POSIX backend."""

    #: ``segment_open_fast(os_name, meta) -> handle | None | int``: the common
    #: case of :meth:`segment_open` in one C call, for the engine's C by-name
    #: opens; an int means "not the common case: call segment_open".
    segment_open_fast = staticmethod(_open_named)
    #: ``segment_close_fast(handle) -> removed``: ``segment_close(handle,
    #: keep=None)`` of a named segment in one C call, for the front end's C
    #: close; NotImplemented (nothing done) for any other handle.
    segment_close_fast = staticmethod(_shmstep.close_named)

    # -- limits, for the engine's messages -------------------------------------

    def segment_size_limit(self) -> int | None:
        return segment_size_limit()

    def segment_store_problem(self) -> str | None:
        where = segment_object.SHM_DIR
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

    def mapping_limit(self) -> tuple[int, int] | None:
        return mapping_usage()

    def segment_space(self) -> int | None:
        try:
            vfs = os.statvfs(segment_object.SHM_DIR)
        except OSError:
            return None
        return vfs.f_bavail * vfs.f_frsize

    # -- create -----------------------------------------------------------------

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
        dataoff = align(META_OFFSET + len(meta))
        total = dataoff + (data_size or 1)
        if total > _PRECHECK_BYTES:
            _check_space(os_name, total)
        if _tmpfile_ok is False:
            return self._create_named(os_name, meta, data_size, mode, persist, init, dataoff)
        # O_TMPFILE: the unnamed object is made, held, written and mapped in C,
        # initialised here, then published (see _shmstep.c).
        pid = segment_object._pid
        flags = FLAG_PERSIST if persist else 0
        epoch = 0
        try:
            if init is None:
                # Nothing to initialise (zeroed): made, held, mapped, published and
                # its handle built in one C call.
                path = path_bytes.get(os_name)
                if path is None:
                    path = remember_path(os_name)
                done = _create(
                    segment_object.SHM_DIR_BYTES,
                    meta,
                    flags,
                    dataoff,
                    data_size,
                    total,
                    mode,
                    pid,
                    path,
                    os_name,
                )
                if done is not None:
                    _tmpfile_ok = True
                    return done if type(done) is PosixSegment else None  # False: taken
                made = None
            else:
                epoch = _fork_epoch()  # before the READ hold is taken (_shmstep_holds.h)
                made = _create(
                    segment_object.SHM_DIR_BYTES,
                    meta,
                    flags,
                    dataoff,
                    data_size,
                    total,
                    mode,
                    pid,
                )
        except OSError as exc:
            raise_no_room(exc, os_name, total)
            raise
        if made is None:  # this kernel or filesystem has no O_TMPFILE: name a temporary
            if not os.path.isdir(segment_object.SHM_DIR):
                # ENOENT from a missing directory, not from a kernel without
                # O_TMPFILE: do not give up O_TMPFILE for good over it.
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), segment_object.SHM_DIR)
            _tmpfile_ok = False
            return self._create_named(os_name, meta, data_size, mode, persist, init, dataoff)
        _tmpfile_ok = True
        fd, mm, created, dev, ino = made
        seg = PosixSegment(
            os_name, mm, dev, ino, meta, persist, dataoff, data_size, created, pid, pid
        )
        published = False
        try:
            if init is not None:
                try:
                    init(seg.data)
                except BaseException:
                    os.close(fd)
                    raise
            path = path_bytes.get(os_name)
            if path is None:
                path = remember_path(os_name)
            # Keeps fd in seg for the hold while there is room; else closes it
            # and the mapping keeps the hold.
            published = _publish(fd, path, seg, epoch)
        finally:
            if not published:
                seg.release_mapping()
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
    ) -> PosixSegment | None:
        """Create under a random temporary name, then link it to its own (no O_TMPFILE)."""
        total = dataoff + (data_size or 1)
        final = path_of(os_name)
        # Same namespace prefix, kind "t", random tail: `gc` finds abandoned ones.
        tmp = path_of(os_name[:-21] + "t" + os.urandom(10).hex())
        epoch = _fork_epoch()
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        seg: PosixSegment | None = None
        published = False
        try:
            _ofd.lock(fd, _ofd.READ, _ofd.HOLD)
            flags = FLAG_PERSIST if persist else 0
            header = HEADER.pack(
                MAGIC, flags, len(meta), dataoff, data_size, time.time_ns(), segment_object._pid
            )
            head = header + bytes(META_OFFSET - len(header)) + meta
            try:
                if total <= _PWRITE_BYTES:
                    os.pwrite(fd, head + bytes(total - len(head)), 0)
                else:
                    os.posix_fallocate(fd, 0, total)
                    os.pwrite(fd, head, 0)
            except OSError as exc:
                raise_no_room(exc, os_name, total)
                raise
            # The umask narrows what open() was asked, owner bits included.
            os.fchmod(fd, mode)
            seg = map_object(fd, os_name)
            if init is not None:
                init(seg.data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return None
            published = True
            return seg
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if not (published and seg is not None and _adopt(seg, fd, epoch)):
                os.close(fd)  # the mapping keeps the description and its hold
            if seg is not None and not published:
                seg.release_mapping()

    # -- open -----------------------------------------------------------------

    def segment_open(
        self, os_name: str, *, keep_orphan: KeepOrphan, meta: bytes = b""
    ) -> PosixSegment | None:
        # The common case (somebody holds it, nobody is removing it) in one C
        # call; everything else through the protocol below.
        found = _open_named(os_name, meta)
        if found is None:
            return None
        if type(found) is PosixSegment:
            return found
        return self._open_protocol(os_name, keep_orphan)

    def _open_protocol(self, os_name: str, keep_orphan: KeepOrphan) -> PosixSegment | None:
        path = path_of(os_name)
        while True:
            epoch = _fork_epoch()
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            held: PosixSegment | None = None  # the open that keeps fd, if room
            try:
                # WRITE first, holding nothing: it succeeds only if nobody holds
                # the object, i.e. it is an orphan. Two openers of one orphan
                # cannot both miss that: one wins, the other waits below.
                # (write_free first: a cheap look that skips a WRITE bound to fail.)
                alone = write_free(fd) and try_lock(fd, WRLCK_HOLD)
                if not alone and not try_lock(fd, RDLCK_HOLD):
                    # A remover holds WRITE: wait for its decision.
                    _ofd.lock(fd, _ofd.READ, _ofd.HOLD)
                st = os.fstat(fd)
                if st.st_nlink == 0:
                    # Removed between our open and our lock: the name may
                    # already name a newer object, so look again.
                    continue
                seg = map_object(fd, os_name, st)
                try:
                    if alone:
                        if not seg.persist and not keep_orphan(seg):
                            os.unlink(path)  # we hold WRITE: nobody can be attaching
                            seg.release_mapping()
                            return None
                        try_lock(fd, RDLCK_HOLD)  # atomic downgrade, cannot fail
                except BaseException:
                    # Never leave a WRITE (or a hold) behind in a stray mapping.
                    try_lock(fd, UNLCK_HOLD)
                    seg.release_mapping()
                    raise
                held = seg
                return seg
            finally:
                # Kept for the hold while there is room; else the mapping keeps
                # the description and its hold.
                if held is None or not _adopt(held, fd, epoch):
                    os.close(fd)

    # -- close ----------------------------------------------------------------

    def segment_close(self, handle: SegmentHandle, *, keep: KeepOrphan | None) -> bool:
        if type(handle) is PosixSegment:
            path = path_bytes.get(handle.os_name)
            if path is None:
                path = remember_path(handle.os_name)
            # One C call (see _shmstep.c): a no-op for a handle inherited across
            # fork (the hold is shared with the parent); unmapping for a persist
            # one. With keep None C decides and unlinks; else it returns a
            # descriptor with WRITE held when we were the last holder, for keep.
            state = _release(handle, path, segment_object._pid, keep is None)
            if state < 0:
                return state == _REMOVED
            return self._decide(handle.os_name, state, keep)
        if type(handle) is PosixAnonymous:
            return close_anonymous(handle)
        raise TypeError(f"not a POSIX segment handle: {handle!r}")

    def segment_let_go(self, handle: SegmentHandle) -> None:
        if type(handle) is not PosixSegment or handle.closed:
            return  # anonymous: children forked later may keep it, nothing to leave behind
        if handle.opener_pid != segment_object._pid:
            return
        handle.drop_data()
        path = path_bytes.get(handle.os_name)
        if path is None:
            path = remember_path(handle.os_name)
        _let_go(handle, path)

    def _decide(self, os_name: str, fd: int, keep: KeepOrphan | None) -> bool:
        """As the last holder of ``os_name`` (WRITE held on ``fd``), remove it
        unless ``keep`` keeps it, reading it through a mapping of its own."""
        removed = False
        try:
            seg = map_object(fd, os_name)
            try:
                doomed = keep is None or not keep(seg)
            finally:
                seg.release_mapping()
            if doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path_of(os_name))
                    removed = True
        finally:
            _unhold(fd)
        return removed

    # -- unlink, identity, collect -----------------------------------------------

    def segment_unlink(
        self, os_name: str, *, identity: tuple[int, int, int] | None = None
    ) -> bool:
        if identity is not None and self.object_identity(os_name) != identity:
            return False  # (a narrow race remains: unlink has no "if still this inode")
        try:
            os.unlink(path_of(os_name))
        except FileNotFoundError:
            return False
        return True

    def object_identity(self, os_name: str) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(path_of(os_name))
        except (OSError, ValueError):
            return None
        return (st.st_uid, st.st_dev, st.st_ino)

    def segment_collect(self, prefix: str, *, keep: KeepOrphan, junk: bool = True) -> list[str]:
        removed = []
        for os_name in self._entries(prefix):
            path = path_of(os_name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                if not try_lock(fd, WRLCK_HOLD):
                    continue  # somebody living holds it (or is deciding about it)
                if is_temp(os_name):
                    # Its creator died before publishing it, or (a moment after
                    # its creation, before its READ hold) is still making it:
                    # only `gc`, asked by a person, takes that chance.
                    doomed = junk
                else:
                    try:
                        seg = map_object(fd, os_name)
                    except OSError as exc:
                        if exc.errno != errno.EBADMSG:
                            continue  # cannot map it now (vm.max_map_count): not junk
                        doomed = junk  # not a procshare object we can read: junk
                    else:
                        try:
                            doomed = not keep(seg)  # keep decides about persist too
                        finally:
                            seg.release_mapping()
                if doomed and os.fstat(fd).st_nlink > 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        removed.append(os_name)
                try_lock(fd, UNLCK_HOLD)  # in case a buffer keeps the mapping (and fd's WRITE)
            finally:
                os.close(fd)
        return removed
