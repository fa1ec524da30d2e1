"""The seed scenario: 100 forked processes add into one shared u64 under one named lock.

Each child ``i`` adds ``i*j - i + i**4`` for ``j`` in 1..99. The children run
at the same time, so without the lock their read-modify-write updates could
interleave and be lost; with it the total is always 193107012120.

Run it: ``python examples/seed_sum.py [PROCESSES]``. It exits 1 on a wrong total.
"""

from __future__ import annotations

import sys
import time

import procshare as ps


@ps.forked
def job(i: int) -> None:
    with ps.shared("sum", ps.u64) as s, ps.interprocess_lock("m"):
        for j in range(1, 100):
            s.value += i * j - i + i**4


def main(processes: int) -> int:
    started = time.perf_counter()
    with ps.shared("sum", ps.u64) as total:
        with ps.children():
            for i in range(processes):
                job(i)
        # children joined here; any failure was raised as an ExceptionGroup
        result = total.value
    wall = time.perf_counter() - started
    # The expected total, summed here in the parent without shared memory or locks.
    expected = sum(i * j - i + i**4 for i in range(processes) for j in range(1, 100))
    print(f"{processes} processes: sum {result}, expected {expected}, {wall:.3f} s")
    if result != expected:
        print(f"WRONG: off by {expected - result}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
