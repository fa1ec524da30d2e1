"""The condition variable and waiters killed while they wait (SPEC 4b).

A ``FUTEX_WAKE`` goes to whichever sleepers the kernel has queued, and a
process sent ``SIGKILL`` stays queued until it next runs: a ``notify(1)``
right after ``child.kill()`` used to wake only the dying process (44 of 100
tries here), and the live waiter slept on. These tests kill a waiter
mid-wait and check that the live one is woken and that the counts shown to
users (``repr``, ``ps.segments()`` / ``ls``) count only live waiters.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import procshare as ps
from procshare._engine import sync as _engine_sync

#: Rounds of kill-then-notify: each lost the notify about half the time
#: before the fix, so ten fail with a probability of ~99.7 %.
ROUNDS = 10


def _state() -> str | None:
    (found,) = (i for i in ps.segments() if i.name == "k" and i.type == "condition")
    return found.state


def _killed(child: ps.Child[bool]) -> None:
    status = child.wait(timeout=60)
    assert status is not None
    assert status.outcome == "killed"


@pytest.fixture
def cond() -> Iterator[ps.InterprocessCondition]:
    """The condition "k" (each test has its own namespace)."""
    c = ps.interprocess_condition("k")
    yield c
    c.close()
    c.lock.close()


def _waiting(limit: float, n: int = 1) -> list[ps.Child[bool]]:
    """Start ``n`` children that wait on "k" up to ``limit`` seconds each; return
    once each has signalled from inside ``with c:``, just before its wait (the
    next ``with cond:`` of the caller then runs once all of them wait)."""

    @ps.forked
    def wait() -> bool:
        c = ps.interprocess_condition("k")
        with c:
            ps.interprocess_semaphore("k-ready", 0).release()
            return c.wait(limit)

    ready = ps.interprocess_semaphore("k-ready", 0)
    children = [wait() for _ in range(n)]
    for _ in range(n):
        assert ready.acquire(timeout=60)
    ready.close()
    return children


@pytest.mark.timeout(600)
def test_a_waiter_killed_mid_wait_does_not_take_the_notify_of_a_live_one(
    cond: ps.InterprocessCondition,
) -> None:
    for _ in range(ROUNDS):
        (victim,) = _waiting(120)
        (live,) = _waiting(30)
        with cond:  # both are inside wait(): it let go of the lock
            assert repr(cond).endswith("waiters=2>")
            victim.kill()  # not reaped yet: it may still be in the kernel's queue
            cond.notify(1)
        assert live.join(timeout=120) is True  # woken, not timed out
        _killed(victim)
    assert repr(cond).endswith("waiters=0>")


@pytest.mark.timeout(300)
def test_notify_all_after_a_waiter_died_wakes_the_live_ones(
    cond: ps.InterprocessCondition,
) -> None:
    victim, *live = _waiting(60, 3)
    with cond:
        victim.kill()
        cond.notify_all()
    assert [child.join(timeout=120) for child in live] == [True, True]
    _killed(victim)


@pytest.mark.timeout(300)
def test_the_waiter_count_shown_leaves_out_a_dead_waiter(
    cond: ps.InterprocessCondition,
) -> None:
    (victim,) = _waiting(120)
    with cond:
        assert _state() == "waiters=1"
    victim.kill()
    _killed(victim)
    # It died counted: repr and ls used to say waiters=1 from then on.
    assert _state() == "waiters=0"
    assert repr(cond).endswith("waiters=0>")
    # A later waiter is counted, and a notify reaches it.
    (live,) = _waiting(60)
    with cond:
        assert _state() == "waiters=1"
        cond.notify(1)
    assert live.join(timeout=120) is True
    assert _state() == "waiters=0"


@pytest.mark.timeout(300)
def test_more_waiting_processes_than_slots_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 128 slots in real use; 2 here, so that a third waiting process is one too many.
    monkeypatch.setattr(_engine_sync, "CONDITION_SLOTS", 2)
    cond = ps.interprocess_condition("full")
    ready = ps.interprocess_semaphore("full-ready", 0)

    @ps.forked
    def wait() -> bool:
        c = ps.interprocess_condition("full")
        with c:
            ps.interprocess_semaphore("full-ready", 0).release()
            return c.wait(60)

    waiters = [wait() for _ in range(2)]
    for _ in range(2):
        assert ready.acquire(timeout=60)
    with cond:
        with pytest.raises(ps.UsageError, match="more than 2 processes wait on it at once"):
            cond.wait(0.1)
        assert cond.lock.owned()  # the refused wait kept the lock
        cond.notify_all()
    assert [child.join(timeout=120) for child in waiters] == [True, True]
    with cond:  # a slot is free again
        assert cond.wait(0) is False
    cond.close()
    cond.lock.close()
    ready.close()


@pytest.mark.timeout(300)
def test_an_anonymous_condition_counts_and_wakes_past_a_dead_waiter() -> None:
    cond = ps.interprocess_condition()
    ready = ps.interprocess_semaphore(0)

    @ps.forked
    def wait(limit: float) -> bool:
        with cond:
            ready.release()
            return cond.wait(limit)

    victim = wait(120)
    live = wait(60)
    for _ in range(2):
        assert ready.acquire(timeout=60)
    with cond:
        assert repr(cond).endswith("waiters=2>")
        victim.kill()
        cond.notify(1)
    assert live.join(timeout=120) is True
    _killed(victim)
    assert repr(cond).endswith("waiters=0>")
    cond.close()
    ready.close()
