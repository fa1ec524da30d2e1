"""Front end for namespaces: ``with ps.namespace("app"):`` and ``with ps.namespace():``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from procshare._engine import anonymous as _anonymous
from procshare._engine import names


@contextlib.contextmanager
def namespace(name: str | None = None) -> Iterator[str]:
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

    Without ``name``, the block gets a fresh *private* namespace of its own
    (``run-<pid>-<random>``, what ``with`` gives): an unchanged program that
    opens objects by name can run twice at once without the runs meeting.
    It is also set as ``PROCSHARE_NAMESPACE`` for the block, so ``subprocess``
    children started inside see it (and so do this process's other threads),
    and when the block ends every object left in it is removed by name, as
    ``ps.unlink`` would (whoever still holds one keeps its memory).

    >>> import procshare as ps
    >>> with ps.namespace("app"):
    ...     pass
    >>> with ps.namespace() as private:
    ...     assert private.startswith("run-")
    """
    if name is not None:
        with names.use_namespace(name) as ns:
            yield ns
        return
    private = _anonymous.fresh_namespace()
    owner = os.getpid()
    saved = os.environ.get(_ENV)
    os.environ[_ENV] = private
    try:
        with names.use_namespace(private) as ns:
            yield ns
    finally:
        # Put the variable back unless something else changed it meanwhile.
        if os.environ.get(_ENV) == private:
            if saved is None:
                del os.environ[_ENV]
            else:
                os.environ[_ENV] = saved
        # Only the process that opened the block empties the namespace: a child
        # forked inside it (by hand, with os.fork) that leaves the block too
        # must not remove what the run still uses.
        if os.getpid() == owner:
            _anonymous.remove_namespace(private)


_ENV = "PROCSHARE_NAMESPACE"
