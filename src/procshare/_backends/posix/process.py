"""Fork, wait, signals and parent-death handling on POSIX (Linux).

* ``os.fork`` with a fresh ``pipe2(O_CLOEXEC)`` result pipe; the parent closes
  its write end at once and reads its end non-blocking.
* The parent opens a *pidfd* (Linux 5.3+) for the child right after the fork:
  it becomes readable when the child exits, so waiting for "result data or
  exit" is one ``poll``. Waiting on pipe end-of-file alone is not enough: a
  descriptor inherited by another process (a sibling forked at the same
  moment by another thread, or a grandchild) keeps the pipe open after the
  child is gone.
* In the child, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes, then a
  re-check of ``getppid()``: a parent that died between the fork and the
  ``prctl`` would otherwise leave an orphan nobody kills. The ctypes function
  is looked up once, in the parent, so the child pays only for the call.
  ``PR_SET_PDEATHSIG`` fires when the *thread* that forked exits, not the
  process; the engine documents that caveat.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import importlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from procshare._backends.api_process import Exit, Forked

_PR_SET_PDEATHSIG = 1
# NamedTuple construction without the Python-level __new__ (fewer objects touched).
_new_tuple: Any = tuple.__new__
_EXIT_OK = Exit(0, None)
_READ_CHUNK = 1 << 20


def _load_prctl() -> Callable[[int, int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # PyDLL keeps the GIL (prctl never blocks) and no argtypes: both save
        # ctypes machinery, whose memory the child would otherwise copy
        # page by page (~15 page faults per fork, measured). libffi widens
        # the small non-negative ints to the unsigned longs prctl reads.
        prctl = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6").prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()
_threads_active: dict[int, Any] = threading._active  # type: ignore[attr-defined]
_threads_limbo: dict[Any, Any] = threading._limbo  # type: ignore[attr-defined]
_pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)


# The signals whose Python handlers commonly raise. Blocking every signal
# costs ~70 µs a fork; so does signal.pthread_sigmask's conversion of the
# result to Signals enums, hence _signal's version, which returns ints.
_sigmask: Callable[[int, Iterable[int]], set[int]] = importlib.import_module(
    "_signal"
).pthread_sigmask
_BLOCKED = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGALRM,
        signal.SIGUSR1,
        signal.SIGUSR2,
    }
)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:  # noqa: SIM105 - cheaper than suppress() on the fork path
                stream.flush()
            except Exception:
                pass


def _die_with_parent(parent: int) -> None:
    """In a fresh child: be SIGKILLed when the parent dies, also if it already has."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        # The parent died before the prctl took effect (we were re-parented).
        os.kill(os.getpid(), signal.SIGKILL)


class PosixProcesses:
    """The process half of the POSIX backend."""

    def process_fork(self, child: Callable[[int], int], *, die_with_parent: bool = True) -> Forked:
        # Every object the parent writes after the fork costs it a page fault
        # (fork write-protects all its pages), so the pipe is fully set up
        # before it: non-blocking read end, blocking write end.
        parent = os.getpid()
        _flush_std_streams()
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(w, True)
        # Block signals across the fork: a handler that raises (SIGINT ->
        # KeyboardInterrupt) must not run in the child before it is inside the
        # try below, or the child would unwind into the caller's frames.
        old_mask = _sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            pid = os.fork()
        except BaseException:
            _sigmask(signal.SIG_SETMASK, old_mask)
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            status = 1
            try:
                os.close(r)
                if die_with_parent:
                    _die_with_parent(parent)
                _sigmask(signal.SIG_SETMASK, old_mask)
                status = child(w)
            finally:
                self.process_exit(status)
        os.close(w)
        wait_fd = None
        if _pidfd_open is not None:
            try:  # noqa: SIM105 - cheaper than suppress() on the fork path
                wait_fd = _pidfd_open(pid)
            except OSError:
                pass  # an old kernel: the engine falls back to polling waitpid
        forked: Forked = _new_tuple(Forked, (pid, r, wait_fd))
        # Unblocked last, so a KeyboardInterrupt cannot separate the fork from
        # the descriptors that let the engine reap the child (only the few
        # bytecodes of the caller storing them remain).
        _sigmask(signal.SIG_SETMASK, old_mask)
        return forked

    def process_write(self, fd: int, data: bytes) -> None:
        n = os.write(fd, data)
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                n = os.write(fd, view)
                view = view[n:]

    def process_read(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return None

    def process_grow_pipe(self, fd: int, size: int) -> None:
        setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
        if setpipe is not None:
            with contextlib.suppress(OSError):  # above pipe-max-size, or not a pipe
                fcntl.fcntl(fd, setpipe, size)

    def process_poll(self, fds: Sequence[int], timeout: float | None) -> list[int]:
        if not fds:
            return []
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        # PEP 475: EINTR is retried with the remaining time; a signal handler
        # that raises (KeyboardInterrupt) propagates out of poll().
        return [fd for fd, _ in poller.poll(ms)]

    def process_reap(self, pid: int, *, block: bool) -> Exit | None:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done == 0:
            return None
        if status == 0:
            return _EXIT_OK
        if os.WIFSIGNALED(status):
            exit_: Exit = _new_tuple(Exit, (None, os.WTERMSIG(status)))
        else:
            exit_ = _new_tuple(Exit, (os.waitstatus_to_exitcode(status), None))
        return exit_

    def process_signal(self, pid: int, signum: int) -> bool:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True

    def process_close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise

    def process_exit(self, status: int) -> NoReturn:
        try:
            _flush_std_streams()
        finally:
            os._exit(status)

    def process_python_threads(self) -> int:
        # threading.active_count() without its lock: this runs on every fork.
        return len(_threads_active) + len(_threads_limbo)
