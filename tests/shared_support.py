"""Fork helpers for the tests.

Every forked child leaves through ``os._exit`` (a child must never return
into pytest), reports through a pipe, and is always reaped by the parent.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from procshare.testing import _stat


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (read from /proc, as the leak check does)."""
    found = _stat(pid)
    return found is not None and found[0] != "Z"


def another_namespace(base: str) -> str:
    """A namespace called ``base`` that belongs to this test alone.

    The leak check gives each test a fresh namespace; a test that needs a
    second one derives it from that, so a copy of the suite running at the
    same time (another checkout, another CI job) never shares its objects.
    """
    from procshare._engine import names

    return f"{base}-{names.current_namespace().removeprefix('t-')}"


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


class ChildFailed(AssertionError):
    pass


def run_in_child(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child and return its (pickled) result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            try:
                payload = pickle.dumps(("ok", fn()))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
            _write_all(w, payload)
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = _read_all(r)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not data:
        raise ChildFailed("the child died without reporting")
    status, value = pickle.loads(data)
    if status == "error":
        raise ChildFailed(f"the child raised:\n{value}")
    return value


class Helper:
    """A long-running child: ``fn(helper)`` calls ``helper.ready()`` when set up,
    then usually ``helper.wait_release()``; the parent kills or releases it."""

    def __init__(self, fn: Callable[[Helper], None]) -> None:
        r, w = os.pipe()
        self.release_r, self.release_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(r)
                os.close(self.release_w)
                self._ready_w = w
                fn(self)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        os.close(self.release_r)
        self.pid = pid
        self._ready = r

    def ready(self) -> None:
        """In the child: tell the parent we are set up."""
        _write_all(self._ready_w, b"R")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        import select

        while time.monotonic() < deadline:
            readable, _, _ = select.select([self._ready], [], [], 0.1)
            if readable:
                if os.read(self._ready, 1) == b"R":
                    return
                raise ChildFailed("the helper died before it was ready")
        raise ChildFailed("the helper was not ready in time")

    def wait_release(self) -> None:
        """In the child: block until the parent calls :meth:`release`."""
        os.read(self.release_r, 1)

    def release(self) -> int:
        os.close(self.release_w)
        return self.join()

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        return self.join()

    def join(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self._ready)
        return status
