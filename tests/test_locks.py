"""ps.interprocess_lock: protocols, timeouts, mutual exclusion, reentrancy, fork, lifetime.

Robustness (a holder that dies) is in test_locks_robust.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import procshare as ps
from lockhelpers import fork, lock_objects, read_byte, shared_counter, wait_ok
from procshare._engine import children as children_engine
from procshare._engine import get_engine
from procshare._engine import locks as engine_locks
from procshare._engine.inspect import namespace_objects
from shared_support import wait_for

# -- the three ways to use it -------------------------------------------------


def test_with_block_holds_the_lock_inside_only() -> None:
    lock = ps.interprocess_lock("m")
    assert not lock.locked()
    with lock as entered:
        assert entered is lock
        assert lock.locked()
        assert lock.owned()
    assert not lock.locked()
    assert not lock.owned()
    lock.close()


def test_with_block_releases_when_the_body_raises() -> None:
    lock = ps.interprocess_lock("m")
    with pytest.raises(KeyError), lock:
        raise KeyError("boom")
    assert not lock.locked()
    lock.close()


def test_decorator_holds_the_lock_during_each_call() -> None:
    lock = ps.interprocess_lock("m")
    seen = []

    @lock
    def work(x: int) -> int:
        """Doubles x."""
        seen.append(lock.owned())
        return 2 * x

    assert work(21) == 42
    assert work(1) == 2
    assert seen == [True, True]
    assert not lock.locked()
    assert work.__name__ == "work"
    assert work.__doc__ == "Doubles x."
    lock.close()


def test_acquire_release_and_locked() -> None:
    lock = ps.interprocess_lock("m")
    assert lock.acquire() is True
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    assert lock.acquire(timeout=0) is True
    lock.release()
    lock.close()


def test_two_objects_of_one_name_are_one_lock() -> None:
    a = ps.interprocess_lock("m")
    b = ps.interprocess_lock("m")
    other = ps.interprocess_lock("other")
    with a:
        assert b.locked()
        assert not other.locked()
    a.close()
    b.close()
    other.close()


# -- timeouts ----------------------------------------------------------------------


def _held_by_another_thread(name: str) -> tuple[threading.Event, threading.Thread]:
    taken, done = threading.Event(), threading.Event()

    def holder() -> None:
        with ps.interprocess_lock(name):
            taken.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    return done, t


@pytest.mark.timeout(30)
def test_timeout_in_with_raises_lock_timeout_after_the_timeout() -> None:
    done, t = _held_by_another_thread("m")
    try:
        lock = ps.interprocess_lock("m", timeout=0.2)
        start = time.monotonic()
        with pytest.raises(ps.LockTimeout) as info, lock:
            pytest.fail("entered a block whose lock another thread holds")
        waited = time.monotonic() - start
        # Far below the other thread's 30 s hold, and generous for a loaded machine:
        # the bound shows the timeout ended the wait, not how fast that was.
        assert 0.2 <= waited < 10
        assert info.value.name == "m"
        assert info.value.timeout == 0.2
        assert isinstance(info.value, TimeoutError)
        lock.close()
    finally:
        done.set()
        t.join()


@pytest.mark.timeout(30)
def test_timeout_in_decorator_raises_lock_timeout() -> None:
    done, t = _held_by_another_thread("m")
    try:
        lock = ps.interprocess_lock("m", timeout=0.2)

        @lock
        def never() -> None:
            pytest.fail("ran while another thread held the lock")

        start = time.monotonic()
        with pytest.raises(ps.LockTimeout):
            never()
        assert 0.2 <= time.monotonic() - start < 10
        lock.close()
    finally:
        done.set()
        t.join()


@pytest.mark.timeout(30)
def test_acquire_with_timeout_returns_false_after_the_timeout() -> None:
    done, t = _held_by_another_thread("m")
    try:
        lock = ps.interprocess_lock("m")
        start = time.monotonic()
        assert lock.acquire(timeout=0.2) is False
        assert 0.2 <= time.monotonic() - start < 10
        start = time.monotonic()
        assert lock.acquire(timeout=0) is False
        assert time.monotonic() - start < 10  # did not wait for the holder
        # acquire() without a timeout uses the lock's own.
        timed = ps.interprocess_lock("m", timeout=0.2)
        start = time.monotonic()
        assert timed.acquire() is False
        assert 0.2 <= time.monotonic() - start < 10
        lock.close()
        timed.close()
    finally:
        done.set()
        t.join()


@pytest.mark.timeout(30)
def test_a_waiter_gets_the_lock_when_it_is_released() -> None:
    lock = ps.interprocess_lock("m")
    lock.acquire()
    got = []

    def waiter() -> None:
        with ps.interprocess_lock("m"):
            got.append(time.monotonic())

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    assert got == []
    released = time.monotonic()
    lock.release()
    t.join(10)
    assert len(got) == 1
    assert got[0] >= released
    lock.close()


@pytest.mark.timeout(30)
def test_blocking_wait_releases_the_gil() -> None:
    done, t = _held_by_another_thread("m")
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        lock = ps.interprocess_lock("m")
        before = ticks[0]
        assert lock.acquire(timeout=0.3) is False
        assert ticks[0] - before > 1000  # Python ran in another thread meanwhile
        lock.close()
    finally:
        stop.set()
        spinner.join()
        done.set()
        t.join()


class _Interrupted(Exception):
    pass


@pytest.mark.timeout(30)
def test_a_signal_interrupts_a_wait_without_a_timeout() -> None:
    done, t = _held_by_another_thread("m")

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        lock = ps.interprocess_lock("m")
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        start = time.monotonic()
        with pytest.raises(_Interrupted):
            lock.acquire()
        assert time.monotonic() - start < 10  # the holder keeps it 30 s
        assert not lock.owned()
        lock.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        done.set()
        t.join()


# -- mutual exclusion, exact counts ------------------------------------------------

N_PROCS = 8
N_INCREMENTS = 20_000


def _increment(counter: memoryview, times: int, lock: ps.InterprocessLock | None) -> None:
    # Read, yield the CPU, write back: without the lock another process runs
    # between the read and the write and its updates are lost.
    for i in range(times):
        if lock is not None:
            lock.acquire()
        value = counter[0]
        if i % 8 == 0:
            os.sched_yield()
        counter[0] = value + 1
        if lock is not None:
            lock.release()


def _run_forked_increments(counter: memoryview, use_lock: bool) -> None:
    # A start gate: each child blocks on the pipe until the parent, having forked
    # them all, closes its end. They then run at once however slowly forking went,
    # so that without the lock the race the negative control shows really happens.
    gate_r, gate_w = os.pipe()

    def body() -> None:
        os.close(gate_w)
        os.read(gate_r, 1)  # end of file: the gate is open
        lock = ps.interprocess_lock("m") if use_lock else None
        _increment(counter, N_INCREMENTS, lock)
        if lock is not None:
            lock.close()

    try:
        pids = [fork(body) for _ in range(N_PROCS)]
    finally:
        os.close(gate_w)
        os.close(gate_r)
    for pid in pids:
        wait_ok(pid, timeout=240)


@pytest.mark.timeout(300)
def test_mutual_exclusion_between_forked_processes() -> None:
    with shared_counter() as counter:
        _run_forked_increments(counter, use_lock=True)
        assert counter[0] == N_PROCS * N_INCREMENTS


@pytest.mark.timeout(300)
def test_negative_control_forked_increments_without_the_lock_lose_updates() -> None:
    # A race on purpose: 8 gated processes each yielding between read and write
    # lose updates; the race allows any total up to the exact one, and the test
    # asserts only that not every update arrived.
    with shared_counter() as counter:
        _run_forked_increments(counter, use_lock=False)
        assert counter[0] < N_PROCS * N_INCREMENTS


@pytest.mark.timeout(300)
def test_mutual_exclusion_with_an_inherited_lock_object() -> None:
    lock = ps.interprocess_lock("m")  # opened before the fork: children use the inherited one
    with shared_counter() as counter:
        pids = [fork(lambda: _increment(counter, 5_000, lock)) for _ in range(4)]
        for pid in pids:
            wait_ok(pid, timeout=240)
        assert counter[0] == 4 * 5_000
    lock.close()


@ps.forked
def _nest_inherited_and_by_name(lock: ps.InterprocessLock) -> str:
    with lock:  # the object inherited from the parent
        try:
            with ps.interprocess_lock(lock.name, reentrant=True):
                return "nested"
        except RuntimeError as exc:
            return str(exc)


@pytest.mark.timeout(60)
def test_a_reentrant_lock_cannot_nest_across_an_inherited_and_an_own_object() -> None:
    lock = ps.interprocess_lock("r", reentrant=True)
    with lock, ps.interprocess_lock("r", reentrant=True):  # one process: one handle
        assert lock.owned()
    said = _nest_inherited_and_by_name(lock).join()
    # Not the non-reentrant advice ("open it with reentrant=True"): it is.
    assert "inherited across a fork" in said
    assert "reentrant=True" not in said
    lock.close()


# -- interrupts -------------------------------------------------------------------


class _Interrupt(Exception):
    """What a signal handler raises here (KeyboardInterrupt would stop pytest)."""


@pytest.mark.timeout(60)
def test_an_interrupt_never_leaves_a_with_block_holding_the_lock() -> None:
    # CPython runs signal handlers between bytecodes. One that raises (Ctrl-C's
    # KeyboardInterrupt) just after the mutex was taken and before the block
    # began, or in __exit__ before the release, would leave the thread holding
    # the lock for good: `with` on a lock is C, as threading.Lock's is, so no
    # bytecode runs in between. A timer fires every 100 us for 1.5 s.
    lock = ps.interprocess_lock("m")
    armed = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal armed
        if armed:
            armed = False  # at most one per round: never inside the except below
            raise _Interrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = stranded = 0
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    try:
        deadline = time.monotonic() + 1.5
        starved = deadline + 30  # a process a busy machine barely runs gets longer
        while time.monotonic() < (deadline if interrupted > 20 else starved):
            try:
                armed = True
                with lock:
                    pass
                armed = False
            except _Interrupt:
                interrupted += 1
                if lock.owned():
                    stranded += 1
                    lock.release()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    lock.close()
    assert interrupted > 20, "the timer never interrupted the loop: the test proves nothing"
    assert stranded == 0, f"{stranded} of {interrupted} interrupts left the lock held"


# -- the parent holds what its children wait for ----------------------------------


@ps.forked
def _try_the_lock(lock: ps.InterprocessLock) -> bool:
    return lock.acquire(timeout=3)  # the parent holds it throughout: gives up


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["scope", "join"])
def test_waiting_for_children_that_wait_for_a_held_lock_warns(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadlock a user writes with `with ps.interprocess_lock("m") as lock:`
    # around the children that use it: the engine says so instead of hanging
    # in silence. (The children give up after 3 s, so this one ends.)
    monkeypatch.setattr(children_engine, "DEADLOCK_WATCH", 0.3)
    lock = ps.interprocess_lock("m")
    with pytest.warns(
        RuntimeWarning, match="holds interprocess lock 'm'.*neither can go on"
    ) as caught:
        got = _wait_for_a_child_holding(lock, how)
    assert got == [False]
    # Attributed to the user's line (the scope's `with` / the join() call), not
    # to procshare's wait loop, however deep that path was.
    assert [w.filename for w in caught] == [__file__]
    lock.close()


def _wait_for_a_child_holding(lock: ps.InterprocessLock, how: str) -> list[bool]:
    with lock:
        if how == "scope":
            with ps.children() as kids:
                _try_the_lock(lock)
                _until_the_child_waits()
            return kids.results
        child = _try_the_lock(lock)
        _until_the_child_waits()
        return [child.join()]


def _until_the_child_waits() -> None:
    # However loaded the machine, the parent starts waiting only once the
    # child is asleep on the lock (a waiter that gave up still shows until the
    # parent releases it), so the warning does not depend on timing.
    assert wait_for(lambda: engine_locks.locks_part().held_and_awaited() == ["m"], 30), (
        "the child never waited for the lock"
    )


@pytest.mark.timeout(60)
def test_holding_a_lock_nobody_waits_for_while_waiting_for_children_is_fine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(children_engine, "DEADLOCK_WATCH", 0.1)
    lock = ps.interprocess_lock("m")

    @ps.forked
    def nap() -> None:
        time.sleep(1.0)  # longer than the watch: the engine looks, finds no waiter

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with lock:
            with ps.children():
                nap()
            assert nap().join() is None
    lock.close()


def _thread_increments(use_lock: bool) -> int:
    box = [0]
    lock = ps.interprocess_lock("m") if use_lock else None
    start = threading.Barrier(4)  # all run at once, so unlocked they do race

    def work() -> None:
        start.wait(60)
        for _ in range(2_000):
            if lock is not None:
                lock.acquire()
            value = box[0]
            time.sleep(0)  # lets another thread run between the read and the write
            box[0] = value + 1
            if lock is not None:
                lock.release()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if lock is not None:
        lock.close()
    return box[0]


@pytest.mark.timeout(120)
def test_mutual_exclusion_between_threads() -> None:
    assert _thread_increments(use_lock=True) == 4 * 2_000


@pytest.mark.timeout(120)
def test_negative_control_threads_without_the_lock_lose_updates() -> None:
    # A race on purpose: asserts only that some update was lost.
    assert _thread_increments(use_lock=False) < 4 * 2_000


_UNRELATED = """
import os, sys
import procshare as ps

path, times, use_lock = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
os.read(int(sys.argv[4]), 1)  # the start gate: end of file once every process is started
fd = os.open(path, os.O_RDWR)
lock = ps.interprocess_lock("m") if use_lock else None
for i in range(times):
    if lock is not None:
        lock.acquire()
    value = int.from_bytes(os.pread(fd, 8, 0), "little")
    if i % 8 == 0:
        os.sched_yield()
    os.pwrite(fd, (value + 1).to_bytes(8, "little"), 0)
    if lock is not None:
        lock.release()
if lock is not None:
    lock.close()
"""


def _run_unrelated(tmp_path: Path, use_lock: bool, procs: int = 4, times: int = 5_000) -> int:
    counter = tmp_path / "counter.bin"
    counter.write_bytes(bytes(8))
    # Not forked: fresh interpreters that know only the name (and inherit
    # PROCSHARE_NAMESPACE from the test's environment).
    # Interpreters start slowly and unevenly: a pipe gates them so that all run
    # at once (the parent's close of the write end opens it).
    gate_r, gate_w = os.pipe()
    args = [str(counter), str(times), "1" if use_lock else "0", str(gate_r)]
    try:
        children = [
            subprocess.Popen([sys.executable, "-c", _UNRELATED, *args], pass_fds=(gate_r,))
            for _ in range(procs)
        ]
    finally:
        os.close(gate_w)
        os.close(gate_r)
    for child in children:
        assert child.wait(timeout=240) == 0
    return int.from_bytes(counter.read_bytes(), "little")


@pytest.mark.timeout(300)
def test_mutual_exclusion_between_unrelated_processes(tmp_path: Path) -> None:
    assert _run_unrelated(tmp_path, use_lock=True) == 4 * 5_000
    assert lock_objects() == set()


@pytest.mark.timeout(300)
def test_negative_control_unrelated_processes_without_the_lock_lose_updates(
    tmp_path: Path,
) -> None:
    # A race on purpose (gated, as above): asserts only that an update was lost.
    assert _run_unrelated(tmp_path, use_lock=False) < 4 * 5_000


# -- reentrancy and ownership ------------------------------------------------------


def test_reentrant_lock_nests_within_a_thread() -> None:
    lock = ps.interprocess_lock("m", reentrant=True)
    with lock:
        with lock:
            assert lock.acquire(timeout=0)
            lock.release()
            assert lock.owned()
        assert lock.owned()
        assert lock.locked()
    assert not lock.locked()
    lock.close()


def test_a_non_reentrant_lock_taken_twice_by_one_thread_raises() -> None:
    lock = ps.interprocess_lock("m")
    with lock:
        with pytest.raises(ps.UsageError, match="reentrant=True"):
            lock.acquire()
        with pytest.raises(RuntimeError, match="already held by this thread"), lock:
            pass
        # through a second object of the same name, too
        other = ps.interprocess_lock("m")
        with pytest.raises(RuntimeError, match="already held"):
            other.acquire()
        other.close()
        assert lock.owned()
    lock.close()


def test_a_timed_or_non_blocking_acquire_of_a_lock_the_thread_holds_is_false() -> None:
    # As threading.Lock: only a wait that could never end is refused. Nothing
    # can free it meanwhile (only its holder may release it), so no wait.
    lock = ps.interprocess_lock("m")
    timed = ps.interprocess_lock("m", timeout=5)
    with lock:
        t0 = time.monotonic()
        assert lock.acquire(timeout=0) is False
        assert lock.acquire(timeout=5) is False
        assert timed.acquire() is False  # its own timeout= makes it a timed acquire
        assert time.monotonic() - t0 < 4
        assert lock.owned()
    assert not lock.locked()
    timed.close()
    lock.close()


@pytest.mark.timeout(30)
def test_reentrant_nesting_is_per_thread() -> None:
    lock = ps.interprocess_lock("m", reentrant=True)
    lock.acquire()
    result = []
    t = threading.Thread(target=lambda: result.append(lock.acquire(timeout=0.2)))
    t.start()
    t.join()
    assert result == [False]
    lock.release()
    lock.close()


def test_releasing_a_lock_you_do_not_hold_raises_runtime_error() -> None:
    lock = ps.interprocess_lock("m")
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.mark_consistent()
    lock.close()


@pytest.mark.timeout(30)
def test_releasing_a_lock_another_thread_holds_raises_runtime_error() -> None:
    done, t = _held_by_another_thread("m")
    try:
        lock = ps.interprocess_lock("m")
        with pytest.raises(RuntimeError, match="does not hold it"):
            lock.release()
        assert lock.locked()
        lock.close()
    finally:
        done.set()
        t.join()


@pytest.mark.timeout(60)
def test_a_lock_held_at_fork_is_not_owned_by_the_child_and_the_child_blocks() -> None:
    lock = ps.interprocess_lock("m")
    lock.acquire()
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        # threading.get_ident() is the parent's here; ownership must not be.
        assert not lock.owned()
        assert lock.locked()
        with pytest.raises(RuntimeError):
            lock.release()
        start = time.monotonic()
        assert lock.acquire(timeout=0.2) is False
        assert time.monotonic() - start >= 0.2
        os.write(w, b"W")
        # blocks until the parent releases, then gets it
        assert lock.acquire(timeout=30) is True
        assert lock.owned()
        lock.release()

    pid = fork(child)
    os.close(w)
    try:
        assert read_byte(r) == b"W"
        time.sleep(0.2)
        assert lock.owned()  # the child's attempts did not disturb the parent
        lock.release()
        wait_ok(pid)
    finally:
        os.close(r)
    lock.close()


# -- lifetime --------------------------------------------------------------------


def test_the_last_user_out_removes_the_lock_object() -> None:
    a = ps.interprocess_lock("m")
    b = ps.interprocess_lock("m")
    assert len(lock_objects()) == 1
    a.close()
    assert len(lock_objects()) == 1
    b.close()
    assert lock_objects() == set()
    b.close()  # twice is fine


@pytest.mark.timeout(60)
def test_a_lock_lives_while_another_process_holds_it_open() -> None:
    r, w = os.pipe()
    r2, w2 = os.pipe()

    def child() -> None:
        os.close(r)
        os.close(w2)
        lock = ps.interprocess_lock("m")
        os.write(w, b"O")
        read_byte(r2)
        lock.close()

    pid = fork(child)
    os.close(w)
    os.close(r2)
    try:
        assert read_byte(r) == b"O"
        mine = ps.interprocess_lock("m")
        mine.close()
        assert len(lock_objects()) == 1  # the child still uses it
        os.write(w2, b"x")
        wait_ok(pid)
        assert lock_objects() == set()  # the child was the last out
    finally:
        os.close(r)
        os.close(w2)


def test_a_by_name_with_block_is_cached_then_released_by_housekeeping() -> None:
    for _ in range(100):
        with ps.interprocess_lock("m"):
            pass
    # The cache kept one open object for all hundred blocks ...
    assert len(lock_objects()) == 1
    # ... and the next call into procshare that does not use it closes it.
    get_engine().poll()
    assert lock_objects() == set()


def test_a_lock_object_in_use_survives_housekeeping() -> None:
    lock = ps.interprocess_lock("m")
    get_engine().poll()
    with ps.interprocess_lock("other"):
        pass
    assert len(lock_objects()) == 2
    get_engine().poll()
    assert len(lock_objects()) == 1
    with lock:
        pass
    lock.close()
    assert lock_objects() == set()


def test_a_held_lock_survives_housekeeping_and_close_until_released() -> None:
    lock = ps.interprocess_lock("m")
    lock.acquire()
    lock.close()  # allowed: the lock can still be released through the object ...
    get_engine().poll()
    assert len(lock_objects()) == 1  # ... and its memory stays mapped until then
    assert lock.owned()
    with pytest.raises(ValueError, match="after close"):
        lock.acquire()
    lock.release()
    assert lock_objects() == set()  # released: the last user is gone
    with pytest.raises(ValueError, match="after close"):
        lock.release()


@pytest.mark.timeout(30)
def test_closing_an_object_another_thread_waits_on_never_strands_the_lock() -> None:
    done, t = _held_by_another_thread("m")
    lock = ps.interprocess_lock("m")
    result = []

    def wait_then_release() -> None:
        result.append(lock.acquire(timeout=10))
        lock.release()  # through the closed object: still allowed
        result.append(lock.owned())

    waiter = threading.Thread(target=wait_then_release)
    mutex = lock._m
    waiter.start()
    # The waiter sleeps on the mutex (the kernel says so), however late it started.
    assert wait_for(lambda: get_engine().backend.lock_contended(mutex), 30)
    lock.close()  # while the waiter sleeps on the mutex: its memory must stay mapped
    done.set()
    t.join()
    waiter.join()
    assert result == [True, False]
    get_engine().poll()
    assert lock_objects() == set()


@pytest.mark.timeout(120)
def test_threads_opening_by_name_concurrently_share_one_lock() -> None:
    box = [0]

    def work() -> None:
        for i in range(500):
            with ps.interprocess_lock("m"):
                value = box[0]
                if i % 4 == 0:
                    time.sleep(0)
                box[0] = value + 1
            if i % 50 == 0:
                get_engine().poll()  # housekeeping racing with the other threads

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box[0] == 4 * 500


def test_using_a_closed_lock_raises() -> None:
    lock = ps.interprocess_lock("m")
    lock.close()
    assert lock.closed
    for use in (lock.acquire, lock.release, lock.locked, lock.mark_consistent):
        with pytest.raises(ValueError, match="after close"):
            use()
    with pytest.raises(ps.ProcshareError, match="after close"), lock:
        pass
    assert "closed" in repr(lock)


@pytest.mark.timeout(60)
def test_a_child_closing_an_inherited_lock_does_not_close_the_parents() -> None:
    lock = ps.interprocess_lock("m")

    def child() -> None:
        lock.close()
        assert lock.closed

    wait_ok(fork(child))
    assert not lock.closed
    with lock:
        pass
    assert len(lock_objects()) == 1
    lock.close()


@pytest.mark.timeout(60)
def test_nothing_is_left_in_dev_shm_after_processes_use_a_lock() -> None:
    # This test's namespace only: other programs create and remove objects in
    # /dev/shm meanwhile.
    before = namespace_objects()

    def child() -> None:
        with ps.interprocess_lock("m"):
            pass
        get_engine().shutdown()

    pids = [fork(child) for _ in range(4)]
    for pid in pids:
        wait_ok(pid)
    assert namespace_objects() - before == set()


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "x" * 129, "sp ace"])
def test_invalid_names_raise_invalid_name(name: str) -> None:
    with pytest.raises(ps.InvalidName):
        ps.interprocess_lock(name)


def test_bad_options_raise_with_a_message() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        ps.interprocess_lock("m", timeout=-1)
    with pytest.raises(TypeError, match="number of seconds"):
        ps.interprocess_lock("m", timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_owner_death"):
        ps.interprocess_lock("m", on_owner_death="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reentrant"):
        ps.interprocess_lock("m", reentrant=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        ps.interprocess_lock("m", mode=0o7777)
    lock = ps.interprocess_lock("m")
    with pytest.raises(ValueError, match=">= 0"):
        lock.acquire(timeout=-0.5)
    lock.close()
    assert lock_objects() == set()


def test_mode_is_applied_to_a_new_lock_object() -> None:
    lock = ps.interprocess_lock("m", mode=0o640)
    (os_name,) = lock_objects()
    assert os.stat("/dev/shm" + os_name).st_mode & 0o777 == 0o640
    lock.close()


@pytest.mark.timeout(60)
def test_a_lock_pickles_by_name_and_opens_in_the_receiving_process() -> None:
    import pickle

    lock = ps.interprocess_lock("m", timeout=0.2, reentrant=True)
    again = pickle.loads(pickle.dumps(lock))
    assert (again.name, again.timeout, again.reentrant) == ("m", 0.2, True)
    with lock:
        assert again.owned()  # same lock, same process
    # a fresh interpreter: only the name (and namespace) travels
    script = (
        "import pickle, sys\n"
        "lock = pickle.loads(sys.stdin.buffer.read())\n"
        "got = lock.acquire(timeout=0.1)\n"
        "print(got, lock.reentrant)\n"
        "if got:\n"
        "    lock.release()\n"
        "lock.close()\n"
    )

    def in_other_process() -> str:
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=pickle.dumps(lock),
            capture_output=True,
            check=True,
            timeout=60,
        )
        return done.stdout.decode().strip()

    lock.acquire()
    assert in_other_process() == "False True"
    lock.release()
    assert in_other_process() == "True True"
    again.close()
    lock.close()
    closed = ps.interprocess_lock("m")
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(closed)


def test_repr_says_the_name_and_state() -> None:
    lock = ps.interprocess_lock("m")
    assert repr(lock) == "<InterprocessLock 'm' unlocked>"
    with lock:
        assert repr(lock) == "<InterprocessLock 'm' locked>"
    lock.close()


@given(
    name=st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
    namespace=st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
)
def test_lock_metadata_is_the_json_it_always_was(name: str, namespace: str) -> None:
    # Formatted directly (no json module in a forked child's first lock open),
    # it must stay byte-identical to what json wrote, and decode to the fields.
    from procshare._engine.locks import _lock_meta

    meta = _lock_meta(name, namespace)
    fields = {"name": name, "namespace": namespace, "kind": "lock"}
    assert meta == json.dumps(fields, sort_keys=True).encode()
    assert json.loads(meta) == fields


class _Boom(Exception):
    pass


def test_refusing_to_nest_never_releases_the_enclosing_hold() -> None:
    # Taking a non-reentrant lock again is refused in the slow path. Even if
    # something raises in there (a trace function, an async exception), the
    # enclosing block's hold must survive: only what the call took is let go.
    lock = ps.interprocess_lock("m")

    lines = 0

    def tracer(frame: Any, event: str, arg: object) -> Any:
        if frame.f_code.co_name != "_enter_slow":
            return None

        def raise_on_the_second_line(frame: Any, event: str, arg: object) -> Any:
            nonlocal lines
            if event == "line":
                lines += 1
                if lines == 2:  # past the first statement: inside any try there
                    raise _Boom
            return raise_on_the_second_line

        return raise_on_the_second_line

    with lock:
        sys.settrace(tracer)
        try:
            with pytest.raises((_Boom, ps.UsageError)):
                lock.__enter__()
        finally:
            sys.settrace(None)
        assert lock.owned()
    assert not lock.locked()
    lock.close()


def test_procshare_imports_without_a_usable_backend() -> None:
    env = {**os.environ, "PROCSHARE_BACKEND": "nonesuch"}
    code = (
        "import procshare as ps\n"
        "try:\n"
        "    ps.interprocess_lock('m')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "unknown procshare backend 'nonesuch'" in out.stdout


@pytest.mark.timeout(60)
def test_a_lock_the_parent_closes_keeps_excluding_while_a_child_holds_it() -> None:
    # The child holds the lock through the object it inherited. The parent's
    # close must not remove the lock under it: a later opener by name must get
    # the same lock (and wait), not a new one it can take at once.
    lock = ps.interprocess_lock("m")
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()

    @ps.forked
    def takes_it_later() -> None:
        os.read(go_r, 1)  # once the parent has closed its object
        with lock:  # the object it inherited
            os.write(held_w, b"h")
            os.read(go_r, 1)

    child = takes_it_later()
    lock.close()  # nobody holds the lock now: nothing but the child keeps it
    os.write(go_w, b"g")
    assert read_byte(held_r) == b"h"
    fresh = ps.interprocess_lock("m")
    assert fresh.acquire(timeout=0.2) is False  # excluded: the child holds it
    os.write(go_w, b"g")
    child.join()
    assert fresh.acquire(timeout=5)
    fresh.release()
    fresh.close()
    assert lock_objects() == set()
    for fd in (held_r, held_w, go_r, go_w):
        os.close(fd)


@ps.forked
def _naps(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.timeout(60)
def test_only_children_forked_while_a_lock_was_in_use_keep_it() -> None:
    lock = ps.interprocess_lock("m")
    first = _naps(0.5)
    lock.close()
    later = _naps(30)
    try:
        assert len(lock_objects()) == 1  # kept for the first child
        first.join()
        assert lock_objects() == set()  # released with it, though a later child runs
    finally:
        later.kill()
        later.wait()


def test_lock_metadata_records_the_origin_namespace_when_it_differs() -> None:
    # A lock made inside ps.namespace("app") by a process started in another
    # namespace records where it came from (the pytest plugin reads it).
    from procshare._engine.locks import _lock_meta

    assert json.loads(_lock_meta("m", "app", "t-1")) == {
        "kind": "lock",
        "name": "m",
        "namespace": "app",
        "origin": "t-1",
    }
    assert _lock_meta("m", "app", "app") == _lock_meta("m", "app")


# -- the by-name reuse of lock objects (issue 16) ---------------------------------


def test_a_by_name_call_reuses_the_object_nobody_refers_to_any_more() -> None:
    with ps.interprocess_lock("m") as first:
        pass
    kept = weakref.ref(first)
    del first
    # Kept for reuse (without it, the object would be garbage by now) ...
    assert kept() is not None
    with ps.interprocess_lock("m") as second:
        assert second is kept()
    del second
    # ... until the next call into procshare that is not a reuse.
    get_engine().poll()
    assert kept() is None
    assert lock_objects() == set()


def test_an_object_still_referred_to_is_never_handed_out_again() -> None:
    held = ps.interprocess_lock("m")
    other = ps.interprocess_lock("m")
    assert other is not held
    held.close()  # must not close the object `other` got
    with other:
        assert other.owned()
    other.close()


def test_a_closed_by_name_object_is_never_handed_out_again() -> None:
    lock = ps.interprocess_lock("m")
    kept = weakref.ref(lock)
    lock.close()
    del lock
    again = ps.interprocess_lock("m")
    assert again is not kept()
    assert not again.closed
    with again:
        pass
    again.close()


def test_options_and_namespaces_are_never_mixed_up_by_the_reuse() -> None:
    with ps.interprocess_lock("m"):
        pass
    with ps.namespace("elsewhere"), ps.interprocess_lock("m") as there:
        assert there._entry is not None
        assert there._entry.namespace == "elsewhere"
    del there
    timed = ps.interprocess_lock("m", timeout=5)
    assert timed.timeout == 5
    plain = ps.interprocess_lock("m")
    assert plain.timeout is None
    assert plain is not timed
    previous = os.environ["PROCSHARE_NAMESPACE"]
    os.environ["PROCSHARE_NAMESPACE"] = previous + "-b"
    try:
        moved = ps.interprocess_lock("m")
        assert moved._entry is not None
        assert moved._entry.namespace == previous + "-b"
        moved.close()
    finally:
        os.environ["PROCSHARE_NAMESPACE"] = previous
    timed.close()
    plain.close()
    get_engine().poll()
    assert lock_objects() == set()


@pytest.mark.timeout(60)
def test_a_forked_child_never_reuses_its_parents_by_name_object() -> None:
    with ps.interprocess_lock("m") as parents:
        pass
    kept = weakref.ref(parents)
    del parents
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        lock = ps.interprocess_lock("m")
        entry = lock._entry
        assert entry is not None
        mine = lock is not kept() and entry.part.engine is get_engine()
        os.write(w, b"y" if mine else b"n")
        lock.close()

    pid = fork(child)
    os.close(w)
    try:
        assert read_byte(r) == b"y"
        wait_ok(pid)
    finally:
        os.close(r)
    get_engine().poll()
    assert lock_objects() == set()


def test_the_python_reference_of_the_reuse_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    from procshare import _locks

    monkeypatch.setattr(_locks, "_reuse", engine_locks.reuse_in_python)
    monkeypatch.setattr(_locks, "_keep", engine_locks.keep_in_python)
    with ps.interprocess_lock("m") as first:
        pass
    kept = weakref.ref(first)
    del first
    second = ps.interprocess_lock("m")
    assert second is kept()
    assert ps.interprocess_lock("m") is not second  # `second` refers to it
    with ps.namespace("elsewhere"):
        assert ps.interprocess_lock("m") is not second
    second.close()
    get_engine().poll()
    assert lock_objects() == set()


@pytest.mark.timeout(60)
def test_a_join_ends_the_reuse_of_a_by_name_object_like_any_other_call() -> None:
    @ps.forked
    def quick() -> None:
        return None

    with ps.interprocess_lock("m"):
        pass
    assert len(lock_objects()) == 1  # kept for reuse
    quick().join()  # a call into procshare that is not a reuse
    assert lock_objects() == set()


def test_the_backends_lock_init_and_attach_work_on_any_lock_memory() -> None:
    # lock_init / lock_attach are single C calls (a lock is often first made in
    # a freshly forked child): the same contract as the Mutex methods they replace.
    backend = get_engine().backend

    class Handle:
        def __init__(self, data: memoryview) -> None:
            self.data = data

    with ps.shared(bytes, size=backend.lock_data_size) as memory:
        backend.lock_init(memory)
        mutex = backend.lock_attach(Handle(memory))  # type: ignore[arg-type]
        try:
            assert mutex.acquire(False, -1.0) == engine_locks.OK
            assert mutex.locked()
            assert mutex.acquire(False, -1.0) == engine_locks.SELF_HELD
            assert mutex.release() == engine_locks.OK
            assert not mutex.locked()
        finally:
            mutex.detach()
        with pytest.raises(ValueError, match="writable bytes"):
            backend.lock_init(memory[: backend.lock_data_size // 2])


def _refuse_python_open(*args: object, **kwargs: object) -> Any:
    raise AssertionError("a lock's by-name open runs no Python open (LocksPart.open is C)")


@pytest.mark.parametrize("env", [None, "elsewhere"])
def test_a_by_name_open_is_one_c_call_that_writes_the_same_object(
    monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    from procshare._engine.locks import LocksPart, _lock_meta
    from procshare._engine.names import current_namespace, env_namespace

    if env is not None:  # (the origin: recorded when it differs from the namespace)
        monkeypatch.setenv("PROCSHARE_NAMESPACE", env)
    ns = current_namespace()
    with ps.interprocess_lock("c-open-warm"):  # (this namespace is swept now)
        pass
    monkeypatch.setattr(LocksPart, "open", _refuse_python_open)
    monkeypatch.setattr(LocksPart, "_open_new", _refuse_python_open)
    lock = ps.interprocess_lock("c-open", timeout=1)  # creates it: a new entry
    again = ps.interprocess_lock("c-open", reentrant=True)  # the same entry, registered
    try:
        entry = lock._entry
        assert entry is not None
        assert again._entry is entry
        assert entry.users == {id(lock), id(again)}
        assert (entry.namespace, entry.name) == (ns, "c-open")
        assert entry.handle.meta == _lock_meta("c-open", ns, env_namespace())
        with lock:
            assert again.locked()
    finally:
        lock.close()
        again.close()


@pytest.mark.parametrize("table", ["the part's", "none"])
def test_the_c_open_calls_the_backend_through_the_parts_function_table(
    monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    # LocksPart.fast: the backend's functions, found once when the part is
    # built (a fresh child adopts a part its parent built, and looks nothing
    # up). Without that table the C open looks them up on the backend.
    from procshare._engine.locks import LocksPart, locks_part

    with ps.interprocess_lock("c-table-warm"):  # (this namespace is swept now)
        pass
    part = locks_part()
    assert isinstance(part.fast, tuple)
    create_fast = part.fast[1]
    created: list[str] = []

    def create(os_name: str, meta: bytes, mode: int) -> Any:
        created.append(os_name)
        return create_fast(os_name, meta, mode)

    if table == "none":
        monkeypatch.setattr(part, "fast", None)
    else:
        monkeypatch.setattr(part, "fast", (part.fast[0], create, *part.fast[2:]))
    monkeypatch.setattr(LocksPart, "_open_new", _refuse_python_open)
    lock = ps.interprocess_lock("c-table")
    try:
        with lock:
            assert lock.locked()
        assert len(created) == (1 if table == "the part's" else 0)
    finally:
        lock.close()


def test_a_by_name_open_leaves_what_is_unusual_to_the_python_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procshare._engine import segments as ps_segments
    from procshare._engine.locks import LocksPart

    opened: list[str] = []
    real = LocksPart._open_new

    def counting(part: LocksPart, namespace: str, name: str, mode: int) -> Any:
        opened.append(name)
        return real(part, namespace, name, mode)

    monkeypatch.setattr(LocksPart, "_open_new", counting)
    # A namespace not swept yet: the Python open reclaims its orphans first.
    monkeypatch.setattr(ps_segments, "swept_namespaces", set())
    with ps.interprocess_lock("c-unusual"):
        pass
    assert opened == ["c-unusual"]


def test_a_by_name_open_of_something_too_small_for_a_lock_says_so() -> None:
    from procshare._engine import names

    with ps.interprocess_lock("c-small-warm"):  # (swept: the C open takes it first)
        pass
    backend = get_engine().backend
    os_name = names.os_name(names.LOCK, "c-small", names.current_namespace())
    handle = backend.segment_create(os_name, meta=b"{}", data_size=8, mode=0o600, persist=False)
    assert handle is not None
    try:
        with pytest.raises(ps.SharedTypeError, match="too small to be a lock"):
            ps.interprocess_lock("c-small")
    finally:
        backend.segment_close(handle, keep=None)


def test_the_by_name_lock_built_in_c_is_the_constructors_lock() -> None:
    # ps.interprocess_lock(name) with the default options builds its object in
    # C (_cengine_new.h); InterprocessLock(name), the reference, must agree.
    from procshare._engine import locks as engine_locks

    made = engine_locks.new_lock("c-built", 0o600)
    ref = ps.InterprocessLock("c-built")
    try:
        assert type(made) is ps.InterprocessLock
        for attr in ("name", "timeout", "reentrant", "anonymous", "_on_owner_death"):
            assert getattr(made, attr) == getattr(ref, attr), attr
        assert made._entry is ref._entry  # one entry, both registered as its users
        assert made._m is ref._entry.mutex
        assert made._entry.users == {id(made), id(ref)}
        with made:
            assert made.locked()
            assert not ref.acquire(timeout=0)  # (not reentrant, held through made)
        assert not made.locked()
        assert engine_locks.new_lock("not valid!", 0o600) is NotImplemented
        assert engine_locks.new_lock(42, 0o600) is NotImplemented
    finally:
        made.close()
        ref.close()
