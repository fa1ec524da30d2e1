"""A child's record and its result transport: what the child runs, says and means.

:mod:`procshare._engine.children` supervises children (fork, wait, reap,
signal, scopes); this module holds what travels between a child and its
parent, both ends of it:

* in the child, :func:`child_main` runs the function, turns a cancel into
  :class:`~procshare.Cancelled` (see :func:`on_cancel`), waits for the
  threads the function started, releases what the child opened and writes
  one message;
* in the parent, :func:`drain` reads that message while the parent waits,
  and :func:`decode` turns a reaped child's record into its value or error.

The message: an 8-byte length, then a tag byte and a pickle (``R`` + the
return value, or ``E`` + a description of the exception); returning ``None``
sends nothing at all. A child that ends while holding interprocess locks
first sends a ``H`` message naming them (the parent warns: the next acquirer
will be told ``OwnerDied``).
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
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from procshare._backends.api_process import Exit
from procshare._engine import core as _core
from procshare.errors import (
    Cancelled,
    ChildError,
    ChildExited,
    ChildKilled,
    ChildRaised,
    ChildTimeout,
)

if TYPE_CHECKING:
    from procshare._backends import Backend
    from procshare._engine.scopes import ScopeState

LEN = struct.Struct("<Q")
RETURNED = b"R"
RAISED = b"E"
HELD = b"H"
_HELD_TAG = HELD[0]
# Results larger than this get the pipe enlarged to _BIG_PIPE bytes (Linux
# lets an unprivileged process go up to /proc/sys/fs/pipe-max-size, 1 MiB).
_BIG_RESULT = 1 << 16
_BIG_PIPE = 1 << 20


class Record:
    """The parent's knowledge of one child.

    A plain slotted class, not attrs: it is built on every fork, and each
    object touched around a fork costs a copy-on-write page fault. The
    backend's C start builds records too, and its C join finishes them,
    writing these slots in place (see :mod:`procshare._engine.accel`): a
    slot added here is added there.
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
        # What the child sent: b"" (shared, nothing allocated per fork) until
        # drain() makes it a bytearray.
        self.buf: bytes | bytearray = b""
        self.eof = False  # the result pipe is at end of file (or closed by us)
        self.exit: Exit | None = None
        self.done = False  # reaped (or lost): the outcome is final
        self.lost = False  # somebody else reaped it: its status is unknown
        self.timed_out = False  # its timeout ran out: cancelled, then killed if need be
        self.cancelled = ""  # why its parent cancelled it ("" if it did not)
        self.dropped = False
        self.decoded: tuple[bool, Any] | None = None

    def __repr__(self) -> str:
        return f"<Record {self.name!r} pid={self.pid} done={self.done}>"


# ---------------------------------------------------------------- the child


# CPython exits with ``(int)PyLong_AsLong(code)``: an int code is taken as a C
# long, and one that does not fit becomes -1 (status 255).
_LONG_MAX = (1 << (8 * struct.calcsize("l") - 1)) - 1


def exit_status(exc: SystemExit) -> int:
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


def raised_payload(exc: BaseException, detail: str = "", *, skip: int = 0) -> bytes:
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
    return RAISED + pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL)


def returned_payload(value: object) -> tuple[int, bytes]:
    """The message for a returned value (not None: a child returning None
    sends nothing at all, and status 0 with an empty pipe says it)."""
    try:
        return 0, RETURNED + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # a __reduce__ may raise anything: report it, not exit 1
        detail = (
            f"its return value, a {type(value).__qualname__}, could not be pickled to send it "
            "to the parent; return something picklable (plain data), or put the result in "
            "shared memory"
        )
        return 1, raised_payload(exc, detail)


# Cancellation, in the child. SIGTERM (the parent's cancel, or anyone's
# terminate) runs on_cancel at the next bytecode of the main thread. It raises
# Cancelled only while the child's function runs (armed), and only once: a
# second SIGTERM must not interrupt the unwinding (a `finally`, an __exit__)
# the first one started. Before the function starts, a cancel is remembered
# and raised as the function starts; after it, the child is finishing anyway.
# Each flag holds the pid it is true for (0: none): a child forked from one
# that was being cancelled inherits its flags, and they are simply not its own.
_armed = 0
_pending = 0
_raised = 0


def on_cancel(signum: int, frame: FrameType | None) -> None:
    """The child's ``SIGTERM`` handler (installed by the backend before the
    child unblocks signals)."""
    global _pending, _raised
    me = _core._pid
    if _armed == me and _raised != me:
        _raised = me
        raise Cancelled
    _pending = me


def on_interrupt(signum: int, frame: FrameType | None) -> None:
    """The child's ``SIGINT`` handler: nothing. A terminal's Ctrl-C reaches
    every process of the group; the parent gets it too and cancels its
    children, which then unwind once, in order. (A handler rather than
    ``SIG_IGN``, which a program the child runs would inherit.)"""


def _join_threads() -> None:
    """Wait for the non-daemon threads the child's function started, as
    ``multiprocessing`` and interpreter exit do (new ones they start too)."""
    me = threading.current_thread()
    while True:
        others = [t for t in threading.enumerate() if t is not me and not t.daemon]
        if not others:
            return
        for t in others:
            t.join()


def child_main(  # noqa: PLR0917 - a functools.partial built on every fork
    backend: Backend,
    held_locks: Callable[[], list[str]],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    result_fd: int,
) -> int:
    """Runs in the child; the backend ends the process with the status returned
    (a negative one: by that signal, after the child unwound from a cancel).

    The backend's C start runs the common case of the same itself (see
    ``_forkfast.c``): it arms the cancel, calls ``fn`` and, unless the
    function returned None in a child that took no lock and opened nothing,
    hands the rest to :func:`child_end`."""
    global _armed, _raised
    # The fork step already closed our siblings' descriptors and our own
    # parent's pipe (see the backend): nothing of the parent's to drop here.
    payload: bytes | None
    try:
        me = _armed = _core._pid
        if _pending == me and _raised != me:  # a cancel came before the start (at the fork)
            _raised = me
            raise Cancelled
        value = fn(*args, **kwargs)
        if backend.process_python_threads() > 1:
            _join_threads()
    except BaseException as exc:
        _armed = 0  # first: a late cancel must not interrupt the report
        status, payload = _failed(exc, skip=1)
    else:
        _armed = 0  # finishing: a late cancel changes nothing any more
        status, payload = (0, None) if value is None else returned_payload(value)
        del value
    return _end(backend, held_locks, status, payload, result_fd)


def child_end(
    backend: Backend,
    held_locks: Callable[[], list[str]],
    box: list[Any],
    exc: BaseException | None,
    result_fd: int,
) -> int:
    """The rest of :func:`child_main` after the C start called the function:
    ``box`` holds its return value (taken out here, so it can be freed
    before the child's engine shuts down), ``exc`` what it raised."""
    global _armed
    value = box.pop() if box else None
    skip = 0  # (the function's own frames: no frame of ours called it)
    if exc is None:
        try:
            if backend.process_python_threads() > 1:
                _join_threads()
        except BaseException as failed:
            exc, skip = failed, 1
    _armed = 0
    payload: bytes | None
    if exc is not None:
        status, payload = _failed(exc, skip=skip)
    else:
        status, payload = (0, None) if value is None else returned_payload(value)
    del value
    return _end(backend, held_locks, status, payload, result_fd)


def _failed(exc: BaseException, *, skip: int) -> tuple[int, bytes | None]:
    """The status and message of a child whose function raised ``exc``."""
    if isinstance(exc, Cancelled) and _raised == _core._pid:
        return -signal.SIGTERM, None  # unwound: end as the signal would have
    if isinstance(exc, SystemExit):
        return exit_status(exc), None
    return 1, raised_payload(exc, skip=skip)  # (a Cancelled of its own making too)


_RELEASE_FAILED = (
    "raised while the child released the segments, locks and children it had opened, "
    "after its function returned"
)


def _end(
    backend: Backend,
    held_locks: Callable[[], list[str]],
    status: int,
    payload: bytes | None,
    result_fd: int,
) -> int:
    """The end of every child: note held locks, release what it opened,
    send its message; the status to exit with."""
    held = held_locks()
    try:
        # Release what the child itself opened (never what it inherited:
        # its engine started empty), and reap its own children.
        _core.shutdown_engine()
    except BaseException as exc:
        if status == 0:
            status = 1
            payload = raised_payload(exc, _RELEASE_FAILED)
    return _send(backend, held, status, payload, result_fd)


def child_end_failed(backend: Backend, exc: BaseException, result_fd: int) -> int:
    """The end of a child whose function returned None and whose engine the
    backend's C end (``_cengine.end_child``) failed to close something of:
    reported as :func:`_end` reports a failed shutdown."""
    return _send(backend, [], 1, raised_payload(exc, _RELEASE_FAILED), result_fd)


_LOST_PIPE = (
    "procshare: child {pid} could not send its result to its parent: descriptor {fd}, its "
    "result pipe, was closed by the child's own code (os.closerange or os.close on a "
    "descriptor it did not open), so the result is lost and the child exits with status 1. "
    "Code run in a child (a @ps.forked function, a pool's) should close only the descriptors "
    "it opened.\n"
)


def _send(
    backend: Backend, held: list[str], status: int, payload: bytes | None, result_fd: int
) -> int:
    """Send the held locks' note and the message, if any; return ``status``."""
    # None needs no message: exit status 0 and silence say it (and the
    # common case runs no more code in a child about to exit, where each
    # object touched is a copied page).
    head = b""
    if held:
        note = "\0".join(held).encode()
        head = LEN.pack(len(note) + 1) + HELD + note
    if (payload is not None or head) and not backend.process_result_pipe(result_fd):
        # The function closed the pipe (os.closerange), and the number may
        # name a file of its own by now: write nothing, say why, and fail, so
        # that the parent does not take silence for a returned None.
        sys.stderr.write(_LOST_PIPE.format(pid=os.getpid(), fd=result_fd))
        return status or 1
    if payload is not None or head:
        # The parent dropped its handle and closed the pipe: nobody wants it.
        with contextlib.suppress(BrokenPipeError):
            if payload is None:
                backend.process_write(result_fd, head)
            elif len(payload) < 65536:
                backend.process_write(result_fd, head + LEN.pack(len(payload)) + payload)
            else:
                backend.process_write(result_fd, head + LEN.pack(len(payload)))
                backend.process_write(result_fd, payload)
    return status


# --------------------------------------------------------------- the parent


def drain(backend: Backend, rec: Record) -> None:
    """Read what the child wrote so far; stop once the message is complete."""
    fd = rec.result_fd
    if fd is None or rec.eof:
        return
    buf = rec.buf
    while True:
        data = backend.process_read(fd)
        if data is None:
            return
        if not data:
            rec.eof = True
            return
        if not isinstance(buf, bytearray):  # the shared b"" of a new record
            buf = rec.buf = bytearray()
        buf += data
        if len(buf) >= LEN.size:
            (n,) = LEN.unpack_from(buf)
            start = 0
            if len(buf) > LEN.size and buf[LEN.size] == _HELD_TAG:
                if len(buf) < LEN.size + n + LEN.size:
                    continue  # the result (if any) follows: read on to end of file
                start = LEN.size + n
                (n,) = LEN.unpack_from(buf, start)
            if len(buf) >= start + LEN.size + n:
                rec.eof = True  # the whole message is in: nothing more will come
                return
            if n > _BIG_RESULT and len(buf) == len(data):
                # A large result: a bigger pipe means fewer wake-ups per MiB.
                backend.process_grow_pipe(fd, _BIG_PIPE)


def _held_end(buf: bytes | bytearray) -> int:
    """Where the result message starts: after the ``H`` message, if any."""
    if len(buf) > LEN.size and buf[LEN.size] == _HELD_TAG:
        n: int = LEN.unpack_from(buf)[0]
        return LEN.size + n
    return 0


def held_locks(rec: Record) -> list[str]:
    """Names of the locks the child said it held when it ended."""
    end = _held_end(rec.buf)
    if not end or len(rec.buf) < end:
        return []
    return bytes(rec.buf[LEN.size + 1 : end]).decode(errors="replace").split("\0")


def message(rec: Record) -> memoryview | None:
    """The complete result message (tag byte + pickle), without copying it."""
    buf = rec.buf
    start = _held_end(buf)
    if len(buf) < start + LEN.size:
        return None
    (n,) = LEN.unpack_from(buf, start)
    start += LEN.size
    if len(buf) < start + n:
        return None
    return memoryview(buf)[start : start + n]


def common(rec: Record) -> dict[str, Any]:
    """The fields every error of ``rec``'s child carries."""
    exit_ = rec.exit
    return {
        "pid": rec.pid,
        "name": rec.name,
        "exitcode": None if exit_ is None else exit_.exitcode,
        "signal": None if exit_ is None else exit_.signal,
    }


def not_unpickled(
    what: str, exc: BaseException, fields: dict[str, Any]
) -> Callable[[], ChildError]:
    """The error of a child whose message (``what``) the parent could not unpickle."""
    return functools.partial(
        ChildRaised,
        f"{what} could not be unpickled in the parent",
        exc_type=type(exc).__name__,
        exc_message=str(exc),
        **fields,
    )


def raised_error(
    payload: bytes | memoryview, fields: dict[str, Any], detail: str = ""
) -> Callable[[], ChildError]:
    """The error of a child that raised: ``payload`` is what :func:`raised_payload`
    made, without its tag byte; ``fields`` those of :class:`~procshare.ChildError`.
    Returns a factory: a fresh error object on every call, so raising it twice
    builds no reference cycle. When the original exception unpickles, the
    error is also an instance of its type (:meth:`ChildRaised.matching`)."""
    try:
        info = pickle.loads(payload)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return not_unpickled("its exception", exc, fields)
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
        cls = ChildRaised.matching(type(cause)) if isinstance(cause, Exception) else ChildRaised
        err = cls(why, exc_type=exc_type, exc_message=exc_message, child_traceback=tb, **fields)
        if isinstance(cause, BaseException):
            err.__cause__ = cause
        return err

    return raised


def decode(rec: Record) -> tuple[bool, Any]:  # noqa: PLR0911 - one per outcome
    """``(True, value)``, or ``(False, factory of the error)``, for a done child."""
    exit_ = rec.exit
    if exit_ is not None and not exit_.status and exit_.signal is None and not rec.timed_out:
        if not rec.buf:
            return True, None  # returned None (or exited 0): nothing was sent
        msg = message(rec)
        if msg is not None and msg[:1] == RETURNED:
            try:
                return True, pickle.loads(msg[1:])  # the common case, fast
            except KeyboardInterrupt:
                raise  # Ctrl-C in the parent: the user's, not the child's failure
            except BaseException as exc:  # a __reduce__ may even call sys.exit()
                return False, not_unpickled("its return value", exc, common(rec))
    fields = common(rec)
    detail = f"cancelled: {rec.cancelled}" if rec.cancelled else ""
    if rec.timed_out:
        return False, lambda: ChildTimeout(timeout=rec.timeout, **fields)
    if exit_ is not None and exit_.signal is not None:
        return False, lambda: ChildKilled(detail, **fields)
    msg = message(rec)
    if msg is not None and msg[:1] == RAISED:
        return False, raised_error(msg[1:], fields, detail)
    if exit_ is not None and exit_.status:
        return False, lambda: ChildExited(detail, **fields)
    if rec.lost:
        return False, lambda: ChildError(
            "it was reaped by someone else (os.wait(), or SIGCHLD set to SIG_IGN), so its "
            "exit status and result are lost; leave reaping to procshare",
            **fields,
        )
    if msg is None:
        if len(rec.buf) > _held_end(rec.buf):
            return False, lambda: ChildExited(
                "it exited with status 0 before its whole result was written", **fields
            )
        return True, None  # os._exit(0) / sys.exit(0): nothing was returned
    try:
        return True, pickle.loads(msg[1:])
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return False, not_unpickled("its return value", exc, fields)
