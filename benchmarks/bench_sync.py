"""The coordination families against their peers (issue 15).

* Queue throughput, one producer process to one consumer process, 64-byte
  ``bytes`` items: ``ps.interprocess_queue`` against ``multiprocessing.Queue``
  and ``faster_fifo.Queue`` (a shared ring buffer with a condition variable;
  an optional peer, installed by the ``bench`` extra). One op = one item
  through; the clock runs from the first put until the consumer has taken
  the last item.
* The same with 1 MiB numpy arrays (reported, no target).
* Event wake-up latency: two processes ping-pong through two events (one
  op = one ``set()`` waking a waiter in the other process), against
  ``multiprocessing.Event`` and a pair of ``posix_ipc`` semaphores.
* Uncontended ``with`` on a semaphore, on an rwlock's read and write sides,
  against ``multiprocessing``'s semaphore, ``posix_ipc``'s semaphore and
  procshare's own lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import time
from collections.abc import Callable
from typing import Any

import procshare as ps
from benchmarks.harness import Bench, Timer

_ITEM = b"x" * 64


def _in_child(work: Callable[[], None]) -> int:
    """Fork a child that runs ``work`` and leaves through ``os._exit``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - benchmark worker
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if status:
        raise RuntimeError(f"benchmark worker {pid} failed ({status})")


def _pipeline(
    make: Callable[[], Any], put: Callable[[Any, Any], None], get: Callable[[Any], Any], item: Any
) -> Timer:
    """n items from this process to a forked consumer through the queue ``make()``."""

    def timer(n: int) -> float:
        q = make()
        go_r, go_w = os.pipe()

        def consume() -> None:
            os.close(go_w)
            select.select([go_r], [], [])
            for _ in range(n):
                get(q)

        pid = _in_child(consume)
        os.close(go_r)
        t0 = time.perf_counter()
        os.close(go_w)
        for _ in range(n):
            put(q, item)
        _reap(pid)
        elapsed = time.perf_counter() - t0
        close = getattr(q, "close", None)
        if callable(close):
            close()
        return elapsed

    return timer


def _procshare_queue(capacity: int) -> Callable[[], Any]:
    def make() -> Any:
        return ps.interprocess_queue("bench-q", maxsize=1000, capacity=capacity)

    return make


def _mp_queue() -> Any:
    return multiprocessing.Queue(1000)


def _faster_fifo(capacity: int) -> Callable[[], Any]:
    def make() -> Any:
        import faster_fifo  # type: ignore[import-not-found,unused-ignore]

        return faster_fifo.Queue(max_size_bytes=capacity)

    return make


def _put(q: Any, item: Any) -> None:
    q.put(item)


def _get(q: Any) -> Any:
    return q.get()


def _queues(bench: Bench) -> None:
    try:
        import faster_fifo  # type: ignore[import-not-found,unused-ignore] # noqa: F401

        have_ff = True
    except ImportError:
        have_ff = False
    g = bench.group(
        "queue: 64-byte items, one producer process to one consumer process",
        note="one op = one item through (put in one process, get in the other)",
        unit="per item",
    )
    g.add("procshare interprocess_queue", _pipeline(_procshare_queue(1 << 20), _put, _get, _ITEM))
    g.add("multiprocessing.Queue", _pipeline(_mp_queue, _put, _get, _ITEM))
    if have_ff:
        g.add("faster_fifo.Queue", _pipeline(_faster_fifo(1 << 20), _put, _get, _ITEM))
    else:
        g.skip("faster_fifo.Queue", "faster-fifo is not installed (pip install '.[bench]')")
    g.measure(n=50_000, repeat=5)
    g.target(
        "procshare interprocess_queue",
        "multiprocessing.Queue",
        max_ratio=0.5,
        text="at least 2x multiprocessing.Queue's throughput (issue 15)",
    )
    if have_ff:
        g.target(
            "procshare interprocess_queue",
            "faster_fifo.Queue",
            max_ratio=1.0,
            text="faster than faster_fifo (issue 15)",
        )

    import numpy

    array = numpy.ones(1 << 17)  # 1 MiB of float64
    big = bench.group(
        "queue: 1 MiB numpy arrays, one producer process to one consumer process",
        note="one op = one array through; procshare copies it into and out of shared "
        "memory once each, out of band of the pickle",
        unit="per item",
    )
    big.add(
        "procshare interprocess_queue", _pipeline(_procshare_queue(8 << 20), _put, _get, array)
    )
    big.add("multiprocessing.Queue", _pipeline(_mp_queue, _put, _get, array))
    if have_ff:
        big.add("faster_fifo.Queue", _pipeline(_faster_fifo(8 << 20), _put, _get, array))
    else:
        big.skip("faster_fifo.Queue", "faster-fifo is not installed")
    big.measure(n=300, repeat=5)
    big.report("procshare interprocess_queue", "multiprocessing.Queue", text="1 MiB items")
    if have_ff:
        big.report("procshare interprocess_queue", "faster_fifo.Queue", text="1 MiB items")


# -- event wake-up ---------------------------------------------------------------


def _ping_pong(
    make: Callable[[], tuple[Any, Any]],
    signal_: Callable[[Any], None],
    wait: Callable[[Any], None],
    done: Callable[[Any, Any], None],
) -> Timer:
    """Two processes wake each other in turn through ``ping`` and ``pong``; one
    op = one wake-up of the other process."""

    def timer(n: int) -> float:
        ping, pong = make()
        rounds = max(1, n // 2)

        def echo() -> None:
            for _ in range(rounds):
                wait(ping)
                signal_(pong)

        pid = _in_child(echo)
        t0 = time.perf_counter()
        for _ in range(rounds):
            signal_(ping)
            wait(pong)
        elapsed = time.perf_counter() - t0
        _reap(pid)
        done(ping, pong)
        return elapsed * n / (2 * rounds)

    return timer


def _ps_events() -> tuple[Any, Any]:
    return ps.interprocess_event("bench-ping"), ps.interprocess_event("bench-pong")


def _event_wait(ev: Any) -> None:
    ev.wait()
    ev.clear()


def _event_set(ev: Any) -> None:
    ev.set()


def _close_both(a: Any, b: Any) -> None:
    for x in (a, b):
        close = getattr(x, "close", None)
        if callable(close):
            close()


def _mp_events() -> tuple[Any, Any]:
    return multiprocessing.Event(), multiprocessing.Event()


def _posix_sems() -> tuple[Any, Any]:
    import posix_ipc

    return (
        posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=0),
        posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=0),
    )


def _sem_release(sem: Any) -> None:
    sem.release()


def _sem_acquire(sem: Any) -> None:
    sem.acquire()


def _posix_done(a: Any, b: Any) -> None:
    import posix_ipc

    for sem in (a, b):
        with contextlib.suppress(posix_ipc.ExistentialError):  # (unlinked by someone else)
            sem.unlink()
        sem.close()


def _wakeups(bench: Bench) -> None:
    g = bench.group(
        "event: set() in one process wakes a waiter in another",
        note="two processes ping-pong; one op = one wake-up (set, the other process "
        "returns from wait and clears)",
        unit="per wake-up",
    )
    g.add(
        "procshare interprocess_event",
        _ping_pong(_ps_events, _event_set, _event_wait, _close_both),
    )
    g.add("multiprocessing.Event", _ping_pong(_mp_events, _event_set, _event_wait, _close_both))
    g.add(
        "posix_ipc.Semaphore pair",
        _ping_pong(_posix_sems, _sem_release, _sem_acquire, _posix_done),
    )
    g.measure(n=20_000, repeat=5)
    g.report("procshare interprocess_event", "multiprocessing.Event", text="event wake-up")
    g.report("procshare interprocess_event", "posix_ipc.Semaphore pair", text="event wake-up")


# -- uncontended with ------------------------------------------------------------


def _with_loop(make: Callable[[], Any], side: Callable[[Any], Any] = lambda x: x) -> Timer:
    def timer(n: int) -> float:
        obj = make()
        cm = side(obj)
        t0 = time.perf_counter()
        for _ in range(n):
            with cm:
                pass
        elapsed = time.perf_counter() - t0
        close = getattr(obj, "close", None)
        if callable(close):
            close()
        return elapsed

    return timer


def _posix_sem_pair(n: int) -> float:
    import posix_ipc

    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=3)
    try:
        acquire, release = sem.acquire, sem.release
        t0 = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        return time.perf_counter() - t0
    finally:
        with contextlib.suppress(posix_ipc.ExistentialError):
            sem.unlink()
        sem.close()


_mp_sem = multiprocessing.Semaphore(3)
_mp_lock = multiprocessing.Lock()


def _uncontended(bench: Bench) -> None:
    g = bench.group(
        "semaphore and rwlock: uncontended `with` block",
        note="one process; one op = enter + leave an empty `with` (acquire + release "
        "for posix_ipc)",
    )
    g.add("procshare semaphore", _with_loop(lambda: ps.interprocess_semaphore("bench-s", 3)))
    g.add("multiprocessing.Semaphore", _with_loop(lambda: _mp_sem))
    g.add("posix_ipc.Semaphore", _posix_sem_pair)
    g.add(
        "procshare rwlock read",
        _with_loop(lambda: ps.interprocess_rwlock("bench-rw"), lambda rw: rw.read),
    )
    g.add(
        "procshare rwlock write",
        _with_loop(lambda: ps.interprocess_rwlock("bench-rw"), lambda rw: rw.write),
    )
    g.add("procshare lock", _with_loop(lambda: ps.interprocess_lock("bench-l")))
    g.add("multiprocessing.Lock", _with_loop(lambda: _mp_lock))
    g.measure(n=200_000)
    g.target(
        "procshare rwlock read",
        "procshare lock",
        max_ratio=2.0,
        text="uncontended read no slower than 2x procshare's lock (issue 15)",
    )
    g.report("procshare semaphore", "multiprocessing.Semaphore", text="semaphore `with`")
    g.report("procshare semaphore", "posix_ipc.Semaphore", text="semaphore pair")
    g.report("procshare rwlock write", "multiprocessing.Lock", text="rwlock write `with`")


def run(bench: Bench) -> None:
    with ps.namespace(f"bench-sync-{os.getpid()}"):
        _queues(bench)
        _wakeups(bench)
        _uncontended(bench)
