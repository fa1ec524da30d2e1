"""Front end for processes: ``@forked``, ``Child`` and the ``children()`` scope.

Built by issue 3. Until then every entry point says so instead of pretending.
"""

from __future__ import annotations

from typing import Any, NoReturn


def _todo(what: str) -> NoReturn:
    raise NotImplementedError(f"procshare: {what} is not built yet (issue 3)")


class Child:
    """Handle of one forked child."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _todo("Child")


class Children:
    """The scope returned by :func:`children`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _todo("children()")


def forked(*args: Any, **kwargs: Any) -> Any:
    """Decorate a function so that calling it forks a child and returns a :class:`Child`."""
    _todo("@forked")


def children(*args: Any, **kwargs: Any) -> Children:
    """A scope that owns, joins and cancels every child forked inside it."""
    _todo("children()")
