"""Errors of shared data: named segments and where the system refuses them (SPEC 3, 5)."""

from __future__ import annotations

import errno as _errno
from typing import ClassVar

from procshare.errors._base import (
    _NamedError,
    _os_fields,
)

# --------------------------------------------------------------------------
# Shared data (SPEC section 3)


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
