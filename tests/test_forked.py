"""``@ps.forked`` and ``ps.Child``: forking now, results, failures, reaping, orphans."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import procshare as ps
from procshare._engine import get_engine
from procshare._engine.inspect import namespace_objects  # never all of /dev/shm: others use it
from procshare._process import CANCEL_GRACE
from procshare.testing import child_pids
from shared_support import alive, wait_for


def _run_script(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------- starting


def test_calling_forks_now_and_returns_a_child(tmp_path: Path) -> None:
    marker, release = tmp_path / "started", tmp_path / "release"

    @ps.forked
    def job() -> int:
        marker.write_text(str(os.getpid()))
        wait_for(release.exists, 60)  # still running while the parent looks, however slow
        return os.getpid()

    child = job()
    assert isinstance(child, ps.Child)
    assert child.pid != os.getpid()
    # The child runs before anyone joins it.
    assert wait_for(marker.exists)
    assert child.running
    assert child.exitcode is None
    release.touch()
    assert child.join() == child.pid == int(marker.read_text())
    assert not child.running
    assert child.exitcode == 0


def test_closures_defaults_args_and_kwargs_need_no_pickling() -> None:
    lock = threading.Lock()  # unpicklable, captured by the closure

    def scale(x: int, y: int = 10, *rest: int, z: int = 100, **extra: int) -> tuple[object, ...]:
        with lock:
            return (x, y, rest, z, extra)

    job = ps.forked(scale)
    assert job(1).join() == (1, 10, (), 100, {})
    assert job(1, 2, 3, 4, z=5, w=6).join() == (1, 2, (3, 4), 5, {"w": 6})


def test_join_twice_gives_the_same_value_and_name_defaults_to_the_function() -> None:
    @ps.forked
    def answer() -> list[int]:
        return [42]

    child = answer()
    assert child.name.endswith("answer")
    assert child.join() == [42]
    assert child.join() == [42]

    @ps.forked(name="worker-7")
    def named() -> None:
        return None

    with named() as c:
        assert c.name == "worker-7"
    assert "worker-7" in repr(c)


@pytest.mark.timeout(60)
def test_join_timeout_leaves_the_child_running() -> None:
    @ps.forked
    def sleeper() -> str:
        time.sleep(30)
        return "never"

    child = sleeper()
    t0 = time.monotonic()
    with pytest.raises(ps.JoinTimeout) as info:
        child.join(timeout=0.2)
    assert time.monotonic() - t0 < 20  # did not wait for the 30 s child (generous under load)
    assert isinstance(info.value, TimeoutError)
    assert info.value.pid == child.pid
    assert "left running" in str(info.value)
    assert child.running
    assert alive(child.pid)
    assert child.wait(timeout=0.05) is None
    child.terminate()
    with pytest.raises(ps.ChildKilled) as killed:
        child.join()
    assert killed.value.signal == signal.SIGTERM
    assert "SIGTERM" in str(killed.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_a_zero_timeout_still_reaps_a_child_that_has_exited(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfd:
        from procshare._backends.posix import process as posix_process

        monkeypatch.setattr(posix_process, "_pidfd_open", None)

    @ps.forked
    def quick() -> int:
        return 5

    a, b = quick(), quick()
    assert wait_for(lambda: child_pids().get(a.pid) == child_pids().get(b.pid) == "Z")
    # Exited, not reaped yet: a timeout of 0 is "do not block", not "do not look".
    status = a.wait(timeout=0)
    assert status is not None
    assert status.outcome == "returned"
    assert b.join(timeout=0) == 5
    assert a.pid not in child_pids()
    assert b.pid not in child_pids()


@pytest.mark.timeout(120)
def test_large_result_does_not_deadlock_on_the_pipe() -> None:
    @ps.forked
    def big() -> bytes:
        return bytes(range(256)) * (40 * 1024 * 1024 // 256)  # 40 MiB

    data = big().join(timeout=60)
    assert len(data) == 40 * 1024 * 1024
    assert data[:256] == bytes(range(256))
    assert data[-1] == 255


@ps.forked
def _closes_descriptors_it_did_not_open(path: str, reuse: bool) -> int:
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    streams = {sys.stdout.fileno(), sys.stderr.fileno()}  # (pytest's capture files here)
    for fd in range(3, top + 1):  # as os.closerange(3, ...) does, the result pipe among them
        if fd not in streams:
            with contextlib.suppress(OSError):
                os.close(fd)
    if reuse:
        fd = -1
        while fd < top:  # the child's own file takes every number back
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    return 5


@pytest.mark.parametrize("reuse", [False, True], ids=["closed", "number-reused"])
def test_a_child_that_closed_its_result_pipe_fails_and_writes_nowhere_else(
    reuse: bool, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Its result cannot reach the parent: the child says so and fails, rather
    # than writing the pickled 5 into a file of its own that got the pipe's
    # number back (the parent then read silence as a returned None).
    own = tmp_path / "own"
    own.write_bytes(b"")
    with pytest.raises(ps.ChildExited) as failed:
        _closes_descriptors_it_did_not_open(str(own), reuse).join(timeout=60)
    assert failed.value.exitcode == 1
    assert own.read_bytes() == b""
    assert "its result pipe, was closed by the child's own code" in capfd.readouterr().err


def test_unpicklable_result_is_a_child_raised_not_a_hang() -> None:
    @ps.forked
    def returns_a_lock() -> object:
        return threading.Lock()

    with pytest.raises(ps.ChildRaised) as info:
        returns_a_lock().join(timeout=30)
    assert "could not be pickled" in str(info.value)
    assert "lock" in str(info.value)


def _refuse_to_load() -> object:
    raise RuntimeError("this value cannot be rebuilt in the parent")


class _LoadsOnlyInTheChild:
    def __reduce__(self) -> object:
        return (_refuse_to_load, ())  # called only by pickle.loads, in the parent


def test_a_result_the_parent_cannot_unpickle_is_a_child_raised() -> None:
    @ps.forked
    def returns_it() -> object:
        return _LoadsOnlyInTheChild()  # pickles fine; loading it in the parent raises

    with pytest.raises(ps.ChildRaised) as info:
        returns_it().join(timeout=30)
    assert "its return value could not be unpickled in the parent" in str(info.value)
    assert info.value.exc_type == "RuntimeError"
    assert "cannot be rebuilt" in str(info.value)


class _ExitsWhenLoaded(Exception):
    """Pickles fine in the child; unpickling it in the parent calls sys.exit(7)."""

    def __reduce__(self) -> object:
        return (sys.exit, (7,))


def _interrupt() -> None:
    raise KeyboardInterrupt


class _InterruptsWhenLoaded:
    def __reduce__(self) -> object:
        return (_interrupt, ())  # as if Ctrl-C came while the parent unpickles


def test_a_base_exception_while_the_parent_unpickles_is_a_child_raised() -> None:
    @ps.forked
    def raises_it() -> None:
        raise _ExitsWhenLoaded("boom")

    @ps.forked
    def returns_it() -> object:
        return _ExitsWhenLoaded("a value")

    with pytest.raises(ps.ChildRaised) as info:
        raises_it().join(timeout=30)
    assert info.value.exc_type == "_ExitsWhenLoaded"
    assert "boom" in str(info.value)
    assert "could not be unpickled in the parent" in str(info.value)
    assert "SystemExit: 7" in str(info.value)
    assert info.value.__cause__ is None

    with pytest.raises(ps.ChildRaised) as info:
        returns_it().join(timeout=30)
    assert "its return value could not be unpickled in the parent" in str(info.value)
    assert info.value.exc_type == "SystemExit"


def test_keyboard_interrupt_while_the_parent_unpickles_is_not_swallowed() -> None:
    @ps.forked
    def returns_it() -> object:
        return _InterruptsWhenLoaded()

    child = returns_it()
    with pytest.raises(KeyboardInterrupt):
        child.join(timeout=30)
    assert not child.running  # reaped all the same


class _StopsPickling(Exception):
    """Pickling it raises ``stop``, a BaseException that is not an Exception."""

    def __init__(self, stop: type[BaseException]) -> None:
        super().__init__(f"stops pickling with {stop.__name__}")
        self.stop = stop

    def __reduce__(self) -> object:
        raise self.stop


@pytest.mark.parametrize("stop", [SystemExit, KeyboardInterrupt])
def test_a_base_exception_while_the_child_pickles_is_a_child_raised(
    stop: type[BaseException],
) -> None:
    @ps.forked
    def returns_it() -> object:
        return _StopsPickling(stop)

    @ps.forked
    def raises_it() -> None:
        raise _StopsPickling(stop)

    with pytest.raises(ps.ChildRaised) as info:
        returns_it().join(timeout=30)
    assert info.value.exc_type == stop.__name__
    assert "its return value, a _StopsPickling, could not be pickled" in str(info.value)

    with pytest.raises(ps.ChildRaised) as info:
        raises_it().join(timeout=30)
    assert info.value.exc_type == "_StopsPickling"
    assert f"stops pickling with {stop.__name__}" in str(info.value)
    assert "raises_it" in info.value.child_traceback
    assert info.value.__cause__ is None


# --------------------------------------------------------------- failures


class Unpicklable(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.handle = threading.Lock()

    def __reduce__(self) -> object:
        raise TypeError("no pickling here")


def test_child_raised_carries_the_traceback_and_the_original_as_cause() -> None:
    @ps.forked
    def fails() -> None:
        def inner_helper() -> None:
            raise KeyError("missing-key")

        inner_helper()

    child = fails()
    with pytest.raises(ps.ChildRaised) as info:
        child.join()
    err = info.value
    assert isinstance(err, ps.ChildError)
    assert isinstance(err, ChildProcessError)
    assert err.pid == child.pid
    assert err.exitcode == 1
    assert err.exc_type == "KeyError"
    assert "inner_helper" in str(err)  # the child's traceback is in the message
    assert "missing-key" in str(err)
    assert isinstance(err.__cause__, KeyError)
    assert err.__cause__.args == ("missing-key",)
    # Raised again: a fresh exception object each time.
    with pytest.raises(ps.ChildRaised) as again:
        child.join()
    assert again.value is not err
    assert pickle.loads(pickle.dumps(err)).child_traceback == err.child_traceback


@pytest.mark.timeout(60)
def test_a_childs_key_error_is_caught_by_except_key_error_in_the_parent() -> None:
    @ps.forked
    def lookup(key: str) -> int:
        return {"a": 1}[key]

    with pytest.raises(KeyError) as info:
        lookup("b").join()
    assert isinstance(info.value, ps.ChildRaised)
    assert isinstance(info.value.__cause__, KeyError)
    caught: list[BaseException] = []
    try:
        with ps.children():
            lookup("a")
            lookup("c")
    except* KeyError as group:
        caught.extend(group.exceptions)
    assert len(caught) == 1
    assert isinstance(caught[0], ps.ChildRaised)
    assert "'c'" in str(caught[0])

    # Across two process boundaries, and through pickling, it stays a KeyError.
    @ps.forked
    def middle() -> int:
        return lookup("d").join()

    with pytest.raises(KeyError) as outer:
        middle().join()
    again = pickle.loads(pickle.dumps(outer.value))
    assert isinstance(again, KeyError)
    assert isinstance(again, ps.ChildRaised)
    assert isinstance(again.__cause__, KeyError)


def test_unpicklable_exception_still_reports_type_and_message() -> None:
    @ps.forked
    def fails() -> None:
        raise Unpicklable("cannot cross")

    with pytest.raises(ps.ChildRaised) as info:
        fails().join()
    assert info.value.exc_type == "Unpicklable"
    assert "cannot cross" in str(info.value)
    assert info.value.__cause__ is None


def test_assertion_in_child_never_continues_the_parents_test() -> None:
    me = os.getpid()

    @ps.forked
    def asserts() -> None:
        raise AssertionError("failed inside the child")

    with pytest.raises(ps.ChildRaised, match="failed inside the child"):
        asserts().join()
    assert os.getpid() == me


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("sys.exit(3)", 3),
        ("os._exit(5)", 5),
        ("sys.exit('bye')", 1),
        # CPython keeps the low byte of a C long: 256 would exit 0, a success.
        ("sys.exit(256)", 255),
        ("sys.exit(512)", 255),
        ("sys.exit(-256)", 255),
        ("sys.exit(2**31 + 5)", 5),
        # Too big for a C long (or -1): CPython exits 255.
        ("sys.exit(2**70)", 255),
        ("sys.exit(2**70 + 5)", 255),
        ("sys.exit(-1)", 255),
    ],
)
def test_nonzero_exit_is_child_exited(body: str, status: int) -> None:
    @ps.forked
    def exits() -> None:
        exec(body)

    with pytest.raises(ps.ChildExited) as info:
        exits().join()
    assert info.value.exitcode == status
    assert info.value.signal is None
    assert f"status {status}" in str(info.value)


@pytest.mark.parametrize("body", ["sys.exit(0)", "sys.exit()", "os._exit(0)"])
def test_zero_exit_returns_none(body: str) -> None:
    @ps.forked
    def exits() -> int:
        exec(body)
        return 1

    assert exits().join() is None


@pytest.mark.parametrize(
    ("signum", "cause"),
    [
        (signal.SIGKILL, "OOM killer"),
        (signal.SIGSEGV, "segmentation fault"),
        (signal.SIGTERM, "terminate"),
        (signal.SIGABRT, "abort"),
    ],
)
def test_killed_by_a_signal_names_it_and_its_likely_cause(signum: int, cause: str) -> None:
    @ps.forked
    def dies() -> None:
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(10)

    child = dies()
    with pytest.raises(ps.ChildKilled) as info:
        child.join(timeout=30)
    assert info.value.signal == signum
    assert info.value.exitcode == -signum
    assert signal.Signals(signum).name in str(info.value)
    assert cause in str(info.value)
    assert child.exitcode == -signum


@pytest.mark.timeout(60)
def test_timeout_cancels_the_child_which_unwinds_and_is_reaped(tmp_path: Path) -> None:
    unwound = tmp_path / "unwound"

    @ps.forked(timeout=0.3)
    def too_slow() -> None:
        try:
            time.sleep(30)
        finally:  # the cancel is an exception in the child: this runs
            unwound.write_text("yes")

    child = too_slow()
    t0 = time.monotonic()
    with pytest.raises(ps.ChildTimeout) as info:
        child.join()
    assert time.monotonic() - t0 < 10
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout == 0.3
    assert info.value.signal == signal.SIGTERM  # ended by the cancel, not SIGKILL
    assert unwound.read_text() == "yes"
    assert "cancelled" in str(info.value)
    assert not alive(child.pid)
    assert child.pid not in child_pids()  # reaped, not a zombie
    status = child.wait()
    assert status is not None
    assert status.outcome == "timed out"


@pytest.mark.timeout(180)
def test_timeout_kills_a_child_that_does_not_unwind_after_the_grace_period() -> None:
    @ps.forked(timeout=1.0)  # (time enough to be in the loop on a loaded machine)
    def stubborn() -> None:
        while True:
            with contextlib.suppress(ps.Cancelled):  # swallowed: it does not end
                time.sleep(30)

    t0 = time.monotonic()
    child = stubborn()
    with pytest.raises(ps.ChildTimeout) as info:
        child.join()
    assert 1.0 + CANCEL_GRACE <= time.monotonic() - t0 < 150
    assert info.value.signal == signal.SIGKILL
    assert "killed" in str(info.value)
    assert child.pid not in child_pids()


def test_timeout_is_not_applied_to_a_fast_child() -> None:
    @ps.forked(timeout=30)
    def quick() -> str:
        return "done"

    assert quick().join() == "done"


def test_wait_describes_every_outcome_without_raising() -> None:
    @ps.forked
    def ok() -> int:
        return 7

    @ps.forked
    def raises() -> None:
        raise ValueError("v")

    @ps.forked
    def exits() -> None:
        os._exit(9)

    @ps.forked
    def killed() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    statuses = [c.wait() for c in (ok(), raises(), exits(), killed())]
    assert [s.outcome for s in statuses if s] == ["returned", "raised", "exited", "killed"]
    assert [s.exitcode for s in statuses if s] == [0, 1, 9, -9]
    assert [s.ok for s in statuses if s] == [True, False, False, False]
    assert statuses[0] is not None
    assert statuses[0].error is None
    assert statuses[0].signal is None
    assert statuses[3] is not None
    assert statuses[3].signal == signal.SIGKILL
    assert isinstance(statuses[1] and statuses[1].error, ps.ChildRaised)
    assert isinstance(statuses[2] and statuses[2].error, ps.ChildExited)


@pytest.mark.timeout(60)
def test_terminate_and_kill() -> None:
    @ps.forked
    def sleeper() -> None:
        time.sleep(30)

    a, b = sleeper(), sleeper()
    a.terminate()
    b.kill()
    sa, sb = a.wait(timeout=20), b.wait(timeout=20)
    assert sa is not None
    assert sb is not None
    assert (sa.signal, sb.signal) == (signal.SIGTERM, signal.SIGKILL)
    # Signalling a reaped child is a no-op: its pid may belong to someone else now.
    a.kill()
    b.terminate()


def test_context_manager_joins_and_raises_the_childs_failure() -> None:
    @ps.forked
    def fails() -> None:
        raise RuntimeError("in child")

    with pytest.raises(ps.ChildRaised), fails():
        pass


def test_context_manager_with_a_failing_block_joins_and_notes_the_child() -> None:
    @ps.forked
    def fails() -> None:
        raise RuntimeError("child side")

    with pytest.raises(ValueError, match="block side") as info, fails() as child:
        raise ValueError("block side")
    assert not child.running
    assert any("child side" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_context_manager_interrupted_terminates_and_reaps_the_child(
    interruption: type[BaseException],
) -> None:
    @ps.forked
    def sleeper() -> None:
        time.sleep(20)

    with pytest.raises(interruption), sleeper() as child:
        raise interruption
    assert child.pid not in child_pids()  # not waited for: cancelled and reaped
    status = child.wait()
    assert status is not None
    assert status.signal == signal.SIGTERM
    assert status.outcome == "cancelled"
    assert child.cancelled


@pytest.mark.timeout(60)
def test_sigint_while_the_context_manager_joins_terminates_reaps_and_propagates() -> None:
    script = textwrap.dedent(
        """
        import time
        import procshare as ps
        from procshare.testing import child_pids

        @ps.forked
        def sleeper():
            time.sleep(60)

        try:
            with sleeper() as child:
                print(child.pid, flush=True)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", sorted(child_pids()), child.exitcode, flush=True)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        time.sleep(0.2)  # leaving the block: joining the child now
        parent.send_signal(signal.SIGINT)
        out, err = parent.communicate(timeout=30)
    finally:
        parent.kill()
        parent.wait()
    assert out.strip() == f"KeyboardInterrupt [] {-signal.SIGTERM}", err
    assert not alive(pid)


def test_reaped_by_someone_else_is_reported_not_hung() -> None:
    @ps.forked
    def quick() -> int:
        return 1

    child = quick()
    os.waitpid(child.pid, 0)  # steals the exit status
    with pytest.raises(ps.ChildError, match="reaped by someone else"):
        child.join(timeout=10)


# ------------------------------------------------------------ child exit


def test_child_skips_parent_atexit_and_flushes_its_stdio(tmp_path: Path) -> None:
    out = _run_script(
        f"""
        import atexit, sys
        import procshare as ps

        atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "a").write("ran\\n"))
        sys.stdout.write("parent-buffered ")  # unflushed at fork: must not be printed twice

        @ps.forked
        def child():
            sys.stdout.write("child-out")      # no newline, no flush
            sys.stderr.write("child-err")
            return 1

        assert child().join() == 1
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("parent-buffered") == 1
    assert "child-out" in out.stdout
    assert "child-err" in out.stderr
    # The parent's atexit ran once, in the parent only.
    assert (tmp_path / "atexit").read_text() == "ran\n"


@pytest.mark.timeout(60)
def test_a_child_waits_for_the_non_daemon_threads_it_started(tmp_path: Path) -> None:
    # As multiprocessing (and interpreter exit) do; daemon threads are not waited for.
    done, daemon_done = tmp_path / "done", tmp_path / "daemon"

    def later(path: Path, seconds: float) -> None:
        time.sleep(seconds)
        path.write_text("written")

    @ps.forked
    def starts_threads() -> str:
        threading.Thread(target=later, args=(done, 0.3)).start()
        threading.Thread(target=later, args=(daemon_done, 30), daemon=True).start()
        return "returned"

    t0 = time.monotonic()
    assert starts_threads().join(timeout=30) == "returned"
    assert done.read_text() == "written"  # the child waited for it before exiting
    assert not daemon_done.exists()
    assert time.monotonic() - t0 < 20


def test_child_gets_a_fresh_engine() -> None:
    parent_engine = get_engine()

    @ps.forked
    def probe() -> tuple[int, int, bool]:
        engine = get_engine()
        return engine.pid, os.getpid(), engine is parent_engine

    engine_pid, pid, same = probe().join()
    assert engine_pid == pid != os.getpid()
    assert not same


def test_children_can_fork_grandchildren() -> None:
    @ps.forked
    def leaf(i: int) -> int:
        return i * i

    @ps.forked
    def middle() -> list[int]:
        with ps.children() as kids:
            for i in range(3):
                leaf(i)
        dropped = leaf(10)  # noqa: F841 - left unjoined: the child's exit reaps it
        return kids.results

    assert middle().join(timeout=30) == [0, 1, 4]


# ----------------------------------------------------------------- zombies


@pytest.mark.timeout(60)
def test_dropped_handle_is_reaped_at_the_next_call_into_procshare() -> None:
    @ps.forked
    def quick() -> None:
        return None

    pid = quick().pid  # the handle is dropped at once
    gc.collect()
    assert wait_for(lambda: child_pids().get(pid) == "Z")  # exited, not reaped yet
    with ps.children():  # any call into procshare
        pass
    assert pid not in child_pids()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "call",
    [
        "shared",
        "lock",
        "segments",
        "join",
        "wait",
        "running",
        "exitcode",
        "terminate",
        "kill",
        "scope exit",
    ],
)
def test_every_public_entry_point_reaps_dropped_children(call: str) -> None:
    # A dropped child that has exited is reaped; one whose timeout= ran out is
    # cancelled, then reaped (with a warning), by any calls into procshare.
    @ps.forked
    def quick() -> None:
        return None

    @ps.forked(timeout=0.1)
    def overdue() -> None:
        time.sleep(30)

    kept = quick()  # calls on a handle the caller keeps are calls into procshare too
    t0 = time.monotonic()
    dropped = [quick(), overdue()]
    pids = [c.pid for c in dropped]
    assert wait_for(lambda: child_pids().get(pids[0]) == "Z")
    time.sleep(max(0.0, t0 + 0.3 - time.monotonic()))  # overdue's timeout has run out

    def shared() -> None:
        with ps.shared("probe", ps.u8):
            pass

    def lock() -> None:
        with ps.interprocess_lock("probe"):
            pass

    def scope_exit() -> None:
        with ps.children():
            if dropped:  # the first time
                dropped.clear()  # after the scope's entry, which polls too
                gc.collect()
                assert all(p in child_pids() for p in pids)

    calls: dict[str, Callable[[], object]] = {
        "shared": shared,
        "lock": lock,
        "segments": ps.segments,
        "join": kept.join,
        "wait": kept.wait,
        "running": lambda: kept.running,
        "exitcode": lambda: kept.exitcode,
        "terminate": kept.terminate,
        "kill": kept.kill,
        "scope exit": scope_exit,
    }
    if call != "scope exit":
        dropped.clear()
        gc.collect()
    # The first call cancels the overdue child (SIGTERM): it unwinds and ends,
    # and the next call reaps it, saying so.
    calls[call]()
    assert wait_for(lambda: child_pids().get(pids[1]) in ("Z", None))
    with pytest.warns(RuntimeWarning, match="after its timeout"):
        calls[call]()
    mine = child_pids()
    assert [p for p in pids if p in mine] == []
    kept.wait()


@pytest.mark.timeout(60)
def test_dropped_failing_child_warns_when_reaped() -> None:
    @ps.forked(name="forgotten")
    def fails() -> None:
        raise ValueError("nobody listens")

    pid = fails().pid
    gc.collect()
    assert wait_for(lambda: child_pids().get(pid) == "Z")
    with pytest.warns(RuntimeWarning, match="forgotten.*dropped without join") as caught:
        get_engine().poll()
    assert pid not in child_pids()
    assert [w.filename for w in caught] == [__file__]  # the call that reaped it


@pytest.mark.timeout(60)
def test_dropped_child_with_a_large_result_does_not_block_forever() -> None:
    @ps.forked
    def big() -> bytes:
        return b"x" * (8 * 1024 * 1024)

    pid = big().pid
    gc.collect()
    get_engine().poll()  # closes the unread pipe: the child's write fails, it exits
    assert wait_for(lambda: child_pids().get(pid) in (None, "Z"))
    get_engine().poll()
    assert pid not in child_pids()


@pytest.mark.timeout(60)
def test_interpreter_exit_waits_for_non_daemon_and_terminates_daemon_children(
    tmp_path: Path,
) -> None:
    done = tmp_path / "done"
    out = _run_script(
        f"""
        import time
        import procshare as ps

        @ps.forked
        def worker():
            time.sleep(0.5)
            open({str(done)!r}, "w").write("finished")

        @ps.forked(daemon=True)
        def daemon():
            time.sleep(60)

        worker()            # dropped: still waited for at exit
        d = daemon()
        print(d.pid, flush=True)
        """
    )
    assert out.returncode == 0, out.stderr
    assert done.read_text() == "finished"
    daemon_pid = int(out.stdout.split()[0])
    assert wait_for(lambda: not alive(daemon_pid), 30)


# ----------------------------------------------------------------- orphans


@pytest.mark.timeout(60)
def test_children_die_when_the_parent_is_sigkilled() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import time
                import procshare as ps

                @ps.forked
                def sleeper():
                    time.sleep(60)

                kids = [sleeper() for _ in range(3)]
                print(" ".join(str(k.pid) for k in kids), flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3
        assert all(alive(p) for p in pids)
        parent.kill()
        parent.wait()
        # Well before their own 60 s end; the bound is generous for a loaded
        # machine (the kernel signals them at once, but they still must run to die).
        assert wait_for(lambda: not any(alive(p) for p in pids), 30)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


# ----------------------------------------------------------------- threads


def test_forking_while_threads_run_warns() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="busy-helper")
    thread.start()
    try:

        @ps.forked
        def job() -> int:
            return 1

        with pytest.warns(RuntimeWarning, match="threads.*deadlock") as caught:
            child = job()
        assert child.join() == 1
        assert [w.filename for w in caught] == [__file__]
    finally:
        stop.set()
        thread.join()


def test_no_thread_warning_when_single_threaded(recwarn: pytest.WarningsRecorder) -> None:
    @ps.forked
    def job() -> int:
        return 1

    assert job().join() == 1
    assert not [w for w in recwarn if "threads" in str(w.message)]


# -------------------------------------------------------------- bad input


def test_bad_arguments_are_named_errors() -> None:
    with pytest.raises(ValueError, match="timeout"):
        ps.forked(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        ps.forked(timeout="soon")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="name"):
        ps.forked(name=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="decorates a function"):
        ps.forked(42)  # type: ignore[call-overload]

    @ps.forked
    def job() -> int:
        return 1

    child = job()
    with pytest.raises(ValueError, match="join"):
        child.join(timeout=-0.5)
    assert child.join() == 1


# ------------------------------------------------- inherited segments, locks


def test_segments_and_locks_opened_before_a_fork_stay_usable_and_are_not_released() -> None:
    lock = ps.interprocess_lock("inherited-lock")
    try:
        with ps.shared("inherited", ps.u64) as total:
            before = namespace_objects()

            @ps.forked
            def add(i: int) -> int:
                for _ in range(50):
                    with lock:  # the parent's lock object, inherited by the fork
                        total.value += i  # the parent's mapping, inherited too
                return i

            with ps.children() as kids:
                for i in range(1, 5):
                    add(i)
            assert kids.results == [1, 2, 3, 4]
            assert total.value == 50 * (1 + 2 + 3 + 4)
            # The children closed, unlinked and released nothing they inherited.
            assert namespace_objects() == before
            assert lock.acquire(timeout=5)
            lock.release()
    finally:
        lock.close()


def test_what_a_child_opens_itself_is_released_when_it_ends() -> None:
    before = namespace_objects()

    @ps.forked
    def opens_and_forgets() -> int:
        seg = ps.shared("child-own", int, initial=7)  # never closed by the function
        return int(seg.__enter__().value)

    assert opens_and_forgets().join() == 7
    assert namespace_objects() == before  # the child's engine shutdown removed it


@pytest.mark.timeout(60)
def test_documented_caveat_children_die_with_the_thread_that_forked_them(
    tmp_path: Path,
) -> None:
    handles: list[ps.Child[None]] = []
    started = tmp_path / "started"

    @ps.forked
    def sleeper() -> None:
        started.write_text("up")  # the death signal is armed before the function runs
        time.sleep(30)

    def fork_and_leave() -> None:
        with pytest.warns(RuntimeWarning, match="threads"):
            handles.append(sleeper())
        assert wait_for(started.exists)

    thread = threading.Thread(target=fork_and_leave)
    thread.start()
    thread.join()
    # PR_SET_PDEATHSIG fires when the forking *thread* exits (see the concepts page).
    status = handles[0].wait(timeout=20)
    assert status is not None
    assert status.signal == signal.SIGKILL


def test_a_decorated_method_gets_its_instance() -> None:
    class Counter:
        def __init__(self, start: int) -> None:
            self.start = start

        @ps.forked
        def plus(self, n: int) -> int:
            return self.start + n

    assert Counter(40).plus(2).join() == 42
    assert isinstance(Counter.__dict__["plus"], type(ps.forked(len)))


def test_a_decorated_staticmethod_gets_no_instance() -> None:
    class Maths:
        @ps.forked
        @staticmethod
        def triple(y: int) -> int:
            return y * 3

    assert Maths.triple(4).join() == 12
    assert Maths().triple(4).join() == 12  # not Maths.triple(instance, 4)


@pytest.mark.timeout(120)
def test_everything_works_without_pidfds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels before 5.3 (and other platforms) have no pidfd: the engine then
    # polls the exit status. The same behaviour must hold.
    from procshare._backends.posix import process as posix_process

    monkeypatch.setattr(posix_process, "_pidfd_open", None)

    @ps.forked
    def big() -> bytes:
        return b"y" * (2 * 1024 * 1024)

    @ps.forked(timeout=0.2)
    def hangs() -> None:
        time.sleep(30)

    child = big()
    assert len(child.join()) == 2 * 1024 * 1024
    with pytest.raises(ps.ChildTimeout):
        hangs().join()
    with ps.children(limit=2) as kids:
        for i in range(4):
            square = ps.forked(lambda i=i: i * i)
            square()
    assert kids.results == [0, 1, 4, 9]
    sleeper = ps.forked(lambda: time.sleep(30))()
    with pytest.raises(ps.JoinTimeout):
        sleeper.join(timeout=0.1)
    sleeper.kill()
    status = sleeper.wait()
    assert status is not None
    assert status.signal == signal.SIGKILL


@pytest.mark.timeout(60)
def test_a_warning_raised_as_an_error_leaves_no_child_unreaped() -> None:
    # Dropped failing children warn when reaped; under -W error the warning
    # raises from whatever call reaped them. Their bookkeeping, and the join
    # that call was making, must be done by then.
    gate_r, gate_w = os.pipe()

    @ps.forked
    def fails() -> None:
        # Not before both are forked: a fork reaps a dropped child that has
        # already ended, which would leave one fewer to reap below.
        os.close(gate_w)
        os.read(gate_r, 1)
        raise ValueError("nobody listens")

    @ps.forked
    def naps() -> int:
        time.sleep(0.3)
        return 7

    kept = naps()  # first: a fork reaps dropped children itself
    try:
        dropped = [fails().pid, fails().pid]
    finally:
        os.close(gate_w)  # the gate opens: both fail now
        os.close(gate_r)
    gc.collect()
    assert wait_for(lambda: all(child_pids().get(p) == "Z" for p in dropped))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="dropped without join"):
            kept.join()
    assert kept.join() == 7  # joined by the call that raised
    assert not any(p in child_pids() for p in dropped)  # both reaped, not one
