"""Shared data without names (issue 19): anonymous segments and locks, private namespaces."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from typing import Annotated

import attrs
import numpy as np
import pytest

import procshare as ps
from procshare._backends import get_backend
from procshare._engine import names
from shared_support import Helper, alive, run_in_child, wait_for


@attrs.define
class Stats:
    count: int
    errors: Annotated[int, ps.u32]
    mean: float


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int32), ("y", ctypes.c_double)]


# -- anonymous segments --------------------------------------------------------


def _backing(address: int, pid: int | str = "self") -> str:
    """What backs the mapping holding ``address`` in ``pid`` (its /proc maps path)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"{address:#x} is not mapped")


def _shm_paths(pid: int | str = "self") -> set[str]:
    """The /dev/shm files ``pid`` maps or has open."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        found |= {line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/dev/shm/"):
                found.add(target)
    return found


@pytest.mark.timeout(60)
def test_an_anonymous_value_is_shared_with_forked_children_and_named_nowhere(
    procshare_leak_check: str,
) -> None:
    # (Other programs may create objects in /dev/shm meanwhile: look only at
    # what backs our memory, and at this test's own namespace.)
    shm_before = _shm_paths()

    @ps.forked
    def add(total: ps.Segment, i: int) -> None:
        with closing(lock):
            with lock:
                total.view.value += i

    with ps.shared(ps.u64) as total:
        lock = ps.interprocess_lock()
        seg = ps.shared(ps.u64)
        with ps.children():
            for i in range(1, 11):
                add(seg, i)
        assert seg.view.value == 55
        assert total.value == 0  # two anonymous segments are two segments
        for address in (seg._rec.handle.address, lock._entry.handle.address):  # type: ignore[union-attr]
            assert _backing(address) == "/dev/zero (deleted)"  # no name anywhere
        assert _shm_paths() == shm_before
        prefix = names.namespace_prefix(procshare_leak_check)
        assert not [n for n in get_backend().os_objects() if n.startswith(prefix)]
        seg.close()
        lock.close()


@pytest.mark.timeout(120)
def test_the_seed_scenario_with_an_anonymous_value_and_lock() -> None:
    """All children start together (released by one pipe) and their critical
    sections are long enough to overlap on 2 cores; a negative control without
    the lock shows the test can fail."""

    def run(locked: bool) -> int:
        r, w = os.pipe()

        @ps.forked
        def job(i: int) -> None:
            os.read(r, 1)  # wait until every child is forked
            for _ in range(3):
                if locked:
                    with lock:
                        v = total.value
                        time.sleep(0.01)  # let another child try to interleave
                        total.value = v + i
                else:
                    v = total.value
                    time.sleep(0.01)
                    total.value = v + i

        try:
            with ps.shared(ps.u64) as total, closing(ps.interprocess_lock()) as lock:
                with ps.children():
                    for i in range(1, 13):
                        job(i)
                    os.write(w, b"g" * 12)
                return int(total.value)
        finally:
            os.close(r)
            os.close(w)

    assert run(locked=True) == 3 * sum(range(1, 13))
    assert run(locked=False) < 3 * sum(range(1, 13))  # lost updates without the lock


def test_anonymous_views_have_the_types_of_named_ones() -> None:
    with ps.shared(int, initial=-5) as number:
        assert number.value == -5
    with ps.shared(ps.f32, initial=1.5) as f:
        assert f.value == 1.5
        with pytest.raises(ValueError, match="f32"):
            f.value = 1e39
    with ps.shared(Stats, initial=Stats(1, 2, 0.5)) as stats:
        stats.count += 1
        assert (stats.count, stats.errors, stats.mean) == (2, 2, 0.5)
    with ps.shared(Point, initial=Point(3, 4.0)) as p:
        assert (p.x, p.y) == (3, 4.0)
    with ps.shared(np.float64, shape=(2, 3), initial=1.0) as grid:
        assert isinstance(grid, np.ndarray)
        assert grid.shape == (2, 3)
        assert grid.sum() == 6.0
    with ps.shared(bytes, size=8, initial=b"hey") as blob:
        assert isinstance(blob, memoryview)
        assert bytes(blob[:4]) == b"hey\0"
    with ps.shared(ps.u8) as small:
        with pytest.raises(ValueError, match="u8"):
            small.value = 256
    with pytest.raises(TypeError, match="Supported kinds"):
        ps.shared(object)


def test_the_segment_handle_says_it_is_anonymous() -> None:
    seg = ps.shared(ps.u64, initial=7)
    try:
        assert seg.anonymous
        assert seg.created
        assert not seg.persist
        assert seg.name == "(anonymous)"
        assert seg.namespace == ""
        assert seg.kind == "u64"
        assert seg.size == 8
        assert "anonymous" in repr(seg)
        assert seg.view.value == 7
    finally:
        seg.close()
    assert seg.closed
    with ps.shared("named-one", ps.u64) as _, ps.shared("named-one", ps.u64) as _:
        pass
    named = ps.shared("named-two", ps.u64)
    assert not named.anonymous
    named.close()


def test_a_scalar_view_is_closed_after_the_block_and_an_array_keeps_working() -> None:
    with ps.shared(ps.u64) as v:
        v.value = 3
    with pytest.raises(ps.SegmentClosed):
        _ = v.value
    with ps.shared(Stats) as s:
        pass
    with pytest.raises(ps.SegmentClosed):
        s.count = 1
    with ps.shared(np.int64, shape=(4,)) as a:
        a[:] = 9
    assert int(a.sum()) == 36  # pins the still-mapped memory (as for named ones)


@pytest.mark.timeout(60)
def test_closing_in_the_parent_leaves_a_running_child_its_memory() -> None:
    with ps.shared(ps.u64, initial=1) as v:
        r, w = os.pipe()

        @ps.forked
        def later() -> int:
            os.read(r, 1)  # the parent has closed its segment by now
            v.value += 41
            return int(v.value)

        child = later()
    # The parent's block ended (unmapped); the child still has its mapping.
    os.write(w, b"x")
    assert child.join() == 42
    os.close(r)
    os.close(w)


@pytest.mark.timeout(60)
def test_a_child_closing_what_it_inherited_leaves_the_parent_alone() -> None:
    seg = ps.shared(ps.u64, initial=5)
    try:

        @ps.forked
        def child() -> bool:
            seg.close()
            return seg.closed

        assert child().join() is True
        assert not seg.closed
        assert seg.view.value == 5
    finally:
        seg.close()


@pytest.mark.timeout(60)
def test_everyone_killed_leaves_nothing_and_the_kernel_frees_the_memory() -> None:
    """A child makes a 4 MiB anonymous segment (a memfd, reserved at creation),
    forks a grandchild that maps it too, and both are SIGKILLed: nothing is in
    /dev/shm, and no process maps that memory any more, so the kernel has freed it."""
    r, w = os.pipe()

    def setup(helper: Helper) -> None:
        seg = ps.shared(np.uint8, shape=(4 << 20,))
        seg.view[:] = 1
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(60)
            finally:
                os._exit(0)
        os.write(w, f"{pid}\n".encode())
        helper.ready()
        helper.wait_release()

    helper = Helper(setup)
    helper.wait_ready()
    grandchild = int(os.read(r, 64).decode())
    os.close(r)
    os.close(w)
    try:
        inode = _anonymous_inode(helper.pid)
        assert inode is not None
        assert inode in _anonymous_inodes(grandchild)
        # Nothing in /dev/shm to leave behind (beyond what they inherited from us).
        assert _shm_paths(helper.pid) - _shm_paths() == set()
        assert _shm_paths(grandchild) - _shm_paths() == set()
    finally:
        os.kill(grandchild, signal.SIGKILL)
        helper.kill()
    assert wait_for(lambda: not alive(grandchild))
    assert wait_for(lambda: all(inode not in _anonymous_inodes(p) for p in _pids()))


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _anonymous_inodes(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {
                line.split()[4]
                for line in f
                if "memfd:procshare-anonymous" in line.split(None, 5)[-1]
            }
    except OSError:
        return set()


def _anonymous_inode(pid: int) -> str | None:
    found = _anonymous_inodes(pid)
    return next(iter(found)) if len(found) == 1 else None


def test_a_segment_that_cannot_fit_is_shared_memory_full_at_creation() -> None:
    space = get_backend().anonymous_space()
    assert space is not None
    with pytest.raises(ps.SharedMemoryFull) as info:
        ps.shared(bytes, size=space + (1 << 30))
    assert isinstance(info.value, OSError)
    assert info.value.errno == 28
    assert "RAM" in str(info.value)
    assert info.value.requested == space + (1 << 30)


def test_a_large_segment_over_the_file_size_limit_names_the_limit() -> None:
    def child() -> str:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            ps.shared(bytes, size=4 << 20)
        except ps.SharedMemoryFull as exc:
            return str(exc)
        return "created"

    assert "ulimit -f" in run_in_child(child)


# -- what an anonymous object cannot do, said clearly -------------------------------


def test_pickling_an_anonymous_segment_view_or_lock_says_why_and_what_to_do() -> None:
    lock = ps.interprocess_lock()
    try:
        with (
            ps.shared(ps.u64) as number,
            ps.shared(Stats) as stats,
            ps.shared(Point) as point,
        ):
            seg = ps.shared(ps.u64)
            for obj in (number, stats, point, seg, lock):
                with pytest.raises(ps.AnonymousError) as info:
                    pickle.dumps(obj)
                assert isinstance(info.value, TypeError)
                text = str(info.value)
                assert "pickled" in text
                assert "no name" in text
                assert "forked" in text
                assert "ps.interprocess_lock('NAME')" in text or "ps.shared('NAME'" in text
            with pytest.raises(ps.AnonymousError):
                copy.copy(number)
            seg.close()
    finally:
        lock.close()
    # The error itself pickles (it may cross a process boundary).
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is ps.AnonymousError
    assert str(again) == str(info.value)


def test_a_named_view_still_refuses_pickling_with_its_own_message() -> None:
    with ps.shared("named-view", ps.u64) as v:
        with pytest.raises(TypeError, match="cannot be copied or pickled") as info:
            pickle.dumps(v)
        assert not isinstance(info.value, ps.AnonymousError)


def test_an_anonymous_object_where_a_name_is_expected_says_why() -> None:
    lock = ps.interprocess_lock()
    try:
        with ps.shared(ps.u64) as view:
            seg = ps.shared(ps.u64)
            attempts = [
                lambda: ps.shared(view, ps.u64),
                lambda: ps.shared(seg, ps.u64),
                lambda: ps.shared(seg.name, ps.u64),
                lambda: ps.unlink(seg),  # type: ignore[arg-type]
                lambda: ps.unlink(seg.name),
                lambda: ps.interprocess_lock(lock),  # type: ignore[arg-type]
                lambda: ps.interprocess_lock(lock.name),
                lambda: ps.interprocess_lock(seg.name),
            ]
            for attempt in attempts:
                with pytest.raises(ps.AnonymousError, match=r"used as a name.*no name"):
                    attempt()
            seg.close()
    finally:
        lock.close()


def test_options_that_need_a_name_are_refused_with_the_reason() -> None:
    with pytest.raises(TypeError, match="no name to attach by"):
        ps.shared(ps.u64, create=False)
    with pytest.raises(TypeError, match="cannot outlive"):
        ps.shared(ps.u64, persist=True)
    with pytest.raises(TypeError, match="permission bits"):
        ps.shared(ps.u64, mode=0o660)
    with pytest.raises(TypeError, match="permission bits"):
        ps.interprocess_lock(mode=0o660)
    with pytest.raises(TypeError, match="name goes first"):
        ps.shared(ps.u64, "sum")
    with pytest.raises(ps.InvalidName, match="must be a str"):
        ps.shared(ps.u64, ps.u32)
    with pytest.raises(TypeError, match="needs a kind"):
        ps.shared("sum")
    with ps.shared(ps.u64, create=True) as fresh:  # always new: create=True is fine
        assert fresh.value == 0


# -- anonymous locks ------------------------------------------------------------------


def test_each_anonymous_lock_is_its_own_lock() -> None:
    a = ps.interprocess_lock()
    b = ps.interprocess_lock()
    try:
        assert a.anonymous
        assert b.anonymous
        assert a.name != b.name
        with a:
            assert a.locked()
            assert not b.locked()
            assert b.acquire(timeout=0)
            b.release()
        named = ps.interprocess_lock("a-named-lock")
        assert not named.anonymous
        named.close()
    finally:
        a.close()
        b.close()
    assert a.closed


@pytest.mark.timeout(60)
def test_an_anonymous_lock_excludes_children_and_tells_a_holders_death() -> None:
    lock = ps.interprocess_lock(timeout=10)
    try:
        r, w = os.pipe()

        @ps.forked
        def die_holding() -> None:
            lock.acquire()
            os.write(w, b"H")
            os.kill(os.getpid(), signal.SIGKILL)

        child = die_holding()
        assert os.read(r, 1) == b"H"
        with pytest.raises(ps.ChildKilled):
            child.join()
        with pytest.raises(ps.OwnerDied) as info:
            lock.acquire()
        assert info.value.held
        assert info.value.owner_pid == child.pid
        lock.mark_consistent()
        lock.release()

        @ps.forked
        def try_while_held() -> bool:
            return lock.acquire(timeout=0.05)

        with lock:
            assert try_while_held().join() is False
        os.close(r)
        os.close(w)
    finally:
        lock.close()


def test_a_dropped_anonymous_lock_is_closed_at_the_next_call() -> None:
    from procshare._engine import anonymous

    part = anonymous.locks_part()
    before = len(part.entries())
    lock = ps.interprocess_lock()
    assert len(part.entries()) == before + 1
    del lock
    ps.segments()  # any call into procshare
    ps.interprocess_lock().close()
    assert len(part.entries()) == before


def test_an_anonymous_lock_held_by_another_thread_is_kept_mapped_after_close() -> None:
    lock = ps.interprocess_lock()
    taken, go = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            go.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert taken.wait(10)
    lock.close()  # the thread still holds it: its memory must stay mapped
    go.set()
    t.join(10)
    assert not t.is_alive()


# -- private namespaces -----------------------------------------------------------


def test_a_private_namespace_is_fresh_exported_and_emptied_at_the_end() -> None:
    outer = os.environ.get("PROCSHARE_NAMESPACE")
    with ps.namespace() as first:
        assert names.current_namespace() == first
        assert os.environ["PROCSHARE_NAMESPACE"] == first
        seen = subprocess.run(
            [
                sys.executable,
                "-c",
                "from procshare._engine import names; print(names.current_namespace())",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert seen == first  # a subprocess child of the run sees it
        kept = ps.shared("kept", ps.u64, persist=True)
        kept.close()
        held = ps.shared("held", ps.u64)
        lock = ps.interprocess_lock("m")
        prefix = names.namespace_prefix(first)
        assert len([n for n in get_backend().os_objects() if n.startswith(prefix)]) == 3
    assert os.environ.get("PROCSHARE_NAMESPACE") == outer
    assert not [n for n in get_backend().os_objects() if n.startswith(prefix)]  # all removed
    held.view.value = 1  # what this process still holds keeps working
    held.close()
    lock.close()
    with ps.namespace() as second:
        assert second != first
        assert second.startswith("run-")


def test_nested_namespaces_restore_each_other() -> None:
    outer = names.current_namespace()
    with ps.namespace() as private:
        with ps.namespace("app"):
            assert names.current_namespace() == "app"
        assert names.current_namespace() == private
        with ps.namespace() as inner:
            assert inner != private
            assert names.current_namespace() == inner
        assert os.environ["PROCSHARE_NAMESPACE"] == private
    assert names.current_namespace() == outer


_SAME_PROGRAM = """
import sys, procshare as ps
with ps.namespace():
    with ps.shared("sum", ps.u64, create=True) as s:   # SegmentExists if the runs met
        s.value += 1
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        sys.stdin.readline()
        assert s.value == 1
print("ok")
"""


@pytest.mark.timeout(120)
def test_an_unchanged_named_program_runs_twice_at_once_without_meeting() -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _SAME_PROGRAM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for run in runs:  # both hold "sum" at the same time
            assert run.stdout is not None
            assert run.stdout.readline() == "ready\n"
        outs = [run.communicate("\n", timeout=60) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert [o[0].strip() for o in outs] == ["ok", "ok"], [o[1] for o in outs]


def test_forked_children_inherit_the_private_namespace() -> None:
    with ps.namespace() as private:

        @ps.forked
        def where() -> str:
            return names.current_namespace()

        assert where().join() == private


_USER_PROGRAM = """
from contextlib import closing

import procshare as ps


@ps.forked
def job(i: int, lock: ps.InterprocessLock, seg: ps.Segment) -> None:
    with lock:
        seg.view.value += i


def main() -> int:
    with ps.shared(ps.u64) as total, closing(ps.interprocess_lock()) as lock:
        seg = ps.shared(ps.u64, initial=3)
        array = ps.shared(float, shape=None)
        with ps.children():
            for i in range(3):
                job(i, lock, seg)
        seg.close()
        array.close()
        with ps.shared(bytes, size=16) as blob:
            blob[0] = 1
        with ps.namespace() as private:
            print(private.upper())
        anonymous: bool = lock.anonymous and seg.anonymous
        value: int = total.value + anonymous
        return value
"""


@pytest.mark.timeout(120)
def test_the_nameless_forms_type_check_in_a_user_program(tmp_path: object) -> None:
    """``mypy --strict`` on a program that uses every nameless form (the
    name-or-kind first argument of ``ps.shared``, no-argument lock and namespace)."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    program = tmp_path / "user_program.py"
    program.write_text(_USER_PROGRAM)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_anonymous_lock_used_after_close_says_it_cannot_be_reopened() -> None:
    lock = ps.interprocess_lock()
    lock.close()
    with pytest.raises(ValueError, match="cannot be opened again"):
        lock.acquire()


@pytest.mark.timeout(60)
def test_a_child_forked_by_hand_that_leaves_the_block_leaves_the_namespace_alone() -> None:
    pid = -1
    still = False
    try:
        with ps.namespace() as private:
            seg = ps.shared("kept-for-the-run", ps.u64)
            pid = os.fork()
            if pid != 0:  # the child skips this and leaves the block at once
                os.waitpid(pid, 0)
                prefix = names.namespace_prefix(private)
                still = any(n.startswith(prefix) for n in get_backend().os_objects())
                seg.close()
    finally:
        if pid == 0:  # pragma: no cover - the child, after its exit from the block
            os._exit(0)
    assert still


@pytest.mark.timeout(60)
def test_waiting_for_children_while_holding_an_anonymous_lock_they_wait_for_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`with ps.interprocess_lock() as lock:` around the children that use it is
    the classic deadlock; the engine's warning names anonymous locks too. (The
    child gives up after 3 s, so this ends.)"""
    from procshare._engine import anonymous
    from procshare._engine import children as children_engine

    monkeypatch.setattr(children_engine, "DEADLOCK_WATCH", 0.3)
    lock = ps.interprocess_lock()

    @ps.forked
    def try_the_lock() -> bool:
        return lock.acquire(timeout=3)

    def hold_while_waiting() -> list[object]:
        with lock, ps.children() as kids:
            try_the_lock()
            # Wait for children only once the child sleeps on the lock.
            assert wait_for(lambda: anonymous.locks_part().held_and_awaited() != [], 30)
        return kids.results

    try:
        with pytest.warns(RuntimeWarning, match=r"holds interprocess lock '\(anonymous #"):
            results = hold_while_waiting()
        assert results == [False]
    finally:
        lock.close()


def test_anonymous_segments_keep_no_descriptor_open() -> None:
    """Each is one mapping and no descriptor: far more than `ulimit -n` fit."""

    def child() -> int:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        segs = [ps.shared(ps.u64, initial=i) for i in range(300)]
        total = sum(int(s.view.value) for s in segs)
        for s in segs:
            s.close()
        return total

    assert run_in_child(child) == sum(range(300))


@pytest.mark.timeout(60)
def test_the_parent_is_warned_when_a_child_ends_holding_an_anonymous_lock() -> None:
    lock = ps.interprocess_lock()
    try:

        @ps.forked
        def forgets() -> int:
            lock.acquire()  # inherited, never released
            return 7

        with pytest.warns(RuntimeWarning, match=r"ended while holding interprocess lock '\(anon"):
            assert forgets().join(timeout=30) == 7
        with pytest.raises(ps.OwnerDied):  # ... and that is what the next acquirer is told
            lock.acquire(timeout=10)
        lock.mark_consistent()
        lock.release()
    finally:
        lock.close()
