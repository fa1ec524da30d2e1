"""A cancelled child unwinds: ``ps.Cancelled`` in the child, locks released cleanly.

Every way a parent stops a child (a scope's ``cancel_on_error``, Ctrl-C,
``timeout=``, ``terminate()``, a scope left by an exception, interpreter exit
on Ctrl-C) is ``SIGTERM``, which the child turns into ``ps.Cancelled`` at its
next bytecode: its ``with`` blocks exit and its ``finally`` clauses run, so a
lock it held is released cleanly and the next acquirer is *not* told
``OwnerDied``. Before this, the child died wherever it was.
"""
# ruff: noqa: PT012 - the block under pytest.raises is the ps.children() scope under test

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import procshare as ps
from procshare.testing import child_pids
from shared_support import wait_for


@ps.forked
def hold_lock_until_cancelled(name: str, inside: str, unwound: str) -> None:
    with ps.interprocess_lock(name):
        try:
            Path(inside).write_text("in")
            time.sleep(60)
        finally:
            Path(unwound).write_text("unwound")


@ps.forked
def fail_when(path: str) -> None:
    assert wait_for(lambda: os.path.exists(path), timeout=30)
    raise ValueError("first failure")


def lock_is_clean(name: str) -> None:
    """The lock is free and was released cleanly: no OwnerDied for the next one."""
    lock = ps.interprocess_lock(name)
    try:
        assert lock.acquire(timeout=10)  # OwnerDied would be raised here
        lock.release()
    finally:
        lock.close()


@pytest.mark.timeout(60)
def test_cancel_on_error_unwinds_a_child_inside_with_lock(tmp_path: Path) -> None:
    inside, unwound = str(tmp_path / "inside"), str(tmp_path / "unwound")
    with pytest.raises(ExceptionGroup) as info, ps.children() as kids:
        hold_lock_until_cancelled("m", inside, unwound)
        fail_when(inside)
    assert [type(e) for e in info.value.exceptions] == [type(info.value.exceptions[0])]
    assert "first failure" in str(info.value.exceptions[0])
    assert Path(unwound).read_text() == "unwound"
    lock_is_clean("m")
    held = kids.children[0]
    assert held.cancelled
    status = held.wait()
    assert status is not None
    assert status.outcome == "cancelled"
    assert status.signal == signal.SIGTERM  # it ended by the cancel, after unwinding
    assert "after another child failed" in str(status.error)


@pytest.mark.timeout(60)
def test_ctrl_c_in_the_parent_unwinds_the_children(tmp_path: Path) -> None:
    inside, unwound = str(tmp_path / "inside"), str(tmp_path / "unwound")
    with pytest.raises(KeyboardInterrupt), ps.children() as kids:
        hold_lock_until_cancelled("m", inside, unwound)
        assert wait_for(lambda: os.path.exists(inside), timeout=30)
        raise KeyboardInterrupt
    assert Path(unwound).read_text() == "unwound"
    lock_is_clean("m")
    status = kids.children[0].wait()
    assert status is not None
    assert status.outcome == "cancelled"
    assert "interrupted by Ctrl-C" in str(status.error)


@pytest.mark.timeout(60)
def test_terminate_and_timeout_unwind_too(tmp_path: Path) -> None:
    inside, unwound = str(tmp_path / "inside"), str(tmp_path / "unwound")
    child = hold_lock_until_cancelled("m", inside, unwound)
    assert wait_for(lambda: os.path.exists(inside), timeout=30)
    child.terminate()
    with pytest.raises(ps.ChildKilled) as killed:
        child.join()
    assert killed.value.signal == signal.SIGTERM
    assert Path(unwound).read_text() == "unwound"
    lock_is_clean("m")

    os.unlink(inside)
    os.unlink(unwound)
    timed = ps.forked(timeout=0.5)(hold_lock_until_cancelled.__wrapped__)
    with pytest.raises(ps.ChildTimeout):
        timed("m", inside, unwound).join()
    assert Path(unwound).read_text() == "unwound"
    lock_is_clean("m")


@pytest.mark.timeout(60)
def test_except_exception_does_not_swallow_the_cancel_and_a_child_may_clean_up() -> None:
    @ps.forked
    def careless() -> str:
        try:
            time.sleep(60)
        except Exception:
            return "swallowed"
        return "slept"

    @ps.forked
    def tidy() -> str:
        try:
            time.sleep(60)
        except ps.Cancelled:
            return "cleaned up"  # it may also return: the parent gets the value
        return "slept"

    a, b = careless(), tidy()
    time.sleep(0.3)
    a.terminate()
    b.terminate()
    status = a.wait(timeout=30)
    assert status is not None
    assert status.signal == signal.SIGTERM
    assert b.join(timeout=30) == "cleaned up"


@pytest.mark.timeout(60)
def test_the_terminals_sigint_is_left_to_the_parent(tmp_path: Path) -> None:
    # A terminal's Ctrl-C reaches the children too; they leave it to the
    # parent (which cancels them), so one that gets SIGINT alone goes on.
    started = tmp_path / "started"

    @ps.forked
    def worker() -> str:
        started.write_text("up")
        time.sleep(0.5)
        return "finished"

    child = worker()
    assert wait_for(started.exists, timeout=30)
    os.kill(child.pid, signal.SIGINT)
    assert child.join(timeout=30) == "finished"


@pytest.mark.timeout(60)
def test_a_cancel_raised_in_a_child_of_a_child_unwinds_both(tmp_path: Path) -> None:
    # The middle child is cancelled while its own scope waits: its scope
    # cancels the grandchild, which unwinds, then the middle one does.
    inside, unwound = str(tmp_path / "inside"), str(tmp_path / "unwound")

    @ps.forked
    def middle() -> None:
        with ps.children():
            hold_lock_until_cancelled("m", inside, unwound)

    child = middle()
    assert wait_for(lambda: os.path.exists(inside), timeout=30)
    child.terminate()
    status = child.wait(timeout=30)
    assert status is not None
    assert status.signal == signal.SIGTERM
    assert Path(unwound).read_text() == "unwound"
    lock_is_clean("m")


@pytest.mark.timeout(60)
def test_interpreter_exit_on_ctrl_c_cancels_children_instead_of_waiting(tmp_path: Path) -> None:
    # No scope: a plain child, and the program dies of an uncaught Ctrl-C.
    # Its exit must not wait out the child's minute of sleep: it cancels it.
    unwound = tmp_path / "unwound"
    program = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import procshare as ps

        @ps.forked
        def long_job():
            try:
                time.sleep(60)
            finally:
                Path({str(unwound)!r}).write_text("unwound")

        child = long_job()
        time.sleep(0.3)
        raise KeyboardInterrupt
        """
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=50, check=False
    )
    assert time.monotonic() - t0 < 30, done.stderr
    assert done.returncode == -signal.SIGINT, done.stderr
    assert unwound.read_text() == "unwound"


def test_cancelled_is_a_base_exception_that_pickles() -> None:
    import pickle

    exc = ps.Cancelled()
    assert isinstance(exc, BaseException)
    assert not isinstance(exc, Exception)
    assert "cancelled" in str(exc)
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)
    assert child_pids() == {}


@pytest.mark.timeout(60)
def test_a_child_forked_while_its_parent_unwinds_starts_uncancelled(tmp_path: Path) -> None:
    # The cancel state is per process: a grandchild forked from a child that is
    # unwinding from its own cancel can be cancelled (and unwinds) in turn.
    unwound = tmp_path / "grandchild unwound"

    @ps.forked
    def grandchild() -> None:
        try:
            time.sleep(60)
        finally:
            unwound.write_text("yes")

    @ps.forked
    def middle() -> int | None:
        try:
            time.sleep(60)
        except ps.Cancelled:
            g = grandchild()
            time.sleep(0.2)
            g.terminate()
            status = g.wait(timeout=20)
            return None if status is None else status.signal
        return None

    child = middle()
    time.sleep(0.3)
    child.terminate()
    assert child.join(timeout=30) == signal.SIGTERM
    assert unwound.read_text() == "yes"


@pytest.mark.timeout(60)
def test_a_cancel_ends_the_wait_for_the_childs_threads(tmp_path: Path) -> None:
    import threading

    returned = tmp_path / "returned"

    @ps.forked
    def leaves_a_thread() -> str:
        threading.Thread(target=time.sleep, args=(60,)).start()
        returned.write_text("")
        return "done"  # then waits for the thread, as multiprocessing does

    child = leaves_a_thread()
    assert wait_for(returned.exists, timeout=30)
    time.sleep(0.2)
    assert child.running  # still waiting for its thread
    t0 = time.monotonic()
    child.terminate()
    status = child.wait(timeout=30)
    assert status is not None
    assert status.signal == signal.SIGTERM
    assert time.monotonic() - t0 < 20
