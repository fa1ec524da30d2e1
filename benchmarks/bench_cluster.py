"""The cluster front end: ``ps.map`` inside ``ps.cluster()`` against ``client.map``.

Runs when ``distributed`` is installed (the ``dask`` and ``dev`` extras);
otherwise the group lists Dask as skipped, with how to install it.

* ``ps.map`` in ``with ps.cluster(client):``: one Dask task per item
  (``chunksize`` left out, as ``client.map`` makes them), gathered in order.
* ``client.map + gather``: the same function and items straight on Dask
  (``pure=False``, as procshare submits them). The overhead target: at most
  1.1x.
* The seed scenario (100 ``@ps.forked`` children adding under one lock into
  one shared u64) as Dask tasks: reported, not compared (on one host the
  same program is in the ``seed`` area).

Both run on a ``LocalCluster`` of 2 single-threaded worker processes started
once for the area, outside the measurement.
"""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

import procshare as ps
from benchmarks.harness import SMOKE, Bench

ITEMS = 20 if SMOKE else 500


def _trivial(x: int) -> int:
    return x * x


def _end_offload_thread() -> None:
    """Stop distributed's offload thread once the cluster is closed: the areas
    after this one fork, and procshare warns when a fork runs beside a thread."""
    from distributed import utils

    utils._offload_executor.shutdown(wait=True)
    utils._offload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="Dask-Offload")
    # And the resource tracker "spawn" started for the workers: a child process.
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def run(bench: Bench) -> None:
    g = bench.group(
        f"cluster: {ITEMS} trivial items on a LocalCluster of 2 worker processes",
        note=(
            "one op = a whole map of x*x, one Dask task per item, results gathered in "
            "order; the cluster is started once, outside the measurement"
        ),
        unit="per map",
    )
    if importlib.util.find_spec("distributed") is None:
        g.skip("ps.map in ps.cluster()", "distributed not installed: pip install '.[dask]'")
        g.skip("client.map + gather", "distributed not installed: pip install '.[dask]'")
        return
    from procshare import _demo, _runtime

    items = list(range(ITEMS))
    with _runtime.local_cluster(2) as client:

        def dask_map(n: int) -> float:
            started = time.perf_counter()
            for _ in range(n):
                futures = client.map(_trivial, items, pure=False)
                client.gather(futures)
            return time.perf_counter() - started

        def procshare_map(n: int) -> float:
            with ps.cluster(client):
                started = time.perf_counter()
                for _ in range(n):
                    ps.map(_trivial, items)
                return time.perf_counter() - started

        g.add("ps.map in ps.cluster()", procshare_map)
        g.add("client.map + gather", dask_map)
        g.measure(n=1, repeat=7)
        g.target(
            "ps.map in ps.cluster()",
            "client.map + gather",
            max_ratio=1.1,
            text="ps.map on a cluster within 1.1x of client.map (issue 17)",
        )

        s = bench.group(
            "cluster: the seed scenario (100 tasks adding under one lock) on a LocalCluster",
            note=(
                "one op = the unchanged seed program inside ps.cluster(): the shared u64 is a "
                "Dask Variable, the lock a Dask Lock, each child a task; compare the seed area"
            ),
            unit="per scenario",
        )

        def seed(n: int) -> float:
            with ps.cluster(client), ps.namespace():
                started = time.perf_counter()
                for _ in range(n):
                    total = _demo.scenario(100)
                    assert total == _demo.expected_sum(100), total
                return time.perf_counter() - started

        s.add("seed scenario in ps.cluster()", seed)
        s.measure(n=1, repeat=3)
    _end_offload_thread()
