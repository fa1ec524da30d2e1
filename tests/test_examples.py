"""Every script in examples/ runs, checks its own answer, and leaves nothing behind.

Each runs in a fresh interpreter (they fork, and must not fork pytest); the
autouse leak check then verifies that the script left no segment, lock or
child. The scripts assert their own results and exit 1 on a wrong one, so
a zero exit status here means the work was done right, not merely that
nothing crashed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# What each example must print: proof that it reached its own check.
EXPECTED_OUTPUT = {
    "seed_sum.py": r"100 processes: sum 193107012120, expected 193107012120",
    "numpy_slices.py": r"4 workers, 2000000 points: pi ~ 3\.14159265",
    "attrs_stats.py": (
        r"20000 numbers in 12 chunks, at most [123] workers at once \(limit 3\): "
        r"mean steps 91\.732, sd 47\.866, longest 278 steps, from 17647"
    ),
}


def test_there_are_at_least_three_examples() -> None:
    assert {p.name for p in EXAMPLES} >= set(EXPECTED_OUTPUT)


def test_every_example_has_an_expected_output() -> None:
    assert {p.name for p in EXAMPLES} == set(EXPECTED_OUTPUT)


def run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_checks_its_result(script: Path, tmp_path: Path) -> None:
    done = run(script, cwd=tmp_path)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    assert re.search(EXPECTED_OUTPUT[script.name], done.stdout), done.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [1, 7, 23])
def test_seed_sum_example_takes_a_process_count(processes: int, tmp_path: Path) -> None:
    done = run(ROOT / "examples" / "seed_sum.py", str(processes), cwd=tmp_path)
    expected = sum(i * j - i + i**4 for i in range(processes) for j in range(1, 100))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"sum {expected}, expected {expected}" in done.stdout
