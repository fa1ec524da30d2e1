"""Starting and joining one no-op child: procshare against the bare kernel and the peers.

One operation is: fork a child that does nothing, wait for it, collect its
result (where the contender has one). Everything is measured from the same
process, interleaved, so the cost of copying this process's page tables at
fork time (the bulk of it) is the same for all.

* ``raw os.fork``: ``os.fork()``; the child calls ``os._exit(0)`` at once; the
  parent ``os.waitpid``. No result, no error reporting, no orphan protection.
* ``procshare @forked``: ``noop().join()``: result pipe, pickled return value,
  ``PR_SET_PDEATHSIG``, pidfd wait, the child's stdio flush and engine
  shutdown.
* ``multiprocessing.Process (fork)``: ``start()`` + ``join()``.
* ``ProcessPoolExecutor round trip``: ``submit(noop).result()`` on a warm pool
  (its workers are already forked): context for what reusing processes costs.

The single-child group runs many short rounds (50 children each) rather than
a few long ones: on a shared machine the load changes within seconds, and a
change that lands on one contender's long round moved the ratio by 20-40 %;
with short interleaved rounds it hits few of the rounds the median is taken
over.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time

import procshare as ps
from benchmarks.harness import Bench


def _noop() -> None:
    return None


@ps.forked
def _ps_noop() -> None:
    return None


def procshare_forked(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        _ps_noop().join()
    return time.perf_counter() - t0


def raw_fork(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    return time.perf_counter() - t0


def multiprocessing_process(n: int) -> float:
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    for _ in range(n):
        p = ctx.Process(target=_noop)
        p.start()
        p.join()
    return time.perf_counter() - t0


def pool_round_trip(n: int) -> float:
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        pool.submit(_noop).result()  # warm: the worker exists before timing starts
        t0 = time.perf_counter()
        for _ in range(n):
            pool.submit(_noop).result()
        return time.perf_counter() - t0


FAN_OUT = 50


def procshare_scope(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with ps.children():
            for _ in range(FAN_OUT):
                _ps_noop()
    return time.perf_counter() - t0


def raw_fan_out(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pids = []
        for _ in range(FAN_OUT):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
    return time.perf_counter() - t0


def multiprocessing_fan_out(n: int) -> float:
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    for _ in range(n):
        procs = [ctx.Process(target=_noop) for _ in range(FAN_OUT)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    return time.perf_counter() - t0


def run(bench: Bench) -> None:
    g = bench.group(
        "fork: start + join of a no-op child",
        note=(
            "one op = fork a child that returns at once, wait for it and collect its result; "
            "the pool contender reuses a warm worker instead of forking"
        ),
        unit="per child",
    )
    g.add("procshare @forked", procshare_forked)
    g.add("raw os.fork", raw_fork)
    g.add("multiprocessing.Process (fork)", multiprocessing_process)
    g.add("ProcessPoolExecutor round trip (warm)", pool_round_trip)
    g.measure(n=50, repeat=31)
    g.target(
        "procshare @forked",
        "raw os.fork",
        max_ratio=1.1,
        text="@forked start + join within 1.1x of raw os.fork + os._exit + os.waitpid "
        "(issues 3, 16)",
    )
    g.target(
        "procshare @forked",
        "multiprocessing.Process (fork)",
        max_ratio=1.0,
        text="@forked start + join faster than multiprocessing.Process with fork (issue 3)",
    )

    fan = bench.group(
        f"fork: {FAN_OUT} no-op children started together, then all joined",
        note=(
            "one op = fork every child, then wait for all; procshare does it with "
            "`with ps.children():` (results collected, failures grouped)"
        ),
        unit="per batch",
    )
    fan.add("procshare children()", procshare_scope)
    fan.add("raw os.fork", raw_fan_out)
    fan.add("multiprocessing.Process (fork)", multiprocessing_fan_out)
    fan.measure(n=5)
