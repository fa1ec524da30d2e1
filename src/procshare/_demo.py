"""``python -m procshare demo``: the seed scenario, end to end.

N forked processes (100 by default) each take the named lock ``"m"`` and add
``i*j - i + i**4`` for ``j`` in ``1..99`` into the shared unsigned 64-bit value
``"sum"``. The demo prints the sum, the value it must be (computed from the
formula, not stored), the wall time, and checks that nothing of the run is
left in shared memory. It exits 1 on a wrong sum, a failed child or a
leftover, so ``make demo`` is a real check, not a show.

Each invocation runs in a fresh namespace (``demo-<pid>-<random>``): a
segment called ``"sum"`` that some other program keeps in the default
namespace can neither spoil the result nor be touched by it, and "nothing
left behind" can be checked exactly, by listing that namespace.

Ctrl-C and ``SIGTERM`` (``kill``, ``timeout``, a service manager) stop it the
same way: the children are cancelled and reaped, and the run's namespace is
left empty. Nobody opens that namespace again, so without this a ``SIGTERM``
(Python's default ends the process at once) left the run's segment in
/dev/shm until a ``procshare gc``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import sys
import threading
import time

import attrs

import procshare as ps
from procshare._engine import inspect

J_RANGE = range(1, 100)
#: The original program's pauses: before taking the lock, and while holding it.
PAUSE_BEFORE = 1.0
PAUSE_HOLDING = 0.1
#: ``--cluster`` without an address: a LocalCluster of 2 worker processes.
_LOCAL = "local"


def expected_sum(processes: int) -> int:
    """``sum(i*j - i + i**4 for i in range(processes) for j in 1..99)``, in closed form.

    Summing over ``j`` first gives ``i * (4950 - 99) + 99 * i**4``; the sums of
    ``i`` and ``i**4`` over ``i < n`` are Faulhaber's formulas. Closed form so
    the check does not share a loop (or a bug) with the scenario it checks.
    """
    n = processes
    sum_j = sum(J_RANGE)  # 4950
    count_j = len(J_RANGE)  # 99
    s1 = n * (n - 1) // 2
    m = n - 1
    s4 = m * (m + 1) * (2 * m + 1) * (3 * m * m + 3 * m - 1) // 30
    return (sum_j - count_j) * s1 + count_j * s4


def max_processes() -> int:
    """The most processes whose total still fits in an unsigned 64-bit value."""
    lo, hi = 1, 10_000
    while lo < hi:  # the total grows with n: bisect for the last n that fits
        mid = (lo + hi + 1) // 2
        if expected_sum(mid) < 2**64:
            lo = mid
        else:
            hi = mid - 1
    return lo


# The scenario, written exactly as a user would (SPEC.md, top).
@ps.forked
def job(i: int) -> None:
    with ps.shared("sum", ps.u64) as s, ps.interprocess_lock("m"):
        for j in range(1, 100):
            s.value += i * j - i + i**4


# The same with the original program's pauses (--sleep).
@ps.forked
def paced_job(i: int) -> None:
    with ps.shared("sum", ps.u64) as s:
        time.sleep(PAUSE_BEFORE)
        with ps.interprocess_lock("m"):
            for j in range(1, 100):
                s.value += i * j - i + i**4
            time.sleep(PAUSE_HOLDING)


def scenario(processes: int, *, paced: bool = False) -> int:
    """Run the seed scenario once and return the shared total."""
    work = paced_job if paced else job
    with ps.shared("sum", ps.u64) as total:
        with ps.children():
            for i in range(processes):
                work(i)
        # children joined here; any failure was raised as an ExceptionGroup
        return int(total.value)


def min_paced_wall(processes: int) -> float:
    """A lower bound on the wall time of a ``--sleep`` run, if the lock works.

    No child takes the lock before its 1 s pause is over, and the 100 ms
    sections held under the lock cannot overlap, so they add up.
    """
    return PAUSE_BEFORE + processes * PAUSE_HOLDING


@attrs.frozen
class Run:
    """The outcome of one run of the scenario."""

    number: int
    total: int | None
    expected: int
    wall: float
    left: frozenset[str]
    error: str | None = None

    def problems(self, *, paced: bool, processes: int) -> list[str]:
        found = []
        if self.error is not None:
            found.append(f"run {self.number} failed: {self.error}")
        elif self.total != self.expected:
            found.append(
                f"run {self.number}: sum {self.total} != expected {self.expected} "
                f"(off by {self.expected - (self.total or 0)}): updates were lost or doubled"
            )
        if self.left:
            found.append(
                f"run {self.number} left {len(self.left)} object(s) in shared memory: "
                + ", ".join(sorted(self.left))
            )
        if paced and self.error is None and self.wall < min_paced_wall(processes):
            found.append(
                f"run {self.number} took {self.wall:.3f} s, less than the "
                f"{min_paced_wall(processes):.1f} s that {processes} serialised 100 ms "
                "sections need: the locked sections overlapped"
            )
        return found


def run_once(number: int, processes: int, *, paced: bool, namespace: str) -> Run:
    expected = expected_sum(processes)
    total: int | None = None
    error: str | None = None
    started = time.perf_counter()
    try:
        with ps.namespace(namespace):
            total = scenario(processes, paced=paced)
    except Exception as exc:
        error = _describe(exc)
    wall = time.perf_counter() - started
    left = inspect.namespace_objects(namespace)
    return Run(number, total, expected, wall, left, error)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: handled as Ctrl-C is (the children
    are cancelled, the namespace is emptied), then reported as SIGTERM."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _raised(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is a ``kind``, or an exception group holding one."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kind) is not None
    return isinstance(exc, kind)


def _interrupted(number: int, namespace: str, exc: BaseException) -> int:
    left = inspect.namespace_objects(namespace)
    by_sigterm = _raised(exc, _Terminated)
    print(f"\n{'terminated (SIGTERM)' if by_sigterm else 'interrupted'} during run {number}")
    if left:
        # A child killed while it held the lock leaves the lock behind on purpose:
        # the next process to open "m" must be told its owner died (ps.OwnerDied).
        # Nobody will open this namespace again, so the demo removes it.
        print(f"left in shared memory: {', '.join(sorted(left))}")
        print("  (a lock whose holder was killed is kept, so its next user hears of it)")
        _remove_leftovers(namespace)
    else:
        print(f"nothing left in shared memory: namespace {namespace} is empty")
    # The shell's convention for "ended by SIGTERM" / "ended by SIGINT".
    return 128 + signal.SIGTERM if by_sigterm else 130


def _remove_leftovers(namespace: str) -> None:
    """Remove what a failed or interrupted run left in the demo's own namespace."""
    removed = inspect.collect(namespace, everything=True)
    if removed:
        print(
            f"  removed {len(removed)} object(s) from the demo's namespace "
            f"(as `python -m procshare gc --all --namespace {namespace}` would)"
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        inner = "; ".join(_describe(e) for e in exc.exceptions)
        return f"{exc.message}: {inner}"
    return f"{type(exc).__name__}: {exc}"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m procshare demo",
        description=(
            "Run the seed scenario: N forked processes each add i*j - i + i**4 for j in "
            "1..99 to one shared u64 under one named lock. Prints the sum, the expected "
            "value and the wall time, checks that nothing is left in shared memory, and "
            "exits 1 if anything is wrong."
        ),
    )
    p.add_argument(
        "--processes",
        type=_positive,
        default=100,
        metavar="N",
        help="number of forked processes (default: 100, whose sum is 193107012120)",
    )
    p.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        metavar="K",
        help="run the scenario K times in a row (default: 1)",
    )
    p.add_argument(
        "--sleep",
        action="store_true",
        help=(
            "reproduce the original program's pauses: each child sleeps 1 s before taking "
            "the lock and 100 ms while holding it (about 1 + N/10 s per run)"
        ),
    )
    p.add_argument(
        "--cluster",
        nargs="?",
        const=_LOCAL,
        default=None,
        metavar="ADDRESS",
        help=(
            "run the same program inside `with ps.cluster(...)`: on the Dask scheduler at "
            "ADDRESS, or, without one, on a LocalCluster of 2 worker processes (needs "
            "pip install 'procshare[dask]')"
        ),
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m procshare demo``; returns the exit status."""
    p = parser()
    args = p.parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        return _main(p, args)
    except _Terminated:  # between runs: nothing of a run is open
        print("\nterminated (SIGTERM)")
        return 128 + signal.SIGTERM
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.cluster is None:
        return _run(p, args)
    # --cluster: the same program, unchanged, as Dask tasks (SPEC 8).
    from procshare import _runtime

    address: str = args.cluster
    with contextlib.ExitStack() as stack:
        if address == _LOCAL:
            try:
                client = stack.enter_context(_runtime.local_cluster(2))
            except ps.MissingDependency as exc:
                print(f"procshare demo --cluster: {exc}", file=sys.stderr)
                return 2
            where = "a LocalCluster of 2 worker processes"
        else:
            client = address
            where = f"the Dask cluster at {address}"
        try:
            stack.enter_context(ps.cluster(client))
        except ps.ClusterUnreachable as exc:
            print(f"procshare demo --cluster: {exc}", file=sys.stderr)
            return 2
        print(f"procshare demo --cluster: every child is a Dask task on {where}")
        return _run(p, args)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    limit = max_processes()
    if args.processes > limit:
        p.error(
            f"--processes {args.processes} would overflow the shared u64 "
            f"(the total exceeds 2**64 - 1 beyond {limit} processes); use at most {limit}"
        )
    processes: int = args.processes
    paced: bool = args.sleep
    namespace = f"demo-{os.getpid()}-{secrets.token_hex(3)}"
    expected = expected_sum(processes)

    print("procshare demo: the seed scenario")
    print(f"  {processes} forked processes; child i adds i*j - i + i**4 for j in 1..99")
    print('  to the shared u64 "sum", holding the interprocess lock "m"')
    print(f"  expected sum: {expected} (from the formula)")
    print(f"  namespace: {namespace} (fresh for this run)")
    if paced:
        hold_ms = f"{PAUSE_HOLDING * 1000:g} ms"
        print(
            f"  --sleep: each child sleeps {PAUSE_BEFORE:g} s, then holds the lock for {hold_ms}."
        )
        print(
            f"    The locked sections run one at a time, so expect at least "
            f"{min_paced_wall(processes):.1f} s a run"
        )
        print(
            f"    ({PAUSE_BEFORE:g} s + {processes} x {hold_ms}); "
            "a faster run would mean two children held the lock at once."
        )
    print()
    before = inspect.namespace_objects(namespace)
    runs: list[Run] = []
    problems: list[str] = []
    if before:  # impossible for a fresh namespace, but then nothing below is meaningful
        problems.append(f"namespace {namespace} was not empty: {', '.join(sorted(before))}")
    for number in range(1, args.repeat + 1):
        try:
            run = run_once(number, processes, paced=paced, namespace=namespace)
        except BaseException as exc:
            if not _raised(exc, KeyboardInterrupt):
                raise
            # Ctrl-C or SIGTERM: the children were terminated and what they
            # held released; show that nothing leaked even so.
            return _interrupted(number, namespace, exc)
        runs.append(run)
        found = run.problems(paced=paced, processes=processes)
        problems += found
        shown = "failed" if run.total is None else str(run.total)
        verdict = "ok" if not found else "WRONG"
        bound = f" (>= {min_paced_wall(processes):.1f} s)" if paced else ""
        print(
            f"run {number:>{len(str(args.repeat))}}: sum {shown}  expected {run.expected}  "
            f"wall {run.wall:.3f} s{bound}  {verdict}",
            flush=True,
        )
    print()
    walls = [r.wall for r in runs]
    if len(runs) > 1:
        print(
            f"wall time over {len(runs)} runs: median {statistics.median(walls):.3f} s, "
            f"min {min(walls):.3f} s, max {max(walls):.3f} s"
        )
    left = frozenset().union(*(r.left for r in runs))
    if left:
        print(f"LEFT IN SHARED MEMORY: {', '.join(sorted(left))}")
        _remove_leftovers(namespace)
    else:
        print(
            f"nothing left in shared memory: namespace {namespace} had "
            f"{len(before)} objects before and {len(left)} after"
        )
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"ok: all {len(runs)} run(s) summed to {expected}")
    return 0
