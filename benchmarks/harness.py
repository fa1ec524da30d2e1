"""A small side-by-side benchmark harness.

Why our own and not pyperf or pytest-benchmark: every result we publish is a
*ratio* between contenders measured in the same process run, interleaved, so
that the noise of this shared 2-core machine hits all of them alike. pyperf
spawns worker processes per benchmark (contenders would run minutes apart),
and pytest-benchmark measures one callable at a time. Interleaving
contenders round by round, taking medians, and reporting ratios is about
eighty lines, so it lives here.

A contender is a function ``fn(n) -> seconds`` that performs ``n`` operations
however is tightest for it and returns the elapsed time, so set-up (opening a
lock, forking workers) stays out of the measurement.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable

import attrs

Timer = Callable[[int], float]

SMOKE = os.environ.get("PROCSHARE_BENCH_SMOKE") == "1"


@attrs.frozen
class Target:
    numerator: str
    denominator: str
    #: ``None``: a ratio reported for context, with no limit and no verdict.
    max_ratio: float | None
    text: str

    def verdict(self, medians: dict[str, float]) -> tuple[float | None, bool | None]:
        if self.numerator not in medians or self.denominator not in medians:
            return None, None
        ratio = medians[self.numerator] / medians[self.denominator]
        return ratio, None if self.max_ratio is None else ratio <= self.max_ratio


@attrs.define
class Group:
    title: str
    note: str = ""
    unit: str = "per op"
    contenders: dict[str, Timer] = attrs.field(factory=dict)
    samples: dict[str, list[float]] = attrs.field(factory=dict)
    targets: list[Target] = attrs.field(factory=list)
    n: int = 0
    skipped: dict[str, str] = attrs.field(factory=dict)
    #: Groups sharing a ``series`` name are plotted together, one point per
    #: contender at ``x`` (e.g. the number of processes), as throughput.
    series: str | None = None
    x: float | None = None

    def add(self, label: str, fn: Timer) -> None:
        self.contenders[label] = fn

    def skip(self, label: str, why: str) -> None:
        """Record a contender that cannot run here (e.g. a peer not installed)."""
        self.skipped[label] = why

    def measure(self, n: int, *, repeat: int = 7, warmup: int = 1) -> None:
        """Run every contender ``repeat`` times, interleaved, after ``warmup`` rounds."""
        if SMOKE:
            n, repeat, warmup = max(1, min(n, 20)), 1, 0
        self.n = n
        labels = list(self.contenders)
        self.samples = {label: [] for label in labels}
        for round_ in range(warmup + repeat):
            # Rotate the order each round so no contender always runs first.
            shift = round_ % len(labels) if labels else 0
            for label in labels[shift:] + labels[:shift]:
                gc.collect()
                elapsed = self.contenders[label](n)
                if round_ >= warmup:
                    self.samples[label].append(elapsed / n)

    def target(self, numerator: str, denominator: str, *, max_ratio: float, text: str) -> None:
        """A goal: time(numerator) / time(denominator) per op must be at most ``max_ratio``."""
        self.targets.append(Target(numerator, denominator, max_ratio, text))

    def report(self, numerator: str, denominator: str, *, text: str) -> None:
        """A ratio worth reading beside the targets, with no limit (listed as "reported")."""
        self.targets.append(Target(numerator, denominator, None, text))

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items() if v}


@attrs.define
class Bench:
    area: str
    groups: list[Group] = attrs.field(factory=list)

    def group(
        self,
        title: str,
        *,
        note: str = "",
        unit: str = "per op",
        series: str | None = None,
        x: float | None = None,
    ) -> Group:
        g = Group(title=title, note=note, unit=unit, series=series, x=x)
        self.groups.append(g)
        return g


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"
