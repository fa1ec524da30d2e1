"""The coordination families' primitives on Linux: futex words, robust mutexes,
process tokens.

The words are ``_futex.Words`` (C: atomics and ``FUTEX_WAIT_BITSET`` /
``FUTEX_WAKE`` on shared memory, see ``_futex.c``); the mutex is the lock
backend's robust pthread mutex, placed at the start of a sync object's data.

A process token is ``(pid, start time)``, the start time being field 22 of
``/proc/PID/stat`` (clock ticks since boot): pids are reused, start times of
a reused pid differ. ``kill(pid, 0)`` would call a zombie alive; the state
field of ``/proc/PID/stat`` says ``Z`` for one, and a zombie holds nothing.
"""

from __future__ import annotations

import os

from procshare._backends.api_lock import LockHandle
from procshare._backends.api_sync import ProcessToken, Words
from procshare._backends.posix._robustmutex import DATA_SIZE, Mutex
from procshare._backends.posix.segment import peek_data

try:
    from procshare._backends.posix._futex import HoldGuard
    from procshare._backends.posix._futex import Words as _Words
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "procshare's C helper for futexes (procshare._backends.posix._futex) is not built: "
        "reinstall procshare with a C compiler available (`pip install -e .` in a checkout, "
        "or `pip install procshare`)"
    ) from exc


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid`` from ``/proc``, or ``None`` if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything:
    # split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):  # pragma: no cover - malformed /proc
        return None


_token: list[ProcessToken] = []
# Forgotten in every child, raw os.fork included: the list's own clear, a C
# method, not a Python function (whose frame, code and globals were pages
# each forked child copied).
os.register_at_fork(after_in_child=_token.clear)


class PosixSync:
    """The sync half of the POSIX backend."""

    sync_mutex_size = DATA_SIZE
    sync_hold_guard: type = HoldGuard

    def sync_words(self, data: memoryview) -> Words:
        words: Words = _Words(data)
        return words

    def sync_mutex_init(self, data: memoryview) -> None:
        mutex = Mutex(data[:DATA_SIZE])
        try:
            mutex.initialise()
        finally:
            mutex.detach()

    def sync_mutex(self, data: memoryview) -> LockHandle:
        mutex: LockHandle = Mutex(data[:DATA_SIZE])
        return mutex

    def process_token(self) -> ProcessToken:
        if not _token:
            pid = os.getpid()
            fields = _stat_fields(pid)
            _token.append((pid, 0 if fields is None else fields[1]))
        return _token[0]

    def process_alive(self, token: ProcessToken) -> bool:
        pid, start = token
        if pid <= 0:
            return False
        fields = _stat_fields(pid)
        if fields is None:
            return False
        state, started = fields
        return state not in ("Z", "X", "x") and started == start

    def process_gone(self, token: ProcessToken) -> bool:
        pid = token[0]
        if pid <= 0:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process has the pid now
            return False
        return False

    def sync_peek(self, os_name: str, size: int) -> bytes | None:
        return peek_data(os_name, size)
