"""ps.interprocess_lock when a holder dies: SPEC section 4, "Robust", point by point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

import procshare as ps
from lockhelpers import (
    fork,
    hold_and_die,
    kill_and_reap,
    killed_holder,
    lock_objects,
    read_byte,
    wait_ok,
)
from procshare._engine import locks as engine_locks
from shared_support import wait_for


def _confirm(lock: ps.InterprocessLock) -> None:
    """Take the lock through OwnerDied, confirm it, release it."""
    with pytest.raises(ps.OwnerDied):
        lock.acquire()
    lock.mark_consistent()
    lock.release()


@pytest.mark.timeout(60)
def test_acquire_raises_owner_died_with_the_lock_held() -> None:
    lock = ps.interprocess_lock("m")
    dead = killed_holder("m")
    with pytest.raises(ps.OwnerDied) as info:
        lock.acquire()
    assert info.value.held is True
    assert info.value.owner_pid == dead
    assert info.value.name == "m"
    assert "mark_consistent" in str(info.value)
    assert lock.owned()
    assert lock.locked()
    lock.mark_consistent()
    lock.release()
    # life goes on: the next acquire is clean
    assert lock.acquire(timeout=0) is True
    lock.release()
    with lock:
        pass
    lock.close()
    assert lock_objects() == set()


@pytest.mark.timeout(60)
def test_a_child_killed_holding_an_inherited_lock_object_counts_as_dead() -> None:
    # The fast way to fan out (docs/tutorial/seed.md): the parent opens the
    # lock, the children take the object they inherit. Still the same robust lock.
    lock = ps.interprocess_lock("m")

    @ps.forked
    def take_and_die() -> None:
        lock.acquire()  # the parent's object, inherited by the fork
        os.kill(os.getpid(), signal.SIGKILL)

    status = take_and_die().wait()
    assert status is not None
    assert status.outcome == "killed"
    with pytest.raises(ps.OwnerDied) as info:
        lock.acquire(timeout=5)
    assert info.value.owner_pid == status.pid
    assert info.value.held is True
    lock.mark_consistent()
    lock.release()
    lock.close()
    assert lock_objects() == set()


@pytest.mark.timeout(60)
def test_the_next_waiter_gets_the_lock_at_once_when_the_holder_is_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With waits sliced at 30 s, only the kernel's wake-up on the holder's
    # death can make the waiter return quickly: no polling delay.
    monkeypatch.setattr(engine_locks, "SLICE", 30.0)
    lock = ps.interprocess_lock("m")
    holder = hold_and_die("m")
    outcome: list[object] = []
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        try:
            lock.acquire()
        except ps.OwnerDied as exc:
            outcome.append(time.monotonic())
            outcome.append(exc)
            lock.mark_consistent()
            lock.release()

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(10)
    time.sleep(0.3)  # the waiter is blocked in the kernel by now
    assert outcome == []
    killed = time.monotonic()
    kill_and_reap(holder)
    t.join(20)
    assert not t.is_alive()
    assert len(outcome) == 2
    assert isinstance(outcome[1], ps.OwnerDied)
    assert outcome[1].owner_pid == holder
    assert outcome[0] - killed < 15  # far below the 30 s slice, generous under load
    lock.close()


@pytest.mark.timeout(60)
def test_with_raises_owner_died_after_releasing_unconfirmed() -> None:
    lock = ps.interprocess_lock("m")
    dead = killed_holder("m")
    ran = []
    with pytest.raises(ps.OwnerDied) as info, lock:
        ran.append(True)
    assert ran == []
    assert info.value.held is False
    assert info.value.owner_pid == dead
    assert not lock.locked()  # released...
    # ... but unconfirmed: the next acquirer is told again, and again.
    with pytest.raises(ps.OwnerDied) as again:
        lock.acquire()
    assert again.value.held is True
    assert again.value.owner_pid == dead
    lock.release()  # still unconfirmed
    with pytest.raises(ps.OwnerDied), lock:
        pass
    _confirm(lock)
    with lock:
        ran.append(True)
    assert ran == [True]
    lock.close()


@pytest.mark.timeout(60)
def test_decorator_raises_owner_died_after_releasing_unconfirmed() -> None:
    lock = ps.interprocess_lock("m")

    @lock
    def work() -> str:
        return "ran"

    killed_holder("m")
    with pytest.raises(ps.OwnerDied) as info:
        work()
    assert info.value.held is False
    assert not lock.locked()
    _confirm(lock)
    assert work() == "ran"
    lock.close()


@pytest.mark.timeout(60)
def test_unconfirmed_is_told_to_other_processes_too() -> None:
    lock = ps.interprocess_lock("m")
    dead = killed_holder("m")
    with pytest.raises(ps.OwnerDied), lock:
        pass

    def child() -> None:
        other = ps.interprocess_lock("m")
        with pytest.raises(ps.OwnerDied) as info:  # never silently healed
            other.acquire()
        assert info.value.owner_pid == dead
        assert info.value.held
        other.mark_consistent()
        other.release()
        other.close()

    wait_ok(fork(child))
    # the child confirmed: clean from now on
    with lock:
        pass
    lock.close()


@pytest.mark.timeout(60)
def test_on_owner_death_repair_runs_with_the_lock_held_then_the_block() -> None:
    calls = []

    def repair(lock: ps.InterprocessLock) -> None:
        calls.append(("repair", lock.owned()))

    lock = ps.interprocess_lock("m", on_owner_death=repair)
    killed_holder("m")
    with lock:
        calls.append(("block", lock.owned()))
    assert calls == [("repair", True), ("block", True)]
    # repaired means confirmed: nobody is told any more
    plain = ps.interprocess_lock("m")
    assert plain.acquire(timeout=0) is True
    plain.release()
    plain.close()
    lock.close()


@pytest.mark.timeout(60)
def test_a_failing_repair_leaves_the_lock_released_and_unconfirmed() -> None:
    def repair(lock: ps.InterprocessLock) -> None:
        raise ValueError("cannot repair")

    lock = ps.interprocess_lock("m", on_owner_death=repair)
    killed_holder("m")
    with pytest.raises(ValueError, match="cannot repair"), lock:
        pass
    assert not lock.locked()
    plain = ps.interprocess_lock("m")
    _confirm(plain)
    plain.close()
    lock.close()


@pytest.mark.timeout(60)
def test_on_owner_death_warn_warns_confirms_and_enters() -> None:
    lock = ps.interprocess_lock("m", on_owner_death="warn")
    dead = killed_holder("m")
    ran = []
    with pytest.warns(RuntimeWarning, match=f"pid {dead} died while holding it") as caught, lock:
        ran.append(lock.owned())
    assert ran == [True]
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lock:  # confirmed: no second warning
            pass
    lock.close()


@pytest.mark.timeout(60)
def test_on_owner_death_warn_through_the_decorator_names_the_callers_line() -> None:
    lock = ps.interprocess_lock("m", on_owner_death="warn")

    @lock
    def guarded() -> bool:
        return lock.owned()

    dead = killed_holder("m")
    with pytest.warns(RuntimeWarning, match=f"pid {dead} died while holding it") as caught:
        assert guarded() is True
    assert [w.filename for w in caught] == [__file__]
    lock.close()


@pytest.mark.timeout(60)
def test_on_owner_death_warn_turned_into_an_error_releases_the_lock_unconfirmed() -> None:
    # `python -W error` (or pytest's filterwarnings) makes the warning raise
    # from entering the block: the block never runs, so no __exit__ will
    # release the lock. Entering must release it itself, unconfirmed.
    lock = ps.interprocess_lock("m", on_owner_death="warn")
    dead = killed_holder("m")
    ran = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match=f"pid {dead} died while holding it"), lock:
            ran.append(True)
    assert ran == []
    assert not lock.owned()
    assert not lock.locked()
    other = ps.interprocess_lock("m")
    _confirm(other)  # still unconfirmed: the next acquirer is told
    other.close()
    lock.close()


@pytest.mark.timeout(60)
def test_a_lock_whose_holder_died_is_kept_when_nobody_has_it_open() -> None:
    # Only the child ever opens the lock, so when it is killed no living
    # process holds the object: it must be kept, and a later opener told.
    dead = killed_holder("m")
    assert len(lock_objects()) == 1
    lock = ps.interprocess_lock("m")
    with pytest.raises(ps.OwnerDied) as info:
        lock.acquire()
    assert info.value.owner_pid == dead
    lock.mark_consistent()
    lock.release()
    lock.close()
    assert lock_objects() == set()  # confirmed and closed: the last user out removes it


@pytest.mark.timeout(60)
def test_a_lock_released_unconfirmed_is_kept_after_its_last_user_closes() -> None:
    lock = ps.interprocess_lock("m")
    dead = killed_holder("m")
    with pytest.raises(ps.OwnerDied), lock:
        pass
    lock.close()
    assert len(lock_objects()) == 1  # never silently healed by being removed
    again = ps.interprocess_lock("m")
    with pytest.raises(ps.OwnerDied) as info:
        again.acquire()
    assert info.value.owner_pid == dead
    again.mark_consistent()
    again.release()
    again.close()
    assert lock_objects() == set()


@pytest.mark.timeout(60)
def test_a_holder_that_dies_again_during_repair_is_told_again() -> None:
    lock = ps.interprocess_lock("m")
    killed_holder("m")
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        mine = ps.interprocess_lock("m")
        try:
            mine.acquire()
        except ps.OwnerDied:
            os.write(w, b"R")  # "repairing" ... and killed before confirming
            while True:
                time.sleep(10)

    pid = fork(child)
    os.close(w)
    try:
        assert read_byte(r) == b"R"
    finally:
        os.close(r)
    kill_and_reap(pid)
    with pytest.raises(ps.OwnerDied) as info:
        lock.acquire()
    assert info.value.owner_pid == pid
    lock.mark_consistent()
    lock.release()
    lock.close()


@pytest.mark.timeout(60)
def test_reentrant_lock_is_robust_too() -> None:
    lock = ps.interprocess_lock("m", reentrant=True)
    killed_holder("m")
    with pytest.raises(ps.OwnerDied):
        lock.acquire()
    with lock:  # nests inside the held lock: no new news
        pass
    lock.mark_consistent()
    lock.release()
    assert not lock.locked()
    lock.close()


@pytest.mark.timeout(60)
def test_mark_consistent_when_nothing_died_is_harmless() -> None:
    lock = ps.interprocess_lock("m")
    with lock:
        lock.mark_consistent()
    assert lock.acquire(timeout=0)
    lock.release()
    lock.close()


def test_owner_died_pickles_with_its_fields() -> None:
    import pickle

    exc = ps.OwnerDied("m", owner_pid=123, held=True)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.name, back.owner_pid, back.held) == ("m", 123, True)
    assert str(back) == str(exc)


@pytest.mark.timeout(60)
def test_a_process_that_exits_holding_the_lock_counts_as_dead() -> None:
    import subprocess
    import sys

    script = (
        "import procshare as ps\n"
        "lock = ps.interprocess_lock('m')\n"
        "lock.acquire()\n"
        "raise SystemExit(0)  # exits normally, never releasing: atexit must not crash\n"
    )
    lock = ps.interprocess_lock("m")
    child = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, timeout=60
    )
    assert child.returncode == 0, child.stderr.decode()
    with pytest.raises(ps.OwnerDied) as info:
        lock.acquire(timeout=5)
    assert info.value.owner_pid is not None
    lock.mark_consistent()
    lock.release()
    lock.close()


@pytest.mark.timeout(60)
def test_a_thread_that_ends_holding_the_lock_counts_as_dead() -> None:
    lock = ps.interprocess_lock("m")
    t = threading.Thread(target=lock.acquire)
    t.start()
    t.join()
    with pytest.raises(ps.OwnerDied) as info:
        lock.acquire(timeout=5)
    assert info.value.owner_pid == os.getpid()
    # The message says what happened: a thread ended, the process did not die.
    assert info.value.thread_ended
    assert f"a thread of pid {os.getpid()} ended" in str(info.value)
    assert f"pid {os.getpid()} died" not in str(info.value)
    lock.mark_consistent()
    lock.release()
    lock.close()


@pytest.mark.timeout(60)
def test_a_thread_of_another_living_process_is_named_as_a_thread(tmp_path: Path) -> None:
    lock = ps.interprocess_lock("m")
    ready, done = tmp_path / "ready", tmp_path / "done"

    @ps.forked
    def leaves_a_thread_holding_it() -> None:
        t = threading.Thread(target=lock.acquire)
        t.start()
        t.join()  # it ended holding the lock; this process lives on until told
        ready.write_text("")
        assert wait_for(done.exists, timeout=30)

    child = leaves_a_thread_holding_it()
    try:
        assert wait_for(ready.exists, timeout=30)
        with pytest.raises(ps.OwnerDied) as info:
            lock.acquire(timeout=10)
        assert info.value.owner_pid == child.pid
        assert f"a thread of pid {child.pid} ended" in str(info.value)
        lock.mark_consistent()
        lock.release()
    finally:
        done.write_text("")
        child.join(timeout=30)
    lock.close()


def test_listing_shows_the_lock_and_its_owner() -> None:
    lock = ps.interprocess_lock("m")
    with lock:
        (info,) = [i for i in ps.segments() if i.type == "lock"]
        assert info.name == "m"
        assert info.owner == os.getpid()
        assert os.getpid() in info.holders
    (info,) = [i for i in ps.segments() if i.type == "lock"]
    assert info.owner is None
    lock.close()


@pytest.mark.timeout(60)
def test_a_lock_poisoned_by_foreign_code_says_how_to_get_rid_of_it() -> None:
    import ctypes

    lock = ps.interprocess_lock("m")
    killed_holder("m")
    assert lock._entry is not None
    address = ctypes.c_void_p(lock._entry.handle.address)
    libc = ctypes.CDLL(None)
    assert libc.pthread_mutex_lock(address) == 130  # EOWNERDEAD, taken by "foreign" code
    assert libc.pthread_mutex_unlock(address) == 0  # ... unlocked without consistent
    for attempt in (lock.acquire, lock.__enter__):
        with pytest.raises(RuntimeError, match="rm --lock m"):
            attempt()
    lock.close()
    assert len(lock_objects()) == 1  # kept: nobody confirmed anything
    from procshare._engine import inspect

    assert inspect.remove("m", lock=True)


# -- a process that ends holding a lock is warned (SPEC 2, last bullet) -------


@pytest.mark.timeout(60)
def test_exiting_while_holding_a_lock_warns_naming_it() -> None:
    program = textwrap.dedent(
        """
        import procshare as ps
        lock = ps.interprocess_lock("exit-held")
        lock.acquire()
        print("exiting")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" in done.stderr
    assert "is exiting while holding interprocess lock 'exit-held'" in done.stderr
    assert "ps.OwnerDied" in done.stderr
    # ... and that is what the next acquirer is told.
    lock = ps.interprocess_lock("exit-held")
    with pytest.raises(ps.OwnerDied):
        lock.acquire(timeout=10)
    lock.mark_consistent()
    lock.release()
    lock.close()


def test_no_exit_warning_when_every_lock_was_released() -> None:
    program = "import procshare as ps\nwith ps.interprocess_lock('exit-free'):\n    pass\n"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", program],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.timeout(60)
def test_the_parent_is_warned_when_a_child_ends_holding_a_lock() -> None:
    @ps.forked
    def forgets(name: str, value: object) -> object:
        ps.interprocess_lock(name).acquire()  # opened here, never released
        return value

    with pytest.warns(RuntimeWarning, match="ended while holding interprocess lock 'held-1'"):
        assert forgets("held-1", ["the", "result"]).join(timeout=30) == ["the", "result"]
    with pytest.warns(RuntimeWarning, match="'held-2'") as caught:
        assert forgets("held-2", None).join(timeout=30) is None
    assert "ps.OwnerDied" in str(caught[0].message)
    with pytest.warns(RuntimeWarning, match="'held-3'"), ps.children() as kids:
        forgets("held-3", 3)
    assert kids.results == [3]
    for name in ("held-1", "held-2", "held-3"):
        lock = ps.interprocess_lock(name)
        with pytest.raises(ps.OwnerDied):
            lock.acquire(timeout=10)
        lock.mark_consistent()
        lock.release()
        lock.close()


@pytest.mark.timeout(60)
def test_a_child_holding_an_inherited_lock_is_reported_too() -> None:
    lock = ps.interprocess_lock("inherited-held")

    @ps.forked
    def takes_it() -> None:
        lock.acquire()

    with pytest.warns(RuntimeWarning, match="'inherited-held'"):
        takes_it().join(timeout=30)
    with pytest.raises(ps.OwnerDied):
        lock.acquire(timeout=10)
    lock.mark_consistent()
    lock.release()
    lock.close()
