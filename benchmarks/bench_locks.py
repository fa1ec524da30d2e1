"""Locks: one uncontended `with` block, and contended throughput, against the peers.

Uncontended (one process, nobody else wants the lock), one op = enter and
leave a ``with`` block, or an acquire + release pair for peers without one:

* ``procshare (held object)``: ``with lock:`` on an ``interprocess_lock`` kept
  in a variable: the hot path.
* ``procshare (by name)``: ``with ps.interprocess_lock("bench"):`` inside the
  loop: the call hands out again the lock object the previous one made
  (nothing refers to it between blocks), one C lookup.
* ``multiprocessing.Lock``: a POSIX semaphore; not robust (a holder killed
  by a signal leaves it locked forever).
* ``posix_ipc.Semaphore``: same, named.
* ``flock pair`` / ``OFD lock pair``: raw ``fcntl`` calls on an open file;
  released by the kernel when the holder dies, silently.
* ``fasteners`` / ``filelock``: the file-lock packages, in their own group
  with fewer operations (they are 50-500x slower).

Contended: N processes (forked before timing, released together) each do
n/N empty ``with lock:`` blocks on one lock; one op is one block, so the
time per op is the inverse of the total throughput.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import select
import struct
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import procshare as ps
from benchmarks.harness import Bench, Timer

_OFD = struct.Struct("@hhqqi4x")


def _with_loop(make: Callable[[], AbstractContextManager[object]]) -> Timer:
    def timer(n: int) -> float:
        lock = make()
        t0 = time.perf_counter()
        for _ in range(n):
            with lock:
                pass
        return time.perf_counter() - t0

    return timer


def procshare_held(n: int) -> float:
    lock = ps.interprocess_lock("bench")
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with lock:
                pass
        return time.perf_counter() - t0
    finally:
        lock.close()


def procshare_by_name(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with ps.interprocess_lock("bench"):
            pass
    return time.perf_counter() - t0


_mp_lock = multiprocessing.Lock()


def mp_lock(n: int) -> float:
    lock = _mp_lock
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            pass
    return time.perf_counter() - t0


def posix_ipc_semaphore(n: int) -> float:
    import posix_ipc

    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    try:
        acquire, release = sem.acquire, sem.release
        t0 = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        return time.perf_counter() - t0
    finally:
        sem.unlink()
        sem.close()


def _tmpfile() -> tuple[int, str]:
    fd, path = tempfile.mkstemp(prefix="procshare-bench-")
    return fd, path


def flock_pair(n: int) -> float:
    fd, path = _tmpfile()
    try:
        flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
        t0 = time.perf_counter()
        for _ in range(n):
            flock(fd, ex)
            flock(fd, un)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def ofd_pair(n: int) -> float:
    fd, path = _tmpfile()
    try:
        lock = _OFD.pack(fcntl.F_WRLCK, 0, 0, 1, 0)
        unlock = _OFD.pack(fcntl.F_UNLCK, 0, 0, 1, 0)
        call, setlkw, setlk = fcntl.fcntl, fcntl.F_OFD_SETLKW, fcntl.F_OFD_SETLK
        t0 = time.perf_counter()
        for _ in range(n):
            call(fd, setlkw, lock)
            call(fd, setlk, unlock)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def _file_lock_package(make: Callable[[str], AbstractContextManager[object]]) -> Timer:
    def timer(n: int) -> float:
        fd, path = _tmpfile()
        os.close(fd)
        try:
            return _with_loop(lambda: make(path))(n)
        finally:
            os.unlink(path)

    return timer


# -- contended ------------------------------------------------------------------


def _contended(procs: int, make: Callable[[], AbstractContextManager[object]]) -> Timer:
    """N forked workers hammer one lock; returns the wall time for n blocks in total."""

    def timer(n: int) -> float:
        lock = make()
        per = max(1, n // procs)
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pids = []
        for _ in range(procs):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - worker
                code = 1
                try:
                    os.close(go_w)
                    os.write(ready_w, b"r")
                    select.select([go_r], [], [])
                    for _ in range(per):
                        with lock:
                            pass
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(ready_w)
        got = 0
        while got < procs:
            got += len(os.read(ready_r, procs))
        t0 = time.perf_counter()
        os.close(go_w)  # every worker sees EOF at once
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if status:
                raise RuntimeError(f"benchmark worker {pid} failed ({status})")
        elapsed = time.perf_counter() - t0
        os.close(go_r)
        os.close(ready_r)
        close = getattr(lock, "close", None)
        if callable(close):
            close()
        return elapsed * n / (per * procs)

    return timer


def run(bench: Bench) -> None:
    import fasteners
    import filelock

    g = bench.group(
        "locks: uncontended `with` block",
        note="one process; one op = enter + leave an empty `with lock:` (or acquire + release)",
    )
    g.add("procshare (held object)", procshare_held)
    g.add("procshare (by name)", procshare_by_name)
    g.add("multiprocessing.Lock", mp_lock)
    g.add("posix_ipc.Semaphore", posix_ipc_semaphore)
    g.add("flock pair", flock_pair)
    g.add("OFD lock pair", ofd_pair)
    g.measure(n=200_000)
    g.target(
        "procshare (held object)",
        "multiprocessing.Lock",
        max_ratio=2.5,
        text="`with lock:` at most 2.5x `with multiprocessing.Lock():` (issue 5)",
    )
    g.target(
        "procshare (by name)",
        "procshare (held object)",
        max_ratio=3.0,
        text="by-name `with ps.interprocess_lock(name):` at most 3x `with lock:` on the held "
        "object (issue 16)",
    )
    g.target(
        "procshare (held object)",
        "flock pair",
        max_ratio=0.5,
        text="`with lock:` at least 2x faster than a raw flock pair (issue 5)",
    )

    f = bench.group(
        "locks: uncontended, against the file-lock packages",
        note="as above, with fewer operations: the packages take microseconds per op",
    )
    f.add("procshare (held object)", procshare_held)
    f.add("flock pair", flock_pair)
    f.add("fasteners", _file_lock_package(fasteners.InterProcessLock))
    f.add("filelock", _file_lock_package(filelock.FileLock))
    f.measure(n=5_000)
    for peer in ("fasteners", "filelock"):
        f.target(
            "procshare (held object)",
            peer,
            max_ratio=1 / 20,
            text=f"`with lock:` at least 20x faster than {peer} (issue 5)",
        )

    for procs in (2, 4, 8, 16):
        c = bench.group(
            f"locks: contended, {procs} processes",
            note=(
                f"{procs} forked processes each run empty `with lock:` blocks on one lock; "
                "time per op = 1 / total throughput"
            ),
            series="locks: contended throughput",
            x=procs,
        )
        c.add("procshare", _contended(procs, lambda: ps.interprocess_lock("bench")))
        c.add("multiprocessing.Lock", _contended(procs, multiprocessing.Lock))
        c.measure(n=200_000, repeat=5)
        c.target(
            "procshare",
            "multiprocessing.Lock",
            max_ratio=1 / 0.6,
            text=f"contended throughput, {procs} processes, at least 0.6x multiprocessing.Lock's "
            "(issue 5)",
        )
