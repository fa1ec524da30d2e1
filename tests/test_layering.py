"""The three layers stay apart: only _backends/ touches the OS primitives.

Reads the source with ``ast``: a forbidden import or an ``os.fork`` call
anywhere outside ``src/procshare/_backends/`` fails the test, and so does a
front-end module importing a backend directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "procshare"
FORBIDDEN = {"ctypes", "fcntl", "posix_ipc", "mmap", "_posixshmem"}
FORBIDDEN_CALLS = {("os", "fork"), ("os", "forkpty")}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(SRC).as_posix() if path.is_relative_to(SRC) else path.name
    if rel.startswith("_backends/"):
        return []
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [node.module or ""]
            if node.module == "os":
                mods += [f"os.{a.name}" for a in node.names]
        else:
            mods = []
        for mod in mods:
            if mod.split(".")[0] in FORBIDDEN:
                found.append(f"{rel}:{node.lineno} imports {mod}")
            if mod in {f"os.{c}" for _, c in FORBIDDEN_CALLS}:
                found.append(f"{rel}:{node.lineno} imports {mod}")
            # The front end (top-level modules) may reach the OS only through the engine.
            if "/" not in rel and mod.startswith("procshare._backends"):
                found.append(f"{rel}:{node.lineno} (front end) imports {mod}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (node.value.id, node.attr)
            if pair in FORBIDDEN_CALLS:
                found.append(f"{rel}:{node.lineno} uses {pair[0]}.{pair[1]}")
    return found


def test_only_backends_touch_the_os() -> None:
    problems = [v for path in _modules() for v in violations(path)]
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import ctypes",
        "from fcntl import flock",
        "import posix_ipc as p",
        "import mmap",
        "pid = os.fork()",
        "from os import fork",
        "from procshare._backends.posix import PosixBackend",
    ],
)
def test_the_check_catches_each_kind_of_violation(snippet: str) -> None:
    assert violations(SRC / "_fake_front_end.py", snippet) != []


def test_backends_are_exempt() -> None:
    assert violations(SRC / "_backends" / "posix" / "x.py", "import ctypes\nos.fork()") == []
