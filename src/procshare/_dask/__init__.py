"""The cluster runtime: procshare's front end on Dask distributed (SPEC 8).

The only package of procshare that imports ``distributed``; the front end
reaches it through :mod:`procshare._runtime` while a ``with ps.cluster():``
block is open. Its parts:

* ``runtime.py``: :class:`~procshare._dask.runtime.DaskRuntime`, the
  ``_runtime.Runtime`` of a block, in the client and in each task;
* ``tasks.py``: ``@ps.forked`` calls as tasks, their handles, the
  ``ps.children()`` scope, and how a task's end becomes procshare's error;
* ``pool.py``: ``ps.map`` / ``ps.imap`` / ``ps.pool`` on ``client.submit``;
* ``sync.py``: locks, semaphores, events and queues on Dask's named ones;
* ``shared.py``: ``ps.shared`` views kept in a Dask ``Variable``.
"""

from __future__ import annotations

import distributed  # noqa: F401 - a missing extra fails here, where ps.cluster() reports it

from procshare._dask.runtime import DaskRuntime, cluster, local_cluster

__all__ = ["DaskRuntime", "cluster", "local_cluster"]
