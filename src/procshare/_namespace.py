"""Front end for namespaces: ``with ps.namespace("app"):``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from procshare._engine import names


@contextlib.contextmanager
def namespace(name: str) -> Iterator[str]:
    """Put every segment and lock opened by name inside the block into namespace ``name``.

    Namespaces keep applications apart: ``"sum"`` in namespace ``"app"`` and
    ``"sum"`` in namespace ``"other"`` are different segments. Without a
    ``namespace()`` block the namespace is ``$PROCSHARE_NAMESPACE``, or
    ``"default"``. Names of every namespace are also per user: two users never
    see each other's objects.

    The block's namespace is a context variable: it holds for the code the
    block runs, in this thread (and in children forked from it), not for
    threads the block starts, which begin in the default namespace like any
    new thread. Start them with ``contextvars.copy_context().run``, or open
    a ``namespace()`` block in the thread itself.

    >>> import procshare as ps
    >>> with ps.namespace("app"):
    ...     pass
    """
    with names.use_namespace(name) as ns:
        yield ns
