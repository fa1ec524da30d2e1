"""The sync half of the backend contract: what any backend's SyncBackend must do.

Talks to the backend directly (a segment, futex words, the robust mutex,
process tokens; no engine, no front end), so a new backend is checked
against exactly the promises of ``api_sync.py``: atomics, a wait that sleeps
only while the word holds the value seen, wakes across threads and
processes, the GIL released while waiting, signals that interrupt a wait,
deferred detach, owner death told through the mutex, and tokens that tell a
dead or reused pid from a living process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from procshare._backends import Backend, get_backend
from procshare._backends.api_lock import OK, OWNER_DIED
from procshare._backends.api_segment import SegmentHandle
from procshare._backends.api_sync import Words
from procshare._engine import names
from shared_support import wait_for

SIZE = 256


@pytest.fixture(params=["posix"])
def backend(request: pytest.FixtureRequest) -> Backend:
    assert request.param == get_backend().name
    return get_backend()


@pytest.fixture
def segment(backend: Backend) -> Iterator[SegmentHandle]:
    os_name = names.os_name(names.SYNC, "contract")

    def init(data: memoryview) -> None:
        backend.sync_mutex_init(data)

    handle = backend.segment_create(
        os_name, meta=b'{"kind": "event"}', data_size=SIZE, mode=0o600, persist=False, init=init
    )
    assert handle is not None
    yield handle
    backend.segment_close(handle, keep=lambda _h: False)
    backend.segment_unlink(os_name)


@pytest.fixture
def words(backend: Backend, segment: SegmentHandle) -> Iterator[Words]:
    found = backend.sync_words(segment.data[backend.sync_mutex_size :])
    yield found
    found.detach()


def _child(fn: object) -> int:
    """Fork a child that runs ``fn`` and leaves through ``os._exit``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - in the child
        code = 1
        try:
            fn()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return pid


def _status(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_atomics(words: Words) -> None:
    assert words.load(0) == 0
    words.store(0, 7)
    assert words.load(0) == 7
    assert words.cas(0, 7, 9) is True
    assert words.cas(0, 7, 11) is False
    assert words.load(0) == 9
    assert words.add(0, 1) == 9
    assert words.add(0, -11) == 10
    assert words.load(0) == 0xFFFFFFFF  # wraps at 32 bits
    assert words.add(0, 1) == 0xFFFFFFFF
    assert words.load(0) == 0
    with pytest.raises(ValueError, match="aligned"):
        words.load(2)
    with pytest.raises(ValueError, match="within"):
        words.load(SIZE)


def test_wait_returns_at_once_when_the_word_changed(words: Words) -> None:
    words.store(4, 1)
    assert words.wait(4, 0, None) is True
    assert words.wait(4, 0, 0.0) is True


def test_wait_times_out(words: Words) -> None:
    start = time.monotonic()
    assert words.wait(4, 0, 0.05) is False
    assert time.monotonic() - start >= 0.045


@pytest.mark.timeout(30)
def test_wake_wakes_a_thread_and_the_gil_is_released(words: Words) -> None:
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(words.wait(8, 0, 20.0)))
    t.start()
    assert wait_for(words.in_use)  # waiting, and this thread still runs
    time.sleep(0.1)  # (most likely asleep in the kernel by now)
    words.store(8, 1)
    assert words.wake(8, 1) in (0, 1)  # 0 only if it had not gone to sleep yet
    t.join(20)
    assert woke == [True]  # False would mean it slept through the wake
    assert not words.in_use()


@pytest.mark.timeout(30)
def test_wake_crosses_processes(words: Words) -> None:
    def waiter() -> None:
        words.store(16, 1)  # "I am about to wait"
        while words.load(12) == 0:
            words.wait(12, 0, 20.0)

    pid = _child(waiter)
    assert wait_for(lambda: words.load(16) == 1)
    time.sleep(0.05)
    words.store(12, 1)
    words.wake(12, -1)
    assert _status(pid) == 0


@pytest.mark.timeout(30)
def test_a_raising_signal_handler_interrupts_a_wait(words: Words) -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            words.wait(20, 0, 20.0)
        assert time.monotonic() - start < 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not words.in_use()


@pytest.mark.timeout(30)
def test_a_quiet_signal_handler_does_not_end_a_wait_early(words: Words) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        assert words.wait(20, 0, 0.3) is False  # resumed to the same deadline
        assert time.monotonic() - start >= 0.29
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert seen == [signal.SIGALRM]


@pytest.mark.timeout(30)
def test_detach_waits_for_the_last_waiter(backend: Backend, segment: SegmentHandle) -> None:
    words = backend.sync_words(segment.data[backend.sync_mutex_size :])
    t = threading.Thread(target=lambda: words.wait(0, 0, 20.0))
    t.start()
    assert wait_for(words.in_use)
    words.detach()  # deferred: the sleeper still uses the memory
    with pytest.raises(ValueError, match="detached"):
        words.load(0)
    other = backend.sync_words(segment.data[backend.sync_mutex_size :])
    other.store(0, 1)
    other.wake(0, -1)
    t.join(20)
    other.detach()


@pytest.mark.timeout(30)
def test_the_mutex_tells_when_its_holder_died(backend: Backend, segment: SegmentHandle) -> None:
    mutex = backend.sync_mutex(segment.data)

    def die_holding() -> None:
        child_mutex = backend.sync_mutex(segment.data)
        assert child_mutex.acquire(False, -1.0) == OK
        os.kill(os.getpid(), signal.SIGKILL)

    pid = _child(die_holding)
    assert _status(pid) == -signal.SIGKILL
    assert mutex.acquire(False, 5.0) == OWNER_DIED
    assert mutex.mark_consistent() == OK
    assert mutex.release() == OK
    assert mutex.acquire(False, -1.0) == OK
    mutex.release()
    mutex.detach()


def test_tokens_tell_the_living_from_the_dead(backend: Backend) -> None:
    me = backend.process_token()
    assert me[0] == os.getpid()
    assert backend.process_alive(me)
    assert not backend.process_alive((me[0], me[1] + 1))  # same pid, another start: reused
    assert not backend.process_alive((0, 0))

    pid = _child(lambda: None)
    # an exited child that is not reaped yet is a zombie: dead
    token = (pid, _start(backend, pid))
    assert wait_for(lambda: not backend.process_alive(token))
    _status(pid)
    assert not backend.process_alive(token)


def test_gone_is_a_cheap_look_that_is_sure_when_it_says_yes(backend: Backend) -> None:
    me = backend.process_token()
    assert not backend.process_gone(me)
    assert backend.process_gone((0, 0))
    pid = _child(lambda: None)
    token = (pid, _start(backend, pid))
    assert not backend.process_gone(token)  # running, or a zombie: not sure
    _status(pid)  # reaped: no process has the pid (unless reused at once)
    assert wait_for(lambda: backend.process_gone(token))


def _start(backend: Backend, pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


def test_a_forked_child_has_its_own_token(backend: Backend) -> None:
    parent = backend.process_token()
    r, w = os.pipe()

    def report() -> None:
        token = backend.process_token()
        os.write(w, f"{token[0]} {token[1]} {backend.process_alive(parent)}".encode())

    pid = _child(report)
    assert _status(pid) == 0
    os.close(w)
    pid_s, _start_s, parent_alive = os.read(r, 100).decode().split()
    os.close(r)
    assert int(pid_s) == pid != parent[0]
    assert parent_alive == "True"


def test_peek_reads_without_holding(backend: Backend, segment: SegmentHandle) -> None:
    words = backend.sync_words(segment.data)
    words.store(backend.sync_mutex_size, 42)
    seen = backend.sync_peek(segment.os_name, backend.sync_mutex_size + 4)
    assert seen is not None
    assert int.from_bytes(seen[-4:], "little") == 42
    assert backend.sync_peek(names.os_name(names.SYNC, "missing"), 8) is None
    words.detach()
