"""The coordination families (SPEC 4b), continued: barrier and rwlock.

Behaviour within one process and across processes, timeouts, and what a
participant killed with SIGKILL (or interrupted) does to them.
"""

from __future__ import annotations

import gc
import os
import signal
import threading

import pytest

import procshare as ps
from shared_support import wait_for


def _killed(status: ps.ExitStatus | None) -> None:
    assert status is not None
    assert status.outcome == "killed"


# -- barrier ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_barrier_between_processes() -> None:
    barrier = ps.interprocess_barrier("b", 3)

    @ps.forked
    def party() -> int:
        return ps.interprocess_barrier("b", 3).wait(30)

    with ps.children():
        children = [party(), party()]
        mine = barrier.wait(30)
        indices = sorted([mine, *(c.join() for c in children)])
    assert indices == [0, 1, 2]
    assert barrier.n_waiting == 0
    assert not barrier.broken
    barrier.close()


@pytest.mark.timeout(60)
def test_barrier_timeout_breaks_it_for_all() -> None:
    barrier = ps.interprocess_barrier("bt", 3)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            barrier.wait(30)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    assert wait_for(lambda: barrier.n_waiting == 1)
    with pytest.raises(ps.BrokenBarrier) as info:
        barrier.wait(0.1)
    t.join(30)
    assert isinstance(info.value, threading.BrokenBarrierError)
    assert "timed out" in str(info.value)
    assert len(errors) == 1
    assert isinstance(errors[0], threading.BrokenBarrierError)
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(1)
    barrier.reset()
    assert not barrier.broken
    barrier.close()


@pytest.mark.timeout(60)
def test_a_dead_party_breaks_the_barrier_instead_of_hanging() -> None:
    barrier = ps.interprocess_barrier("bd", 2)
    first = ps.interprocess_event("first")

    @ps.forked
    def party_that_dies() -> None:
        b = ps.interprocess_barrier("bd", 2)
        b.wait(30)  # round one
        ps.interprocess_event("first").set()
        os.kill(os.getpid(), signal.SIGKILL)  # never comes to round two

    status = party_that_dies()
    assert barrier.wait(30) in (0, 1)
    assert first.wait(30)
    _killed(status.wait())
    with pytest.raises(ps.BrokenBarrier, match="a party died"):
        barrier.wait()  # no timeout: would hang without the liveness check
    barrier.reset()
    barrier.close()
    first.close()


@pytest.mark.timeout(60)
def test_a_party_that_exits_normally_does_not_break_it() -> None:
    barrier = ps.interprocess_barrier("bn", 2)

    @ps.forked
    def party() -> int:
        return ps.interprocess_barrier("bn", 2).wait(30)

    with ps.children():
        child = party()
        barrier.wait(30)
        child.join()
    # the child left its slot at exit; a new party takes its place
    with ps.children():
        child = party()
        barrier.wait(30)
        child.join()
    assert not barrier.broken
    barrier.close()


def test_barrier_abort_and_reset() -> None:
    barrier = ps.interprocess_barrier("ba", 2)
    barrier.abort()
    with pytest.raises(ps.BrokenBarrier, match="abort"):
        barrier.wait(1)
    barrier.reset()
    assert barrier.parties == 2
    barrier.close()


# -- rwlock ----------------------------------------------------------------------


def test_rwlock_readers_share_writers_exclude() -> None:
    rw = ps.interprocess_rwlock("rw")
    with rw.read:
        assert rw.read.acquire(timeout=0)  # readers share (and nest)
        assert rw.readers == 2
        assert rw.write.acquire(timeout=0) is False
        rw.read.release()
    with rw.write:
        assert rw.write_locked
        assert rw.read.acquire(timeout=0) is False
    assert not rw.write_locked
    with pytest.raises(RuntimeError, match="no read hold"):
        rw.read.release()
    rw.close()


def test_rwlock_with_times_out() -> None:
    rw = ps.interprocess_rwlock("rwt", timeout=0.05)
    rw.write.acquire()
    blocked: list[BaseException] = []

    def reader() -> None:
        try:
            with rw.read:
                pass
        except BaseException as exc:
            blocked.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    t.join(30)
    assert len(blocked) == 1
    assert isinstance(blocked[0], ps.WaitTimeout)
    rw.write.release()
    rw.close()


@pytest.mark.timeout(60)
def test_rwlock_writers_are_not_starved() -> None:
    rw = ps.interprocess_rwlock("rws")
    rw.read.acquire()

    @ps.forked
    def writer() -> bool:
        with ps.interprocess_rwlock("rws").write:
            return True

    @ps.forked
    def new_reader() -> bool:
        # another process: a waiting writer keeps new readers out
        return ps.interprocess_rwlock("rws").read.acquire(timeout=0.2)

    with ps.children():
        w = writer()
        assert wait_for(lambda: "writers_waiting=1" in repr(rw))
        assert new_reader().join() is False
        rw.read.release()
        assert w.join() is True
    rw.close()


@pytest.mark.timeout(60)
def test_rwlock_a_dead_writer_is_told_and_dead_readers_come_back() -> None:
    rw = ps.interprocess_rwlock("rwd")

    @ps.forked
    def write_and_die() -> None:
        ps.interprocess_rwlock("rwd").write.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    @ps.forked
    def read_and_die() -> None:
        ps.interprocess_rwlock("rwd").read.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    status = write_and_die().wait()
    _killed(status)
    assert status is not None
    with pytest.raises(ps.HolderDied) as info:
        rw.write.acquire(timeout=10)
    assert info.value.held is True
    assert info.value.owner_pid == status.pid
    rw.write.release()
    _killed(read_and_die().wait())
    assert rw.write.acquire(timeout=10)  # the dead reader's hold came back
    rw.write.release()
    rw.close()


@pytest.mark.timeout(60)
def test_an_interrupted_barrier_wait_breaks_it() -> None:
    barrier = ps.interprocess_barrier("interrupted", 2)
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        barrier.wait(20)
    timer.join()
    assert barrier.broken
    with pytest.raises(ps.BrokenBarrier, match="interrupted"):
        barrier.wait(1)
    barrier.reset()
    barrier.close()


_NAMED = {
    "lock": lambda: ps.interprocess_lock("d"),
    "semaphore": lambda: ps.interprocess_semaphore("d", 2),
    "event": lambda: ps.interprocess_event("d"),
    "condition": lambda: ps.interprocess_condition("d"),
    "barrier": lambda: ps.interprocess_barrier("d", 2),
    "rwlock": lambda: ps.interprocess_rwlock("d"),
    "queue": lambda: ps.interprocess_queue("d", 4),
}


@pytest.mark.parametrize("family", sorted(_NAMED))
def test_a_dropped_named_handle_is_released_at_once(family: str) -> None:
    # Without the cycle collector: the rwlock's sides used to refer back to
    # their handle, so a dropped rwlock stayed open until a collection.
    gc.disable()
    try:
        handle = _NAMED[family]()
        assert "d" in {s.name for s in ps.segments()}
        del handle
        assert "d" not in {s.name for s in ps.segments()}
    finally:
        gc.enable()


def test_a_side_kept_alone_keeps_the_rwlock_open() -> None:
    gc.disable()
    try:
        reader = ps.interprocess_rwlock("d", timeout=5).read
        assert "d" in {s.name for s in ps.segments()}
        with reader:
            assert ps.interprocess_rwlock("d").readers == 1
        assert reader.acquire(timeout=0)  # the slow path, through the object kept
        reader.release()
        assert repr(reader).startswith("<read side of <InterprocessRWLock 'd' readers=0")
        del reader
        assert "d" not in {s.name for s in ps.segments()}
    finally:
        gc.enable()


def test_a_rwlock_handle_pickles_as_itself() -> None:
    import pickle

    rw = ps.interprocess_rwlock("d", timeout=3)
    again = pickle.loads(pickle.dumps(rw))
    try:
        assert type(again) is ps.InterprocessRWLock
        assert again.timeout == 3.0
        with rw.write:
            assert again.write_locked
    finally:
        again.close()
        rw.close()
