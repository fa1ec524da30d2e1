"""Every ```python block in the docs and the README runs, and leaks nothing.

Each page's blocks are joined in order and run as one script in a fresh
interpreter (examples fork, so they must not run inside pytest's process).
The autouse leak check then verifies the page left no segment, lock or child.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


ALL_PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# Pages without python examples have nothing to run; listing only the others
# keeps the run free of skips.
PAGES = [p for p in ALL_PAGES if blocks(p)]


def test_the_readme_and_docs_have_examples() -> None:
    assert ROOT / "README.md" in PAGES
    assert len(PAGES) >= 3


def test_block_extraction() -> None:
    text = "x\n```python\na = 1\n```\n```text\nnot code\n```\n```python title='t'\nb = 2\n```\n"
    page = ROOT / "build" / "extraction-probe.md"
    page.parent.mkdir(exist_ok=True)
    page.write_text(text)
    try:
        assert blocks(page) == ["a = 1\n", "b = 2\n"]
    finally:
        page.unlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    code = blocks(page)
    script = tmp_path / "page.py"
    script.write_text("\n".join(code))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"{page.name} examples failed:\n{done.stdout}\n{done.stderr}"
