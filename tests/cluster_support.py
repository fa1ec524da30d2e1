"""A LocalCluster for the cluster tests, started and stopped without leftovers.

``LocalCluster(n_workers=2, processes=True, threads_per_worker=1)`` runs its
scheduler and nannies in this process's "IO loop" thread and its workers as
spawned child processes. Closing it joins all of them; what is left is
distributed's offload thread (``Dask-Offload``, started lazily by the first
client), which would make every later ``@ps.forked`` test of this pytest
process fork with a thread running (procshare warns about that). ``stopped``
ends it and puts a fresh, not yet started executor in its place.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import distributed  # the dev extra installs it: a missing one fails, it is not skipped


def _end_offload_thread() -> None:
    from distributed import utils

    old = utils._offload_executor
    old.shutdown(wait=True)
    utils._offload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="Dask-Offload")


@contextlib.contextmanager
def local_cluster(workers: int = 2, **config: Any) -> Iterator[Any]:
    """A client of a fresh ``LocalCluster``; ``config``: dask settings for it."""
    import dask

    threads_before = {t.ident for t in threading.enumerate()}
    with (
        dask.config.set(config),
        distributed.LocalCluster(
            n_workers=workers,
            processes=True,
            threads_per_worker=1,
            dashboard_address=":0",  # any free port: never "8787 is in use"
        ) as lc,
        distributed.Client(lc, set_as_default=False) as client,
    ):
        yield client
    _end_offload_thread()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t.ident not in threads_before]
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left by the LocalCluster: {[t.name for t in left]}")
