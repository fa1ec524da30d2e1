"""The base of every procshare error, and the errors every part may raise."""

from __future__ import annotations

from typing import Any, ClassVar


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
