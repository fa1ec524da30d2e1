"""Child supervision: forking, waiting, reaping, timeouts, cancellation and scopes.

One :class:`ChildrenPart` per engine (so per process) keeps a
:class:`~procshare._engine.transport.Record` for every child this process
forked and has not reaped yet. What runs in the child, and the messages
between child and parent, are :mod:`procshare._engine.transport`'s.
Everything here reaches the OS through ``engine.backend`` only.

The parent reads a child's result pipe *while* it waits, never only after
the exit, so a result larger than the pipe buffer cannot deadlock parent and
child.

Reaping: a record leaves the part once its child is reaped. A handle dropped
unjoined marks its record *dropped*: the next call into procshare
(:meth:`ChildrenPart.poll`) closes its pipe (the child, if still writing,
gets ``EPIPE`` and ends) and reaps it once it has exited. At interpreter exit
(:meth:`ChildrenPart.shutdown`) non-daemon children are waited for (cancelled
if the interpreter is exiting on Ctrl-C) and daemon children are cancelled;
either way every one is reaped.

Cancelling (a scope's ``cancel_on_error``, Ctrl-C, a ``timeout=``, daemon
children at exit) is ``SIGTERM``, which the child turns into
:class:`~procshare.Cancelled` and unwinds; ``SIGKILL`` only for a child still
running once ``CANCEL_GRACE`` seconds pass without any of those cancelled
together ending.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from procshare._backends.api_process import Exit
from procshare._engine import core as _core
from procshare._engine import locks as _locks
from procshare._engine import scopes, transport, userwarn
from procshare._engine.children_warn import ChildrenWarnings
from procshare._engine.scopes import CANCEL_GRACE, ScopeCancelled, ScopeState
from procshare._engine.transport import Record
from procshare.errors import ForkError, UsageError

if TYPE_CHECKING:
    from procshare._engine.core import Engine

__all__ = [
    "CANCEL_GRACE",
    "DEADLOCK_WATCH",
    "ChildrenPart",
    "Record",
    "ScopeCancelled",
    "ScopeState",
    "current_children",
    "get_children",
]


# Without a pidfd (not Linux) the engine cannot wait on "the child exited"
# directly, so it polls the exit status at this interval while waiting.
_NO_PIDFD_SLICE = 0.005
# join() waits this long for a child's exit before it also watches the pipe.
_EXIT_FIRST = 0.002
#: Seconds a wait for children lasts before the engine looks for the classic
#: deadlock: the waiting thread holds an interprocess lock that someone (a
#: child?) is waiting for. It then warns once; the wait goes on.
DEADLOCK_WATCH = 5.0
# Fork failures that say a limit was reached (ForkError names it and the fix).
_LIMITS = {errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM}
# The child's own handlers, installed before it unblocks signals: SIGTERM (a
# cancel) becomes Cancelled; the terminal's SIGINT is left to the parent.
CHILD_HANDLERS: dict[int, Callable[[int, FrameType | None], Any]] = {
    int(signal.SIGTERM): transport.on_cancel,
    int(signal.SIGINT): transport.on_interrupt,
}


class ChildrenPart(ChildrenWarnings):
    """Every child this process forked and has not reaped yet.

    Slotted: the backend's C start and join (see ``_engine/accel.py``) read
    ``engine``, ``_live``, ``_local`` and ``scoped`` in place.
    """

    __slots__ = (
        "_dropped",
        "_held_news",
        "_live",
        "_local",
        "_lock",
        "backend",
        "engine",
        "scoped",
    )

    order = 0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = engine.backend
        self._lock = threading.RLock()
        self._live: dict[int, Record] = {}
        self._dropped: list[Record] = []
        self._local = threading.local()
        #: Children that said they ended holding locks, not yet warned about.
        self._held_news: list[tuple[Record, list[str]]] = []
        #: ``ps.children()`` scopes open in any thread (see scopes.enter/leave):
        #: while there is none, a fork needs no look at the thread's stack.
        self.scoped = 0

    # ------------------------------------------------------------------ fork

    def scope_stack(self) -> list[ScopeState]:
        stack: list[ScopeState] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def start(  # noqa: PLR0917 - positional: this runs on every fork
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        timeout: float | None,
        daemon: bool,
    ) -> Record:
        """Fork a child running ``fn(*args, **kwargs)``; return its record (parent only).

        Everything the parent needs is built *before* the fork: each Python
        object first written after it costs a copy-on-write page fault.
        """
        if self.engine.pending or self.engine.kept:
            # Housekeeping asked for (by-name objects kept for reuse, a release
            # waiting for a reap): done here, the C start takes the next fork.
            self.engine.poll()
        if self._dropped:
            self.poll()
        stack = getattr(self._local, "stack", None)
        scope = stack[-1] if stack else None
        if scope is not None and (scope.cancelling or scope.limit is not None):
            scopes.admit(self, scope)
        threads = self.backend.process_python_threads()
        if threads > 1:
            userwarn.warn(
                f"procshare: forking child {name!r} while this process runs {threads} Python "
                "threads. Only the calling thread exists in the child: a lock another thread "
                "held at the fork (logging, an import, a stream's buffer) stays locked there "
                "forever and can deadlock the child. Fork before starting threads, or fork "
                "from a process that has none."
            )
        rec = Record(name, daemon, timeout, scope)
        engine = self.engine
        child = functools.partial(
            transport.child_main, self.backend, _locks.held_here, fn, args, kwargs
        )
        try:
            engine.forking += 1  # until the child is in _live (see Engine.children_between)
            engine.forks += 1
            rec.seq = engine.forks
            try:
                rec.pid, rec.result_fd, rec.wait_fd = self.backend.process_fork(
                    child, token=rec.seq, handlers=CHILD_HANDLERS
                )
            except BaseException as exc:
                # A Ctrl-C that arrived during the fork runs its handler just
                # after it: the child exists, only its numbers were lost. Record
                # it (the scope's interruption handling then stops and reaps it).
                lost = self.backend.process_unclaimed(rec.seq)
                if lost is None:
                    if isinstance(exc, OSError) and exc.errno in _LIMITS:
                        raise ForkError(
                            name=name, errno_code=exc.errno, running=len(self._live)
                        ) from exc
                    raise
                rec.pid, rec.result_fd, rec.wait_fd = lost
                self._live[rec.pid] = rec
                if scope is not None:
                    scope.records.append(rec)
                    scope.running.append(rec)
                raise
            self._live[rec.pid] = rec
        finally:
            engine.forking -= 1
        if scope is not None:
            scope.records.append(rec)
            scope.running.append(rec)
        return rec

    def _finish(self, rec: Record, exit_: Exit | None) -> None:
        """The child is reaped: collect the last of its output and forget it."""
        if exit_ is None:
            rec.lost = True
        else:
            rec.exit = exit_
        transport.drain(self.backend, rec)
        backend = self.backend
        if rec.result_fd is not None:
            backend.process_close(rec.result_fd)
        if rec.wait_fd is not None:
            backend.process_close(rec.wait_fd)
        rec.result_fd = rec.wait_fd = None
        rec.done = True
        self._live.pop(rec.pid, None)
        if self.engine.deferred:
            self.engine.pending = True  # a release waiting for children may go now
        if rec.buf:
            self._check_held(rec)

    def _check_held(self, rec: Record) -> None:
        """A reaped child sent something: note it if it says it ended holding
        locks (also called by the backend's C join, which reaps in C)."""
        held = transport.held_locks(rec)
        if held:  # warned at the next call into procshare (see poll)
            self._held_news.append((rec, held))
            self.engine.pending = True

    def forked_between(self, opened: int, closed: int) -> bool:
        """Whether a child numbered above ``opened`` and at most ``closed`` is unreaped."""
        return any(opened < r.seq <= closed for r in list(self._live.values()))

    def _foreign(self, rec: Record) -> None:
        raise UsageError(
            f"this handle of child {rec.name!r} (pid {rec.pid}) belongs to process "
            f"{self.engine.pid}, which forked it; process {os.getpid()} inherited it with a "
            "fork and cannot wait for or signal a child that is not its own"
        )

    def _reap(self, rec: Record, *, block: bool) -> bool:
        try:
            exit_ = self.backend.process_reap(rec.pid, block=block)
        except ChildProcessError:
            if rec.done:  # another thread's C join reaped and finished it meanwhile
                return True
            if self.engine.pid != os.getpid():
                self._foreign(rec)
            self._finish(rec, None)  # reaped behind our back (os.wait(), SIGCHLD=SIG_IGN)
            return True
        if exit_ is None:
            return False
        self._finish(rec, exit_)
        return True

    def advance(self, rec: Record) -> bool:
        """Non-blocking progress: read what the child wrote, reap it if it exited,
        kill it if its timeout ran out. Returns whether it is done."""
        if rec.done:
            return True
        if self.engine.pid != _core._pid:  # (current_pid() without the call)
            # A handle inherited across a fork: its descriptors were the
            # parent's, closed here, and their numbers may be reused by now.
            self._foreign(rec)
        with self._lock:
            if rec.done:
                return True
            transport.drain(self.backend, rec)
            if self._reap(rec, block=False):
                return True
            deadline = rec.deadline
            if deadline is not None and time.monotonic() >= deadline:
                return self._expire(rec)
            return False

    def _expire(self, rec: Record) -> bool:
        """``rec``'s deadline passed: its ``timeout=`` ran out, so cancel it
        (``SIGTERM``: it unwinds) and give it ``CANCEL_GRACE`` seconds; once
        those are over too, kill and reap it. Whether it is done."""
        if not rec.timed_out:
            rec.timed_out = True
            rec.deadline = time.monotonic() + CANCEL_GRACE
            self.backend.process_signal(rec.pid, signal.SIGTERM)
            return False
        self.backend.process_signal(rec.pid, signal.SIGKILL)
        self._reap(rec, block=True)
        return True

    def wait(self, rec: Record, timeout: float | None) -> bool:
        """Wait for one child; whether it is done (``False``: ``timeout`` ran out).

        The lean path of ``join()``: poll the result pipe and the pidfd, read
        when there is data, reap when the child has exited.
        """
        if rec.done:
            return True
        if self.engine.pid != _core._pid:  # (current_pid() without the call)
            self._foreign(rec)
        if rec.wait_fd is None or rec.deadline is not None or timeout is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            self.wait_any([rec], deadline)
            return rec.done
        poll = self.backend.process_poll
        # Most children that are joined at once are short: wait for the exit
        # alone first, so the parent wakes once instead of twice (for the data,
        # then the exit). A result bigger than the pipe buffer waits at most
        # _EXIT_FIRST seconds before the parent starts reading it.
        ready = poll([rec.wait_fd], _EXIT_FIRST)
        if ready:
            with self._lock:
                if not rec.done:
                    self._reap(rec, block=False)
        watch: float | None = time.monotonic() + DEADLOCK_WATCH
        while not rec.done:
            wait = None
            if watch is not None:
                wait = watch - time.monotonic()
                if wait <= 0:
                    watch = wait = None
                    self._warn_held_locks()
            if rec.eof or rec.result_fd is None:
                ready = poll([rec.wait_fd], wait)  # all data is in: wait for the exit
            else:
                ready = poll([rec.result_fd, rec.wait_fd], wait)
            with self._lock:
                if rec.done:
                    break
                if rec.wait_fd in ready:
                    self._reap(rec, block=False)
                else:
                    transport.drain(self.backend, rec)
        return True

    def wait_any(self, recs: Sequence[Record], deadline: float | None) -> None:
        """Return once one of ``recs`` is done, or at ``deadline`` (monotonic).

        One ``poll`` over every pipe and pidfd, then progress only for the
        children whose descriptors are ready: waiting on N children costs
        O(N) per wake-up, not N reads and N ``waitpid`` calls. A ``deadline``
        already past still looks once (``join(timeout=0)`` reaps a child that
        has exited).
        """
        watch: float | None = time.monotonic() + DEADLOCK_WATCH
        looked = False
        while True:
            now = time.monotonic()
            limit = deadline
            by_fd: dict[int, Record] = {}
            blind: list[Record] = []  # no pidfd: their exit must be polled for
            for r in recs:
                if r.done:
                    return
                d = r.deadline
                if d is not None and d <= now:
                    # Its timeout ran out: cancelled now (a new deadline: the
                    # grace period), or killed and reaped once that is over too.
                    if self.advance(r):
                        return
                    d = r.deadline
                if d is not None and (limit is None or d < limit):
                    limit = d
                if r.result_fd is not None and not r.eof:
                    by_fd[r.result_fd] = r
                if r.wait_fd is not None:
                    by_fd[r.wait_fd] = r
                else:
                    blind.append(r)
            if not recs or (looked and deadline is not None and now >= deadline):
                return
            wait = None if limit is None else max(0.0, limit - now)
            if watch is not None:
                if now >= watch:
                    watch = None
                    self._warn_held_locks()
                elif wait is None or watch - now < wait:
                    wait = watch - now
            if blind:
                wait = _NO_PIDFD_SLICE if wait is None else min(wait, _NO_PIDFD_SLICE)
            ready = self.backend.process_poll(list(by_fd), wait)
            looked = True
            for fd in ready:
                self.advance(by_fd[fd])
            for r in blind:
                self.advance(r)

    def signal(self, rec: Record, signum: int) -> bool:
        """Signal a child that has not been reaped (never a reused pid)."""
        with self._lock:
            if rec.done:
                return False
            if self.engine.pid != os.getpid():
                self._foreign(rec)
            return self.backend.process_signal(rec.pid, signum)

    def terminate_all(self, recs: Iterable[Record], *, cancel: bool | str, grace: float) -> None:
        """Stop every running one of ``recs`` (``SIGTERM``: each unwinds), kill
        (``SIGKILL``) those still running once ``grace`` seconds pass without any
        of them ending, and reap them all, even when interrupted (``Ctrl-C``
        again: then the kill comes at once). ``cancel``: why the parent cancels
        them (their handles then say "cancelled"; ``True``: no reason given),
        or ``False`` for a plain stop."""
        running = [r for r in recs if not self.advance(r)]
        if not running:
            return
        try:
            reason = "by its parent" if cancel is True else cancel or ""
            for r in running:
                if reason:
                    r.cancelled = reason
                self.signal(r, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while True:
                left = [r for r in running if not r.done]
                now = time.monotonic()
                if len(left) < len(running):
                    # Progress: the others are unwinding too, give them time.
                    deadline = max(deadline, now + grace)
                running = left
                if not running or now >= deadline:
                    break
                self.wait_any(running, deadline)
        finally:
            for r in running:
                if not r.done:
                    self.signal(r, signal.SIGKILL)
                    with self._lock:
                        if not r.done:
                            self._reap(r, block=True)

    # -------------------------------------------------------------- outcome

    def outcome(self, rec: Record) -> tuple[bool, Any]:
        """``(True, value)`` or ``(False, error)`` for a done child. A fresh error
        object on every call, so raising it twice builds no reference cycle."""
        decoded = rec.decoded
        if decoded is None:
            decoded = rec.decoded = transport.decode(rec)
            rec.buf = b""  # decoded once: free a large result's bytes
        ok, data = decoded
        if ok:
            return True, data
        return False, data()

    # ------------------------------------------------------- engine hooks

    def drop(self, rec: Record) -> None:
        """A handle to ``rec`` was garbage collected (may run in any thread)."""
        if rec.done or rec.scope is not None or self.engine.pid != os.getpid():
            return
        rec.dropped = True
        self._dropped.append(rec)
        self.engine.pending = True

    def poll(self) -> None:
        """Reap dropped children that have exited; enforce timeouts of dropped ones;
        warn about children that ended holding locks."""
        if self.engine.pid != os.getpid():
            return
        if self._held_news:
            self._warn_held_at_end()
        if not self._dropped:
            return
        with self._lock:
            dropped, self._dropped = self._dropped, []
        keep: list[Record] = []
        reaped: list[Record] = []
        try:
            for rec in dropped:
                with self._lock:
                    if rec.done:
                        continue
                    if rec.result_fd is not None:
                        # Nobody will read the result: let a writing child fail fast.
                        self.backend.process_close(rec.result_fd)
                        rec.result_fd = None
                        rec.eof = True
                if self.advance(rec):
                    reaped.append(rec)
                else:
                    keep.append(rec)
        finally:
            # What was not looked at (an interrupt) is looked at next time.
            keep += [r for r in dropped if not r.done and r not in keep]
            if keep:
                with self._lock:
                    self._dropped.extend(keep)
                self.engine.pending = True  # look again at the next call
        # Warnings last: one raised as an error (-W error) must not stop the
        # bookkeeping of the others.
        for rec in reaped:
            self._warn_dropped(rec)

    def shutdown(self) -> None:
        """Interpreter (or child) exit: wait for non-daemon children (cancel them
        if the interpreter is exiting on Ctrl-C), cancel daemon ones, reap them all."""
        if self.engine.pid != os.getpid():
            return
        with self._lock:
            recs = list(self._live.values())
        if not recs:
            self._warn_quietly()
            return
        # An uncaught KeyboardInterrupt ends the main program: this is its exit.
        # The children ignore the terminal's SIGINT (the parent cancels them),
        # so waiting for them would wait out whatever they were doing.
        # (Not in a forked child, which may have inherited an old sys.last_value.)
        last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        on_ctrl_c = isinstance(last, KeyboardInterrupt) and not _core._inherited
        stop = recs if on_ctrl_c else [r for r in recs if r.daemon]
        try:
            try:
                self.terminate_all(stop, cancel=False, grace=CANCEL_GRACE)
                waiting = [r for r in recs if not r.done]
                while True:
                    waiting = [r for r in waiting if not self.advance(r)]
                    if not waiting:
                        break
                    self.wait_any(waiting, None)
            except BaseException as interrupted:  # Ctrl-C while waiting: cancel the rest
                self.terminate_all(
                    recs, cancel=scopes.interrupted(interrupted), grace=CANCEL_GRACE
                )
                raise
        finally:
            self.terminate_all(recs, cancel=False, grace=0.0)
            for rec in recs:
                if rec.dropped and rec.done and not rec.daemon:
                    with contextlib.suppress(Exception):
                        self._warn_dropped(rec)
            self._warn_quietly()


def still_running(pid: int) -> bool:
    """Whether process ``pid`` is this one, or another that has not ended (a
    lock holder recorded as ``pid`` that died was then only one of its threads).

    A dying process releases its robust locks (waking the next holder) a
    moment before it shows as ended, so "still running" is confirmed twice
    more within 50 ms: only a process whose thread ended stays running."""
    if pid == _core._pid:
        return True
    backend = _core.get_engine().backend
    for pause in (0.0, 0.01, 0.04):
        time.sleep(pause)
        if not backend.process_running(pid):
            return False
    return True


def get_children(engine: Engine) -> ChildrenPart:
    return engine.part("children", ChildrenPart)


_current: ChildrenPart | None = None


def current_children() -> ChildrenPart:
    """This process's children part, cached: it is looked up on every fork.

    A forked child resets the engine (``core._engine``), which invalidates the
    cache there, so a child never uses its parent's part.
    """
    global _current
    part = _current
    if part is None or part.engine is not _core._engine:
        part = _current = get_children(_core.get_engine())
    return part
