"""Child supervision: forking, result transport, reaping, timeouts and scopes.

One :class:`ChildrenPart` per engine (so per process) keeps a :class:`Record`
for every child this process forked and has not reaped yet. Everything here
reaches the OS through ``engine.backend`` only.

Result transport: the child writes one message to its result pipe, an 8-byte
length then a tag byte then a pickle (``R`` + the return value, or ``E`` +
a description of the exception); returning ``None`` sends nothing at all.
The parent reads the pipe *while* it waits,
never only after the exit, so a result larger than the pipe buffer cannot
deadlock parent and child.

Reaping: a record leaves the part once its child is reaped. A handle dropped
unjoined marks its record *dropped*: the next call into procshare
(:meth:`ChildrenPart.poll`) closes its pipe (the child, if still writing,
gets ``EPIPE`` and ends) and reaps it once it has exited. At interpreter exit
(:meth:`ChildrenPart.shutdown`) non-daemon children are waited for and daemon
children are terminated; either way every one is reaped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from procshare._backends.api_process import Exit
from procshare._engine import core as _core
from procshare._engine import locks as _locks
from procshare._engine import segments as _segments
from procshare._engine import userwarn
from procshare.errors import (
    ChildError,
    ChildExited,
    ChildKilled,
    ChildRaised,
    ChildTimeout,
    UsageError,
)

if TYPE_CHECKING:
    from procshare._engine.core import Engine

#: Seconds a cancelled or terminated child gets between ``SIGTERM`` and ``SIGKILL``.
CANCEL_GRACE = 1.0

_LEN = struct.Struct("<Q")
_RETURNED = b"R"
_RAISED = b"E"
# Without a pidfd (not Linux) the engine cannot wait on "the child exited"
# directly, so it polls the exit status at this interval while waiting.
_NO_PIDFD_SLICE = 0.005
# Results larger than this get the pipe enlarged to _BIG_PIPE bytes (Linux
# lets an unprivileged process go up to /proc/sys/fs/pipe-max-size, 1 MiB).
_BIG_RESULT = 1 << 16
_BIG_PIPE = 1 << 20
# join() waits this long for a child's exit before it also watches the pipe.
_EXIT_FIRST = 0.002
#: Seconds a wait for children lasts before the engine looks for the classic
#: deadlock: the waiting thread holds an interprocess lock that someone (a
#: child?) is waiting for. It then warns once; the wait goes on.
DEADLOCK_WATCH = 5.0


class Cancelled(BaseException):
    """Raised from a ``@forked`` call inside a scope that is being cancelled.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that an
    ``except Exception:`` in the block does not swallow it; the scope that
    raised it catches it at its exit and does not count it as a failure.
    """

    def __init__(self, scope: ScopeState) -> None:
        super().__init__(
            "this ps.children() scope is cancelling its children after a failure; "
            "no new child is started"
        )
        self.scope = scope


class Record:
    """The parent's knowledge of one child.

    A plain slotted class, not attrs: it is built on every fork, and each
    object touched around a fork costs a copy-on-write page fault.
    """

    __slots__ = (
        "buf",
        "cancelled",
        "daemon",
        "deadline",
        "decoded",
        "done",
        "dropped",
        "eof",
        "exit",
        "lost",
        "name",
        "pid",
        "result_fd",
        "scope",
        "seq",
        "timed_out",
        "timeout",
        "wait_fd",
    )

    def __init__(
        self, name: str, daemon: bool, timeout: float | None, scope: ScopeState | None
    ) -> None:
        self.name = name
        self.daemon = daemon
        self.timeout = timeout
        self.deadline: float | None = None if timeout is None else time.monotonic() + timeout
        self.scope = scope
        self.pid = 0
        self.seq = 0  # the engine's fork count with this fork
        self.result_fd: int | None = None
        self.wait_fd: int | None = None
        self.buf = bytearray()
        self.eof = False  # the result pipe is at end of file (or closed by us)
        self.exit: Exit | None = None
        self.done = False  # reaped (or lost): the outcome is final
        self.lost = False  # somebody else reaped it: its status is unknown
        self.timed_out = False
        self.cancelled = False
        self.dropped = False
        self.decoded: tuple[bool, Any] | None = None

    def __repr__(self) -> str:
        return f"<Record {self.name!r} pid={self.pid} done={self.done}>"


@attrs.define(eq=False)
class ScopeState:
    """The engine's side of one ``ps.children()`` block."""

    limit: int | None
    cancel_on_error: bool
    records: list[Record] = attrs.field(factory=list)
    running: list[Record] = attrs.field(factory=list)
    failures: list[Record] = attrs.field(factory=list)
    cancelling: bool = False


# CPython exits with ``(int)PyLong_AsLong(code)``: an int code is taken as a C
# long, and one that does not fit becomes -1 (status 255).
_LONG_MAX = (1 << (8 * struct.calcsize("l") - 1)) - 1


def _exit_status(exc: SystemExit) -> int:
    """What the interpreter would exit with for this ``SystemExit``, except
    that a non-zero code never gives status 0."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        if not code:
            return 0
        status = code & 0xFF if -_LONG_MAX - 1 <= code <= _LONG_MAX else 0xFF
        # sys.exit(256) would exit 0 from a plain interpreter, and the parent
        # would report a clean return. 255, not 1: it is what CPython itself
        # exits with for a code it cannot represent (sys.exit(2**70)), and 1
        # is also the status of a child that raised.
        return status or 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _raised_payload(exc: BaseException, detail: str = "", *, skip: int = 0) -> bytes:
    """The message for an exception (runs in the child, which must report
    something: so any ``BaseException`` of the user's code it calls, a
    ``__reduce__`` calling ``sys.exit()`` or a Ctrl-C, is caught too)."""
    frames = exc.__traceback__
    for _ in range(skip):  # our own frames: the user's function is what matters
        if frames is not None and frames.tb_next is not None:
            frames = frames.tb_next
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, frames))
    except BaseException as failed:
        tb = f"<the traceback could not be formatted: {type(failed).__name__}>\n"
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:
        exc_bytes = None
    try:
        message = str(exc)
    except BaseException:
        message = "<the exception's message could not be formatted>"
    info = (type(exc).__qualname__, message, tb, exc_bytes, detail)
    return _RAISED + pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL)


def _not_unpickled(
    what: str, exc: BaseException, common: dict[str, Any]
) -> Callable[[], ChildError]:
    """The error of a child whose message (``what``) the parent could not unpickle."""
    return functools.partial(
        ChildRaised,
        f"{what} could not be unpickled in the parent",
        exc_type=type(exc).__name__,
        exc_message=str(exc),
        **common,
    )


def _returned_payload(value: object) -> tuple[int, bytes]:
    """The message for a returned value (not None: a child returning None
    sends nothing at all, and status 0 with an empty pipe says it)."""
    try:
        return 0, _RETURNED + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # a __reduce__ may raise anything: report it, not exit 1
        detail = (
            f"its return value, a {type(value).__qualname__}, could not be pickled to send it "
            "to the parent; return something picklable (plain data), or put the result in "
            "shared memory"
        )
        return 1, _raised_payload(exc, detail)


class ChildrenPart:
    """Every child this process forked and has not reaped yet."""

    order = 0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = engine.backend
        self._lock = threading.RLock()
        self._live: dict[int, Record] = {}
        self._dropped: list[Record] = []
        self._local = threading.local()

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
        if self._dropped:
            self.poll()
        stack = getattr(self._local, "stack", None)
        scope = stack[-1] if stack else None
        if scope is not None and (scope.cancelling or scope.limit is not None):
            self._admit(scope)
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
        child = functools.partial(self._child_main, fn, args, kwargs)
        try:
            engine.forking += 1  # until the child is in _live (see Engine.children_between)
            engine.forks += 1
            rec.seq = engine.forks
            try:
                rec.pid, rec.result_fd, rec.wait_fd = self.backend.process_fork(
                    child, token=rec.seq
                )
            except BaseException:
                # A Ctrl-C that arrived during the fork runs its handler just
                # after it: the child exists, only its numbers were lost. Record
                # it (the scope's interruption handling then stops and reaps it).
                lost = self.backend.process_unclaimed(rec.seq)
                if lost is None:
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

    def _child_main(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result_fd: int,
    ) -> int:
        """Runs in the child; the backend ends the process with the status returned."""
        backend = self.backend
        # The fork step already closed our siblings' descriptors and our own
        # parent's pipe (see the backend): nothing of the parent's to drop here.
        payload: bytes | None
        try:
            value = fn(*args, **kwargs)
        except SystemExit as exc:
            status, payload = _exit_status(exc), None
        except BaseException as exc:
            status, payload = 1, _raised_payload(exc, skip=1)
        else:
            status, payload = (0, None) if value is None else _returned_payload(value)
            del value
        try:
            # Release what the child itself opened (never what it inherited:
            # its engine started empty), and reap its own children.
            _core.shutdown_engine()
        except BaseException as exc:
            if status == 0:
                status = 1
                payload = _raised_payload(
                    exc,
                    "raised while the child released the segments, locks and children "
                    "it had opened, after its function returned",
                )
        # None needs no message: exit status 0 and silence say it (and the
        # common case runs no more code in a child about to exit, where each
        # object touched is a copied page).
        if payload is not None:
            # The parent dropped its handle and closed the pipe: nobody wants it.
            with contextlib.suppress(BrokenPipeError):
                if len(payload) < 65536:
                    backend.process_write(result_fd, _LEN.pack(len(payload)) + payload)
                else:
                    backend.process_write(result_fd, _LEN.pack(len(payload)))
                    backend.process_write(result_fd, payload)
        return status

    # ------------------------------------------------------------- progress

    def _drain(self, rec: Record) -> None:
        """Read what the child wrote so far; stop once the message is complete."""
        fd = rec.result_fd
        if fd is None or rec.eof:
            return
        buf = rec.buf
        while True:
            data = self.backend.process_read(fd)
            if data is None:
                return
            if not data:
                rec.eof = True
                return
            buf += data
            if len(buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(buf)
                if len(buf) >= _LEN.size + n:
                    rec.eof = True  # the whole message is in: nothing more will come
                    return
                if n > _BIG_RESULT and len(buf) == len(data):
                    # A large result: a bigger pipe means fewer wake-ups per MiB.
                    self.backend.process_grow_pipe(fd, _BIG_PIPE)

    def _finish(self, rec: Record, exit_: Exit | None) -> None:
        """The child is reaped: collect the last of its output and forget it."""
        if exit_ is None:
            rec.lost = True
        else:
            rec.exit = exit_
        self._drain(rec)
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
            self._drain(rec)
            if self._reap(rec, block=False):
                return True
            deadline = rec.deadline
            if deadline is not None and time.monotonic() >= deadline:
                self._expire(rec)
                return True
            return False

    def _expire(self, rec: Record) -> None:
        rec.timed_out = True
        self.backend.process_signal(rec.pid, signal.SIGKILL)
        self._reap(rec, block=True)

    def wait(self, rec: Record, timeout: float | None) -> bool:
        """Wait for one child; whether it is done (``False``: ``timeout`` ran out).

        The lean path of ``join()``: poll the result pipe and the pidfd, read
        when there is data, reap when the child has exited.
        """
        if rec.done:
            return True
        if self.engine.pid != os.getpid():
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
                    self._drain(rec)
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
                if d is not None:
                    if d <= now:
                        self.advance(r)  # kills and reaps it: its timeout ran out
                        return
                    if limit is None or d < limit:
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

    def _warn_held_locks(self) -> None:
        """A wait for children has lasted DEADLOCK_WATCH seconds: warn if the
        waiting thread holds a lock somebody is waiting for."""
        part = self.engine.existing_part(_locks.KEY)
        if not isinstance(part, _locks.LocksPart):
            return
        held = part.held_and_awaited()
        if held:
            userwarn.warn(
                f"procshare: this thread has waited {DEADLOCK_WATCH:g} s for child processes "
                f"while it holds interprocess lock {', '.join(map(repr, held))}, which "
                "another process is waiting for. If that process is one of the children, "
                "neither can go on: the child waits for the lock and this thread for the "
                "child. Release the lock before waiting for children; to share a lock with "
                "children, open it in the parent without `with` (see 'Making it fast' in "
                "the seed scenario tutorial)."
            )

    def signal(self, rec: Record, signum: int) -> bool:
        """Signal a child that has not been reaped (never a reused pid)."""
        with self._lock:
            if rec.done:
                return False
            if self.engine.pid != os.getpid():
                self._foreign(rec)
            return self.backend.process_signal(rec.pid, signum)

    def terminate_all(self, recs: Iterable[Record], *, cancel: bool, grace: float) -> None:
        """``SIGTERM`` every running one of ``recs``, ``SIGKILL`` after ``grace``
        seconds, and reap them all, even when interrupted (``Ctrl-C`` again)."""
        running = [r for r in recs if not self.advance(r)]
        if not running:
            return
        try:
            for r in running:
                if cancel:
                    r.cancelled = True
                self.signal(r, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while True:
                running = [r for r in running if not r.done]
                if not running or time.monotonic() >= deadline:
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
            decoded = rec.decoded = self._decode(rec)
            rec.buf = bytearray()  # decoded once: free a large result's bytes
        ok, data = decoded
        if ok:
            return True, data
        return False, data()

    def _decode(self, rec: Record) -> tuple[bool, Any]:  # noqa: PLR0911 - one per outcome
        exit_ = rec.exit
        if exit_ is not None and not exit_.status and exit_.signal is None and not rec.timed_out:
            if not rec.buf:
                return True, None  # returned None (or exited 0): nothing was sent
            message = self._message(rec)
            if message is not None and message[:1] == _RETURNED:
                try:
                    return True, pickle.loads(message[1:])  # the common case, fast
                except KeyboardInterrupt:
                    raise  # Ctrl-C in the parent: the user's, not the child's failure
                except BaseException as exc:  # a __reduce__ may even call sys.exit()
                    return False, _not_unpickled("its return value", exc, self._common(rec))
        common = self._common(rec)
        detail = (
            "cancelled by its ps.children() scope after another failure" if rec.cancelled else ""
        )
        if rec.timed_out:
            return False, lambda: ChildTimeout(timeout=rec.timeout, **common)
        if exit_ is not None and exit_.signal is not None:
            return False, lambda: ChildKilled(detail, **common)
        message = self._message(rec)
        if message is not None and message[:1] == _RAISED:
            try:
                info = pickle.loads(message[1:])
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                return False, _not_unpickled("its exception", exc, common)
            exc_type, exc_message, tb, exc_bytes, raised_detail = info
            if detail:
                raised_detail = f"{raised_detail}; {detail}" if raised_detail else detail

            def raised() -> ChildError:
                cause: object = None
                why = raised_detail
                if exc_bytes is not None:
                    try:
                        cause = pickle.loads(exc_bytes)
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # its __reduce__ may even call sys.exit()
                        lost = (
                            "the original exception could not be unpickled in the parent "
                            f"(so it is not the __cause__): {type(exc).__name__}: {exc}"
                        )
                        why = f"{why}; {lost}" if why else lost
                err = ChildRaised(
                    why,
                    exc_type=exc_type,
                    exc_message=exc_message,
                    child_traceback=tb,
                    **common,
                )
                if isinstance(cause, BaseException):
                    err.__cause__ = cause
                return err

            return False, raised
        if exit_ is not None and exit_.status:
            return False, lambda: ChildExited(detail, **common)
        if rec.lost:
            return False, lambda: ChildError(
                "it was reaped by someone else (os.wait(), or SIGCHLD set to SIG_IGN), so its "
                "exit status and result are lost; leave reaping to procshare",
                **common,
            )
        if message is None:
            if rec.buf:
                return False, lambda: ChildExited(
                    "it exited with status 0 before its whole result was written", **common
                )
            return True, None  # os._exit(0) / sys.exit(0): nothing was returned
        try:
            return True, pickle.loads(message[1:])
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            return False, _not_unpickled("its return value", exc, common)

    @staticmethod
    def _common(rec: Record) -> dict[str, Any]:
        """The fields every error of ``rec``'s child carries."""
        exit_ = rec.exit
        return {
            "pid": rec.pid,
            "name": rec.name,
            "exitcode": None if exit_ is None else exit_.exitcode,
            "signal": None if exit_ is None else exit_.signal,
        }

    @staticmethod
    def _message(rec: Record) -> memoryview | None:
        """The complete message (tag byte + pickle), without copying it."""
        buf = rec.buf
        if len(buf) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(buf)
        if len(buf) < _LEN.size + n:
            return None
        return memoryview(buf)[_LEN.size : _LEN.size + n]

    # --------------------------------------------------------------- scopes

    def _refresh(self, scope: ScopeState) -> None:
        """Advance the scope's running children; note failures among the ones
        that ended (in fork order); cancel the rest if the scope says so."""
        # wait_any() and terminate_all() advance the children; here we only
        # look (no system calls per child on every fork under a limit).
        ended = [r for r in scope.running if r.done]
        if not ended:
            return
        scope.running = [r for r in scope.running if not r.done]
        for r in ended:
            if not (r.cancelled or self.outcome(r)[0]):
                scope.failures.append(r)
        if scope.failures and scope.cancel_on_error and not scope.cancelling:
            self.cancel(scope)

    def cancel(self, scope: ScopeState) -> None:
        scope.cancelling = True
        self.terminate_all(scope.running, cancel=True, grace=CANCEL_GRACE)
        self._refresh(scope)

    def _admit(self, scope: ScopeState) -> None:
        """Before forking into ``scope``: wait for a free slot under its limit."""
        if scope.cancelling:
            raise Cancelled(scope)
        if scope.limit is None:
            return
        while True:
            self._refresh(scope)
            if scope.cancelling:
                raise Cancelled(scope)
            if len(scope.running) < scope.limit:
                return
            self.wait_any(scope.running, None)

    def enter_scope(self, limit: int | None, cancel_on_error: bool) -> ScopeState:
        self.poll()
        scope = ScopeState(limit=limit, cancel_on_error=cancel_on_error)
        self.scope_stack().append(scope)
        return scope

    def exit_scope(self, scope: ScopeState, exc: BaseException | None) -> None:
        """Join (or cancel) every child of ``scope``; take it off the stack.

        A ``KeyboardInterrupt`` (or any other non-``Exception``), from the
        block or while waiting, terminates and reaps every child; the caller
        then lets it propagate.
        """
        try:
            if exc is not None and not isinstance(exc, Exception | Cancelled):
                scope.cancelling = True
                self.terminate_all(scope.running, cancel=True, grace=CANCEL_GRACE)
                return
            if exc is not None and not isinstance(exc, Cancelled) and scope.cancel_on_error:
                self.cancel(scope)
            while True:
                self._refresh(scope)
                if not scope.running:
                    return
                self.wait_any(scope.running, None)
        except BaseException:
            # Interrupted while joining: nothing may be left behind.
            scope.cancelling = True
            self.terminate_all(scope.running, cancel=True, grace=CANCEL_GRACE)
            raise
        finally:
            stack = self.scope_stack()
            if scope in stack:
                stack.remove(scope)
            _segments.reclaim_after_kills(scope.records)  # SPEC 3: a killed child's orphans

    # ------------------------------------------------------- engine hooks

    def drop(self, rec: Record) -> None:
        """A handle to ``rec`` was garbage collected (may run in any thread)."""
        if rec.done or rec.scope is not None or self.engine.pid != os.getpid():
            return
        rec.dropped = True
        self._dropped.append(rec)
        self.engine.pending = True

    def poll(self) -> None:
        """Reap dropped children that have exited; enforce timeouts of dropped ones."""
        if not self._dropped or self.engine.pid != os.getpid():
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

    def _warn_dropped(self, rec: Record) -> None:
        exit_ = rec.exit
        if rec.timed_out:
            what = f"was killed after its timeout of {rec.timeout} s"
        elif exit_ is not None and exit_.signal is not None:
            what = f"was killed by signal {exit_.signal}"
        elif exit_ is not None and exit_.status:
            what = f"ended with exit status {exit_.status} (an exception, or sys.exit)"
        else:
            return
        userwarn.warn(
            f"procshare: child {rec.name!r} (pid {rec.pid}) {what}, and its handle was "
            "dropped without join(), so nobody saw its error. Keep the Child and call "
            "join(), or fork it inside `with ps.children():`."
        )

    def shutdown(self) -> None:
        """Interpreter (or child) exit: wait for non-daemon children, terminate
        daemon ones, reap them all."""
        if self.engine.pid != os.getpid():
            return
        with self._lock:
            recs = list(self._live.values())
        if not recs:
            return
        try:
            self.terminate_all([r for r in recs if r.daemon], cancel=False, grace=CANCEL_GRACE)
            waiting = [r for r in recs if not r.daemon]
            while True:
                waiting = [r for r in waiting if not self.advance(r)]
                if not waiting:
                    break
                self.wait_any(waiting, None)
        finally:
            self.terminate_all(recs, cancel=False, grace=0.0)
            for rec in recs:
                if rec.dropped and rec.done and not rec.daemon:
                    with contextlib.suppress(Exception):
                        self._warn_dropped(rec)


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
