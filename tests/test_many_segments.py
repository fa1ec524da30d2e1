"""Holds with and without descriptors: far more segments than ``ulimit -n``, and the limits.

A hold keeps its descriptor while this process is far below its descriptor
limit (a quarter of ``ulimit -n``), so that closing needs no new open of the
name; beyond that an open segment is one shared mapping and no descriptor
(SPEC 3): a process holds as many as ``vm.max_map_count`` allows, and running
into that limit is a ``ps.MappingLimit`` that names it. The children here
lower their own limits; nothing changes a sysctl.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import mmap
import os
import resource
import struct
from pathlib import Path

import pytest

import procshare as ps
from procshare._backends.posix import _shmstep
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


def test_an_open_segment_is_one_mapping_and_one_descriptor_while_there_is_room() -> None:
    seg = ps.shared("one", ps.u64, initial=5)
    path = _path("one")
    try:
        assert _descriptors_on(path) == 1
        assert _mappings_of(path) == 1
        again = ps.shared("one", ps.u64)  # the same object, opened twice: two holds
        assert _descriptors_on(path) == 2
        assert _mappings_of(path) == 2
        again.close()
        assert _descriptors_on(path) == 1
        # A close that is not the last may keep its small mapping as a spare
        # for the next open: listed as such, and no hold (next test).
        ino = os.stat(path).st_ino
        assert _mappings_of(path) - 1 == sum(1 for _d, i in _shmstep.spares() if i == ino)
        assert os.path.exists(path)
    finally:
        seg.close()
    assert not os.path.exists(path)


@ps.forked
def _holds_until(name: str, ready_w: int, go_r: int) -> None:
    with ps.shared(name, ps.u64, create=False) as s:
        s.value += 1
        os.write(ready_w, b"r")
        os.read(go_r, 1)


def test_a_spare_mapping_is_no_hold() -> None:
    # The parent attaches and closes while a child holds: its mapping stays as
    # an idle spare. When the child, the last holder, closes, the segment goes.
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        with ps.shared("sp", ps.u64) as first:
            child = _holds_until("sp", ready_w, go_r)
            os.read(ready_r, 1)
        path = _path("sp")
        assert os.path.exists(path)  # the child holds it: the parent's close left it
        with ps.shared("sp", ps.u64, create=False) as again:  # a held segment: attach + close
            assert again.value == 1
        st = os.stat(path)
        assert (st.st_dev, st.st_ino) in _shmstep.spares()
        assert _mappings_of(path) >= 1  # the spare, still mapped here
        (info,) = [i for i in ps.segments() if i.name == "sp"]
        assert info.holders == (child.pid,)  # the spare is not listed as a hold
        assert _held_by_someone("sp")
        os.write(go_w, b"g")
        child.join(timeout=30)
        assert not os.path.exists(path)  # the child was the last holder: the spare did not count
        del first
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


@ps.forked
def _cross_the_budget(nofile: int, count: int) -> dict[str, object]:
    """Lower ulimit -n so that the descriptor budget (a quarter of it) is small,
    then hold past it and come back below it."""
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    for _ in range(10):  # the limit is read again every few opens: let it be seen
        ps.shared("warm", ps.u64).close()
    baseline = len(os.listdir("/proc/self/fd"))
    budget = _shmstep.descriptors()[1]
    segs = [ps.shared(f"x{i}", ps.u64, initial=i) for i in range(count)]
    kept = [s for s in segs if s._rec.handle.fd >= 0]
    mapped = [s for s in segs if s._rec.handle.fd < 0]
    during = len(os.listdir("/proc/self/fd"))
    held = [_held_by_someone(f"x{i}") for i in (0, count - 1)]
    # Back below the budget: closing some descriptor-keeping holds makes room,
    # and the next opens keep descriptors again.
    for s in kept[:5]:
        s.close()
    later = [ps.shared(f"y{i}", ps.u64, initial=i) for i in range(5)]
    later_fds = [s._rec.handle.fd >= 0 for s in later]
    total = sum(int(s.view.value) for s in segs[5:] + later if not s.closed)
    for s in segs + later:
        s.close()
    left = [n for n in (f"x{i}" for i in range(count)) if os.path.exists(_path(n))]
    left += [n for n in (f"y{i}" for i in range(5)) if os.path.exists(_path(n))]
    return {
        "budget": budget,
        "kept": len(kept),
        "mapped": len(mapped),
        "fds_added": during - baseline,
        "held": held,
        "later_fds": later_fds,
        "total": total,
        "left": left,
        "fds_after": len(os.listdir("/proc/self/fd")) - baseline,
        "descriptor_holds": _shmstep.descriptors()[0],
    }


def test_the_descriptor_budget_is_a_quarter_of_ulimit_n_and_at_most_1024() -> None:
    for _ in range(10):  # the limit is read again every few opens
        ps.shared("b", ps.u64).close()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    expected = 1024 if soft == resource.RLIM_INFINITY else min(soft // 4, 1024)
    assert _shmstep.descriptors()[1] == expected


def test_holds_cross_the_descriptor_budget_both_ways() -> None:
    nofile, count = 64, 40
    got = _cross_the_budget(nofile, count).join(timeout=100)
    assert got["budget"] == nofile // 4
    assert got["kept"] == nofile // 4  # the first holds keep their descriptor ...
    assert got["mapped"] == count - nofile // 4  # ... the rest have none
    assert got["fds_added"] == nofile // 4  # none leaked, none more than the budget
    assert got["held"] == [True, True]  # both kinds really held (the kernel's count)
    assert got["later_fds"] == [True] * 5  # room again below the budget
    assert got["total"] == sum(range(5, count)) + sum(range(5))
    assert got["left"] == []  # every last close removed its segment, either kind
    assert got["fds_after"] == 0  # no descriptor left behind
    assert got["descriptor_holds"] == 0


@ps.forked
def _close_after_raw_fork() -> tuple[bool, bool, bool]:
    seg = ps.shared("rf", ps.u64, initial=7)
    assert seg._rec.handle.fd >= 0
    go_r, go_w = os.pipe()
    pid = os.fork()  # a raw fork, unknown to procshare's engine
    if pid == 0:  # pragma: no cover - the child: keeps the inherited hold a while
        os.close(go_w)
        os.read(go_r, 1)
        os._exit(0)
    os.close(go_r)
    seg.close()  # the child shares the hold's description: it must keep its part
    kept = os.path.exists(_path("rf"))
    held = _held_by_someone("rf")
    os.write(go_w, b"g")
    os.close(go_w)
    os.waitpid(pid, 0)
    gone_hold = not _held_by_someone("rf")
    ps.unlink("rf")  # an orphan now (the next use of the namespace would reclaim it)
    return kept, held, gone_hold


def test_a_hold_taken_before_a_raw_fork_is_left_to_the_child_at_close() -> None:
    # Closing on the kept descriptor would drop the READ lock the child shares
    # (OFD locks belong to the open file description, which fork shares): a
    # hold taken before any fork is closed the mapping way instead.
    assert _close_after_raw_fork().join(timeout=60) == (True, True, True)


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
    _shmstep.drop_spares()  # (inherited idle mappings would give way: next test)
    kept = None
    if kind == "spare":
        kept = ps.shared("kept", ps.u64)
        ps.shared("kept", ps.u64).close()  # not the last close: its mapping stays a spare
        assert len(_shmstep.spares()) == 1
    filler = _fill_the_map_count(slack=0)
    try:
        if kind == "spare":
            ps.shared("late", ps.u64).close()  # the spare gives way
            return "nothing raised", str(_shmstep.spares()), 0, None, None
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
        if kept is not None:
            kept.close()
    return "nothing raised", "", 0, None, None


def test_idle_spare_mappings_give_way_at_vm_max_map_count() -> None:
    assert _open_past_the_map_count("spare").join(timeout=100) == (
        "nothing raised",
        "[]",
        0,
        None,
        None,
    )


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


def _close_together(rounds: int, start_r: int, done_w: int) -> int:
    """The child's half: each round, wait for the segment, open it, wait for the
    go, close it."""
    closed = 0
    for i in range(rounds):
        os.read(start_r, 1)  # made
        seg = ps.shared(f"tw{i}", ps.u64, create=False)
        os.write(done_w, b"o")  # opened
        os.read(start_r, 1)  # go
        seg.close()
        closed += 1
        os.write(done_w, b"c")
    return closed


@pytest.mark.timeout(120)
def test_two_last_holders_closing_at_once_leave_no_orphan() -> None:
    # Each close first tries to upgrade its READ to WRITE on its own
    # descriptor. Two last holders doing only that at the same moment would
    # both be refused and both leave: the segment would stay, held by nobody.
    # The refused one drops READ and tries again, so one of them removes it.
    rounds = 300
    start_r, start_w = os.pipe()
    done_r, done_w = os.pipe()
    child = ps.forked(_close_together)(rounds, start_r, done_w)
    try:
        for i in range(rounds):
            seg = ps.shared(f"tw{i}", ps.u64)  # opened after the fork: its own hold
            os.write(start_w, b"m")
            assert os.read(done_r, 1) == b"o"
            os.write(start_w, b"g")
            seg.close()  # while the child closes its own hold
            assert os.read(done_r, 1) == b"c"
        assert child.join(timeout=60) == rounds
        left = [i for i in range(rounds) if os.path.exists(_path(f"tw{i}"))]
        assert left == []  # every round's last closer removed it
    finally:
        for i in range(rounds):
            ps.unlink(f"tw{i}")  # (only if the test failed)
        for fd in (start_r, start_w, done_r, done_w):
            os.close(fd)


@ps.forked
def _nothing() -> None:
    pass


@pytest.mark.parametrize("forked_since", [False, True], ids=["alone", "forked-since"])
@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("ending", ["close", "dropped"])
def test_a_kept_descriptor_closed_behind_its_back_is_not_touched(
    ending: str, which: str, forked_since: bool, tmp_path: Path
) -> None:
    # A program may close descriptors it did not open (os.closerange) and get
    # the number back for a file of its own. Closing the segment must leave
    # that file alone (no lock call on it, no close), and still decide from
    # the object itself: while the other hold is open the name stays, and the
    # last close removes it. "alone": no fork since the open (the close on the
    # kept descriptor); "forked-since": the close the mapping way.
    first = ps.shared("cb", ps.u64, initial=3)
    last = ps.shared("cb", ps.u64)
    path = _path("cb")
    own = os.open(tmp_path / "own", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        victim = first if which == "first" else last
        taken = victim._rec.handle.fd
        assert taken >= 0
        assert _descriptors_on(path) == 2
        if forked_since:
            assert _nothing().join(timeout=60) is None
        os.dup2(own, taken)  # closes the segment's descriptor; the number is a file's now
        assert _descriptors_on(path) == 1
        if ending == "close":
            first.close()
            assert os.path.exists(path)
            assert _held_by_someone("cb")
            last.close()
        else:
            del first, victim
            gc.collect()
            assert os.path.exists(path)
            assert _held_by_someone("cb")
            del last
            gc.collect()
        assert not os.path.exists(path)  # the last hold removed it
        os.pwrite(taken, b"x", 0)  # the program's file is still open there, and its own
        assert (tmp_path / "own").read_bytes() == b"x"
        os.close(taken)
    finally:
        os.close(own)
