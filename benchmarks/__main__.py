"""Run the benchmarks: ``python -m benchmarks [--smoke] [--only AREA] [--report PATH]``.

Each ``benchmarks/bench_<area>.py`` defines ``run(bench)``. A full run prints
every table and writes the Markdown report (``docs/benchmarks.md`` by
default); ``--smoke`` runs everything with tiny sizes and writes nothing, so
the test suite can prove the benchmarks still work without timing anything.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


#: Areas run after all the others: the cluster area imports distributed and
#: starts a LocalCluster, and the memory and threads it leaves in this process
#: made every later fork ~4x slower (page tables to copy: a raw fork + join
#: measured 2.2 ms alone, 8.2 ms after it), which flattened the fork-heavy
#: groups' ratios (the overhead compared is a smaller share of a slower fork).
RUN_LAST = ("cluster",)


def discover() -> list[str]:
    """The areas, in the order a full run takes them (alphabetical, RUN_LAST last)."""
    areas = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    )
    return [a for a in areas if a not in RUN_LAST] + [a for a in areas if a in RUN_LAST]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no report written")
    parser.add_argument("--only", action="append", default=[], help="run only this area")
    parser.add_argument("--report", default=str(HERE.parent / "docs" / "benchmarks.md"))
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
        module = importlib.import_module(f"benchmarks.bench_{area}")
        bench = Bench(area=area)
        print(f"== {area}", flush=True)
        module.run(bench)
        for group in bench.groups:
            print(report.group_text(group), flush=True)
        benches.append(bench)
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
