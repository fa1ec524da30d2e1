"""The lock half of the backend contract: what any backend's LockBackend must do.

Talks to the backend directly (segments + lock handles, no engine, no front
end), so a new backend is checked against exactly the promises of
``api_lock.py``: result codes, per-thread ownership, nesting, owner death
told and never healed, the keep decision, the GIL released while waiting,
and no ownership across fork.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator

import pytest

from procshare._backends import Backend, get_backend
from procshare._backends import api_lock as api
from procshare._backends.api_lock import LockHandle
from procshare._backends.api_segment import SegmentHandle
from procshare._engine import names
from shared_support import wait_for


@pytest.fixture(params=["posix"])
def backend(request: pytest.FixtureRequest) -> Backend:
    assert request.param == get_backend().name
    return get_backend()


def _new_lock_object(backend: Backend, os_name: str, meta: bytes) -> SegmentHandle:
    """A lock object made the general way: segment_create with the lock's size and set-up."""
    handle = backend.segment_create(
        os_name,
        meta=meta,
        data_size=backend.lock_data_size,
        mode=0o600,
        persist=False,
        init=backend.lock_init,
    )
    assert handle is not None
    return handle


@pytest.fixture
def segment(backend: Backend) -> Iterator[SegmentHandle]:
    os_name = names.os_name(names.LOCK, "contract")
    handle = _new_lock_object(backend, os_name, b'{"kind": "lock"}')
    yield handle
    backend.segment_close(handle, keep=lambda _h: False)
    backend.segment_unlink(os_name)


@pytest.fixture
def mutex(backend: Backend, segment: SegmentHandle) -> Iterator[LockHandle]:
    m = backend.lock_attach(segment)
    yield m
    while m.owned():
        m.release()
    m.detach()


def in_thread(fn: object) -> object:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))  # type: ignore[operator]
    t.start()
    t.join(30)
    return out[0]


def _die_holding(m: LockHandle) -> int:
    """Fork a child that takes ``m`` (inherited mapping) and is SIGKILLed holding it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            m.acquire(False, 5.0)
            os.write(w, b"H")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 1) == b"H"
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid


def test_fresh_lock_is_free_and_needs_no_keeping(
    backend: Backend, segment: SegmentHandle, mutex: LockHandle
) -> None:
    assert not mutex.locked()
    assert not mutex.owned()
    assert not mutex.held_here()
    assert not backend.lock_keep(segment)
    assert mutex.acquire(False, -1.0) == api.OK
    # An object found held when its last holder leaves is kept, never removed
    # from under its owner (the engine itself never closes a held lock).
    assert backend.lock_keep(segment)
    assert mutex.release() == api.OK


def test_lock_close_removes_the_last_holders_clean_lock(backend: Backend) -> None:
    os_name = names.os_name(names.LOCK, "contract-close")
    meta = b'{"kind": "lock"}'
    first = _new_lock_object(backend, os_name, meta)
    second = backend.segment_open(os_name, keep_orphan=backend.lock_keep, meta=meta)
    assert second is not None
    m = backend.lock_attach(second)
    assert m.acquire(False, -1.0) == api.OK
    assert m.release() == api.OK
    m.detach()
    assert backend.lock_close(second) is False  # another holder: it stays
    assert backend.object_identity(os_name) is not None
    assert backend.lock_close(first) is True  # the last one, clean: removed
    assert backend.object_identity(os_name) is None
    assert backend.lock_close(first) is False  # closed already: nothing more


@pytest.mark.timeout(30)
def test_lock_close_keeps_a_lock_whose_holder_died_unconfirmed(backend: Backend) -> None:
    os_name = names.os_name(names.LOCK, "contract-keep")
    handle = _new_lock_object(backend, os_name, b'{"kind": "lock"}')
    m = backend.lock_attach(handle)
    try:
        _die_holding(m)
    finally:
        m.detach()
    try:
        assert backend.lock_close(handle) is False  # the last holder, but a death to tell
        assert backend.object_identity(os_name) is not None
    finally:
        backend.segment_unlink(os_name)


def test_lock_create_fast_makes_a_lock_object_in_one_step(backend: Backend) -> None:
    create = getattr(backend, "lock_create_fast", None)
    if create is None:  # (optional: the engine then uses segment_create)
        return
    os_name = names.os_name(names.LOCK, "contract-create")
    meta = b'{"kind": "lock", "name": "contract-create"}'
    handle = create(os_name, meta, 0o600)
    assert handle is not None
    assert handle is not NotImplemented  # O_TMPFILE exists on every machine CI runs on
    try:
        assert create(os_name, meta, 0o600) is None  # taken: nothing made
        other = backend.segment_open(os_name, keep_orphan=backend.lock_keep, meta=meta)
        assert other is not None
        assert other.meta == meta
        assert other.data_size >= backend.lock_data_size
        m = backend.lock_attach(other)
        assert m.acquire(False, -1.0) == api.OK  # set up as a lock before it was published
        assert in_thread(lambda: backend.lock_attach(handle).acquire(False, -1.0)) == api.BUSY
        assert m.release() == api.OK
        assert not backend.lock_keep(other)
        m.detach()
        assert backend.lock_close(other) is False
    finally:
        assert backend.lock_close(handle) is True
    assert backend.object_identity(os_name) is None


def _holding_story(mutex: LockHandle, backend: Backend) -> None:
    assert backend.lock_holding() is False
    assert mutex.acquire(True, -1.0) == api.OK
    assert mutex.acquire(True, -1.0) == api.OK  # nested: still one lock held
    assert backend.lock_holding() is True
    assert mutex.release() == api.OK
    assert backend.lock_holding() is True
    pid = os.fork()
    if pid == 0:  # pragma: no cover - grandchild: the hold is not this process's
        os._exit(0 if backend.lock_holding() is False else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mutex.release() == api.OK
    assert backend.lock_holding() is False
    # Held by another thread of this process: holding too.
    took, done = threading.Event(), threading.Event()
    codes: list[int] = []

    def holder() -> None:
        codes.append(mutex.acquire(False, -1.0))
        took.set()
        done.wait(30)
        codes.append(mutex.release())

    t = threading.Thread(target=holder)
    t.start()
    assert took.wait(30)
    assert backend.lock_holding() is True
    done.set()
    t.join(30)
    assert codes == [api.OK, api.OK]
    assert backend.lock_holding() is False


@pytest.mark.timeout(60)
def test_lock_holding_says_no_only_when_nothing_is_held(
    mutex: LockHandle, backend: Backend
) -> None:
    # In a fresh child: True may err high (a thread of this test process that
    # ended holding a lock, in an earlier test, leaves it so; a fork starts over).
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            _holding_story(mutex, backend)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_acquire_release_codes(mutex: LockHandle) -> None:
    assert mutex.acquire(False, -1.0) == api.OK
    assert mutex.owned()
    assert mutex.held_here()
    assert mutex.locked()
    assert mutex.acquire(False, -1.0) == api.SELF_HELD
    assert mutex.release() == api.OK
    assert not mutex.locked()
    assert mutex.release() == api.NOT_OWNER
    assert mutex.mark_consistent() == api.NOT_OWNER


def test_reentrant_acquire_nests(mutex: LockHandle) -> None:
    assert mutex.acquire(True, -1.0) == api.OK
    assert mutex.acquire(True, 0.5) == api.OK
    assert mutex.release() == api.OK
    assert mutex.locked()
    assert mutex.release() == api.OK
    assert not mutex.locked()


def _guard_class(base: type) -> type:
    class Guarded(base):  # type: ignore[valid-type,misc]
        """What the front end's lock object adds to the guard: the two call-backs."""

        __slots__ = ("calls",)

        def _enter_slow(self, rc: int) -> object:
            self.calls.append(("enter_slow", rc))
            return "slow path's result"

        def _not_owner(self, what: str) -> None:
            self.calls.append(("not_owner", what))
            raise RuntimeError(f"not the owner: {what}")

    return Guarded


def test_the_guard_takes_no_stray_number_for_a_result_code(backend: Backend) -> None:
    class Odd:
        def acquire(self, reentrant: bool, timeout: float, /) -> int:
            return 1 << 40  # would read as OK (0) truncated to a C int

        def release(self) -> int:
            return -1

    guard = _guard_class(backend.lock_guard)()
    guard.calls = []
    guard._m = Odd()
    guard._reentrant = False
    with pytest.raises(SystemError, match="not a result code"):
        guard.__enter__()
    with pytest.raises(SystemError, match="not a result code"):
        guard.__exit__(None, None, None)
    assert guard.calls == []


class _StandIn:
    """A closed lock's stand-in: any object whose acquire/release return codes."""

    def acquire(self, reentrant: bool, timeout: float, /) -> int:
        return api.SELF_HELD

    def release(self) -> int:
        return api.NOT_OWNER


@pytest.mark.parametrize("which", ["backend", "reference"])
def test_the_lock_guard_keeps_its_contract(
    backend: Backend, mutex: LockHandle, which: str
) -> None:
    # The backend's `with` (C for posix) behaves exactly as the Python
    # reference in api_lock.PyLockGuard describes.
    guard = _guard_class(backend.lock_guard if which == "backend" else api.PyLockGuard)()
    guard.calls = []
    guard._m = mutex
    guard._reentrant = False
    with guard as got:
        assert got is guard
        assert mutex.owned()
    assert not mutex.owned()
    assert guard.calls == []
    guard._reentrant = True
    with guard, guard:
        assert mutex.owned()
    assert not mutex.locked()
    # Any other code goes to the call-backs.
    assert mutex.acquire(False, -1.0) == api.OK
    assert in_thread(guard.__enter__) == "slow path's result"
    assert guard.calls == [("enter_slow", api.BUSY)]
    assert mutex.release() == api.OK
    with pytest.raises(RuntimeError, match="not the owner: release"):
        guard.__exit__(None, None, None)
    guard.calls.clear()
    guard._m = _StandIn()
    assert guard.__enter__() == "slow path's result"
    with pytest.raises(RuntimeError, match="not the owner: release"):
        guard.__exit__(None, None, None)
    assert guard.calls == [("enter_slow", api.SELF_HELD), ("not_owner", "release")]


@pytest.mark.timeout(30)
def test_other_threads_see_busy_and_timeout(mutex: LockHandle) -> None:
    assert mutex.acquire(False, -1.0) == api.OK
    assert in_thread(lambda: mutex.acquire(False, -1.0)) == api.BUSY
    start = time.monotonic()
    assert in_thread(lambda: mutex.acquire(False, 0.2)) == api.TIMEDOUT
    assert time.monotonic() - start >= 0.2
    assert in_thread(mutex.release) == api.NOT_OWNER
    assert in_thread(mutex.owned) is False
    assert mutex.release() == api.OK


@pytest.mark.timeout(30)
def test_a_timed_wait_releases_the_gil(mutex: LockHandle) -> None:
    assert mutex.acquire(False, -1.0) == api.OK
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    waiter = threading.Thread(target=lambda: mutex.acquire(False, 0.3))
    spinner = threading.Thread(target=spin)
    waiter.start()
    time.sleep(0.05)
    spinner.start()
    before = ticks[0]
    time.sleep(0.15)
    progressed = ticks[0] - before
    stop.set()
    waiter.join()
    spinner.join()
    assert progressed > 1000
    assert mutex.release() == api.OK


@pytest.mark.timeout(30)
def test_contended_says_whether_someone_waits(backend: Backend, mutex: LockHandle) -> None:
    assert not backend.lock_contended(mutex)
    assert mutex.acquire(False, -1.0) == api.OK
    assert not backend.lock_contended(mutex)  # held, nobody waiting
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = 0 if mutex.acquire(False, 20.0) == api.OK and mutex.release() == api.OK else 2
        finally:
            os._exit(code)
    # the child goes to sleep on it
    assert wait_for(lambda: backend.lock_contended(mutex), 20), "a waiting process never showed"
    assert mutex.release() == api.OK
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not backend.lock_contended(mutex)  # the last holder had nobody to wake


@pytest.mark.timeout(30)
def test_owner_death_is_told_until_confirmed_and_kept(
    backend: Backend, segment: SegmentHandle, mutex: LockHandle
) -> None:
    dead = _die_holding(mutex)
    assert backend.lock_keep(segment)  # a death nobody confirmed: keep it
    assert mutex.acquire(False, -1.0) == api.OWNER_DIED
    assert mutex.owned()
    assert mutex.state()[4] == dead  # dead_pid
    assert mutex.release() == api.OK  # released unconfirmed
    assert backend.lock_keep(segment)
    assert mutex.acquire(False, 1.0) == api.UNCONFIRMED  # told again
    assert mutex.mark_consistent() == api.OK
    assert mutex.release() == api.OK
    assert not backend.lock_keep(segment)
    assert mutex.acquire(False, -1.0) == api.OK  # clean
    assert mutex.release() == api.OK


@pytest.mark.timeout(30)
def test_a_forked_child_does_not_own_what_the_parent_holds(mutex: LockHandle) -> None:
    assert mutex.acquire(False, -1.0) == api.OK
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ok = (
                not mutex.owned()
                and not mutex.held_here()
                and mutex.release() == api.NOT_OWNER
                and mutex.acquire(False, -1.0) == api.BUSY
                and mutex.acquire(True, 0.1) == api.TIMEDOUT
            )
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mutex.owned()
    assert mutex.release() == api.OK


def test_detach_is_refused_while_held(mutex: LockHandle) -> None:
    assert mutex.acquire(False, -1.0) == api.OK
    with pytest.raises(RuntimeError):
        mutex.detach()
    assert mutex.release() == api.OK


@pytest.mark.timeout(30)
def test_a_mutex_poisoned_by_foreign_code_is_reported_not_crashed_on(
    segment: SegmentHandle, mutex: LockHandle
) -> None:
    import ctypes

    # Foreign code (plain pthreads): unlocking after EOWNERDEAD without
    # pthread_mutex_consistent() makes the mutex ENOTRECOVERABLE for good.
    libc = ctypes.CDLL(None)
    address = ctypes.c_void_p(segment.address)
    _die_holding(mutex)
    assert libc.pthread_mutex_lock(address) == 130  # EOWNERDEAD
    assert libc.pthread_mutex_unlock(address) == 0
    # glibc's trylock on such a mutex would leave our tid in the lock word
    # (and a later unlock crash): the handle must not even try.
    word_before = mutex.state()[0]
    assert mutex.acquire(False, -1.0) == api.NOT_RECOVERABLE
    assert mutex.acquire(False, 0.1) == api.NOT_RECOVERABLE
    assert mutex.state()[0] == word_before
    assert not mutex.owned()


# -- a lock in anonymous memory (ps.interprocess_lock() without a name) --------


@pytest.fixture
def anonymous_mutex(backend: Backend) -> Iterator[LockHandle]:
    handle = backend.segment_create_anonymous(
        data_size=backend.lock_data_size, init=backend.lock_init
    )
    m = backend.lock_attach(handle)
    yield m
    while m.owned():
        m.release()
    m.detach()
    backend.segment_close(handle, keep=None)


@pytest.mark.timeout(30)
def test_a_lock_in_anonymous_memory_excludes_and_tells_a_death(
    anonymous_mutex: LockHandle,
) -> None:
    m = anonymous_mutex
    assert not m.locked()
    assert m.acquire(False, -1.0) == api.OK
    assert in_thread(lambda: m.acquire(False, -1.0)) == api.BUSY
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the inherited mapping is the same lock
        try:
            os._exit(0 if m.acquire(False, 0.05) == api.TIMEDOUT else 2)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert m.release() == api.OK
    dead = _die_holding(m)  # a child forked now takes it and is SIGKILLed
    assert m.acquire(False, -1.0) == api.OWNER_DIED
    assert m.state()[4] == dead
    assert m.mark_consistent() == api.OK
    assert m.release() == api.OK
    assert m.acquire(False, -1.0) == api.OK
    assert m.release() == api.OK
