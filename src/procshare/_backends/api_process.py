"""What the engine needs from a backend to fork, supervise and reap children.

The engine owns the policy (scopes, results, timeouts, cancellation); a
backend only offers the primitives below. A forked child talks to its parent
through one *result pipe*: the child writes to ``result_fd``, the parent reads
its end non-blocking while it waits, so a large result never fills the pipe
and stalls a child that the parent is waiting for.

The contract tests in ``tests/contract/test_processes_contract.py`` pin down
every promise made here; a new backend passes them before it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, NamedTuple, NoReturn, Protocol


class Forked(NamedTuple):
    """What :meth:`ProcessBackend.process_fork` returns in the parent.

    ``pid`` is the child's pid, ``result_fd`` the non-blocking read end of the
    result pipe and ``wait_fd`` a descriptor that
    becomes readable when the child has exited (a Linux pidfd), or ``None``
    when the platform has none: the engine then polls :meth:`process_reap`.
    """

    pid: int
    result_fd: int
    wait_fd: int | None


class Exit(NamedTuple):
    """How a reaped child ended: ``status`` for a normal exit, else ``signal``."""

    status: int | None
    signal: int | None

    @property
    def exitcode(self) -> int:
        """:mod:`multiprocessing` convention: the status, or minus the signal number."""
        if self.signal is not None:
            return -self.signal
        return self.status if self.status is not None else 0


class ProcessBackend(Protocol):
    """Fork, wait and signal primitives."""

    def process_fork(
        self,
        child: Callable[[int], int],
        *,
        die_with_parent: bool = True,
        token: int = 0,
        handlers: Mapping[int, Callable[[int, FrameType | None], Any]] | None = None,
    ) -> Forked:
        """Fork now, with a fresh result pipe (both ends close-on-exec).

        Returns only in the parent (see :class:`Forked`); the parent's copy of
        the write end is closed before it returns. The child runs
        ``child(result_fd)`` and then ends through :meth:`process_exit` with the
        status it returned (1 if it raised): it never returns into the caller,
        and signals are blocked from just before the fork until ``child`` runs,
        so not even a ``KeyboardInterrupt`` can land in the caller's frames.
        Python's standard streams are flushed before the fork so buffered
        output is not written twice. With ``die_with_parent`` the child is
        killed (``SIGKILL``) when its parent dies, including when the parent
        died before the arrangement took effect.

        Before ``child`` runs, the child closes every descriptor an earlier
        ``process_fork`` of its parent returned and :meth:`process_close` has
        not closed yet (its siblings' pipes and wait descriptors), and the
        parent's own result pipe if the parent is itself a forked child.

        ``token`` numbers the fork for :meth:`process_unclaimed`.

        ``handlers`` maps signal numbers to Python signal handlers that the
        child installs before it unblocks signals, so a signal sent to the
        child at any moment after the fork (a cancel) reaches them, and not
        a handler it inherited.
        """
        ...

    def process_unclaimed(self, token: int) -> Forked | None:
        """What :meth:`process_fork` with ``token`` returned, if it forked and was
        the last fork, else ``None``. A signal that arrives during the fork is
        handled just after it returns, and its exception (``KeyboardInterrupt``)
        can separate the result from the caller: this hands it over so the
        child is still recorded, and reaped."""
        ...

    def process_write(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` to a (blocking) pipe; ``BrokenPipeError`` if the
        reader is gone."""
        ...

    def process_result_pipe(self, fd: int) -> bool:
        """In a child: whether ``fd`` still is the result pipe's write end that
        :meth:`process_fork` gave it. False once the child's own code closed it
        (``os.closerange``), and when the number names another file since:
        writing the result there would land in that file."""
        ...

    def process_read(self, fd: int) -> bytes | None:
        """Read what is available on a non-blocking pipe now: ``None`` if nothing
        yet, ``b""`` at end of file."""
        ...

    def process_grow_pipe(self, fd: int, size: int) -> None:
        """Best effort: let the pipe of ``fd`` buffer up to ``size`` bytes, so a large
        result crosses in fewer wake-ups. Silently does nothing where it cannot."""
        ...

    def process_poll(self, fds: Sequence[int], timeout: float | None) -> list[int]:
        """Wait until one of ``fds`` is readable (or at end of file, or hung up),
        at most ``timeout`` seconds (``None``: no limit). Returns the ready ones,
        ``[]`` on timeout. Signal handlers run while it waits; one that raises
        (``KeyboardInterrupt``) interrupts it."""
        ...

    def process_reap(self, pid: int, *, block: bool) -> Exit | None:
        """Reap ``pid``: its :class:`Exit`, or ``None`` if ``block`` is false and it
        is still running. ``ChildProcessError`` if it is not our child (or was
        already reaped by someone else)."""
        ...

    def process_signal(self, pid: int, signum: int) -> bool:
        """Send ``signum`` to ``pid``; ``False`` if no such process. Never call it
        for a pid already reaped: the number may belong to someone else now."""
        ...

    def process_close(self, fd: int) -> None:
        """Close a descriptor returned by :meth:`process_fork` (idempotent on
        ``EBADF``); children forked later no longer close it."""
        ...

    def process_exit(self, status: int) -> NoReturn:
        """End this process at once with ``status``: no atexit handlers, no
        finalizers, no return into the caller. Flush Python's streams first.

        A negative ``status`` ends it by signal ``-status`` instead, with that
        signal's default action (how a child that unwound from a cancel
        reports it, as a process that handled ``SIGINT`` re-raises it)."""
        ...

    def process_running(self, pid: int) -> bool:
        """Whether a process ``pid`` exists and has not ended (a zombie has ended).
        Any process, not only a child; a hint, since pids are reused."""
        ...

    def process_python_threads(self) -> int:
        """How many Python threads this process runs (1 when single-threaded)."""
        ...
