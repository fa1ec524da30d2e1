"""A Griffe extension: the docstrings' Sphinx roles become links on the API page.

procshare's docstrings cross-reference with Sphinx roles (``:class:`Child```,
``:meth:`acquire```, ``:class:`~procshare.OwnerDied```), which read well in
``help()`` and in an editor, but mkdocstrings prints them as they are. This
rewrites each role, when the docs are built, into mkdocs-autorefs syntax
(``[Child][procshare.Child]``) if its target is on the API page, that is a
name of ``procshare.__all__`` or a public member of one, and into plain
inline code otherwise (private helpers, the standard library), so a strict
build never meets a link to nowhere.

Loaded from mkdocs.yml (``extensions:`` of the mkdocstrings python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import procshare

ROLE = re.compile(r":(?:class|func|meth|attr|exc|data|obj|mod):`(~?)\.?([\w.]+)`")


def _public_paths() -> dict[str, str]:
    """Canonical path (``procshare._locks.InterprocessLock``) -> public path."""
    paths = {}
    for name in procshare.__all__:
        obj = getattr(procshare, name)
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if module and qualname:
            paths[f"{module}.{qualname}"] = f"procshare.{name}"
        paths[f"procshare.{name}"] = f"procshare.{name}"
    return paths


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self._public = _public_paths()

    def _member(self, public: str, member: str) -> str | None:
        """``public.member`` if that is a public attribute of a public object."""
        owner: Any = procshare
        for part in public.split(".")[1:]:
            owner = getattr(owner, part)
        if member.startswith("_") or not hasattr(owner, member):
            return None
        return f"{public}.{member}"

    def _target(self, text: str, obj: griffe.Object) -> str | None:
        head, _, rest = text.partition(".")
        if head == "procshare":
            head, _, rest = rest.partition(".")
        if head in procshare.__all__:
            public = f"procshare.{head}"
            return self._member(public, rest) if rest else public
        # A bare member name: of the class being documented, or of its class.
        for scope in (obj, obj.parent):
            if scope is not None and (public := self._public.get(scope.path)):
                return self._member(public, text) if "." not in text else None
        return None

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return

        def link(match: re.Match[str]) -> str:
            short, text = match.group(1), match.group(2)
            shown = text.rsplit(".", 1)[-1] if short else text
            target = self._target(text, obj)
            return f"[`{shown}`][{target}]" if target else f"`{shown}`"

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
