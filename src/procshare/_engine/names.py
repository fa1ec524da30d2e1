"""User-facing names, namespaces, and the short OS names they map to.

A user names a segment or lock with 1-128 characters of ``A-Z a-z 0-9 . _ -``.
The OS name is derived from ``(uid, namespace, name)`` by hashing, so that

* two users, or two applications in different namespaces, never collide;
* every OS name is at most 31 characters including the leading slash (the
  macOS limit), whatever the length of the user's name;
* all objects of one namespace share a prefix, so listing a namespace is a
  prefix scan of the backend's directory, not an open of every file.

Layout: ``/ps`` + 7 hex digits of namespace hash + 1 character of object
kind + 20 hex digits of name hash = 31 characters. 80 bits of name hash make
an accidental collision within a namespace negligible; the engine also
stores the full name in each object and checks it on open.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from typing import Any

from procshare._engine import _cengine
from procshare.errors import InvalidName

MAX_NAME = 128
OS_NAME_MAX = 31
PREFIX = "/ps"

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_DEFAULT_NAMESPACE = "default"

# Object kinds, one character each in the OS name.
SEGMENT = "s"
LOCK = "l"
#: semaphores, events, conditions, barriers, rwlocks, queues ("kind" in the metadata)
SYNC = "y"
TEMP = "t"

_namespace: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "procshare_namespace", default=None
)


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid procshare name, else raise :class:`InvalidName`."""
    if _valid(name):  # (the check in C; the rest of this function says what is wrong)
        return name  # type: ignore[return-value]
    if not isinstance(name, str):
        if callable(name) and what == "lock name":
            raise InvalidName(
                repr(name),
                "@ps.interprocess_lock was used without a name: write "
                '@ps.interprocess_lock("name") with the name of the lock to hold around '
                "each call",
            )
        raise InvalidName(repr(name), f"a {what} must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        if not name:
            why = f"the {what} is empty"
        elif len(name) > MAX_NAME:
            why = f"the {what} is {len(name)} characters long"
        else:
            bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
            why = f"the {what} contains {', '.join(map(repr, bad))}"
        raise InvalidName(name, why)
    return name


def current_namespace() -> str:
    """The innermost ``ps.namespace()``, else ``$PROCSHARE_NAMESPACE``, else ``default``."""
    ns = _namespace.get()
    if ns is not None:
        return ns
    return env_namespace()


def env_namespace() -> str:
    """The namespace of ``$PROCSHARE_NAMESPACE`` (else ``default``), ignoring any
    ``ps.namespace()`` block: what the process and its descendants inherited.

    New objects record it as their *origin* when it differs from their own
    namespace, which is how the pytest plugin tells an object a test's
    processes made in another namespace from another program's.
    """
    # The variable is read on every call (it may change, e.g. per test) but
    # decoded and validated only when it does: by-name opens sit in hot loops,
    # and in a freshly forked child every Python frame run costs page faults.
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(_ENV_NAME)
    if not raw:
        return _DEFAULT_NAMESPACE
    last = _env_last
    if raw == last[0]:
        found: str = last[1]
        return found
    env = os.fsdecode(raw) if isinstance(raw, bytes) else str(raw)
    validate_name(env, "namespace (from PROCSHARE_NAMESPACE)")
    _env_last[:] = (raw, env)
    return env


def env_raw() -> object:
    """The raw value of ``$PROCSHARE_NAMESPACE`` (one dict lookup; for cache keys)."""
    return _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(_ENV_NAME)


_ENV_NAME = "PROCSHARE_NAMESPACE"
# os.environ keeps its contents in a plain dict (of bytes on POSIX) and writes
# through to it: one C lookup there replaces the five Python frames of
# os.environ.get(). Where that private layout is missing, the public way.
_ENV_DATA: dict[object, object] | None = getattr(os.environ, "_data", None)
_ENV_KEY: object = (
    os.environ.encodekey(_ENV_NAME)
    if _ENV_DATA is not None and hasattr(os.environ, "encodekey")
    else _ENV_NAME
)
if _ENV_KEY is _ENV_NAME:  # pragma: no cover - not CPython's os.environ
    _ENV_DATA = None
# (raw value of $PROCSHARE_NAMESPACE, the namespace it validated to)
_env_last: list[Any] = [None, _DEFAULT_NAMESPACE]


@contextlib.contextmanager
def use_namespace(name: str) -> Iterator[str]:
    """Make ``name`` the namespace of every segment and lock opened by name inside."""
    token = _namespace.set(validate_name(name, "namespace"))
    try:
        yield name
    finally:
        _namespace.reset(token)


# Both hashes are BLAKE2b, unkeyed, computed in C (_cengine.c, which tests
# check against hashlib): the prefix is "/ps" + the first 7 lower-case hex
# digits of blake2b(f"{uid}\0{namespace}", digest_size=8); the name part is
# the kind + the 20 hex digits of blake2b(f"{namespace}\0{kind}\0{name}",
# digest_size=10), all UTF-8. Lower-case hex is valid in every POSIX IPC
# namespace and file system. (In C because a name is often first hashed in a
# freshly forked child, where the Python steps copied ~25 pages.)
_valid = _cengine.valid


def namespace_prefix(namespace: str | None = None, uid: int | None = None) -> str:
    """The OS-name prefix shared by every object of ``namespace`` for ``uid``."""
    ns = current_namespace() if namespace is None else namespace
    return _cengine.prefix(ns, os.geteuid() if uid is None else uid)


def os_name(kind: str, name: str, namespace: str | None = None, uid: int | None = None) -> str:
    """The OS name (``/ps...``, 31 characters) of object ``name`` of ``kind``."""
    ns = current_namespace() if namespace is None else namespace
    return _cengine.os_name(kind, name, ns, os.geteuid() if uid is None else uid)


def _code(data: bytes, length: int) -> str:
    return data.hex()[:length]


def temp_os_name(namespace: str | None = None) -> str:
    """A fresh random OS name of kind ``TEMP`` (used while creating an object)."""
    return namespace_prefix(namespace) + TEMP + _code(os.urandom(10), 20)
