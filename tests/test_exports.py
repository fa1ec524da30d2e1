"""procshare.__all__ is exactly the surface documented in docs/api.md."""

from __future__ import annotations

import re
from pathlib import Path

import procshare as ps

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def documented() -> list[str]:
    return re.findall(r"^::: procshare\.(\w+)\s*$", API.read_text(), flags=re.MULTILINE)


def test_all_matches_the_api_reference() -> None:
    names = documented()
    assert len(names) == len(set(names)), "a name is documented twice"
    assert set(ps.__all__) == set(names)


def test_all_is_sorted_and_resolves() -> None:
    assert list(ps.__all__) == sorted(ps.__all__)
    for name in ps.__all__:
        assert getattr(ps, name) is not None


def test_nothing_public_is_left_out_of_all() -> None:
    public = {n for n in vars(ps) if not n.startswith("_")}
    # Submodules are importable but not part of the surface.
    modules = {"errors", "testing", "annotations"}
    assert public - modules - set(ps.__all__) == set()


def test_every_public_name_has_a_docstring() -> None:
    missing = [n for n in ps.__all__ if not (getattr(ps, n).__doc__ or "").strip()]
    assert missing == []
