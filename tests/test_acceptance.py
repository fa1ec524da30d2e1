"""SPEC section 6: the seed scenario, 200 times in a row, right every time, leaving nothing.

A shared-sum test is easy to write so that it cannot fail: children that
finish in microseconds run one after another anyway, so the plain scenario
passes with no lock at all. So the runs (in ``tests/seed_runner.py``, a
script run in a fresh interpreter, where a fork costs half what it costs
from pytest):

* run the scenario exactly as SPEC.md writes it, 200 times, checking the
  total, that the namespace is empty and that no child is left after every
  run;
* in every tenth run, make the critical sections *overlap*: all hundred
  children leave a start gate together and each one's updates are read,
  yield, write, with a 2 ms pause inside one of them, while holding the lock;
* and a negative control runs those same overlapping children without the
  lock, through the same checks, which must then report every run wrong. If
  it ever stops losing updates, the overlap runs prove nothing any more, and
  this file fails to say so.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "seed_runner.py"


def run_runner(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(900)
def test_the_seed_scenario_200_times_in_a_row() -> None:
    done = run_runner("--runs", "200", "--overlap-every", "10", timeout=880)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert done.stdout.splitlines()[-1] == (
        "200 of 200 runs right (20 with overlapping critical sections); 0 left something behind"
    ), report


@pytest.mark.timeout(300)
def test_negative_control_without_the_lock_updates_are_lost() -> None:
    # Exactly the overlap runs above, minus the lock: a hundred children hold a
    # read 2 ms before writing it back, all at once. For no update to be lost,
    # no child could write during any other's pause, for all hundred; measured,
    # over 90% of the sum is lost.
    done = run_runner("--runs", "5", "--overlap-every", "1", "--unlocked", timeout=280)
    report = done.stdout + done.stderr
    assert done.returncode == 1, report
    assert done.stdout.splitlines()[-1] == (
        "0 of 5 runs right (5 with overlapping critical sections, unlocked); "
        "0 left something behind"
    ), report
    # A lost update overwrites others' additions, so a total can only fall short.
    wrong = re.findall(r"^run (\d) \(overlapping\): sum \d+ != \d+ \((\w+)\)$", report, re.M)
    assert wrong == [(str(k), "short") for k in range(1, 6)], report


@pytest.mark.timeout(300)
def test_the_runner_checks_plain_runs_too() -> None:
    # A few plain runs and one locked overlap run with a small process count:
    # the same checks, passing, so the control above fails for the lock alone.
    done = run_runner("--runs", "4", "--processes", "20", "--overlap-every", "4", timeout=280)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert done.stdout.splitlines()[-1] == (
        "4 of 4 runs right (1 with overlapping critical sections); 0 left something behind"
    ), report
