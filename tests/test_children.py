"""``with ps.children()``: ownership, results, ExceptionGroups, cancellation, limit, Ctrl-C."""
# ruff: noqa: PT012 - the block under pytest.raises is the ps.children() scope under test

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import procshare as ps
from procshare._process import CANCEL_GRACE
from procshare.testing import child_pids
from shared_support import alive, wait_for


@ps.forked
def square(i: int) -> int:
    return i * i


@ps.forked
def sleep_then(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


@ps.forked
def fail(message: str) -> None:
    raise ValueError(message)


@ps.forked
def fail_after(seconds: float, message: str) -> None:
    time.sleep(seconds)
    raise ValueError(message)


def test_results_in_fork_order_not_finish_order() -> None:
    with ps.children() as kids:
        for i in range(5):
            sleep_then((5 - i) * 0.05, i)  # the last forked finishes first
    assert kids.results == [0, 1, 2, 3, 4]
    assert [c.exitcode for c in kids.children] == [0] * 5
    assert not any(c.running for c in kids.children)


def test_leaving_the_block_joins_every_child() -> None:
    with ps.children() as kids:
        for i in range(8):
            square(i)
        pids = [c.pid for c in kids.children]
    assert kids.results == [i * i for i in range(8)]
    mine = child_pids()
    assert not [p for p in pids if p in mine]  # reaped, not even zombies


def test_results_are_only_known_after_a_clean_exit() -> None:
    with ps.children() as kids:
        square(2)
        with pytest.raises(RuntimeError, match="only after"):
            _ = kids.results
    assert kids.results == [4]
    with pytest.raises(ExceptionGroup), ps.children() as failed:
        fail("x")
    with pytest.raises(RuntimeError, match="only after"):
        _ = failed.results


def test_a_single_failure_is_still_a_group() -> None:
    with pytest.raises(ExceptionGroup) as info, ps.children():
        square(1)
        fail("only one")
    group = info.value
    assert len(group.exceptions) == 1
    (err,) = group.exceptions
    assert isinstance(err, ps.ChildRaised)
    assert "only one" in str(err)
    assert "1 of 2 children failed" in str(group)


def test_the_blocks_own_exception_is_in_the_group() -> None:
    with pytest.raises(ExceptionGroup) as info, ps.children(cancel_on_error=False):
        fail("child side")
        raise KeyError("block side")
    errors = info.value.exceptions
    assert type(errors[0]) is KeyError
    assert isinstance(errors[1], ps.ChildRaised)
    assert "the block raised KeyError" in str(info.value)


def test_block_exception_alone_is_a_group_and_children_are_reaped() -> None:
    with pytest.raises(ExceptionGroup) as info, ps.children() as kids:
        sleep_then(30, None)
        raise RuntimeError("block failed")
    assert [type(e) for e in info.value.exceptions] == [RuntimeError]
    (child,) = kids.children
    assert child.cancelled
    assert not alive(child.pid)


@pytest.mark.timeout(60)
def test_cancel_on_error_terminates_the_others_which_are_not_failures() -> None:
    t0 = time.monotonic()
    with pytest.raises(ExceptionGroup) as info, ps.children() as kids:
        sleep_then(30, "slow")
        sleep_then(30, "slow")
        # "quick" has finished before anything fails (waited for, not slept for).
        assert sleep_then(0.0, "quick").wait(timeout=30) is not None
        fail_after(0.5, "first failure")
    assert time.monotonic() - t0 < 20
    errors = info.value.exceptions
    assert len(errors) == 1
    assert "first failure" in str(errors[0])
    handles = kids.children
    assert [h.cancelled for h in handles] == [True, True, False, False]
    for h in handles[:2]:
        status = h.wait()
        assert status is not None
        assert status.outcome == "cancelled"
        assert status.signal == signal.SIGTERM
        with pytest.raises(ps.ChildKilled, match="cancelled"):
            h.join()
    assert "2 cancelled" in str(info.value)


@pytest.mark.timeout(60)
def test_cancellation_escalates_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    ready = tmp_path / "ready"

    @ps.forked
    def stubborn() -> None:
        while True:
            try:
                ready.write_text("")
                time.sleep(30)
            except ps.Cancelled:
                pass  # swallowed: it does not end

    t0 = time.monotonic()
    with pytest.raises(ExceptionGroup), ps.children() as kids:
        stubborn()
        assert wait_for(ready.exists, timeout=30)
        t0 = time.monotonic()
        fail("go")
    elapsed = time.monotonic() - t0
    assert CANCEL_GRACE <= elapsed < CANCEL_GRACE + 15
    status = kids.children[0].wait()
    assert status is not None
    assert status.signal == signal.SIGKILL
    assert status.outcome == "cancelled"


@pytest.mark.timeout(60)
def test_cancel_on_error_false_lets_all_finish_and_reports_every_failure() -> None:
    with pytest.raises(ExceptionGroup) as info, ps.children(cancel_on_error=False) as kids:
        fail("a")
        sleep_then(0.3, "finished")
        fail("b")
    assert [e.exc_message for e in info.value.exceptions] == ["a", "b"]  # type: ignore[attr-defined]
    assert kids.children[1].join() == "finished"
    assert not any(h.cancelled for h in kids.children)


@pytest.mark.timeout(60)
def test_forks_after_a_failure_are_not_started() -> None:
    started = []
    with pytest.raises(ExceptionGroup) as info, ps.children(limit=1) as kids:
        fail("stop")
        for i in range(20):
            started.append(i)
            sleep_then(0.05, i)
    assert len(info.value.exceptions) == 1
    # The second fork waited for the slot, saw the failure and stopped the block.
    assert started == [0]
    assert len(kids.children) == 1


@pytest.mark.timeout(120)
def test_limit_bounds_how_many_run_at_once(tmp_path: Path) -> None:
    log, go = tmp_path / "log", tmp_path / "go"

    @ps.forked
    def stamped(i: int, gated: bool) -> None:
        start = time.monotonic()
        if gated:  # held until every child is forked, however slow forking is
            assert wait_for(go.exists, 60)
        time.sleep(0.15)
        end = time.monotonic()
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{start} {end}\n".encode())
        finally:
            os.close(fd)

    def max_overlap(limit: int | None) -> int:
        log.unlink(missing_ok=True)
        go.unlink(missing_ok=True)
        with ps.children(limit=limit):
            for i in range(8):
                stamped(i, gated=limit is None)
            go.touch()
        events = []
        for line in log.read_text().splitlines():
            start, end = map(float, line.split())
            events += [(start, 1), (end, -1)]
        running = peak = 0
        for _, delta in sorted(events):  # an end before a start at the same instant
            running += delta
            peak = max(peak, running)
        return peak

    assert max_overlap(2) <= 2
    assert max_overlap(1) == 1
    # Negative control: without a limit the same children do overlap (all of
    # them, as the gate holds each until the last is forked).
    assert max_overlap(None) > 2


def test_nested_scopes_own_their_own_children() -> None:
    with ps.children() as outer:
        square(1)
        with ps.children() as inner:
            square(2)
            square(3)
        assert inner.results == [4, 9]
        square(4)
    assert outer.results == [1, 16]


def test_an_inner_failure_is_a_group_inside_the_outer_group() -> None:
    with pytest.raises(ExceptionGroup) as info, ps.children():
        square(1)
        with ps.children():
            fail("deep")
    (inner,) = info.value.exceptions
    assert isinstance(inner, ExceptionGroup)
    assert isinstance(inner.exceptions[0], ps.ChildRaised)


def test_forks_from_another_thread_do_not_join_the_scope(
    recwarn: pytest.WarningsRecorder,
) -> None:
    handles: list[ps.Child[int]] = []
    forked = threading.Event()
    joined = threading.Event()

    def fork_and_outlive_the_child() -> None:
        # The death signal follows the forking *thread* (see the processes
        # concepts page): this thread must outlive its child, or the child may
        # be killed before it answers.
        handles.append(square(5))
        forked.set()
        joined.wait(30)

    with ps.children() as kids:
        square(1)
        thread = threading.Thread(target=fork_and_outlive_the_child)
        thread.start()
        assert forked.wait(30)
    assert kids.results == [1]
    try:
        assert handles[0].join() == 25
    finally:
        joined.set()
        thread.join()


def test_timeouts_inside_a_scope_are_failures() -> None:
    @ps.forked(timeout=0.2)
    def hangs() -> None:
        time.sleep(30)

    with pytest.raises(ExceptionGroup) as info, ps.children():
        hangs()
    assert isinstance(info.value.exceptions[0], ps.ChildTimeout)


def test_keyboard_interrupt_in_the_block_terminates_children_and_propagates() -> None:
    with pytest.raises(KeyboardInterrupt), ps.children() as kids:
        sleep_then(30, None)
        sleep_then(30, None)
        raise KeyboardInterrupt
    for child in kids.children:
        assert not child.running
        assert not alive(child.pid)


@pytest.mark.timeout(60)
def test_sigint_while_the_scope_waits_terminates_reaps_and_propagates() -> None:
    script = textwrap.dedent(
        """
        import time
        import procshare as ps
        from procshare.testing import child_pids

        @ps.forked
        def sleeper():
            time.sleep(60)

        try:
            with ps.shared("held", int) as held, ps.interprocess_lock("held-lock"):
                held.value = 1
                with ps.children() as kids:
                    for _ in range(3):
                        sleeper()
                    print(" ".join(str(c.pid) for c in kids.children), flush=True)
        except KeyboardInterrupt:
            # Segments still open, and locks still held (a lock object stays
            # cached by name after its block, but nobody may hold it).
            left = [s.name for s in ps.segments() if s.type == "segment" or s.owner]
            print("KeyboardInterrupt", sorted(child_pids()), left, flush=True)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3
        time.sleep(0.2)  # the scope is waiting now
        parent.send_signal(signal.SIGINT)
        out, err = parent.communicate(timeout=30)
    finally:
        parent.kill()
        parent.wait()
    # Children terminated and reaped; the segment and the lock released.
    assert out.strip() == "KeyboardInterrupt [] []", err
    assert not any(alive(p) for p in pids)


def test_scope_can_be_entered_once_and_checks_its_arguments() -> None:
    scope = ps.children()
    with scope:
        pass
    with pytest.raises(RuntimeError, match="only once"), scope:
        pass
    with pytest.raises(ValueError, match="at least 1"):
        ps.children(limit=0)
    with pytest.raises(TypeError, match="limit"):
        ps.children(limit=1.5)  # type: ignore[arg-type]


def test_a_child_cannot_join_or_signal_a_sibling_it_inherited() -> None:
    @ps.forked
    def sleeper() -> None:
        time.sleep(30)

    sibling = sleeper()
    try:

        @ps.forked
        def meddles() -> str:
            # The sibling's descriptors were closed in this child; reuse their
            # numbers with pipes holding data that must not be read away.
            reused = [os.pipe() for _ in range(8)]
            for _, w in reused:
                os.write(w, b"mine")
            looks = (lambda: sibling.running, lambda: sibling.exitcode)
            for action in (sibling.join, sibling.kill, sibling.wait, *looks):
                with pytest.raises(RuntimeError, match="cannot wait for or signal"):
                    action()
            for r, _ in reused:
                os.set_blocking(r, False)
                assert os.read(r, 16) == b"mine"
            return "refused"

        assert meddles().join() == "refused"
        assert sibling.running
    finally:
        sibling.kill()
        sibling.wait()


def _fd_targets(fds: set[int] | None = None) -> list[str]:
    """What this process's descriptors point at (``pipe:[inode]``, ``anon_inode:[pidfd]``)."""
    found = []
    for fd in os.listdir("/proc/self/fd") if fds is None else map(str, fds):
        with contextlib.suppress(FileNotFoundError):  # the one listdir itself used
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_a_child_holds_none_of_its_siblings_descriptors() -> None:
    from procshare._backends.posix import _forkstep

    before = set(_forkstep.private())

    @ps.forked
    def nested() -> tuple[list[str], list[str], list[str]]:
        own = _fd_targets(set(_forkstep.private()))  # our result pipe's write end

        @ps.forked
        def grandchild() -> list[str]:
            return _fd_targets()

        return own, _fd_targets(), grandchild().join()

    sibling = sleep_then(30, None)
    rec = sibling._rec
    sibling_fds = {rec.result_fd, rec.wait_fd} - {None}
    try:
        assert sibling_fds <= set(_forkstep.private())
        (sibling_pipe,) = [t for t in _fd_targets(sibling_fds) if t.startswith("pipe:")]
        own, child, grandchild = nested().join()
        assert len(own) == 1
        assert own[0].startswith("pipe:")
        # The child holds neither its sibling's pipe nor any pidfd; the
        # grandchild not even the child's own result pipe (its parent's business).
        assert sibling_pipe not in child
        assert not [t for t in child if "pidfd" in t]
        assert sibling_pipe not in grandchild
        assert own[0] not in grandchild
        assert not [t for t in grandchild if "pidfd" in t]
    finally:
        sibling.kill()
        with pytest.raises(ps.ChildKilled):
            sibling.join()
    # Joined children's descriptors are closed and forgotten.
    assert set(_forkstep.private()) == before


def test_a_plain_os_fork_child_keeps_the_descriptor_numbers_it_reused(tmp_path: Path) -> None:
    # A process made by os.fork (not by procshare) inherits the list of its
    # parent's private descriptors. If it closed one and reused the number,
    # its own procshare children must not close that number for it.
    from procshare._backends.posix import _forkstep
    from shared_support import run_in_child

    sibling = sleep_then(30, None)
    try:
        reused = sibling._rec.result_fd
        assert reused is not None
        assert reused in _forkstep.private()
        marker = tmp_path / "kept"
        marker.write_text("mine")

        def plain_child() -> str:
            fd = os.open(marker, os.O_RDONLY)
            os.dup2(fd, reused)  # the inherited number now names our own file
            os.close(fd)

            @ps.forked
            def grandchild() -> str:
                return os.pread(reused, 4, 0).decode()

            return str(grandchild().join())

        assert run_in_child(plain_child) == "mine"
    finally:
        sibling.kill()
        with pytest.raises(ps.ChildKilled):
            sibling.join()


@pytest.mark.timeout(90)
def test_ctrl_c_during_the_fork_still_stops_and_reaps_the_child() -> None:
    # A SIGINT that arrives while the fork step has signals blocked is handled
    # the moment the step returns, before the caller could store the child's
    # numbers. The child exists anyway: the scope must still stop and reap it.
    code = textwrap.dedent(
        """
        import os, signal, time
        import procshare as ps
        from procshare.testing import child_pids

        armed = [False]

        def interrupt_the_parent():
            if armed[0]:
                armed[0] = False
                os.kill(os.getpid(), signal.SIGINT)  # pending until the step unblocks

        os.register_at_fork(after_in_parent=interrupt_the_parent)

        @ps.forked
        def sleeper():
            time.sleep(30)

        armed[0] = True
        try:
            with ps.children():
                sleeper()
        except KeyboardInterrupt:
            print("interrupted", len(child_pids()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "interrupted 0", out.stdout + out.stderr


@pytest.mark.timeout(120)
def test_running_out_of_descriptors_is_a_fork_error_naming_the_limit_and_the_fix() -> None:
    # In a child, so the low descriptor limit is nobody else's: fork without
    # limit= until the pipes and pidfds of running children use them all up.
    @ps.forked
    def fork_until_it_fails() -> tuple[str, int | None, bool, str]:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 12, hard))
        caught: list[BaseException] = []
        try:
            with ps.children():
                for _ in range(100):
                    sleep_then(30, None)  # cancelled (they unwind) once the fork fails
        except* ps.ForkError as group:
            caught.extend(group.exceptions)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        (err,) = caught
        assert isinstance(err, ps.ForkError)
        return type(err).__name__, err.errno, isinstance(err, OSError), str(err)

    name, code, is_os_error, message = fork_until_it_fails().join(timeout=100)
    assert name == "ForkError"
    assert is_os_error
    assert code == errno.EMFILE
    assert "ulimit -n" in message
    assert "ps.children(limit=" in message


@pytest.mark.timeout(60)
def test_a_child_closes_every_sibling_descriptor_and_nothing_else() -> None:
    # The child closes the parent-private descriptors in runs (close_range):
    # descriptors of the program's own between them must stay open.
    from procshare._backends.posix import _forkstep

    siblings, mine = [], []
    try:
        for _ in range(6):
            siblings.append(sleep_then(30, None))
            mine.append(os.open("/dev/null", os.O_RDONLY))  # between the siblings' ones
        private = set(_forkstep.private())
        assert len(private) >= 12
        private_pipes = {t for t in _fd_targets(private) if t.startswith("pipe:")}

        @ps.forked
        def open_here() -> tuple[list[str], list[str], list[str]]:
            own = _fd_targets(set(_forkstep.private()))  # our result pipe's write end
            return own, _fd_targets(set(mine)), _fd_targets()

        own, at_mine, everything = open_here().join()
        assert at_mine == ["/dev/null"] * len(mine)
        assert not [t for t in everything if "pidfd" in t]
        assert not (private_pipes & (set(everything) - set(own)))
    finally:
        for fd in mine:
            os.close(fd)
        for sibling in siblings:
            sibling.kill()
            with pytest.raises(ps.ChildKilled):
                sibling.join()
