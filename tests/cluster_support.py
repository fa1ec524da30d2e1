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
import gc
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import distributed  # the dev extra installs it: a missing one fails, it is not skipped

from procshare.testing import child_pids


def _end_resource_tracker(was_running: bool) -> None:
    """The nannies start their workers with multiprocessing's "spawn", which
    starts its resource tracker, a child process that would outlive the
    cluster (and fail every later test that checks this process has no
    children). Stop it, unless it ran before the cluster."""
    from multiprocessing import resource_tracker

    gc.collect()  # the nannies' queues unregister their semaphores when collected
    if not was_running:
        resource_tracker._resource_tracker._stop()


def _end_offload_thread() -> None:
    from distributed import utils

    old = utils._offload_executor
    old.shutdown(wait=True)
    utils._offload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="Dask-Offload")


@contextlib.contextmanager
def local_cluster(workers: int = 2, **config: Any) -> Iterator[Any]:
    """A client of a fresh ``LocalCluster``; ``config``: dask settings for it."""
    from multiprocessing import resource_tracker

    import dask

    threads_before = {t.ident for t in threading.enumerate()}
    children_before = set(child_pids())
    tracker_ran = resource_tracker._resource_tracker._fd is not None
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
    _end_resource_tracker(tracker_ran)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t.name for t in threading.enumerate() if t.ident not in threads_before]
        left += [f"process {pid}" for pid in set(child_pids()) - children_before]
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"the LocalCluster left threads or processes behind: {left}")
