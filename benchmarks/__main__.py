"""Run the benchmarks: ``python -m benchmarks [--smoke] [--only AREA] [--report PATH]``.

Each ``benchmarks/bench_<area>.py`` defines ``run(bench)``. A full run prints
every table and writes the Markdown report (``docs/benchmarks.md`` by
default); ``--smoke`` runs everything with tiny sizes and writes nothing, so
the test suite can prove the benchmarks still work without timing anything.
A run of several areas runs each in a fresh process of its own (see
``run_isolated``), so no area measures in memory another one left behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    )


def run_isolated(area: str, smoke: bool) -> Any:
    """Run one area in a fresh process and return its Bench.

    Each area of a run of several gets a process of its own, as a user's
    program has: what one area leaves in memory changed the next one's
    numbers. After the pool area (1 MiB results) this process held ~230 MB,
    and after the cluster area a LocalCluster's memory and threads; every
    later fork copied their page tables, a raw fork + join went from ~2 ms
    to 6-8 ms, and the fork-heavy groups' ratios flattened (the overhead
    compared became a smaller share of a slower fork).
    """
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "bench.pickle"
        command = [sys.executable, "-m", "benchmarks", "--only", area, "--dump", str(dump)]
        done = subprocess.run([*command, *(["--smoke"] if smoke else [])], check=False)
        if done.returncode != 0:
            raise SystemExit(f"benchmarks: area {area!r} failed (exit status {done.returncode})")
        with dump.open("rb") as f:
            return pickle.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no report written")
    parser.add_argument("--only", action="append", default=[], help="run only this area")
    parser.add_argument("--report", default=str(HERE.parent / "docs" / "benchmarks.md"))
    # (internal: where a run of one area pickles its results for the run that started it)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["PROCSHARE_BENCH_SMOKE"] = "1"
    # Imported after the environment is set: the harness reads SMOKE at import.
    from benchmarks import report
    from benchmarks.harness import Bench

    areas = args.only or discover()
    unknown = sorted(set(areas) - set(discover()))
    if unknown:
        parser.error(f"unknown area(s) {unknown}; available: {discover()}")
    benches = []
    started = time.perf_counter()
    for area in areas:
        if len(areas) > 1:
            benches.append(run_isolated(area, args.smoke))
            continue
        module = importlib.import_module(f"benchmarks.bench_{area}")
        bench = Bench(area=area)
        print(f"== {area}", flush=True)
        module.run(bench)
        for group in bench.groups:
            print(report.group_text(group), flush=True)
            group.contenders.clear()  # (the timed functions: done with, and not picklable)
        benches.append(bench)
        if args.dump:
            with Path(args.dump).open("wb") as f:
                pickle.dump(bench, f)
    elapsed = time.perf_counter() - started
    if not args.smoke and not args.only:
        report_path = Path(args.report)
        plots = report.plot_series(benches, report_path.parent / "img")
        text = report.markdown(benches, machine=machine(), elapsed=elapsed, plots=plots)
        Path(args.report).write_text(text)
        print(f"report written to {args.report}")
    return 0


def machine() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("procshare", "posix-ipc", "numpy", "fasteners", "filelock"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        **versions,
    }


if __name__ == "__main__":
    raise SystemExit(main())
