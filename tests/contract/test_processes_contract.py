"""The process half of the backend contract: what any backend must do.

These tests talk to the backend directly (no engine, no front end), so a new
backend is checked against exactly the promises ``api_process.py`` makes:
fork returns only in the parent, the child always ends through
``process_exit`` with its status, the result pipe (close-on-exec, the
parent's read end non-blocking, end of file once the child is gone), the
wait descriptor, reaping with exit status or signal, signalling, and death
with the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from procshare._backends import get_backend
from procshare._backends.api_process import Exit, Forked, ProcessBackend
from shared_support import alive


@pytest.fixture(params=["posix"])
def backend(request: pytest.FixtureRequest) -> ProcessBackend:
    assert request.param == get_backend().name
    return get_backend()


def _finish(backend: ProcessBackend, forked: Forked) -> Exit:
    """Wait for the exit (through the wait descriptor when there is one) and reap."""
    if forked.wait_fd is not None:
        assert backend.process_poll([forked.wait_fd], 30) == [forked.wait_fd]
        exit_ = backend.process_reap(forked.pid, block=False)
    else:
        exit_ = backend.process_reap(forked.pid, block=True)
    assert exit_ is not None
    backend.process_close(forked.result_fd)
    if forked.wait_fd is not None:
        backend.process_close(forked.wait_fd)
    return exit_


def _read_all(backend: ProcessBackend, fd: int) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        backend.process_poll([fd], 1)
        chunk = backend.process_read(fd)
        if chunk is None:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError("no end of file on the result pipe")


def test_fork_returns_only_in_the_parent_and_the_child_reports_through_the_pipe(
    backend: ProcessBackend,
) -> None:
    me = os.getpid()

    def child(fd: int) -> int:
        backend.process_write(fd, f"{os.getpid()} {os.getppid()}".encode())
        return 0

    forked = backend.process_fork(child)
    assert os.getpid() == me  # only the parent comes back here
    assert forked.pid > 0
    pid, ppid = map(int, _read_all(backend, forked.result_fd).split())
    assert (pid, ppid) == (forked.pid, me)
    assert _finish(backend, forked) == Exit(0, None)


def test_a_child_knows_whether_its_result_pipe_is_still_the_one_it_was_given(
    backend: ProcessBackend,
) -> None:
    def child(fd: int) -> int:
        before = backend.process_result_pipe(fd)
        other = os.open(os.devnull, os.O_WRONLY)
        neighbour = backend.process_result_pipe(other)
        os.dup2(other, fd)  # closes the pipe's end; the number names another file now
        reused = backend.process_result_pipe(fd)
        os.close(fd)
        closed = backend.process_result_pipe(fd)
        return 0 if (before, neighbour, reused, closed) == (True, False, False, False) else 1

    forked = backend.process_fork(child)
    assert _finish(backend, forked) == Exit(0, None)


@pytest.mark.parametrize("status", [0, 3, 255])
def test_the_child_exits_with_the_status_it_returns(backend: ProcessBackend, status: int) -> None:
    forked = backend.process_fork(lambda fd: status)
    exit_ = _finish(backend, forked)
    assert exit_ == Exit(status, None)
    assert exit_.exitcode == status


def test_a_child_that_raises_never_returns_into_the_caller(backend: ProcessBackend) -> None:
    me = os.getpid()

    def child(fd: int) -> int:
        raise KeyboardInterrupt  # even a BaseException must not escape the child

    forked = backend.process_fork(child)
    assert os.getpid() == me
    assert _finish(backend, forked) == Exit(1, None)


def test_process_exit_skips_finalizers(backend: ProcessBackend) -> None:
    def child(fd: int) -> int:
        try:
            backend.process_exit(7)
        finally:
            os.write(fd, b"finally ran")  # must not happen: _exit runs nothing
        return 0  # pragma: no cover

    forked = backend.process_fork(child)
    assert _read_all(backend, forked.result_fd) == b""
    assert _finish(backend, forked) == Exit(7, None)


def test_signals_are_reported_as_signals(backend: ProcessBackend) -> None:
    def child(fd: int) -> int:
        time.sleep(30)
        return 0

    forked = backend.process_fork(child)
    assert backend.process_reap(forked.pid, block=False) is None  # still running
    assert backend.process_poll([forked.result_fd], 0.05) == []  # nothing written yet
    assert backend.process_read(forked.result_fd) is None  # non-blocking: no data now
    assert backend.process_signal(forked.pid, signal.SIGKILL)
    exit_ = _finish(backend, forked)
    assert exit_ == Exit(None, signal.SIGKILL)
    assert exit_.exitcode == -signal.SIGKILL


def test_the_pipe_is_close_on_exec_and_read_while_the_child_writes(
    backend: ProcessBackend,
) -> None:
    size = 4 * 1024 * 1024  # far beyond a pipe buffer: the parent must read as it goes

    def child(fd: int) -> int:
        assert not os.get_inheritable(fd)
        backend.process_write(fd, b"z" * size)
        return 0

    forked = backend.process_fork(child)
    assert not os.get_inheritable(forked.result_fd)
    assert not os.get_blocking(forked.result_fd)
    data = _read_all(backend, forked.result_fd)
    assert len(data) == size
    assert _finish(backend, forked) == Exit(0, None)


def test_the_wait_descriptor_becomes_ready_at_exit(backend: ProcessBackend) -> None:
    gate_r, gate_w = os.pipe()

    def child(fd: int) -> int:
        os.close(gate_w)
        os.read(gate_r, 1)  # runs until the parent has looked: an event, not a sleep
        return 0

    try:
        forked = backend.process_fork(child)
        if forked.wait_fd is None:
            pytest.fail("the POSIX backend on Linux must provide a pidfd")
        assert backend.process_poll([forked.wait_fd], 0.05) == []
    finally:
        os.close(gate_w)  # the child may end now
        os.close(gate_r)
    assert backend.process_poll([forked.wait_fd], 30) == [forked.wait_fd]
    assert _finish(backend, forked) == Exit(0, None)


def test_reaping_twice_or_a_stranger_is_child_process_error(backend: ProcessBackend) -> None:
    forked = backend.process_fork(lambda fd: 0)
    _finish(backend, forked)
    with pytest.raises(ChildProcessError):
        backend.process_reap(forked.pid, block=False)
    with pytest.raises(ChildProcessError):
        backend.process_reap(1, block=False)


def test_poll_is_interrupted_by_a_raising_signal_handler(backend: ProcessBackend) -> None:
    r, w = os.pipe()

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            backend.process_poll([r], 30)
        assert time.monotonic() - t0 < 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(r)
        os.close(w)


def test_python_threads_are_counted(backend: ProcessBackend) -> None:
    base = backend.process_python_threads()
    assert base >= 1
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert backend.process_python_threads() == base + 1
    finally:
        stop.set()
        thread.join()


@pytest.mark.timeout(60)
def test_children_die_with_their_parent(backend: ProcessBackend) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import time
                from procshare._backends import get_backend

                backend = get_backend()

                def sleeper(fd):
                    time.sleep(60)
                    return 0

                kids = [backend.process_fork(sleeper) for _ in range(2)]
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
        assert len(pids) == 2
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.01)
        assert not any(alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_grown_pipe_buffers_a_large_result_without_a_reader(backend: ProcessBackend) -> None:
    size = 512 * 1024

    def child(fd: int) -> int:
        backend.process_write(fd, b"q" * size)
        return 0

    r, w = os.pipe()
    try:
        backend.process_grow_pipe(r, 1 << 20)
        # The grown pipe takes the whole write at once, with nobody reading.
        os.set_blocking(w, False)
        assert os.write(w, b"q" * size) == size
    finally:
        os.close(r)
        os.close(w)
    forked = backend.process_fork(child)
    backend.process_grow_pipe(forked.result_fd, 1 << 20)
    assert len(_read_all(backend, forked.result_fd)) == size
    assert _finish(backend, forked) == Exit(0, None)


def test_the_last_fork_can_be_claimed_by_its_token_once(backend: ProcessBackend) -> None:
    # What a caller lost to an exception raised just after the fork returned.
    forked = backend.process_fork(lambda fd: 0, token=42)
    assert backend.process_unclaimed(41) is None  # another call's token: not this fork
    assert backend.process_unclaimed(42) == forked
    assert backend.process_unclaimed(42) is None  # handed over once
    assert _finish(backend, forked).status == 0


def test_handlers_are_installed_before_a_signal_sent_at_the_fork_is_delivered(
    backend: ProcessBackend,
) -> None:
    # A SIGTERM that reaches the child before its function runs must find the
    # handlers given to process_fork, not the inherited disposition (death).
    got: list[int] = []

    def record(signum: int, frame: object) -> None:
        got.append(signum)

    def child(fd: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # as if sent during the fork: already handled
        time.sleep(0.05)
        backend.process_write(fd, repr(got).encode())
        return 0

    forked = backend.process_fork(child, handlers={signal.SIGTERM: record})
    assert _read_all(backend, forked.result_fd) == repr([int(signal.SIGTERM)]).encode()
    assert _finish(backend, forked) == Exit(0, None)
    assert signal.getsignal(signal.SIGTERM) is not record  # the parent's are its own


def test_a_negative_status_ends_the_child_by_that_signal(backend: ProcessBackend) -> None:
    def child(fd: int) -> int:
        signal.signal(signal.SIGTERM, lambda *_: None)  # even with a handler installed
        return -signal.SIGTERM

    forked = backend.process_fork(child)
    assert _finish(backend, forked) == Exit(None, signal.SIGTERM)


def test_process_running_tells_a_live_process_from_an_ended_one(backend: ProcessBackend) -> None:
    assert backend.process_running(os.getpid())
    forked = backend.process_fork(lambda fd: 0)
    if forked.wait_fd is not None:
        backend.process_poll([forked.wait_fd], 30)
    else:
        time.sleep(0.5)
    assert not backend.process_running(forked.pid)  # a zombie has ended
    _finish(backend, forked)
    assert not backend.process_running(forked.pid)
