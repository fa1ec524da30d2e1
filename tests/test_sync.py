"""The coordination families (SPEC 4b): event, semaphore, condition, barrier, rwlock.

Each family: behaviour within one process and across processes, timeouts,
pickling, listing, and what a participant killed with SIGKILL does to it.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

import procshare as ps
from shared_support import wait_for


def _killed(status: ps.ExitStatus | None) -> None:
    assert status is not None
    assert status.outcome == "killed"


# -- event ---------------------------------------------------------------------


def test_event_set_clear_wait() -> None:
    ev = ps.interprocess_event("ev")
    assert not ev.is_set()
    assert ev.wait(0) is False
    assert ev.wait(0.05) is False
    ev.set()
    assert ev.is_set()
    assert ev.wait() is True
    ev.clear()
    assert not ev.is_set()
    ev.close()


@pytest.mark.timeout(60)
def test_event_wakes_a_waiter_in_another_process() -> None:
    ev = ps.interprocess_event("go")
    ready = ps.interprocess_event("ready")

    @ps.forked
    def waiter() -> bool:
        ready.set()
        return ps.interprocess_event("go").wait(30)

    with ps.children():
        child = waiter()
        assert ready.wait(30)
        time.sleep(0.05)
        ev.set()
        assert child.join() is True
    ev.close()
    ready.close()


@pytest.mark.timeout(60)
def test_event_wait_is_woken_by_set_even_if_cleared_at_once() -> None:
    ev = ps.interprocess_event("flash")
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(ev.wait(30)))
    t.start()
    assert wait_for(lambda: "waiters=1" in repr(ev))
    ev.set()
    ev.clear()
    t.join(30)
    assert woke == [True]
    ev.close()


@pytest.mark.timeout(30)
def test_ctrl_c_interrupts_a_wait() -> None:
    ev = ps.interprocess_event("never")
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ev.wait(20)
    assert time.monotonic() - start < 15
    timer.join()
    ev.close()


# -- semaphore -------------------------------------------------------------------


def test_semaphore_counts() -> None:
    sem = ps.interprocess_semaphore("s", 2)
    assert sem.value == 2
    assert sem.acquire(timeout=0)
    assert sem.acquire(timeout=0)
    assert sem.value == 0
    assert sem.acquire(timeout=0) is False
    assert sem.acquire(timeout=0.05) is False
    sem.release()
    with sem:
        assert sem.value == 0
    assert sem.value == 1
    sem.release()
    assert sem.value == 2
    sem.release()  # a release beyond the initial value grows it, as threading's does
    assert sem.value == 3
    sem.close()


def test_semaphore_with_times_out() -> None:
    sem = ps.interprocess_semaphore("t", 0, timeout=0.05)
    with pytest.raises(ps.WaitTimeout) as info, sem:
        pass
    assert isinstance(info.value, TimeoutError)
    assert "'t'" in str(info.value)
    sem.close()


def test_semaphore_as_decorator() -> None:
    sem = ps.interprocess_semaphore("d", 1)

    @sem
    def inside() -> int:
        return sem.value

    assert inside() == 0
    assert sem.value == 1
    sem.close()


def test_semaphore_parameters_must_agree() -> None:
    sem = ps.interprocess_semaphore("v", 2)
    with pytest.raises(ps.SharedTypeError):
        ps.interprocess_semaphore("v", 3)
    sem.close()


@pytest.mark.timeout(60)
def test_semaphore_limits_processes() -> None:
    sem = ps.interprocess_semaphore("limit", 2)
    try:
        with ps.shared("inside", ps.i64) as inside, ps.shared("most", ps.i64) as most:

            @ps.forked
            def work() -> None:
                with ps.interprocess_semaphore("limit", 2):
                    with ps.interprocess_lock("count"):
                        inside.value += 1
                        most.value = max(most.value, inside.value)
                    # Stay in until two have been in at once: a wait with a
                    # deadline, not a sleep that a loaded machine can outlast
                    # (children run one after the other, and none meets another).
                    deadline = time.monotonic() + 20
                    while most.value < 2 and time.monotonic() < deadline:
                        time.sleep(0.005)
                    with ps.interprocess_lock("count"):
                        inside.value -= 1

            with ps.children():
                for _ in range(6):
                    work()
            assert most.value == 2  # two at once, never three
        assert sem.value == 2
    finally:
        sem.close()


@pytest.mark.timeout(60)
def test_a_unit_held_by_a_dead_process_comes_back_and_is_told() -> None:
    sem = ps.interprocess_semaphore("robust", 1)

    @ps.forked
    def take_and_die() -> None:
        ps.interprocess_semaphore("robust", 1).acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    status = take_and_die().wait()
    _killed(status)
    assert status is not None
    assert sem.value == 0  # not back until someone needs it
    with pytest.raises(ps.HolderDied) as info:
        sem.acquire(timeout=10)
    assert isinstance(info.value, ps.OwnerDied)
    assert info.value.held is True
    assert info.value.owner_pid == status.pid
    assert "semaphore 'robust'" in str(info.value)
    assert sem.value == 0
    sem.release()
    # told once: the next acquirer is not told again
    assert sem.acquire(timeout=0)
    sem.release()
    again = pickle.loads(pickle.dumps(info.value))
    assert again.owner_pid == status.pid
    sem.close()


@pytest.mark.timeout(60)
def test_a_waiter_gets_the_unit_of_a_holder_killed_while_it_waits() -> None:
    sem = ps.interprocess_semaphore("waited", 1)
    held = ps.interprocess_event("held")

    @ps.forked
    def hold_forever() -> None:
        ps.interprocess_semaphore("waited", 1).acquire()
        ps.interprocess_event("held").set()
        time.sleep(60)

    child = hold_forever()
    assert held.wait(30)
    threading.Timer(0.3, child.kill).start()
    with pytest.raises(ps.HolderDied) as info, sem:
        pass
    assert info.value.held is False
    _killed(child.wait())
    assert sem.acquire(timeout=5)
    sem.release()
    sem.close()
    held.close()


def test_semaphore_pickles_by_name() -> None:
    sem = ps.interprocess_semaphore("p", 3, timeout=1.5)
    copy = pickle.loads(pickle.dumps(sem))
    assert copy.name == "p"
    assert copy.acquire(0)
    assert sem.value == 2
    copy.release()
    copy.close()
    sem.close()


# -- condition -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_condition_notify_between_processes() -> None:
    cond = ps.interprocess_condition("c")
    with ps.shared("box", ps.i64) as box:

        @ps.forked
        def consumer() -> int:
            c = ps.interprocess_condition("c")
            with c:
                assert c.wait_for(lambda: box.value != 0, timeout=30)
                return box.value

        with ps.children():
            child = consumer()
            time.sleep(0.1)
            with cond:
                box.value = 42
                cond.notify_all()
            assert child.join() == 42
    cond.close()
    cond.lock.close()


def test_condition_wait_times_out_and_keeps_the_lock() -> None:
    cond = ps.interprocess_condition("c2")
    with cond:
        assert cond.wait(0.05) is False
        assert cond.lock.owned()
    assert not cond.lock.owned()
    assert cond.wait_for(lambda: 0, timeout=0) == 0
    cond.close()
    cond.lock.close()


def test_condition_needs_its_lock() -> None:
    cond = ps.interprocess_condition("c3", lock="other")
    assert cond.lock.name == "other"
    with pytest.raises(RuntimeError, match="does not hold"):
        cond.notify()
    with pytest.raises(RuntimeError, match="does not hold"):
        cond.wait(0)
    cond.close()
    cond.lock.close()


@pytest.mark.timeout(60)
def test_a_dead_waiter_does_not_swallow_a_notify() -> None:
    # glibc's process-shared condvar loses a signal to a waiter that died;
    # a futex waiter that dies leaves the kernel's queue.
    cond = ps.interprocess_condition("c4")
    waiting = ps.interprocess_event("waiting")

    @ps.forked
    def die_waiting() -> None:
        c = ps.interprocess_condition("c4")
        with c:
            ps.interprocess_event("waiting").set()
            c.wait(60)

    child = die_waiting()
    assert waiting.wait(30)
    time.sleep(0.1)
    child.kill()
    _killed(child.wait())
    woke: list[bool] = []

    def live_waiter() -> None:
        with cond:
            woke.append(cond.wait(30))

    t = threading.Thread(target=live_waiter)
    t.start()
    time.sleep(0.2)
    with cond:
        cond.notify(1)
    t.join(30)
    assert woke == [True]
    cond.close()
    cond.lock.close()
    waiting.close()


# -- all families ----------------------------------------------------------------


def test_listed_with_their_state() -> None:
    sem = ps.interprocess_semaphore("ls-sem", 2)
    ev = ps.interprocess_event("ls-ev")
    ev.set()
    found = {i.name: i for i in ps.segments()}
    assert found["ls-sem"].type == "semaphore"
    assert found["ls-sem"].state == "value=2 waiters=0"
    assert found["ls-ev"].type == "event"
    assert found["ls-ev"].state is not None
    assert found["ls-ev"].state.startswith("set")
    assert os.getpid() in found["ls-sem"].holders
    sem.close()
    ev.close()
    assert not ps.segments()


def test_closed_handles_refuse_use() -> None:
    ev = ps.interprocess_event("closed")
    ev.close()
    ev.close()  # twice is fine
    assert ev.closed
    with pytest.raises(ps.UsageError, match="after close"):
        ev.set()
    with pytest.raises(ps.UsageError):
        pickle.dumps(ev)


def test_names_are_checked() -> None:
    with pytest.raises(ps.InvalidName):
        ps.interprocess_event("no spaces")
    with pytest.raises(ValueError, match="parties"):
        ps.interprocess_barrier("b", 0)
    with pytest.raises(ValueError, match="value"):
        ps.interprocess_semaphore("s", -1)


@pytest.mark.timeout(60)
def test_inherited_handles_work_in_a_forked_child() -> None:
    # The fast `with` of an inherited object must use the child's own token:
    # a unit the child holds is the child's, and comes back if it dies.
    sem = ps.interprocess_semaphore("inherit", 1)
    rw = ps.interprocess_rwlock("inherit-rw")

    @ps.forked
    def use() -> int:
        with sem, rw.read:
            return rw.readers

    @ps.forked
    def die_holding() -> None:
        sem.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    with ps.children():
        assert use().join() == 1
    assert sem.value == 1
    _killed(die_holding().wait())
    with pytest.raises(ps.HolderDied), sem:
        pass
    with sem:
        assert sem.value == 0
    sem.close()
    rw.close()


@pytest.mark.timeout(60)
def test_closing_an_inherited_handle_in_a_child_closes_it_there_only() -> None:
    sem = ps.interprocess_semaphore("child-closes", 1)

    @ps.forked
    def close_it() -> bool:
        sem.close()
        return sem.closed

    assert close_it().join() is True  # closed in the child (it said open before)
    assert not sem.closed
    assert sem.acquire(timeout=0)
    sem.release()
    sem.close()


def test_a_dropped_handle_is_closed_at_once_not_by_the_cycle_collector() -> None:
    gc.disable()
    try:
        for open_ in (
            lambda: ps.interprocess_semaphore("dropped", 2),
            lambda: ps.interprocess_event("dropped"),
            lambda: ps.interprocess_condition("dropped"),
            lambda: ps.interprocess_barrier("dropped", 2),
            lambda: ps.interprocess_queue("dropped", capacity=4096),
        ):
            obj = open_()
            assert [i.name for i in ps.segments()] != []
            del obj
            assert [i.name for i in ps.segments()] == []
    finally:
        gc.enable()


def test_with_after_close_says_closed() -> None:
    sem = ps.interprocess_semaphore("closed-sem", 1)
    rw = ps.interprocess_rwlock("closed-rw")
    sem.close()
    rw.close()
    with pytest.raises(ps.UsageError, match="after close"), sem:
        pass
    with pytest.raises(ps.UsageError, match="after close"), rw.write:
        pass


@pytest.mark.timeout(60)
def test_a_process_killed_holding_the_internal_lock_is_repaired() -> None:
    sem = ps.interprocess_semaphore("internal", 2)
    sem.acquire()

    @ps.forked
    def die_in_the_middle() -> None:
        mine = ps.interprocess_semaphore("internal", 2)
        obj = mine._obj
        obj.lock()
        from procshare._sync import _S_COUNT

        obj.words.store(_S_COUNT, 99)  # half an update: the count is wrong
        os.kill(os.getpid(), signal.SIGKILL)

    _killed(die_in_the_middle().wait())
    # the next locker (here the C fast path) finds the dead holder; the
    # repair recounts from the holder slots: one unit held, one free
    assert sem.acquire(timeout=5)
    assert sem.value == 0
    assert sem.acquire(timeout=0) is False
    sem.release()
    sem.release()
    assert sem.value == 2
    sem.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procshare", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_ls_shows_the_state_and_rm_sync_removes() -> None:
    q = ps.interprocess_queue("cli-q")
    q.put(1)
    q.put(2)
    out = _cli("ls")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[-1] == "STATE"
    assert row.split()[:2] == ["cli-q", "queue"]
    assert "items=2" in row
    wrong = _cli("rm", "cli-q")
    assert wrong.returncode == 1
    assert "rm --sync cli-q" in wrong.stderr
    assert _cli("rm", "--sync", "cli-q").returncode == 0
    assert ps.segments() == []
    q.close()  # its memory stayed valid until now


LEAKY_SEMAPHORE = """
import procshare as ps

kept = []

def test_leaks_a_semaphore():
    kept.append(ps.interprocess_semaphore("leaky", 2))
"""


@pytest.mark.timeout(60)
def test_the_leak_check_names_a_leaked_semaphore(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY_SEMAPHORE)
    result = pytester.runpytest_subprocess("-p", "procshare.testing", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*leaked*semaphore 'leaky'*"])


@pytest.mark.timeout(60)
def test_gc_removes_a_sync_object_nobody_holds() -> None:
    @ps.forked
    def open_and_die() -> None:
        q = ps.interprocess_queue("orphan")  # held (a dropped handle closes at once)
        q.put(b"lost with its last holder")
        os.kill(os.getpid(), signal.SIGKILL)

    _killed(open_and_die().wait())
    (info,) = ps.segments()
    assert (info.name, info.type, info.holders) == ("orphan", "queue", ())
    out = _cli("gc")
    assert out.returncode == 0, out.stderr
    assert "1 object(s) removed" in out.stdout
    assert ps.segments() == []
