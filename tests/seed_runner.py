"""Runs the seed scenario many times in a row: the body of tests/test_acceptance.py.

A script, run in a fresh interpreter by the tests, because forking is what
the scenario measures and costs: a child of the pytest process copies page
tables and faults in pages of a heap several times larger, which measured
twice the CPU per run. This file imports nothing but procshare.

    python tests/seed_runner.py --runs 200 --overlap-every 10
    python tests/seed_runner.py --runs 5 --overlap-every 1 --unlocked   # must fail

Every run checks the total, that the namespace holds nothing afterwards, and
that this process has no child left (running or zombie). In every
``--overlap-every``-th run the critical sections overlap: all children leave
a start gate together and each one's updates are read, yield, write, with a
2 ms pause inside one of them. ``--unlocked`` drops the lock from those runs:
the negative control, which must lose updates. Exit status 1 if any run was
wrong or left something behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import procshare as ps
from procshare._engine import inspect

PROCESSES = 100
GATE_TIMEOUT = 60.0
OVERLAP_PAUSE = 0.002


def expected_sum(processes: int) -> int:
    return sum(i * j - i + i**4 for i in range(processes) for j in range(1, 100))


# The seed scenario, exactly as SPEC.md writes it.
@ps.forked
def job(i: int) -> None:
    with ps.shared("sum", ps.u64) as s, ps.interprocess_lock("m"):
        for j in range(1, 100):
            s.value += i * j - i + i**4


def seed_scenario(processes: int) -> int:
    with ps.shared("sum", ps.u64) as total:
        with ps.children():
            for i in range(processes):
                job(i)
        return int(total.value)


@ps.forked
def overlapping_job(i: int, *, locked: bool, pause: float) -> None:
    """The same additions, each a visible read-modify-write, started with the others."""
    with ps.shared("sum", ps.u64) as s, ps.shared("go", ps.u8) as go:
        # The start gate: every child leaves it at (nearly) the same moment. A gate
        # that never opens must fail the run, not hang it.
        deadline = time.monotonic() + GATE_TIMEOUT
        while not go.value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {i}: the start gate stayed shut {GATE_TIMEOUT} s")
            time.sleep(0.001)
        with ps.interprocess_lock("m") if locked else contextlib.nullcontext():
            for j in range(1, 100):
                seen = s.value
                # Between the read and the write: a yield, and once a real pause.
                time.sleep(pause if j == 50 else 0)
                s.value = seen + i * j - i + i**4


def overlapping_scenario(processes: int, *, locked: bool, pause: float = OVERLAP_PAUSE) -> int:
    with ps.shared("sum", ps.u64) as total, ps.shared("go", ps.u8) as go:
        with ps.children():
            for i in range(processes):
                overlapping_job(i, locked=locked, pause=pause)
            go.value = 1  # every child is forked: open the gate
        return int(total.value)


def left_behind() -> list[str]:
    """What this process and its namespace still have: objects, children, zombies."""
    found = sorted(inspect.namespace_objects())
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass  # no child at all, running or zombie: as it must be
    else:
        found.append(f"child process {pid}" if pid else "a running child process")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument("--overlap-every", type=int, default=10, metavar="K")
    parser.add_argument("--unlocked", action="store_true", help="overlap runs without the lock")
    args = parser.parse_args(argv)
    # The test's namespace when run by pytest (inherited); a fresh one otherwise.
    namespace = os.environ.get("PROCSHARE_NAMESPACE") or f"seed-runner-{os.getpid()}"
    with ps.namespace(namespace):
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    expected = expected_sum(args.processes)
    if left_behind():
        print(f"FAILED before the first run: {left_behind()}")
        return 1
    right = overlapped = dirty = 0
    for run in range(1, args.runs + 1):
        overlap = run % args.overlap_every == 0
        try:
            if overlap:
                overlapped += 1
                total = overlapping_scenario(args.processes, locked=not args.unlocked)
            else:
                total = seed_scenario(args.processes)
        except Exception as exc:
            print(f"run {run}: raised {type(exc).__name__}: {exc}", flush=True)
            # What the children raised, not just how many: the first few, by type.
            leaves = exc.exceptions[:3] if isinstance(exc, ExceptionGroup) else ()
            for leaf in leaves:
                first = (str(leaf).splitlines() or [""])[0]
                print(f"  {type(leaf).__name__}: {first[:300]}", flush=True)
            total = None
        if total == expected:
            right += 1
        elif total is not None:
            how = "short" if total < expected else "over"
            what = "overlapping" if overlap else "plain"
            print(f"run {run} ({what}): sum {total} != {expected} ({how})", flush=True)
        left = left_behind()
        if left:
            dirty += 1
            print(f"run {run} left behind: {', '.join(left)}", flush=True)
    print(
        f"{right} of {args.runs} runs right ({overlapped} with overlapping critical "
        f"sections{', unlocked' if args.unlocked else ''}); {dirty} left something behind"
    )
    return 0 if right == args.runs and dirty == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
