"""A hold needs no descriptor: far more segments than ``ulimit -n``, and the limits that remain.

An open segment is one shared mapping and no descriptor (SPEC 3): a process
holds as many as ``vm.max_map_count`` allows, and running into that limit
is a ``ps.MappingLimit`` that names it. The children here lower their own
limits; nothing changes a sysctl.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import struct

import pytest

import procshare as ps
from procshare._engine import names

pytestmark = pytest.mark.timeout(120)

_WRITE_HOLD = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0)


def _path(name: str) -> str:
    return "/dev/shm" + names.os_name(names.SEGMENT, name)


def _held_by_someone(name: str) -> bool:
    """Whether a WRITE on the holder byte is refused: somebody holds the object."""
    fd = os.open(_path(name), os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WRITE_HOLD)
    except BlockingIOError:  # EAGAIN: a READ hold is there
        return True
    finally:
        os.close(fd)  # (drops the WRITE if it was granted)
    return False


def _descriptors_on(path: str) -> int:
    ino = os.stat(path).st_ino
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{fd}").st_ino == ino:
                count += 1
        except OSError:
            pass
    return count


def _mappings_of(path: str) -> int:
    ino = str(os.stat(path).st_ino)
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.split()[4:5] == [ino])


def test_an_open_segment_is_one_mapping_and_no_descriptor() -> None:
    seg = ps.shared("one", ps.u64, initial=5)
    path = _path("one")
    try:
        assert _descriptors_on(path) == 0
        assert _mappings_of(path) == 1
        again = ps.shared("one", ps.u64)  # the same object, opened twice: two holds
        assert _descriptors_on(path) == 0
        assert _mappings_of(path) == 2
        again.close()
        assert _mappings_of(path) == 1  # a close that is not the last unmaps too
        assert os.path.exists(path)
    finally:
        seg.close()
    assert not os.path.exists(path)


@ps.forked
def _hold_many(count: int, nofile: int) -> tuple[int, int, list[bool]]:
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    segs = [ps.shared(f"m{i}", ps.u64, initial=i) for i in range(count)]
    try:
        total = sum(int(s.view.value) for s in segs)
        descriptors = len(os.listdir("/proc/self/fd"))
        held = [_held_by_someone(f"m{i}") for i in (0, count // 2, count - 1)]
        return total, descriptors, held
    finally:
        for s in segs:
            s.close()


def test_a_process_holds_far_more_segments_than_its_descriptor_limit() -> None:
    count, nofile = 2000, 256
    total, descriptors, held = _hold_many(count, nofile).join(timeout=100)
    assert total == sum(range(count))
    assert descriptors < nofile  # none kept per segment
    assert held == [True, True, True]  # each one really held (by the kernel's count)
    assert not any(os.path.exists(_path(f"m{i}")) for i in range(count))  # last close removed


def _fill_the_map_count(slack: int) -> list[mmap.mmap]:
    """Split one PROT_NONE reservation into separate mappings (every other page
    made readable) until this process has ``vm.max_map_count - slack``. Never
    touched, so it costs no memory; the child that calls it exits soon after."""
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    with open("/proc/self/maps") as f:
        have = sum(1 for _ in f)
    want = limit - slack - have  # mappings to add: each mprotect splits off two
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000  # MAP_NORESERVE
    start = libc.mmap(None, (want + 4) * page, 0, flags, -1, 0)
    assert start not in (None, ctypes.c_void_p(-1).value)
    for i in range(want // 2 + 2):
        if libc.mprotect(start + (2 * i + 1) * page, page, mmap.PROT_READ) != 0:
            break  # ENOMEM: splitting stops at the limit
    # mmap itself may add one past it: take those too (shared: never merged).
    extra = []
    while True:
        try:
            extra.append(mmap.mmap(-1, page, mmap.MAP_SHARED))
        except OSError:
            return extra


@ps.forked
def _open_past_the_map_count(kind: str) -> tuple[str, str, int, int | None, int | None]:
    # Everything the open path needs is warmed up first: only its own mmap may fail.
    ps.shared("warm", ps.u64).close()
    ps.shared(ps.u64).close()
    filler = _fill_the_map_count(slack=0)
    try:
        if kind == "named":
            ps.shared("late", ps.u64).close()
        else:
            ps.shared(ps.u64).close()
    except ps.ProcshareError as err:
        code = err.errno if isinstance(err, OSError) else -1
        return (
            type(err).__name__,
            str(err),
            code or 0,
            getattr(err, "mappings", None),
            getattr(err, "limit", None),
        )
    finally:
        for m in filler:
            m.close()
    return "nothing raised", "", 0, None, None


@pytest.mark.parametrize("kind", ["named", "anonymous"])
def test_running_out_of_mappings_names_vm_max_map_count(kind: str) -> None:
    name, message, code, mappings, limit = _open_past_the_map_count(kind).join(timeout=100)
    assert name == "MappingLimit", message
    with open("/proc/sys/vm/max_map_count") as f:
        assert limit == int(f.read())
    assert name == "MappingLimit", message
    assert code == errno.ENOMEM
    assert mappings is not None
    assert mappings >= limit - 8
    assert "vm.max_map_count" in message
    assert "sysctl -w vm.max_map_count=" in message
    assert not os.path.exists(_path("late"))  # nothing half-made left behind


def test_mapping_limit_pickles_and_is_an_oserror() -> None:
    import pickle

    err = ps.MappingLimit("x", mappings=65530, limit=65530)
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOMEM
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    assert again.limit == 65530
    below = ps.MappingLimit("x", mappings=100, limit=65530)
    assert "ulimit -v" in str(below)
