"""The fast path of ``@ps.forked`` start and ``Child.join()``, when the backend has one.

Each object Python touches between one fork and the next is a copy-on-write
page fault in the parent (CPython 3.11 writes an object's reference count
whenever it so much as uses it): the Python start and join wrote ~115 more
pages per fork than a raw ``os.fork`` loop. The POSIX backend therefore
offers two C base classes: ``Launcher``, whose call forks in C (and whose
child calls the function and, in the common end, exits in C), and
``Handle``, whose ``join()`` waits, reads a result of up to 64 KiB, reaps
and finishes the record in C. They take the common case only (no
``ps.cluster()`` block, no ``ps.children()`` scope with a ``limit`` or
cancelling, no ``timeout=``, no pending housekeeping, one thread; a join
without a timeout) and call the Python code for the rest: ``_Forked._call``
and ``Child._join`` (the reference, which the front end keeps),
``ChildrenPart._check_held`` and ``Child._joined`` after a C reap of a child
that sent something or failed, ``transport.child_end`` in a child that
returned a value, raised, or opened or took something.

The C code reads and writes the engine's objects in place (the slots of
:class:`~procshare._engine.transport.Record`, :class:`~procshare._engine.core.Engine`
and :class:`~procshare._engine.children.ChildrenPart`, and the module globals
the Python path reads): :func:`accelerate` hands it where they are.

A backend without a fast path gets the Python classes below as bases: every
call then takes the Python path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procshare._backends import get_backend
from procshare._engine import _cengine, children, core, transport
from procshare._engine import locks as _locks

if TYPE_CHECKING:
    from procshare._engine.children import ChildrenPart
    from procshare._engine.transport import Record

__all__ = ["HandleBase", "LauncherBase", "accelerate"]


class PyLauncher:
    """The launcher without a fast path: a call is ``self._call(*args, **kwargs)``."""

    _fn: Callable[..., Any]
    _name: str
    _timeout: float | None
    _daemon: bool

    if not TYPE_CHECKING:  # (the front end types __call__ itself)

        def __call__(self, *args, **kwargs):
            return self._call(*args, **kwargs)


class PyHandle:
    """The handle base without a fast path: ``join`` is ``self._join(timeout)``,
    and a handle dropped unjoined marks its record dropped."""

    __slots__ = ("__weakref__", "_part", "_rec")

    _part: ChildrenPart
    _rec: Record

    if not TYPE_CHECKING:  # (the front end types join itself)

        def join(self, timeout=None):
            return self._join(timeout)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._part.drop(self._rec)


def _bases() -> tuple[type, type]:
    try:
        bases = getattr(get_backend(), "process_fast_bases", None)
    except (ImportError, RuntimeError):
        bases = None
    return bases if bases is not None else (PyLauncher, PyHandle)


if TYPE_CHECKING:
    LauncherBase = PyLauncher
    HandleBase = PyHandle
else:
    LauncherBase, HandleBase = _bases()


_cengine.end_setup(vars(core))


def accelerate(handle: type, poll_if_asked: Callable[[], None], runtime: dict[str, Any]) -> None:
    """Tell the backend's C start and join where everything is (once, by the
    front end, after it has defined ``Child``): ``handle`` is the handle
    class the C start makes, ``poll_if_asked`` what a join runs after its
    wait, ``runtime`` the globals of :mod:`procshare._runtime`."""
    setup: Callable[[dict[str, Any]], None] | None
    try:
        backend: object = get_backend()
    except (ImportError, RuntimeError):
        return
    setup = getattr(backend, "process_fast_setup", None)
    if setup is None or LauncherBase is PyLauncher:
        return
    setup(
        {
            "core": vars(core),
            "children": vars(children),
            "runtime": runtime,
            "Record": transport.Record,
            "Engine": core.Engine,
            "ChildrenPart": children.ChildrenPart,
            "ScopeState": children.ScopeState,
            "Child": handle,
            "main": transport.child_main,
            "end": transport.child_end,
            "transport": vars(transport),  # the cancel's flags (_armed, _pending, _raised)
            # Whether a thread of the child may hold a lock: no, and the C end
            # needs no look at the locks (held_here would name none).
            "holding": getattr(backend, "lock_holding", None) or (lambda: True),
            # The end of the child's engine when it is simple (the C shutdown of
            # _cengine_end.h: True, or False having done nothing), and the report
            # of a close that failed there.
            "end_fast": _cengine.end_child,
            "end_failed": transport.child_end_failed,
            "held": _locks.held_here,
            "handlers": tuple(children.CHILD_HANDLERS.items()),
            "poll_if_asked": poll_if_asked,
        }
    )
