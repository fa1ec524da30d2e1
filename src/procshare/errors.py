"""The whole public exception hierarchy of procshare.

Every error is a :class:`ProcshareError` *and* the builtin exception a user
would already catch for that situation (``TimeoutError``,
``FileExistsError``, ``TypeError``, ...), so ``except TimeoutError:`` keeps
working when procshare is dropped into existing code.

Errors cross process boundaries (a child's failure is raised in the parent),
so every class keeps its facts as attributes and pickles with them intact.
The message is *derived* from those fields, never stored on its own, so a
round trip through :mod:`pickle` cannot make the text and the fields
disagree.
"""

from __future__ import annotations

import errno as _errno
import queue as _queue
import signal as _signal
import threading as _threading
from typing import Any, ClassVar

__all__ = [
    "AnonymousError",
    "BrokenBarrier",
    "Cancelled",
    "ChildError",
    "ChildExited",
    "ChildKilled",
    "ChildRaised",
    "ChildTimeout",
    "ClusterUnreachable",
    "ForkError",
    "HolderDied",
    "InvalidName",
    "JoinTimeout",
    "LockTimeout",
    "MissingDependency",
    "NotOnCluster",
    "OwnerDied",
    "ProcshareError",
    "QueueEmpty",
    "QueueFull",
    "SegmentClosed",
    "SegmentExists",
    "SegmentNotFound",
    "SharedMemoryFull",
    "SharedTypeError",
    "UsageError",
    "WaitTimeout",
]


def _rebuild(cls: type[ProcshareError], fields: dict[str, Any]) -> ProcshareError:
    return cls(**fields)


class ProcshareError(Exception):
    """Base class of every error procshare raises.

    Subclasses list their keyword-only constructor fields in ``_fields`` and
    implement :meth:`_message`; pickling rebuilds the exception from those
    fields, which is what lets a child's failure reach the parent whole.
    """

    _fields: ClassVar[tuple[str, ...]] = ("detail",)

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        return self.detail

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {name: getattr(self, name) for name in self._fields}
        extra = {k: v for k, v in self.__dict__.items() if k not in fields}
        return (_rebuild, (type(self), fields), extra or None)


class UsageError(ProcshareError, RuntimeError):
    """procshare was asked for something that cannot work as asked.

    Releasing a lock the calling thread does not hold, taking a non-reentrant
    lock it already holds, using a lock made unrecoverable by code outside
    procshare, a child's handle used in a process that did not fork it,
    ``kids.results`` before the scope ended cleanly, a scope entered twice.
    Also a ``RuntimeError``, which the SPEC names for these. The message
    says what to do instead.
    """


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


# --------------------------------------------------------------------------
# Shared data (SPEC section 3)


def _os_fields(exc: OSError, code: int, message: str) -> None:
    """``errno`` and ``strerror`` as the OS's own error of that kind carries them."""
    exc.errno = code
    exc.strerror = message


class _NamedError(ProcshareError):
    """An error about one named segment or lock."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "detail")
    #: For the OSError ones: the errno the OS's own error would carry.
    _os_errno: ClassVar[int | None] = None

    def __init__(self, name: str = "", detail: str = "") -> None:
        self.name = name
        super().__init__(detail)
        if self._os_errno is not None and isinstance(self, OSError):
            _os_fields(self, self._os_errno, self._message())

    def _tail(self) -> str:
        return f" ({self.detail})" if self.detail else ""


class SegmentExists(_NamedError, FileExistsError):
    """``create=True`` but a live segment of that name exists (``errno`` is ``EEXIST``)."""

    _os_errno = _errno.EEXIST

    def _message(self) -> str:
        return (
            f"shared segment {self.name!r} already exists and create=True demands a new one"
            f"{self._tail()}; pass create=None to attach to it, or pick another name"
        )


class SegmentNotFound(_NamedError, FileNotFoundError):
    """``create=False`` but no live segment of that name exists (``errno`` is ``ENOENT``)."""

    _os_errno = _errno.ENOENT

    def _message(self) -> str:
        return (
            f"no shared segment named {self.name!r} exists in this namespace{self._tail()}; "
            "create it first, pass create=None to create it if missing, or check the "
            "namespace (ps.namespace() / PROCSHARE_NAMESPACE)"
        )


class SharedTypeError(_NamedError, TypeError):
    """Attaching with another kind, shape, size or layout than the segment holds."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "expected", "found", "detail")

    def __init__(
        self, name: str = "", expected: str = "", found: str = "", detail: str = ""
    ) -> None:
        self.expected = expected
        self.found = found
        super().__init__(name, detail)

    def _message(self) -> str:
        what = "lock" if self.expected == "a lock" else "shared segment"
        return (
            f"{what} {self.name!r} holds {self.found}, but it was opened as "
            f"{self.expected}{self._tail()}; open it with the kind it was created with, "
            "or use another name"
        )


class SegmentClosed(_NamedError, ValueError):
    """A scalar or struct view was used after its ``with`` block ended."""

    def _message(self) -> str:
        return (
            f"shared segment {self.name!r} was used after its view was closed{self._tail()}; "
            "use the view only inside its `with ps.shared(...)` block, or open it again"
        )


class SharedMemoryFull(_NamedError, OSError):
    """Creating a segment that does not fit in free shared memory (``errno`` is ``ENOSPC``).

    ``file_size_limit`` is set instead of ``available`` when what it exceeds is
    the process's limit on the size of a file it writes (``ulimit -f``).
    """

    _fields: ClassVar[tuple[str, ...]] = (
        "name",
        "requested",
        "available",
        "detail",
        "file_size_limit",
        "what",
    )
    _os_errno = _errno.ENOSPC

    def __init__(
        self,
        name: str = "",
        requested: int | None = None,
        available: int | None = None,
        detail: str = "",
        file_size_limit: int | None = None,
        *,
        what: str = "shared segment",
    ) -> None:
        self.requested = requested
        self.available = available
        self.file_size_limit = file_size_limit
        #: ``"shared segment"`` or ``"lock"``.
        self.what = what
        super().__init__(name, detail)

    def _message(self) -> str:
        if self.file_size_limit is not None:
            return (
                f"{self.what} {self.name!r} does not fit: {self.requested} bytes were "
                "requested, and with procshare's header that is more than this process "
                f"may write to one file ({self.file_size_limit} bytes: `ulimit -f`, "
                f"RLIMIT_FSIZE){self._tail()}; raise that limit or create a smaller segment"
            )
        avail = "" if self.available is None else f", {self.available} bytes are free"
        if self.name == "(anonymous)":  # memory with no name: RAM, not /dev/shm
            return (
                f"shared segment {self.name} does not fit: {self.requested} bytes were "
                f"requested{avail}{self._tail()}; anonymous segments take RAM and swap, not "
                "/dev/shm: free memory (close other segments) or create a smaller segment"
            )
        return (
            f"{self.what} {self.name!r} does not fit: {self.requested} bytes were "
            f"requested{avail}{self._tail()}; free shared memory (`python -m procshare gc`, "
            "close other segments) or enlarge /dev/shm (Docker: --shm-size)"
        )


class InvalidName(_NamedError, ValueError):
    """A segment, lock or namespace name outside the allowed alphabet or length."""

    def _message(self) -> str:
        return (
            f"invalid name {self.name!r}{self._tail()}: names are 1 to 128 characters of "
            "A-Z a-z 0-9 . _ -"
        )


# --------------------------------------------------------------------------
# Locks (SPEC section 4)


class LockTimeout(_NamedError, TimeoutError):
    """The lock could not be taken within ``timeout`` seconds."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "timeout", "detail")

    def __init__(self, name: str = "", timeout: float | None = None, detail: str = "") -> None:
        self.timeout = timeout
        super().__init__(name, detail)

    def _message(self) -> str:
        return (
            f"could not take lock {self.name!r} within {self.timeout} s{self._tail()}; "
            "another holder keeps it (see `python -m procshare ls`), or raise the timeout"
        )


class OwnerDied(_NamedError):
    """The previous holder of a lock died while holding it.

    ``held`` says whether the caller holds the lock now (``acquire()``
    raises with the lock held; ``with`` raises after releasing it
    unconfirmed). ``owner_pid`` is the dead holder's pid when known.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "owner_pid", "held", "detail", "thread_ended")

    def __init__(
        self,
        name: str = "",
        owner_pid: int | None = None,
        held: bool = False,
        detail: str = "",
        thread_ended: bool = False,
    ) -> None:
        self.owner_pid = owner_pid
        self.held = held
        #: The holder was a thread that ended while its process lives on, not a
        #: process that died.
        self.thread_ended = thread_ended
        super().__init__(name, detail)

    def _who(self) -> str:
        if self.owner_pid is None:
            return "its previous holder died"
        if self.thread_ended:
            return (
                f"a thread of pid {self.owner_pid} ended (pid {self.owner_pid} itself is "
                "still running)"
            )
        return f"pid {self.owner_pid} died"

    def _message(self) -> str:
        who = self._who()
        if self.held:
            todo = (
                "you hold the lock now: repair the data it protects, call "
                "lock.mark_consistent(), then release()"
            )
        else:
            todo = (
                "the lock was released unconfirmed: take it with acquire(), repair the data, "
                "call lock.mark_consistent(); or pass on_owner_death=repair or 'warn'"
            )
        return (
            f"lock {self.name!r}: {who} while holding it, so the data it protects may "
            f"be half-updated{self._tail()}; {todo}"
        )


# --------------------------------------------------------------------------
# Where the system refuses named shared memory (SPEC 3, 5: no bare OSError)


class SharedMemoryUnavailable(_NamedError, OSError):
    """The system keeps no named shared memory for this process: ``/dev/shm``
    is missing, read-only or not writable. ``errno`` is the OS's (``ENOENT``,
    ``EROFS``, ``EACCES``); ``reason`` says which it is.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "reason", "code", "what", "detail")

    def __init__(
        self,
        name: str = "",
        reason: str = "",
        code: int = _errno.EROFS,
        what: str = "shared segment",
        detail: str = "",
    ) -> None:
        self.reason = reason
        self.code = code
        self.what = what
        super().__init__(name, detail)
        _os_fields(self, code, self._message())

    def _message(self) -> str:
        return (
            f"cannot create or open {self.what} {self.name!r}: {self.reason}{self._tail()}; "
            "procshare keeps named shared memory in /dev/shm, which must be a writable "
            "tmpfs: mount one (`mount -t tmpfs -o mode=1777 tmpfs /dev/shm`), or in a "
            "container leave /dev/shm writable (Docker: --shm-size; Kubernetes: an "
            "emptyDir volume with medium: Memory on /dev/shm)"
        )


class DescriptorLimit(_NamedError, OSError):
    """Opening a segment or lock needs a file descriptor and none is left
    (``errno`` is ``EMFILE``, or ``ENFILE`` when the whole system ran out).
    ``limit`` is this process's ``ulimit -n`` when known.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "limit", "system", "what", "detail")

    def __init__(
        self,
        name: str = "",
        limit: int | None = None,
        system: bool = False,
        what: str = "shared segment",
        detail: str = "",
    ) -> None:
        self.limit = limit
        self.system = system
        self.what = what
        super().__init__(name, detail)
        _os_fields(self, _errno.ENFILE if system else _errno.EMFILE, self._message())

    def _message(self) -> str:
        head = f"cannot open {self.what} {self.name!r}{self._tail()}: "
        if self.system:
            return head + (
                "the whole system has as many files open as it may (`sysctl fs.file-max`); "
                "close segments and files you no longer use, or raise fs.file-max"
            )
        limit = "" if self.limit is None else f" = {self.limit}"
        return head + (
            "this process has as many files open as it may (`ulimit -n`, "
            f"RLIMIT_NOFILE{limit}), and opening a segment or lock needs one for a moment "
            "(none stays open while it is held); raise the limit (`ulimit -n 65536` in the "
            "shell, or resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)) in the "
            "program), or close files you no longer use"
        )


class MappingLimit(_NamedError, OSError):
    """Opening a segment or lock needs one more memory mapping and the kernel
    refused it (``errno`` is ``ENOMEM``). Every open segment or lock is one
    mapping (and no descriptor): a process holds at most
    ``vm.max_map_count`` of them, less what the interpreter maps itself.
    ``mappings`` is how many this process had, ``limit`` the sysctl's value.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "mappings", "limit", "what", "detail")

    def __init__(
        self,
        name: str = "",
        mappings: int | None = None,
        limit: int | None = None,
        what: str = "shared segment",
        detail: str = "",
    ) -> None:
        self.mappings = mappings
        self.limit = limit
        self.what = what
        super().__init__(name, detail)
        _os_fields(self, _errno.ENOMEM, self._message())

    def at_limit(self) -> bool:
        """Whether the mapping count explains the refusal (else: address space)."""
        if self.mappings is None or self.limit is None:
            return True
        return self.mappings >= self.limit - 8

    def _message(self) -> str:
        head = f"cannot map {self.what} {self.name!r}{self._tail()}: "
        count = "" if self.mappings is None else f" ({self.mappings} now)"
        limit = "" if self.limit is None else f" = {self.limit}"
        fix = (
            "close segments and locks you no longer use, or raise the limit as root "
            "(`sysctl -w vm.max_map_count=262144`; add it to /etc/sysctl.conf to keep it)"
        )
        if self.at_limit():
            return head + (
                f"this process has as many memory mappings as it may{count} "
                f"(`sysctl vm.max_map_count`{limit}), and each open segment or lock is "
                f"one; {fix}"
            )
        return head + (
            f"the kernel refused a memory mapping (ENOMEM) with this process below "
            f"`sysctl vm.max_map_count`{limit}{count}: its address space is exhausted "
            "(`ulimit -v`) or memory is short; raise `ulimit -v`, or close segments and "
            "locks you no longer use"
        )


# --------------------------------------------------------------------------
# The coordination families (SPEC section 4b)


class HolderDied(OwnerDied):
    """A process died holding part of a semaphore or rwlock; what it held came back.

    ``what`` is ``"semaphore"`` or ``"rwlock"``. Raised, like
    :class:`OwnerDied` for locks, to the next acquirer that gets what came
    back: by ``acquire()`` with it held (``held=True``), by ``with`` after
    giving it back (``held=False``). Only that acquirer is told.
    """

    _fields: ClassVar[tuple[str, ...]] = ("name", "owner_pid", "held", "what", "detail")

    def __init__(
        self,
        name: str = "",
        owner_pid: int | None = None,
        held: bool = False,
        what: str = "semaphore",
        detail: str = "",
    ) -> None:
        self.what = what
        super().__init__(name, owner_pid, held, detail)

    def _message(self) -> str:
        who = "a process" if self.owner_pid is None else f"pid {self.owner_pid}"
        part = "a unit of it" if self.what == "semaphore" else "it for writing"
        if self.held:
            todo = "you hold it now: check the data it protects, then release()"
        else:
            todo = "it was given back: take it again with acquire() to check the data"
        return (
            f"{self.what} {self.name!r}: {who} died holding {part}, so the data it "
            f"protects may be half-updated{self._tail()}; {todo}"
        )


class WaitTimeout(_NamedError, TimeoutError):
    """A ``with`` block on a semaphore or rwlock could not start within ``timeout`` seconds."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "what", "timeout", "detail")

    def __init__(
        self,
        name: str = "",
        what: str = "semaphore",
        timeout: float | None = None,
        detail: str = "",
    ) -> None:
        self.what = what
        self.timeout = timeout
        super().__init__(name, detail)

    def _message(self) -> str:
        return (
            f"could not take {self.what} {self.name!r} within {self.timeout} s{self._tail()}; "
            "its holders keep it (see `python -m procshare ls`), or raise the timeout"
        )


class BrokenBarrier(_NamedError, _threading.BrokenBarrierError):
    """The barrier is broken: a wait timed out, a party died, or ``reset()`` ran
    while this party waited. ``threading.BrokenBarrierError`` too."""

    _fields: ClassVar[tuple[str, ...]] = ("name", "reason", "detail")

    def __init__(self, name: str = "", reason: str = "", detail: str = "") -> None:
        self.reason = reason
        super().__init__(name, detail)

    def _message(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (
            f"barrier {self.name!r} is broken{why}{self._tail()}; every party waiting was "
            "told; call reset() once all parties agree to start again"
        )


class QueueEmpty(_NamedError, _queue.Empty):
    """``get`` found no item (within ``timeout``). Also ``queue.Empty``."""

    def _message(self) -> str:
        return (
            f"queue {self.name!r} is empty{self._tail()}: no item was ready in time "
            "(get() waits for one; get_nowait() does not)"
        )


class QueueFull(_NamedError, _queue.Full):
    """``put`` found no room (within ``timeout``). Also ``queue.Full``."""

    def _message(self) -> str:
        return (
            f"queue {self.name!r} is full{self._tail()}: no room came free in time "
            "(put() waits for room; a larger maxsize= or capacity= makes more)"
        )


# --------------------------------------------------------------------------
# Anonymous objects (SPEC section 3, "Without a name")


class AnonymousError(ProcshareError, TypeError):
    """An anonymous segment, view or lock was used where only a named one works.

    Raised when one is pickled (sent to a pool item, a queue, an unrelated
    process) or passed where a name is expected. It has no name: it exists
    only in the process that made it and the children forked while it was
    open. The message says how to share it instead.
    """

    _fields: ClassVar[tuple[str, ...]] = ("what", "action", "named", "detail")

    def __init__(
        self, what: str = "", action: str = "", named: str = "", detail: str = ""
    ) -> None:
        #: What was misused: ``"an anonymous shared segment (u64)"``.
        self.what = what
        #: What was tried: ``"pickled"``, ``"used as a name"``.
        self.action = action
        #: The call that makes a named one instead: ``"ps.shared('NAME', ps.u64)"``.
        self.named = named
        super().__init__(detail)

    def _message(self) -> str:
        tail = f" ({self.detail})" if self.detail else ""
        return (
            f"{self.what} cannot be {self.action}{tail}: it has no name, so it exists only "
            "in the process that made it and in the children forked while it is open. Use "
            "it there (capture it in the @ps.forked function, or in the function given to "
            "ps.map, and fork while it is open), or give it a name so that other processes "
            f"can open it: {self.named}"
        )


# --------------------------------------------------------------------------
# Optional extras (SPEC section 7: progress bars)


class MissingDependency(ProcshareError, ModuleNotFoundError):
    """A feature needs an optional package that is not installed.

    Also a ``ModuleNotFoundError`` (so an ``ImportError``); ``module`` is the
    missing package, ``extra`` the procshare extra that installs it.
    """

    _fields: ClassVar[tuple[str, ...]] = ("module", "extra", "feature", "detail")

    def __init__(
        self, detail: str = "", *, module: str = "", extra: str = "", feature: str = ""
    ) -> None:
        self.module = module
        self.extra = extra
        self.feature = feature
        super().__init__(detail)
        self.name = module  # ImportError's own field: the module that is missing

    def _message(self) -> str:
        return (
            f"{self.feature} needs {self.module!r}, which is not installed: install it with "
            f"`pip install 'procshare[{self.extra}]'` (or `pip install {self.module}`)"
            + (f" ({self.detail})" if self.detail else "")
        )


# --------------------------------------------------------------------------
# The cluster front end (SPEC 8)


class NotOnCluster(ProcshareError, NotImplementedError):
    """Something that exists on one host has no faithful form on a Dask cluster.

    Raised inside ``with ps.cluster(...):`` for a numpy kind of
    ``ps.shared``, an anonymous object, a condition, barrier or rwlock. The
    message says what to use instead.
    """

    _fields: ClassVar[tuple[str, ...]] = ("what", "instead", "detail")

    def __init__(self, what: str = "", instead: str = "", detail: str = "") -> None:
        #: What was asked for: ``"ps.shared('a', numpy.float64, shape=...)"``.
        self.what = what
        #: What to use on the cluster instead.
        self.instead = instead
        super().__init__(detail)

    def _message(self) -> str:
        return (
            f"{self.what} is not available inside `with ps.cluster(...)`"
            + (f" ({self.detail})" if self.detail else "")
            + f": {self.instead}"
        )


class ClusterUnreachable(ProcshareError, ConnectionError):
    """``ps.cluster(address)`` found no Dask scheduler answering at ``address``.

    Raised when the client for the block cannot connect within ``timeout``
    seconds (nothing listening, a wrong host or port, a firewall). A
    ``ConnectionError``, so an ``OSError`` too, as Dask's own failure was.
    """

    _fields: ClassVar[tuple[str, ...]] = ("address", "timeout", "detail")

    def __init__(self, address: str = "", timeout: float | None = None, detail: str = "") -> None:
        #: The scheduler address that did not answer.
        self.address = address
        #: Seconds the connection was tried for (``None``: Dask's configured
        #: ``distributed.comm.timeouts.connect``).
        self.timeout = timeout
        super().__init__(detail)

    def _message(self) -> str:
        waited = (
            "within Dask's connect timeout (distributed.comm.timeouts.connect)"
            if self.timeout is None
            else f"within {self.timeout:g} s"
        )
        return (
            f"no Dask scheduler answered at {self.address!r} {waited}"
            + (f" ({self.detail})" if self.detail else "")
            + ": start one there (`dask scheduler`, which listens on port 8786), check the "
            "host and port, or pass ps.cluster() a connected distributed.Client; "
            "ps.cluster(address, timeout=SECONDS) waits longer for a scheduler still starting"
        )


class WorkerDied(ChildKilled):
    """A task's Dask worker died under it, on every try the scheduler allowed.

    A :class:`ChildKilled` (not exported on its own): ``except ps.ChildKilled``
    catches the cluster's form of "the process running it was killed". Dask
    retries a task whose worker died on another worker, up to the scheduler's
    ``distributed.scheduler.allowed-failures`` (3 by default) times; this is
    raised when those ran out (Dask's ``KilledWorker``), so the function may
    have run, in part, more than once.
    """

    def _message(self) -> str:
        return (
            f"task {self.name!r} lost its Dask worker on every try: the worker process died "
            "while running it (out of memory, a segfault, a kill), and the scheduler's "
            "retries (distributed.scheduler.allowed-failures) ran out. It may have run in part "
            "more than once; make it idempotent, or give it less memory to use"
            + (f" ({self.detail})" if self.detail else "")
        )
