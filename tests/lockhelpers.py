"""Helpers for the lock tests: a raw shared counter, forked children, holders to kill.

The shared counter is a raw segment made through the backend (``ps.shared``
is another issue's work); children are plain ``os.fork`` so these tests do
not depend on ``@ps.forked``. Every child leaves through ``os._exit``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator

from procshare._backends import get_backend
from procshare._engine import names


@contextlib.contextmanager
def shared_counter(name: str = "counter") -> Iterator[memoryview]:
    """A u64 in a fresh shared segment, as a one-element ``memoryview`` of format ``Q``."""
    backend = get_backend()
    os_name = names.os_name(names.SEGMENT, name)
    handle = backend.segment_create(os_name, meta=b"{}", data_size=8, mode=0o600, persist=False)
    assert handle is not None
    view = handle.data.cast("Q")
    try:
        yield view
    finally:
        view.release()
        backend.segment_close(handle, keep=lambda _h: False)


def fork(body: Callable[[], object]) -> int:
    """Fork a child running ``body``; it exits 0 if ``body`` returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_ok(pid: int, timeout: float = 60.0) -> None:
    """Reap ``pid`` and assert it exited 0."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, f"child {pid} failed ({status})"
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish in {timeout} s")
        time.sleep(0.005)


def kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL


def read_byte(fd: int, timeout: float = 30.0) -> bytes:
    """One byte from a pipe, or fail after ``timeout`` seconds."""
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the child never signalled"
    return os.read(fd, 1)


def hold_and_die(name: str) -> int:
    """Fork a child that opens lock ``name`` by name, takes it, says so, and waits to be killed."""
    import procshare as ps

    r, w = os.pipe()

    def body() -> None:
        os.close(r)
        lock = ps.interprocess_lock(name)
        lock.acquire()
        os.write(w, b"H")
        while True:
            time.sleep(10)

    pid = fork(body)
    os.close(w)
    try:
        assert read_byte(r) == b"H"
    finally:
        os.close(r)
    return pid


def killed_holder(name: str) -> int:
    """A holder of lock ``name`` that was then SIGKILLed; returns its pid."""
    pid = hold_and_die(name)
    kill_and_reap(pid)
    return pid


def lock_objects() -> set[str]:
    """OS names of the lock objects of the current namespace."""
    prefix = names.namespace_prefix() + names.LOCK
    return {n for n in get_backend().os_objects() if n.startswith(prefix)}
