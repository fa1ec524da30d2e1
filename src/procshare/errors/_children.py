"""Errors of processes: a child that failed, a fork refused, a cancel (SPEC 1)."""

from __future__ import annotations

import errno as _errno
import signal as _signal
from typing import Any, ClassVar

from procshare.errors._base import (
    ProcshareError,
    _os_fields,
)

# --------------------------------------------------------------------------
# Processes (SPEC section 1)


_SIGNAL_CAUSES: dict[int, str] = {
    _signal.SIGKILL: (
        "it was killed outright: by the kernel's OOM killer when memory ran out "
        "(check `dmesg`), by a timeout or cancellation, or by someone running `kill -9`"
    ),
    _signal.SIGSEGV: (
        "a segmentation fault: a C extension or ctypes call touched invalid memory, "
        "for example a numpy array used after its shared segment was unmapped"
    ),
    _signal.SIGBUS: (
        "a bus error: memory-mapped storage could not be backed, for example a shared "
        "segment whose file was truncated or a full /dev/shm"
    ),
    _signal.SIGTERM: "it was asked to terminate (by `kill`, a supervisor or a cancelled scope)",
    _signal.SIGINT: "it was interrupted (Ctrl-C reaches every process of the terminal)",
    _signal.SIGABRT: "it aborted: a failed C assertion or a fatal error inside the interpreter",
    _signal.SIGFPE: "an arithmetic fault in native code (integer division by zero)",
    _signal.SIGILL: "an illegal instruction in native code (a build for another CPU?)",
    _signal.SIGPIPE: "it wrote to a pipe or socket whose reader had gone away",
    _signal.SIGHUP: "its terminal or controlling process went away",
}


def signal_name(signum: int | None) -> str:
    """``SIGKILL`` for 9; ``signal 64`` for numbers without a name."""
    if signum is None:
        return "no signal"
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _who(name: str | None, pid: int | None) -> str:
    """How a message names a child: by name and pid, or as a cluster task (no pid)."""
    if pid is None:
        return f"task {name!r} on the cluster"
    return f"child {name!r} (pid {pid})"


class ChildError(ProcshareError, ChildProcessError):
    """A forked child failed. Carries ``pid``, ``name``, ``exitcode`` and ``signal``.

    ``exitcode`` follows :mod:`multiprocessing`: the exit status, or minus the
    signal number when a signal ended the child. ``signal`` is the signal
    number or ``None``.
    """

    _fields: ClassVar[tuple[str, ...]] = ("pid", "name", "exitcode", "signal", "detail")

    def __init__(
        self,
        detail: str = "",
        *,
        pid: int | None = None,
        name: str | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
    ) -> None:
        self.pid = pid
        self.name = name
        self.exitcode = exitcode
        self.signal = signal
        # Not super(): in a ChildRaised.matching() class the next class in the
        # MRO may be the child's own exception type, whose __init__ (a
        # ProcshareError's too) must not run with these arguments.
        ProcshareError.__init__(self, detail)

    def _who(self) -> str:
        return _who(self.name, self.pid)

    def _message(self) -> str:
        status = f" (exit code {self.exitcode})" if self.exitcode is not None else ""
        return f"{self._who()} failed{status}" + (f": {self.detail}" if self.detail else "")


class ChildRaised(ChildError):
    """The child's function raised. The child's formatted traceback is in the
    message; the original exception is ``__cause__`` when it could be pickled.
    """

    _fields: ClassVar[tuple[str, ...]] = (
        *ChildError._fields,
        "exc_type",
        "exc_message",
        "child_traceback",
    )

    def __init__(
        self,
        detail: str = "",
        *,
        exc_type: str = "Exception",
        exc_message: str = "",
        child_traceback: str = "",
        pid: int | None = None,
        name: str | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
    ) -> None:
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.child_traceback = child_traceback
        super().__init__(detail, pid=pid, name=name, exitcode=exitcode, signal=signal)

    def _message(self) -> str:
        head = f"{self._who()} raised {self.exc_type}: {self.exc_message}"
        if self.detail:
            head += f" ({self.detail})"
        if self.child_traceback:
            head += "\n\nTraceback in the child:\n" + self.child_traceback.rstrip("\n")
        return head

    def __reduce__(self) -> tuple[Any, ...]:
        # The class may be one made by matching() (not importable by name), and
        # the original exception is worth keeping: BaseException.__setstate__
        # sets each key as an attribute, __cause__ included.
        rebuild, (cls, fields), extra = super().__reduce__()
        state = dict(extra or {})
        cause = self.__cause__
        if cause is not None and _pickles(cause):
            state["__cause__"] = cause
        original = getattr(cls, "_original", None)
        if original is not None:
            return (_rebuild_matching, (original, fields), state or None)
        return (rebuild, (cls, fields), state or None)

    @staticmethod
    def matching(original: type[BaseException]) -> type[ChildRaised]:
        """The class of a ``ChildRaised`` for an exception of type ``original``.

        A subclass of both ``ChildRaised`` and ``original`` when ``original``
        is an :class:`Exception` that can be subclassed so (``KeyError``,
        ``ValueError``, most user classes), so ``except KeyError:`` and
        ``except* KeyError:`` in the parent match a child's ``KeyError``;
        otherwise ``ChildRaised`` itself. One class per type, made once.
        Its own fields and message are the ``ChildRaised``'s; any other
        attribute is read from the original exception (``__cause__``).
        """
        made = _matching.get(original)
        if made is not None:
            return made
        # A child that let a ChildRaised for a KeyError (its own child's) through:
        # match what that one matched.
        original = getattr(original, "_original", original)
        made = _matching.get(original, ChildRaised)
        if made is not ChildRaised:
            return made
        if (
            isinstance(original, type)
            and issubclass(original, Exception)
            and not issubclass(original, ChildRaised)
        ):
            try:
                made = type(
                    f"ChildRaised[{original.__qualname__}]",
                    (ChildRaised, original),
                    {
                        "__module__": __name__,
                        "__slots__": (),
                        "_original": original,
                        "__getattr__": _from_cause,
                    },
                )
                # The MRO puts ChildRaised's __init__, __str__ and __reduce__
                # first; check once that the pair can really be built.
                made(exc_type=original.__name__)
            except Exception:  # a layout conflict (UnicodeError, StopIteration...), a metaclass
                made = ChildRaised
        if len(_matching) < 1024:
            _matching[original] = made
        return made


_matching: dict[type[BaseException], type[ChildRaised]] = {}


def _from_cause(self: ChildRaised, attr: str) -> Any:
    """A matching class's fallback: what the ``ChildRaised`` has not itself (a
    user exception's fields, an ``OwnerDied``'s ``owner_pid``) comes from the
    original exception, its ``__cause__``, when that crossed the boundary."""
    cause = self.__cause__
    if attr.startswith("__") or cause is None:
        raise AttributeError(attr)
    return getattr(cause, attr)


def _pickles(obj: object) -> bool:
    import pickle  # only when a ChildRaised with a cause is pickled

    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


def _rebuild_matching(original: type[BaseException], fields: dict[str, Any]) -> ChildRaised:
    return ChildRaised.matching(original)(**fields)


class ChildExited(ChildError):
    """The child called ``sys.exit(n)`` or ``os._exit(n)`` with ``n != 0``."""

    def _message(self) -> str:
        return (
            f"{self._who()} exited with status {self.exitcode}: it called sys.exit() or "
            "os._exit() with a non-zero status instead of returning"
            + (f" ({self.detail})" if self.detail else "")
            + ". Return a value or raise an exception to report a result."
        )


class ChildKilled(ChildError):
    """A signal ended the child; the message names it and its likely cause."""

    def _message(self) -> str:
        name = signal_name(self.signal)
        cause = _SIGNAL_CAUSES.get(self.signal or 0, "an unexpected signal")
        return (
            f"{self._who()} was killed by {name}: {cause}"
            + (f" ({self.detail})" if self.detail else "")
            + "."
        )


class ChildTimeout(ChildError, TimeoutError):
    """The ``timeout=`` given to ``@forked`` ran out; the child was cancelled
    (``SIGTERM``: it unwinds), killed if still running after the grace period,
    and reaped."""

    _fields: ClassVar[tuple[str, ...]] = (*ChildError._fields, "timeout")

    def __init__(
        self,
        detail: str = "",
        *,
        timeout: float | None = None,
        pid: int | None = None,
        name: str | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
    ) -> None:
        self.timeout = timeout
        super().__init__(detail, pid=pid, name=name, exitcode=exitcode, signal=signal)

    def _message(self) -> str:
        if self.signal is not None and self.signal != _signal.SIGTERM:
            how = f"cancelled, then killed by {signal_name(self.signal)} when it did not end"
        else:
            how = "cancelled (ps.Cancelled was raised in it, so it unwound)"
        return (
            f"{self._who()} ran longer than its timeout of {self.timeout} s and was "
            f"{how}, and reaped. Raise the timeout=, or make the work smaller"
            + (f" ({self.detail})" if self.detail else "")
            + "."
        )


class ForkError(ProcshareError, OSError):
    """A child could not be forked: the process or the system ran out of
    something a child needs (descriptors, processes, memory).

    Also the ``OSError`` the failed system call raised, with its ``errno``
    (``EMFILE``, ``ENFILE``, ``EAGAIN`` or ``ENOMEM``); the message names the
    limit and the fix (``ulimit -n``, ``ps.children(limit=...)``).
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "errno_code", "running", "detail")

    def __init__(
        self,
        detail: str = "",
        *,
        name: str | None = None,
        errno_code: int | None = None,
        running: int | None = None,
    ) -> None:
        self.name = name
        #: The errno of the failed call (also ``.errno``, as for any OSError).
        self.errno_code = errno_code
        #: How many children of this process were running (not yet reaped) then.
        self.running = running
        super().__init__(detail)
        if errno_code is not None:
            _os_fields(self, errno_code, self._message())

    def _message(self) -> str:
        code = self.errno_code
        running = "" if self.running is None else f" with {self.running} children running"
        head = f"could not fork child {self.name!r}{running}: "
        if code == _errno.EMFILE:
            why = (
                "this process ran out of file descriptors (EMFILE): each running child "
                "holds two until it is joined or reaped (its result pipe and its pidfd). "
                "Raise the limit (`ulimit -n`), or let fewer children run at once: "
                "`with ps.children(limit=N):` waits for a free slot before each fork"
            )
        elif code == _errno.ENFILE:
            why = (
                "the whole system ran out of open files (ENFILE, /proc/sys/fs/file-max). "
                "Let fewer children run at once (`with ps.children(limit=N):`) or close "
                "files elsewhere"
            )
        elif code == _errno.EAGAIN:
            why = (
                "the limit on processes was reached (EAGAIN: `ulimit -u`, or the system's "
                "pid or thread limit). Let fewer children run at once "
                "(`with ps.children(limit=N):`) or raise the limit"
            )
        elif code == _errno.ENOMEM:
            why = (
                "there is not enough memory for another process (ENOMEM). Let fewer "
                "children run at once (`with ps.children(limit=N):`), or fork from a "
                "smaller process"
            )
        else:
            why = f"the system refused it (errno {code})"
        return head + why + (f" ({self.detail})" if self.detail else "")


class Cancelled(BaseException):
    """Raised *in a child* that is being cancelled, and from a ``@forked`` call
    made in a :func:`~procshare.children` scope that is cancelling.

    A child is cancelled by its scope (``cancel_on_error``, ``Ctrl-C`` or
    another exception leaving the block), by its ``timeout=``, by
    ``Child.terminate()`` or by any ``SIGTERM``. The signal becomes this
    exception at the next Python bytecode of the child's main thread, once:
    ``with`` blocks exit and ``finally`` clauses run, so locks are released
    cleanly and nobody is told :class:`OwnerDied`. A child whose function
    lets it propagate ends by ``SIGTERM`` (the parent records it as
    cancelled, or killed by ``SIGTERM`` if the parent did not ask); one
    still running after the grace period is killed (``SIGKILL``).

    Like ``KeyboardInterrupt`` it is a ``BaseException``, not an error, so
    ``except Exception:`` does not swallow it; catch it only to clean up,
    and re-raise it.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "this child is being cancelled by its parent (SIGTERM): its with blocks exit "
            "and its locks are released on the way out"
        )


class JoinTimeout(ProcshareError, TimeoutError):
    """``Child.join(timeout=t)`` ran out; the child is left running."""

    _fields: ClassVar[tuple[str, ...]] = ("pid", "name", "timeout", "detail")

    def __init__(
        self,
        detail: str = "",
        *,
        pid: int | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.pid = pid
        self.name = name
        self.timeout = timeout
        super().__init__(detail)

    def _message(self) -> str:
        return (
            f"{_who(self.name, self.pid)} was still running after join(timeout="
            f"{self.timeout}); it is left running: join() again, or terminate() it"
            + (f" ({self.detail})" if self.detail else "")
        )
