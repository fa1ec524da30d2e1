"""Views are typed (SPEC 3): ``mypy --strict`` knows what ``ps.shared`` gives.

Two user programs in tests/typing/, type-checked by one run of the venv's
mypy with the project's configuration (strict, ``src`` on the path):

* ``views_pass.py`` must produce no error at all: its ``assert_type`` calls
  pin the view type of every kind family (fixed-width kinds, builtins,
  structs, numpy, bytes, ctypes), named and nameless, in ``with`` blocks and
  as handles. It is then run, so the types it claims are the run-time ones.
* ``views_fail.py`` holds mistakes; each line marked ``# E: code`` must be
  reported with that code, and no other line may be.
* the shared-data tutorial's examples, joined as tests/test_docs.py runs
  them, must pass too: the docs show typed code.

Without the overloads of ``ps.shared`` every view is ``Any``: the passing
program's ``assert_type`` calls fail and the failing program's mistakes go
unreported, so both tests fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).resolve().parent / "typing"
PASS = PROGRAMS / "views_pass.py"
FAIL = PROGRAMS / "views_fail.py"
TUTORIAL = ROOT / "docs" / "tutorial" / "shared.md"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
ERROR = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<text>.*?)\s+\[(?P<code>[a-z-]+)\]$"
)
MARK = re.compile(r"#\s*E:\s*(?P<codes>[a-z|-]+)\s*$")

Reports = dict[tuple[str, int], list[tuple[str, str]]]


def parse(output: str) -> Reports:
    """mypy's errors by (file name, line): [(code, text)]."""
    found: Reports = defaultdict(list)
    for line in output.splitlines():
        match = ERROR.match(line)
        if match:
            key = (Path(match["path"]).name, int(match["line"]))
            found[key].append((match["code"], match["text"]))
    return found


def marked(path: Path) -> dict[int, set[str]]:
    """Line number -> the error codes its ``# E:`` marker accepts."""
    return {
        number: set(match["codes"].split("|"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (match := MARK.search(line))
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Reports:
    cache = tmp_path_factory.mktemp("mypy-cache")
    tutorial = tmp_path_factory.mktemp("tutorial") / "shared_tutorial.py"
    tutorial.write_text("\n".join(BLOCK.findall(TUTORIAL.read_text())))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),  # strict, and mypy_path = src
            "--strict",
            "--cache-dir",
            str(cache),
            "--no-pretty",
            "--show-error-codes",
            "--hide-error-context",
            str(PASS),
            str(FAIL),
            str(tutorial),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    # 0: no error, 1: errors found (expected: the failing program); else mypy broke.
    assert done.returncode in (0, 1), f"mypy failed to run:\n{done.stdout}\n{done.stderr}"
    found = parse(done.stdout)
    assert found, f"mypy reported nothing, not even views_fail.py:\n{done.stdout}"
    return found


@pytest.mark.timeout(420)
def test_the_typed_program_passes_mypy_strict(reports: Reports) -> None:
    errors = {key: value for key, value in reports.items() if key[0] == PASS.name}
    assert errors == {}


@pytest.mark.timeout(420)
def test_the_shared_data_tutorial_passes_mypy_strict(reports: Reports) -> None:
    errors = {key: value for key, value in reports.items() if key[0] == "shared_tutorial.py"}
    assert errors == {}


@pytest.mark.timeout(420)
def test_each_marked_mistake_is_reported_and_nothing_else(reports: Reports) -> None:
    expected = marked(FAIL)
    assert len(expected) >= 20  # the markers were read
    got = {line: value for (name, line), value in reports.items() if name == FAIL.name}
    missing = {
        line: (codes, got.get(line))
        for line, codes in expected.items()
        if not any(code in codes for code, _ in got.get(line, []))
    }
    unexpected = {line: value for line, value in got.items() if line not in expected}
    assert missing == {}, "marked lines mypy did not report (with that code)"
    assert unexpected == {}, "lines mypy reported that carry no # E: marker"


@pytest.mark.timeout(120)
def test_the_typed_program_runs_as_it_is_typed() -> None:
    # In a fresh interpreter (it opens segments in a private namespace of its
    # own), so the types it asserts statically are checked against what the
    # program really gets (isinstance, values).
    done = subprocess.run(
        [sys.executable, str(PASS)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


def test_the_marker_and_report_parsers() -> None:
    out = (
        "tests/typing/x.py:3: error: Bad thing  [attr-defined]\n"
        "tests/typing/x.py:3: note: a note\n"
        "tests/typing/x.py:9: error: No overload  [call-overload]\n"
        "Found 2 errors in 1 file\n"
    )
    assert parse(out) == {
        ("x.py", 3): [("attr-defined", "Bad thing")],
        ("x.py", 9): [("call-overload", "No overload")],
    }
    assert MARK.search("x.valeu = 3  # E: attr-defined")["codes"] == "attr-defined"  # type: ignore[index]
    assert MARK.search("f()  # E: call-overload|arg-type") is not None
    assert MARK.search("f()  # a comment") is None
