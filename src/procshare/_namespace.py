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

    >>> import procshare as ps
    >>> with ps.namespace("app"):
    ...     pass
    """
    with names.use_namespace(name) as ns:
        yield ns
