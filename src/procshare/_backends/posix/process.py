"""Fork, wait, signals and parent-death handling on POSIX (Linux).

* The fork step is one C call (``_forkstep.c``): every page the parent or the
  child writes after a fork is copied, and the same steps in Python wrote
  ~10 more pages in the parent and ~10-30 more in the child per fork.
* A fresh ``pipe2(O_CLOEXEC)`` result pipe; the parent closes its write end
  at once and reads its end non-blocking; the child writes blocking.
* The parent opens a *pidfd* (Linux 5.3+) for the child right after the fork:
  it becomes readable when the child exits, so waiting for "result data or
  exit" is one ``poll``. Waiting on pipe end-of-file alone is not enough: a
  descriptor inherited by another process (a sibling forked at the same
  moment by another thread, or a grandchild) keeps the pipe open after the
  child is gone.
* Result read ends and pidfds are the parent's own: the fork step records
  them, and a child closes every one it inherited before it runs any Python
  (its siblings' pipes must not stay open in it); ``process_close`` forgets
  them again.
* In the child, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, then a re-check of
  ``getppid()``: a parent that died between the fork and the ``prctl`` would
  otherwise leave an orphan nobody kills. ``PR_SET_PDEATHSIG`` fires when the
  *thread* that forked exits, not the process; the engine documents that
  caveat.
* The common case of a whole ``@ps.forked`` start and ``Child.join()`` is in
  C too (``_forkfast.c``, the same extension module; see
  ``procshare._engine.accel``). Its fork keeps the parent's copy of the
  write end while a pidfd watches the child (closed with the read end by
  ``process_close``), so the child's exit does not hang the pipe up and one
  ``poll`` on the pidfd and the pipe wakes for data or the exit only;
  ``process_fork`` itself still closes it at once, as its contract says.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C half of signal
import contextlib
import fcntl
import os
import select
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, NoReturn

from procshare._backends.api_process import Exit, Forked

try:
    from procshare._backends.posix import _forkstep
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "procshare's C helper for processes (procshare._backends.posix._forkstep) is not "
        "built: reinstall procshare with a C compiler available (`pip install -e .` in a "
        "checkout, or `pip install procshare`)"
    ) from exc

# NamedTuple construction without the Python-level __new__ (fewer objects touched).
_new_tuple: Any = tuple.__new__
_EXIT_OK = Exit(0, None)
_READ_CHUNK = 1 << 20
_fork_step = _forkstep.fork
_unblock = _forkstep.unblock
_exit = _forkstep.exit
_close = _forkstep.close
_poll1 = _forkstep.poll1
# The C function, not signal.signal: that wrapper converts the old handler to
# an enum, and the Python it runs for it touched ~20 pages in each child.
_set_handler = _signal.signal
Handler = Callable[[int, FrameType | None], Any]
_PF_EXITING = 0x4  # linux/sched.h: the task is in do_exit()

_threads_active: dict[int, Any] = threading._active  # type: ignore[attr-defined]
_threads_limbo: dict[Any, Any] = threading._limbo  # type: ignore[attr-defined]
_forkstep.threads_setup(_threads_active, _threads_limbo)
# None (no os.pidfd_open: an old Python or platform) makes the fork step skip
# the pidfd; the engine then polls the exit status.
_pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)


class PosixProcesses:
    """The process half of the POSIX backend."""

    def process_fork(
        self,
        child: Callable[[int], int],
        *,
        die_with_parent: bool = True,
        token: int = 0,
        handlers: Mapping[int, Handler] | None = None,
    ) -> Forked:
        # Flush what the parent buffered, or the child would print it again.
        # (Inline: the parent runs this again after every fork, and each
        # function it calls then is a copied page.)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                try:  # noqa: SIM105 - cheaper than suppress() on the fork path
                    stream.flush()
                except Exception:
                    pass
        # The C step blocks SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGALRM, SIGUSR1
        # and SIGUSR2 across the fork. The parent gets them back last, after
        # the pidfd is open, so a KeyboardInterrupt cannot separate the fork
        # from the descriptors that let the engine reap the child (only the
        # few bytecodes of the caller storing them remain). The child gets
        # them back only inside the try below: a handler that raises must not
        # run before it, or the child would unwind into the caller's frames.
        forked = _fork_step(die_with_parent, _pidfd_open is not None, token)
        pid, fd, _ = forked
        if pid == 0:
            status = 1
            try:
                if handlers:
                    # Still blocked: a signal sent during the fork (a cancel)
                    # is delivered to these, once the child is in this try.
                    for signum, handler in handlers.items():
                        _set_handler(signum, handler)
                _unblock()
                status = child(fd)
            finally:
                self.process_exit(status)
        made: Forked = _new_tuple(Forked, forked)
        return made

    def process_unclaimed(self, token: int) -> Forked | None:
        lost = _forkstep.unclaimed(token)
        if lost is None:
            return None
        forked: Forked = _new_tuple(Forked, lost)
        return forked

    def process_write(self, fd: int, data: bytes) -> None:
        n = os.write(fd, data)
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                n = os.write(fd, view)
                view = view[n:]

    def process_result_pipe(self, fd: int) -> bool:
        return _forkstep.result_pipe(fd)  # the identity the fork step took (fstat)

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
        if len(fds) == 1:
            # join()'s wait on a pidfd, in C: no poll object built while the
            # child still shares our pages (each object written is a copy).
            return _poll1(fds[0], -1 if timeout is None else max(0, int(timeout * 1000 + 0.999)))
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
        _close(fd)  # also stops children from closing it (see _forkstep.c)

    def process_exit(self, status: int) -> NoReturn:
        _exit(status)  # flushes stdout and stderr first, in C; status < 0: by signal -status

    def process_running(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:
            return False
        except OSError:  # no /proc: existence only (a zombie counts as running)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        # "pid (comm) state ppid pgrp session tty tpgid flags ...": comm may hold
        # spaces and parentheses. A process on its way out (PF_EXITING in its
        # main thread's flags) has ended too: its robust locks are being
        # released before it becomes a zombie.
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) < 7 or fields[0] in (b"Z", b"X"):
            return False
        return not int(fields[6]) & _PF_EXITING

    # The common case of @forked start and Child.join() in C (_forkfast.c; see
    # procshare._engine.accel): the bases the front end's classes derive from,
    # and where the C code finds what it reads and writes.
    process_fast_bases = (_forkstep.Launcher, _forkstep.Handle)

    def process_fast_setup(self, config: dict[str, Any]) -> None:
        _forkstep.fast_setup(
            {
                **config,
                "process": globals(),  # _pidfd_open, read on every fork as process_fork does
                "backend": self,
                "Exit": Exit,
                "exit_ok": _EXIT_OK,
                "set_handler": _set_handler,
            }
        )

    # threading.active_count() without its lock, in C: this runs on every fork
    # and at the end of every child (where each object touched is a copied
    # page, and len() from Python writes both dictionaries' reference counts).
    process_python_threads = staticmethod(_forkstep.python_threads)
