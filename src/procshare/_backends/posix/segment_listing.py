"""Looking at named objects without holding them: listings and who holds what.

For ``ps.segments()``, ``python -m procshare ls`` and the pytest plugin's leak
check; never for lifetime decisions (those are the kernel's OFD locks, see
``segment.py``).
"""

from __future__ import annotations

import contextlib
import os
import re

from procshare._backends.api_segment import SegmentInfo
from procshare._backends.posix import _shmstep, segment_object
from procshare._backends.posix.segment_object import (
    FLAG_PERSIST,
    HEADER,
    META_OFFSET,
    path_of,
    read_header,
)

_TEMP_RE = re.compile(r"/ps.{7}t")


def is_temp(os_name: str) -> bool:
    """Whether ``os_name`` is a creation's temporary (kind ``t``), not an object."""
    return bool(_TEMP_RE.match(os_name))


def _mapped_inodes(
    pid: str, inodes: dict[int, str], shm_dir: bytes, spare: frozenset[int] = frozenset()
) -> set[str]:
    """The names among ``inodes`` (inode -> OS name) that ``pid`` maps; a
    mapping of an inode in ``spare`` (this process's idle spares, one each,
    which hold nothing) is not counted."""
    hits: set[str] = set()
    spared: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                # start-end perms offset dev inode path
                fields = line.split(None, 5)
                if len(fields) < 6 or not fields[5].startswith(shm_dir):
                    continue
                ino = int(fields[4])
                hit = inodes.get(ino)
                if hit is None:
                    continue
                if ino in spare and ino not in spared:
                    spared.add(ino)  # (an object's spare and its hold are two mappings)
                    continue
                hits.add(hit)
    except (OSError, ValueError):
        pass
    return hits


class PosixSegmentListing:
    """The listing half of the POSIX segments (a mixin of ``PosixSegments``)."""

    def segment_holders(self, names: set[str], *, mapped: bool = False) -> dict[str, list[int]]:
        """Pids that hold each name: that map it (a procshare hold beyond the
        descriptor budget is a mapping, with no descriptor) or have a
        descriptor open on it.

        Matched by inode, not by path: a creator's mapping and descriptor
        still show the unnamed or temporary inode they were made on. A raw
        segment is often only mapped too (``posix_ipc`` closes its
        descriptor), so ``mapped`` changes nothing here: mappings always count.
        """
        found: dict[str, list[int]] = {n: [] for n in names}
        by_inode: dict[tuple[int, int], str] = {}
        dev = None
        for name in names:
            try:
                st = os.stat(path_of(name))
            except OSError:
                continue
            by_inode[(st.st_dev, st.st_ino)] = name
            dev = st.st_dev
        if not by_inode:
            return found
        # Every object lives on the one filesystem under SHM_DIR: maps lines
        # give the inode number and the path it was mapped under.
        inodes = {ino: name for (d, ino), name in by_inode.items() if d == dev}
        shm_dir = segment_object.SHM_DIR.encode() + b"/"
        me = str(os.getpid())
        spare = frozenset(ino for d, ino in _shmstep.spares() if d == dev)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            # Only this process's spares are known here: another process's
            # idle spare mapping (see _shmstep_holds.h) is listed as a holder.
            seen = _mapped_inodes(entry, inodes, shm_dir, spare if entry == me else frozenset())
            fd_dir = f"/proc/{entry}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                fds = []
            for fdname in fds:
                try:
                    st = os.stat(f"{fd_dir}/{fdname}")
                except OSError:
                    continue
                hit = by_inode.get((st.st_dev, st.st_ino))
                if hit is not None:
                    seen.add(hit)
            for hit in seen:
                found[hit].append(int(entry))
        return found

    def segment_list(self, prefix: str) -> list[SegmentInfo]:
        entries = self._entries(prefix)
        holders = self.segment_holders(set(entries))
        infos = []
        for os_name in sorted(entries):
            temporary = is_temp(os_name)
            try:
                # O_NONBLOCK: a FIFO someone put under our prefix must not hang ls.
                fd = os.open(path_of(os_name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                flags, meta, created, creator = 0, b"", 0, 0
                if size >= META_OFFSET:
                    # pread, not a mapping: a listing maps nothing (and holds nothing).
                    head = os.pread(fd, META_OFFSET, 0)
                    metalen = HEADER.unpack_from(head, 0)[2]
                    if metalen <= size - META_OFFSET:
                        head += os.pread(fd, metalen, META_OFFSET)
                    # Not a procshare object: listed as what it is.
                    with contextlib.suppress(OSError):
                        flags, meta, _, _, created, creator = read_header(head, os_name)
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
            names = os.listdir(segment_object.SHM_DIR)
        except FileNotFoundError:
            return []
        return ["/" + n for n in names if n.startswith(base)]

    def os_objects(self) -> frozenset[str]:
        try:
            return frozenset("/" + n for n in os.listdir(segment_object.SHM_DIR))
        except FileNotFoundError:
            return frozenset()
