"""Fork start + join, procshare against raw, alternating child by child.

``python -m benchmarks.fork_alternating [N] [--python-path]``: times N
no-op children of each kind one at a time, raw and ``@ps.forked`` taking
turns (the order swapped every pair), and prints the ratio of the median
procshare child to the median raw one, and of their 10th and 30th
percentiles. On a shared machine whose load changes within seconds this
resolves what ``python -m benchmarks --only fork`` (rounds of 50 children
per contender) cannot: both kinds see the same load. ``--python-path``
switches the backend's C start and join off (the Python reference path).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import procshare as ps


@ps.forked
def _noop() -> None:
    return None


def _raw() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _procshare() -> None:
    _noop().join()


def main(argv: list[str]) -> None:
    if "--python-path" in argv:
        from procshare._backends.posix import _forkstep

        _forkstep.fast_enable(False)
    n = int(next((a for a in argv if a.isdigit()), "1500"))
    clock = time.perf_counter_ns
    for _ in range(50):  # warm both
        _raw()
        _procshare()
    raw: list[int] = []
    ours: list[int] = []
    for i in range(n):
        pair = ((_raw, raw), (_procshare, ours))
        for fn, into in pair if i & 1 else pair[::-1]:
            t0 = clock()
            fn()
            into.append(clock() - t0)
    q_raw, q_ours = statistics.quantiles(raw, n=10), statistics.quantiles(ours, n=10)
    load = os.getloadavg()[0]
    print(
        f"raw median {statistics.median(raw) / 1e3:.0f} us, procshare median "
        f"{statistics.median(ours) / 1e3:.0f} us: ratio "
        f"{statistics.median(ours) / statistics.median(raw):.3f} (10th percentile "
        f"{q_ours[0] / q_raw[0]:.3f}, 30th {q_ours[2] / q_raw[2]:.3f}; load {load:.2f})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
