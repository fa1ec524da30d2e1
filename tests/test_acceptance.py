"""SPEC section 6: the seed scenario, 200 times in a row, right every time, leaving nothing.

A shared-sum test is easy to write so that it cannot fail: children that
finish in microseconds run one after another anyway, so the plain scenario
passes with no lock at all. So this file does three things:

* runs the scenario exactly as SPEC.md writes it, 200 times, checking the
  total, the namespace (empty after every run) and the process table;
* in every tenth of those runs, makes the critical sections *overlap*: all
  children are released at the same moment by a start gate, and each splits
  its updates into read, yield, write, pausing in the middle of one of them
  while holding the lock;
* keeps a negative control: the same overlapping children without the lock
  must lose updates, every time. If the control ever stops losing updates,
  the overlap runs above no longer prove anything, and this file says so
  by failing.
"""

from __future__ import annotations

import contextlib
import time

import pytest

import procshare as ps
from procshare._engine import leftovers
from procshare.testing import child_pids

PROCESSES = 100
RUNS = 200
OVERLAP_EVERY = 10
GATE_TIMEOUT = 60.0
OVERLAP_PAUSE = 0.002
EXPECTED = sum(i * j - i + i**4 for i in range(PROCESSES) for j in range(1, 100))


# The seed scenario, exactly as SPEC.md writes it.
@ps.forked
def job(i: int) -> None:
    with ps.shared("sum", ps.u64) as s, ps.interprocess_lock("m"):
        for j in range(1, 100):
            s.value += i * j - i + i**4


def seed_scenario() -> int:
    with ps.shared("sum", ps.u64) as total:
        with ps.children():
            for i in range(PROCESSES):
                job(i)
        return int(total.value)


@ps.forked
def overlapping_job(i: int, *, locked: bool, pause: float) -> None:
    """The same additions, but each one a visible read-modify-write, started with the others."""
    with ps.shared("sum", ps.u64) as s, ps.shared("go", ps.u8) as go:
        # The start gate: every child leaves it at (nearly) the same moment. A gate
        # that never opens must fail the test, not hang it.
        deadline = time.monotonic() + GATE_TIMEOUT
        while not go.value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {i}: the start gate stayed shut {GATE_TIMEOUT} s")
            time.sleep(0.001)
        with ps.interprocess_lock("m") if locked else contextlib.nullcontext():
            for j in range(1, 100):
                seen = s.value
                # Between the read and the write: a yield, and once a long pause.
                time.sleep(pause if j == 50 else 0)
                s.value = seen + i * j - i + i**4


def overlapping_scenario(processes: int, *, locked: bool, pause: float) -> tuple[int, int]:
    """Run the gated scenario; return (total, expected)."""
    expected = sum(i * j - i + i**4 for i in range(processes) for j in range(1, 100))
    with ps.shared("sum", ps.u64) as total, ps.shared("go", ps.u8) as go:
        with ps.children():
            for i in range(processes):
                overlapping_job(i, locked=locked, pause=pause)
            go.value = 1  # all children forked: open the gate
        return int(total.value), expected


def assert_nothing_left(run: int) -> None:
    left = leftovers.namespace_objects()
    assert not left, f"run {run} left {sorted(left)} in shared memory"
    kids = child_pids()
    assert not kids, f"run {run} left child processes {kids}"


@pytest.mark.timeout(900)
def test_the_seed_scenario_200_times_in_a_row() -> None:
    assert not leftovers.namespace_objects()
    wrong: list[str] = []
    overlapped = 0
    for run in range(1, RUNS + 1):
        if run % OVERLAP_EVERY == 0:
            total, expected = overlapping_scenario(PROCESSES, locked=True, pause=OVERLAP_PAUSE)
            overlapped += 1
        else:
            total, expected = seed_scenario(), EXPECTED
        if total != expected:
            wrong.append(f"run {run}: {total} != {expected}")
        assert_nothing_left(run)
    assert wrong == [], f"{len(wrong)} of {RUNS} runs summed wrong: {wrong[:10]}"
    assert overlapped == RUNS // OVERLAP_EVERY


@pytest.mark.timeout(300)
def test_negative_control_without_the_lock_updates_are_lost() -> None:
    # Exactly the overlap runs above, minus the lock. A hundred children leave
    # the gate together and each holds a read 2 ms before writing it back: for
    # no update to be lost, no child could write during any other's 2 ms, one
    # after another, for all hundred. Measured: over 90% of the sum is lost.
    for attempt in range(5):
        total, expected = overlapping_scenario(PROCESSES, locked=False, pause=OVERLAP_PAUSE)
        # A lost update overwrites others' additions, so the total can only fall short.
        assert total < expected, f"attempt {attempt}: no update was lost ({total})"
        assert_nothing_left(attempt)
