"""Workers fill slices of one shared numpy array; the parent reduces it.

Estimates pi by the midpoint rule for the integral of 4 / (1 + x**2) over
[0, 1]. The grid has two million points; each of four forked workers
evaluates the integrand on its own slice and writes it straight into the
shared array, so nothing is pickled or copied back. The parent opened the
array before forking, and the children use that same view: a fork inherits
the mapping. The parent then sums the array.

Run it: ``python examples/numpy_slices.py``. It exits 1 if a slice is
missing or wrong, or if the estimate is not pi to 1e-9.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np

import procshare as ps

POINTS = 2_000_000
WORKERS = 4


def integrand(start: int, stop: int) -> np.ndarray:
    x = (np.arange(start, stop, dtype=np.float64) + 0.5) / POINTS
    return 4.0 / (1.0 + x * x)


def main() -> int:
    bounds = [POINTS * k // WORKERS for k in range(WORKERS + 1)]
    with ps.shared("integrand", np.float64, shape=(POINTS,)) as y:

        @ps.forked
        def fill(start: int, stop: int) -> None:
            y[start:stop] = integrand(start, stop)  # writes into shared memory

        with ps.children():
            for start, stop in itertools.pairwise(bounds):
                fill(start, stop)
        estimate = float(y.sum()) / POINTS
        # The children's work, checked against the same computation done here.
        exact = bool(np.array_equal(y, integrand(0, POINTS)))
        unfilled = int(np.count_nonzero(y == 0.0))  # the segment started zeroed
    error = abs(estimate - math.pi)
    print(f"{WORKERS} workers, {POINTS} points: pi ~ {estimate!r}, error {error:.1e}")
    if unfilled or not exact or error > 1e-9:
        print(f"WRONG: {unfilled} unfilled, slices match the serial result: {exact}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
