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


def test_the_api_page_turns_sphinx_roles_into_links_or_code() -> None:
    # mkdocstrings prints a docstring's `:class:`Child`` as it is; the Griffe
    # extension that mkdocs.yml loads rewrites every role of a public object.
    import griffe  # installed with mkdocstrings[python], a dev dependency

    import procshare

    assert "- docs/_hooks/sphinx_roles.py:SphinxRoles" in (ROOT / "mkdocs.yml").read_text()
    ext = griffe.load_extensions(f"{ROOT}/docs/_hooks/sphinx_roles.py:SphinxRoles")
    pkg = griffe.load("procshare", search_paths=[str(ROOT / "src")], extensions=ext)
    lock_doc = pkg["InterprocessLock"].docstring.value
    assert "[`acquire`][procshare.InterprocessLock.acquire]" in lock_doc
    assert "[`interprocess_lock`][procshare.interprocess_lock]" in lock_doc
    left = []
    for name in procshare.__all__:
        obj = pkg[name]
        members = [m for n, m in obj.members.items() if not n.startswith("_")]
        for each in [obj, *(members if obj.is_class else [])]:
            if each.docstring is not None and re.search(r":\w+:`", each.docstring.value):
                left.append(each.path)
    assert left == []


def test_the_pytest_plugin_howto_example_gives_the_outcome_it_shows(
    pytester: pytest.Pytester,
) -> None:
    page = (ROOT / "docs" / "howto" / "testing.md").read_text()
    files = re.findall(r'^```python title="([^"]+)"\n(.*?)^```', page, re.DOTALL | re.MULTILINE)
    assert [name for name, _ in files] == ["conftest.py", "test_counter.py"]
    for name, body in files:
        (pytester.path / name).write_text(body)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    # The leak line the page shows, but for the OS name, which varies.
    (shown,) = (line for line in page.splitlines() if " leaked: " in line)
    result.stdout.fnmatch_lines([re.sub(r"\(/ps\w+", "(/ps*", shown)])
