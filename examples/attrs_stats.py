"""Workers under ``ps.children(limit=...)`` merge statistics into one shared attrs struct.

The job: the Collatz stopping time (steps of ``n -> n/2`` or ``3n + 1`` until
1) of every number up to 20000. The range is cut into twelve chunks, and
``ps.children(limit=3)`` runs at most three workers at a time. Each worker
computes its chunk's statistics privately, then merges them into the shared
``Stats`` struct in one short section under a named lock. The struct also
counts the workers running at each moment, so the example can show that the
limit held.

The parent reads the totals and checks them against the same statistics
computed serially, without shared memory. Run it:
``python examples/attrs_stats.py``; it exits 1 on any disagreement.
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Annotated

import attrs

import procshare as ps

LIMIT_N = 20_000
CHUNKS = 12
WORKERS_AT_ONCE = 3


@attrs.define
class Stats:
    """Fields of a shared struct are fixed-width numbers; Annotated keeps type checkers happy."""

    numbers: Annotated[int, ps.u64] = 0
    total_steps: Annotated[int, ps.u64] = 0
    sum_of_squares: Annotated[int, ps.u64] = 0  # exact integer variance, no float drift
    longest: Annotated[int, ps.u32] = 0
    longest_start: Annotated[int, ps.u64] = 0
    chunks_done: Annotated[int, ps.u32] = 0
    running: Annotated[int, ps.u32] = 0
    peak_running: Annotated[int, ps.u32] = 0


def stopping_time(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def chunk_stats(start: int, stop: int) -> Stats:
    times = [stopping_time(n) for n in range(start, stop)]
    longest = max(times)
    return Stats(
        numbers=len(times),
        total_steps=sum(times),
        sum_of_squares=sum(t * t for t in times),
        longest=longest,
        longest_start=start + times.index(longest),  # the smallest n reaching it
        chunks_done=1,
    )


@ps.forked
def worker(start: int, stop: int) -> None:
    with ps.shared("collatz", Stats) as shared:
        with ps.interprocess_lock("collatz"):
            shared.running += 1
            shared.peak_running = max(shared.peak_running, shared.running)
        mine = chunk_stats(start, stop)  # the real work, outside the lock
        with ps.interprocess_lock("collatz"):
            shared.numbers += mine.numbers
            shared.total_steps += mine.total_steps
            shared.sum_of_squares += mine.sum_of_squares
            better = mine.longest > shared.longest
            tie = mine.longest == shared.longest and mine.longest_start < shared.longest_start
            if better or tie:
                shared.longest = mine.longest
                shared.longest_start = mine.longest_start
            shared.chunks_done += 1
            shared.running -= 1


def main() -> int:
    bounds = [1 + LIMIT_N * k // CHUNKS for k in range(CHUNKS + 1)]
    with ps.shared("collatz", Stats) as shared:
        with ps.children(limit=WORKERS_AT_ONCE):
            for start, stop in itertools.pairwise(bounds):
                worker(start, stop)
        got = Stats(**{f.name: getattr(shared, f.name) for f in attrs.fields(Stats)})
    mean = got.total_steps / got.numbers
    sd = math.sqrt(got.sum_of_squares / got.numbers - mean * mean)
    print(
        f"{got.numbers} numbers in {got.chunks_done} chunks, at most {got.peak_running} "
        f"workers at once (limit {WORKERS_AT_ONCE}): mean steps {mean:.3f}, sd {sd:.3f}, "
        f"longest {got.longest} steps, from {got.longest_start}"
    )
    serial = chunk_stats(1, LIMIT_N + 1)
    expected = attrs.evolve(serial, chunks_done=CHUNKS, peak_running=got.peak_running)
    problems = []
    if got != expected:
        problems.append(f"shared {got} != serial {expected}")
    if not 1 <= got.peak_running <= WORKERS_AT_ONCE:
        problems.append(f"{got.peak_running} workers ran at once, limit {WORKERS_AT_ONCE}")
    for problem in problems:
        print(f"WRONG: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
