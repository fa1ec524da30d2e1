"""Pools: ``ps.map`` against ``multiprocessing.Pool``, ``ProcessPoolExecutor``, joblib, mpire.

Every contender does the whole job in one op: start its workers (fork), map,
and stop and reap them, with 2 workers.

* ``procshare ps.map``: ``ps.map(fn, items, workers=2)``; the items are a list,
  so the workers index their inherited copy (nothing is sent but ranges).
* ``multiprocessing.Pool.map (fork)``: ``with ctx.Pool(2) as p: p.map(fn, items)``.
* ``ProcessPoolExecutor.map (fork)``: with ``chunksize`` as ``Pool.map`` picks it
  (len / (4 x workers)); without one it sends every item on its own.
* ``joblib`` with its ``multiprocessing`` backend (a fork pool per call).
  Its default, loky, cannot run side by side with the forking contenders in
  one process: once another contender has forked, loky's next worker start
  fails (its workers cannot reopen its semaphores, TerminatedWorkerError),
  and it keeps two threads running between calls. ``mpire``
  (``WorkerPool(start_method="fork")``): optional peers from the ``bench``
  extra, skipped with a note when absent.
* ``raw fork + pipe``: two ``os.fork`` children, each computes its half and
  writes one pickle of its results to a pipe: no chunking, no per-item
  results, no crash handling. The floor a pool could reach.

For the slow items, the ideal (items x 10 ms / workers) is a bound nobody
reaches: each ``time.sleep(0.01)`` takes a little longer (the kernel's timer
slack, 50 µs by default, and the wake-up), and every contender forks and
reaps its workers. ``items / workers run in-process`` measures the first
part (one worker's share of the items, run in the benchmark's process).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from typing import Any

import procshare as ps
from benchmarks.harness import Bench, Group

WORKERS = 2
TRIVIAL_ITEMS = 1000
SLOW_ITEMS = 100
SLOW_SECONDS = 0.010
ARRAY_ITEMS = 64
ARRAY_BYTES = 1 << 20
SHARE = "items / workers run in-process (measured)"


def _trivial(x: int) -> int:
    return x * x


def _slow(x: int) -> int:
    time.sleep(SLOW_SECONDS)
    return x


def _array(x: int) -> Any:
    import numpy as np

    return np.full(ARRAY_BYTES // 8, x, dtype=np.float64)


Mapper = Callable[[Callable[[Any], Any], list[Any]], list[Any]]


def _procshare(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return ps.map(fn, items, workers=WORKERS)


def _mp_pool(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(WORKERS) as pool:
        return pool.map(fn, items)


def _executor(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    ctx = multiprocessing.get_context("fork")
    chunk = max(1, len(items) // (4 * WORKERS))
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx) as pool:
        return list(pool.map(fn, items, chunksize=chunk))


def _joblib(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    import joblib

    calls = (joblib.delayed(fn)(x) for x in items)
    return list(joblib.Parallel(n_jobs=WORKERS, backend="multiprocessing")(calls))


def _mpire(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    from mpire.pool import WorkerPool

    with WorkerPool(n_jobs=WORKERS, start_method="fork") as pool:
        return list(pool.map(fn, items))


def _raw(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    half = (len(items) + 1) // 2
    parts = [(0, half), (half, len(items))]
    pipes = []
    for lo, hi in parts:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            data = pickle.dumps([fn(x) for x in items[lo:hi]], protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(w, "wb") as out:
                out.write(data)
            os._exit(0)
        os.close(w)
        pipes.append((pid, r))
    results: list[Any] = []
    for pid, r in pipes:
        with os.fdopen(r, "rb") as src:
            results += pickle.loads(src.read())
        os.waitpid(pid, 0)
    return results


def _timer(mapper: Mapper, fn: Callable[[Any], Any], items: list[Any]) -> Callable[[int], float]:
    def timed(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            mapper(fn, items)
        return time.perf_counter() - t0

    return timed


def _peers(g: Group, fn: Callable[[Any], Any], items: list[Any], *, all_peers: bool) -> None:
    g.add("procshare ps.map", _timer(_procshare, fn, items))
    g.add("multiprocessing.Pool.map (fork)", _timer(_mp_pool, fn, items))
    g.add("raw fork + pipe", _timer(_raw, fn, items))
    if not all_peers:
        return
    g.add("ProcessPoolExecutor.map (fork, chunked)", _timer(_executor, fn, items))
    for label, module, mapper in (("joblib", "joblib", _joblib), ("mpire", "mpire", _mpire)):
        try:
            __import__(module)
        except ImportError:
            g.skip(label, f"not installed (pip install '.[bench]' or pip install {module})")
        else:
            g.add(label, _timer(mapper, fn, items))


def run(bench: Bench) -> None:
    try:  # mpire draws with tqdm, whose monitor thread would outlive its pools
        import tqdm

        tqdm.tqdm.monitor_interval = 0
    except ImportError:
        pass
    trivial = list(range(TRIVIAL_ITEMS))
    g = bench.group(
        f"pool: {TRIVIAL_ITEMS:,} trivial items, {WORKERS} workers, pool start included",
        note=(
            "one op = start the workers, map x*x over a list, stop and reap them; "
            "joblib runs with its multiprocessing backend (loky breaks once others fork)"
        ),
        unit="per map",
    )
    _peers(g, _trivial, trivial, all_peers=True)
    g.measure(n=5)
    g.target(
        "procshare ps.map",
        "multiprocessing.Pool.map (fork)",
        max_ratio=1.0,
        text="ps.map no slower than multiprocessing.Pool.map for trivial items (issue 14)",
    )
    for peer in ("ProcessPoolExecutor.map (fork, chunked)", "joblib", "mpire"):
        if peer in g.contenders:
            g.target(
                "procshare ps.map",
                peer,
                max_ratio=1.0,
                text=f"ps.map faster than {peer} for trivial items (issue 14)",
            )
    g.report("procshare ps.map", "raw fork + pipe", text="ps.map against the raw floor")

    slow_items = list(range(SLOW_ITEMS))
    ideal = SLOW_ITEMS * SLOW_SECONDS / WORKERS
    s = bench.group(
        f"pool: {SLOW_ITEMS} items of {SLOW_SECONDS * 1000:g} ms (sleep), {WORKERS} workers",
        note=f"one op = a whole map; the ideal is items x {SLOW_SECONDS * 1000:g} ms / workers",
        unit="per map",
    )
    _peers(s, _slow, slow_items, all_peers=False)

    def ideal_timer(n: int) -> float:
        return ideal * n  # not measured: the bound itself

    s.add("ideal (items x time / workers)", ideal_timer)

    share = slow_items[: SLOW_ITEMS // WORKERS]

    def share_timer(n: int) -> float:
        # One worker's share of the items run here, with no process at all: what
        # the sleeps really take (each time.sleep(0.01) overshoots a little).
        t0 = time.perf_counter()
        for _ in range(n):
            for x in share:
                _slow(x)
        return time.perf_counter() - t0

    s.add(SHARE, share_timer)
    s.measure(n=1, repeat=5)
    s.target(
        "procshare ps.map",
        "ideal (items x time / workers)",
        max_ratio=1.05,
        text="ps.map within 5 % of the ideal for 100 items of 10 ms (issue 14)",
    )
    s.report(
        "procshare ps.map",
        SHARE,
        text="ps.map against its work run in-process (the ideal with the sleeps' real length)",
    )
    s.report("raw fork + pipe", SHARE, text="the raw floor against the same")
    s.report(
        "procshare ps.map",
        "multiprocessing.Pool.map (fork)",
        text="ps.map against Pool.map for slow items",
    )

    try:
        import numpy  # noqa: F401
    except ImportError:
        return
    a = bench.group(
        f"pool: {ARRAY_ITEMS} items returning a 1 MiB numpy array, {WORKERS} workers",
        note="one op = a whole map; each result is pickled and sent to the parent",
        unit="per map",
    )
    _peers(a, _array, list(range(ARRAY_ITEMS)), all_peers=False)
    a.measure(n=2, repeat=5)
    a.report(
        "procshare ps.map",
        "multiprocessing.Pool.map (fork)",
        text="ps.map against Pool.map moving 1 MiB results (time ratio; below 1 is faster)",
    )
