"""Shared segments: procshare against multiprocessing.shared_memory and posix_ipc.

* create + close of an anonymous 4 KiB segment (``ps.shared(bytes, size=4096)``)
  against the named one and a bare ``mmap.mmap(-1, 4096)`` (issue 19);
* create + close of a 4 KiB segment: ``with ps.shared(name, bytes, size=4096):``
  (create-or-attach, which finds no segment, creates it atomically with its
  metadata, takes the kernel-counted hold, and as last holder unlinks it at
  the end) against ``SharedMemory(create=True)`` + ``close()`` + ``unlink()``
  and ``posix_ipc.SharedMemory(O_CREX)`` + ``mmap`` + ``unlink``;
* attach + close of a segment someone else holds, the same three ways;
* attach by name in a freshly forked child (issue 16): each child times its own
  open + read + close, so the fork itself stays out and what remains is the
  attach path with its copy-on-write faults;
* many segments held at once by one process (issue 16): procshare keeps a
  descriptor per segment only up to a quarter of ``ulimit -n`` (at most
  1,024; then the mapping alone is the hold), so it goes past ``ulimit -n``
  up to ``vm.max_map_count``; ``SharedMemory`` keeps one each;
* copying 256 MiB into an already-touched shared numpy array against the
  same copy into a private array;
* the cost of reading and writing a scalar view's ``.value``, with a private
  ctypes value and ``multiprocessing.Value(lock=False)`` for context;
* ``view.value += 1`` on a ``ps.u64`` view against the same update on a ctypes
  value over shared memory, ``ctypes.c_uint64.from_buffer(mmap)`` (issue 16).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import resource
import struct
import time
import warnings
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np

import procshare as ps
from benchmarks.harness import SMOKE, Bench, Timer

try:
    import posix_ipc
except ImportError:  # pragma: no cover - a declared dependency, but be explicit
    posix_ipc = None

SIZE = 4096


def ps_create_close(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with ps.shared("bench-cc", bytes, size=SIZE):
            pass
    return time.perf_counter() - t0


def ps_anonymous_create_close(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with ps.shared(bytes, size=SIZE):
            pass
    return time.perf_counter() - t0


def mmap_anonymous_create_close(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        mm = mmap.mmap(-1, SIZE)
        mm.close()
    return time.perf_counter() - t0


def mp_create_close(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        shm = shared_memory.SharedMemory(create=True, size=SIZE)
        shm.close()
        shm.unlink()
    return time.perf_counter() - t0


def posix_ipc_create_close(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        shm = posix_ipc.SharedMemory("/bench-posix-ipc-cc", posix_ipc.O_CREX, size=SIZE)
        mm = mmap.mmap(shm.fd, SIZE)
        shm.close_fd()
        mm.close()
        shm.unlink()
    return time.perf_counter() - t0


def ps_attach(n: int) -> float:
    with ps.shared("bench-at", bytes, size=SIZE):
        t0 = time.perf_counter()
        for _ in range(n):
            with ps.shared("bench-at", bytes, size=SIZE, create=False):
                pass
        return time.perf_counter() - t0


def mp_attach(n: int) -> float:
    owner = shared_memory.SharedMemory(create=True, size=SIZE)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            shm = shared_memory.SharedMemory(name=owner.name)
            shm.close()
        return time.perf_counter() - t0
    finally:
        owner.close()
        owner.unlink()


def posix_ipc_attach(n: int) -> float:
    owner = posix_ipc.SharedMemory("/bench-posix-ipc-at", posix_ipc.O_CREX, size=SIZE)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            shm = posix_ipc.SharedMemory("/bench-posix-ipc-at")
            mm = mmap.mmap(shm.fd, SIZE)
            shm.close_fd()
            mm.close()
        return time.perf_counter() - t0
    finally:
        owner.close_fd()
        owner.unlink()


def _in_fresh_children(n: int, attach: Callable[[], None]) -> float:
    """Fork ``n`` children one after another; each times ``attach()`` itself
    (open by name, read, close) and reports it: the sum of those times."""
    r, w = os.pipe()
    total = 0.0
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:  # child: always leaves through os._exit
                code = 1
                try:
                    t0 = time.perf_counter()
                    attach()
                    os.write(w, struct.pack("d", time.perf_counter() - t0))
                    code = 0
                finally:
                    os._exit(code)
            os.waitpid(pid, 0)
            total += struct.unpack("d", os.read(r, 8))[0]
    finally:
        os.close(r)
        os.close(w)
    return total


def _child_attach_contenders(bench: Bench) -> None:
    owner = ps.shared("bench-child", ps.u64)
    raw = posix_ipc.SharedMemory("/bench-posix-ipc-child", posix_ipc.O_CREX, size=8)
    mp = shared_memory.SharedMemory(create=True, size=8)

    def ps_attach_child() -> None:
        with ps.shared("bench-child", ps.u64) as s:
            s.value  # noqa: B018

    def raw_attach_child() -> None:
        shm = posix_ipc.SharedMemory("/bench-posix-ipc-child")
        mm = mmap.mmap(shm.fd, 8)
        shm.close_fd()
        ctypes.c_uint64.from_buffer(mm).value  # noqa: B018

    def mp_attach_child() -> None:
        shm = shared_memory.SharedMemory(mp.name)
        if shm.buf is not None:
            shm.buf[0]
        shm.close()

    try:
        g = bench.group(
            "segments: attach by name in a fresh child",
            note="each forked child times its own open by name + read + close (the fork "
            "is not counted): procshare `with ps.shared(name, ps.u64) as s: s.value`",
            unit="per child",
        )
        g.add("procshare", lambda n: _in_fresh_children(n, ps_attach_child))
        g.add("posix_ipc + mmap", lambda n: _in_fresh_children(n, raw_attach_child))
        g.add("multiprocessing.shared_memory", lambda n: _in_fresh_children(n, mp_attach_child))
        g.measure(n=100, repeat=5)
        g.report(
            "procshare",
            "posix_ipc + mmap",
            text="attach by name in a fresh child against posix_ipc + mmap (issue 16)",
        )
        g.report(
            "procshare",
            "multiprocessing.shared_memory",
            text="attach by name in a fresh child against SharedMemory (issue 16)",
        )
    finally:
        owner.close()
        raw.unlink()
        mp.close()
        mp.unlink()


def ps_hold_many(n: int) -> float:
    t0 = time.perf_counter()
    segs = [ps.shared(f"bench-many-{i}", ps.u64) for i in range(n)]
    for seg in segs:
        seg.close()
    return time.perf_counter() - t0


def posix_ipc_hold_many(n: int) -> float:
    t0 = time.perf_counter()
    held = []
    try:
        for i in range(n):
            shm = posix_ipc.SharedMemory(
                f"/bench-many-{os.getpid()}-{i}", posix_ipc.O_CREX, size=8
            )
            held.append(shm)
            mm = mmap.mmap(shm.fd, 8)  # (mmap.mmap keeps a dup of the descriptor)
            shm.close_fd()
            held.append(mm)
    finally:
        for obj in held:
            if isinstance(obj, mmap.mmap):
                obj.close()
            else:
                obj.unlink()
    return time.perf_counter() - t0


def mp_hold_many(n: int) -> float:
    t0 = time.perf_counter()
    held = [shared_memory.SharedMemory(create=True, size=8) for _ in range(n)]
    for shm in held:
        shm.close()
        shm.unlink()
    return time.perf_counter() - t0


def _room_for_mappings(margin: int = 2000) -> int:
    """How many more mappings this process may make, less a margin."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            have = sum(1 for _ in f)
    except OSError:
        return 10_000
    return max(0, limit - have - margin)


def _many_contenders(bench: Bench) -> None:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n = 20 if SMOKE else min(5000, nofile // 2)
    g = bench.group(
        f"segments: hold {n} segments at once, then close them",
        note="create n named 8-byte segments held together, then close (and remove) "
        "each; procshare keeps a mapping per segment, and a descriptor only for the "
        "first quarter of ulimit -n (at most 1,024)",
        unit="per segment",
    )
    g.add("procshare", ps_hold_many)
    g.add("posix_ipc + mmap", posix_ipc_hold_many)
    g.add("multiprocessing.shared_memory", mp_hold_many)
    g.measure(n=n, repeat=3)
    g.report("procshare", "posix_ipc + mmap", text=f"{n} segments held at once (issue 16)")
    g.report(
        "procshare",
        "multiprocessing.shared_memory",
        text=f"{n} segments held at once against SharedMemory (issue 16)",
    )
    # Past ulimit -n: only what can hold a segment without a descriptor can run.
    big = 20 if SMOKE else min(100_000, _room_for_mappings())
    g = bench.group(
        f"segments: hold {big} segments at once (ulimit -n = {nofile})",
        note="one process holds them all; vm.max_map_count (65,530 by default) bounds "
        "it, not ulimit -n: 100,000 needs `sysctl -w vm.max_map_count=262144`",
        unit="per segment",
    )
    g.add("procshare", ps_hold_many)
    if big >= nofile:
        # Python's mmap.mmap keeps a dup of the descriptor for each mapping.
        g.skip(
            "posix_ipc + mmap",
            f"mmap.mmap keeps a descriptor per mapping: stops at ulimit -n = {nofile}",
        )
        g.skip(
            "multiprocessing.shared_memory",
            f"keeps a descriptor per segment: stops at ulimit -n = {nofile}",
        )
    else:
        g.add("posix_ipc + mmap", posix_ipc_hold_many)
        g.add("multiprocessing.shared_memory", mp_hold_many)
    g.measure(n=big, repeat=1, warmup=0)


def _copy_contenders(bench: Bench) -> None:
    mib = 1 if SMOKE else 256
    count = mib * (1 << 20) // 8
    source = np.arange(count, dtype=np.float64)
    private = np.ones(count, dtype=np.float64)  # touched: its pages exist
    seg = ps.shared("bench-copy", np.float64, shape=count)
    shared_array = seg.view
    shared_array[:] = 1.0  # touched too, so both copies measure memory bandwidth

    def into(target: np.ndarray) -> float:
        t0 = time.perf_counter()
        np.copyto(target, source)
        return time.perf_counter() - t0

    def ps_copy(n: int) -> float:
        return sum(into(shared_array) for _ in range(n))

    def private_copy(n: int) -> float:
        return sum(into(private) for _ in range(n))

    g = bench.group(
        f"segments: copy {mib} MiB into a warm numpy array",
        note="np.copyto(target, source); both targets already touched",
        unit="per copy",
    )
    g.add("procshare shared array", ps_copy)
    g.add("private numpy array", private_copy)
    try:
        g.measure(n=3, repeat=5)
    finally:
        seg.close()  # the array stays valid until it is collected with this frame
    g.target(
        "procshare shared array",
        "private numpy array",
        max_ratio=1 / 0.9,
        text="copy into a warm shared array at least 0.9x a private copy (issue 4)",
    )


def _scalar_contenders(bench: Bench) -> None:
    seg = ps.shared("bench-scalar", ps.u64)
    view = seg.view
    private = ctypes.c_uint64(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp_value = multiprocessing.get_context("fork").Value("Q", 0, lock=False)

    def reader(obj: object) -> float:
        def run(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                obj.value  # type: ignore[attr-defined]  # noqa: B018
            return time.perf_counter() - t0

        return run  # type: ignore[return-value]

    def writer(obj: object) -> float:
        def run(n: int) -> float:
            t0 = time.perf_counter()
            for i in range(n):
                obj.value = i  # type: ignore[attr-defined]
            return time.perf_counter() - t0

        return run  # type: ignore[return-value]

    try:
        for what, make in (("read", reader), ("write", writer)):
            g = bench.group(
                f"segments: scalar .value {what}",
                note="ps.shared(name, ps.u64) view, reported (no target)",
            )
            g.add("procshare view.value", make(view))  # type: ignore[arg-type]
            g.add("private ctypes c_uint64", make(private))  # type: ignore[arg-type]
            g.add("multiprocessing.Value(lock=False)", make(mp_value))  # type: ignore[arg-type]
            g.measure(n=200_000)
    finally:
        del view
        seg.close()


def _increment_contenders(bench: Bench) -> None:
    """``view.value += 1``: procshare's scalar view against a ctypes value in an mmap."""
    seg = ps.shared("bench-increment", ps.u64)
    view = seg.view
    mm = mmap.mmap(-1, 8)
    peer = ctypes.c_uint64.from_buffer(mm)

    def ps_increment(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            view.value += 1
        return time.perf_counter() - t0

    def ctypes_increment(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            peer.value += 1
        return time.perf_counter() - t0

    g = bench.group(
        "segments: scalar view.value += 1",
        note="ps.shared(name, ps.u64) view (range-checked, SegmentClosed after the block) "
        "against ctypes.c_uint64.from_buffer(mmap.mmap(-1, 8)) (wraps silently)",
    )
    g.add("procshare view.value += 1", ps_increment)
    g.add("ctypes c_uint64.from_buffer(mmap)", ctypes_increment)
    try:
        g.measure(n=200_000)
    finally:
        seg.close()  # (the private mmap goes with the peer: ctypes pins it until then)
    g.target(
        "procshare view.value += 1",
        "ctypes c_uint64.from_buffer(mmap)",
        max_ratio=1.3,
        text="scalar view.value += 1 at most 1.3x a ctypes value (issue 16)",
    )


def _against_shared_memory(
    bench: Bench, title: str, note: str, timers: tuple[Timer, Timer, Timer], target: str
) -> None:
    """procshare vs multiprocessing.shared_memory (the target) and posix_ipc + mmap."""
    procshare_fn, mp_fn, posix_ipc_fn = timers
    g = bench.group(title, note=note)
    g.add("procshare", procshare_fn)
    g.add("multiprocessing.shared_memory", mp_fn)
    if posix_ipc is not None:
        g.add("posix_ipc + mmap", posix_ipc_fn)
    else:
        g.skip("posix_ipc + mmap", "posix_ipc is not installed")
    g.measure(n=2000)
    g.target("procshare", "multiprocessing.shared_memory", max_ratio=1.0, text=target)


def run(bench: Bench) -> None:
    _against_shared_memory(
        bench,
        "segments: create + close a 4 KiB segment",
        "procshare: with ps.shared(name, bytes, size=4096) (atomic create, metadata, "
        "kernel-counted hold, unlink by the last holder)",
        (ps_create_close, mp_create_close, posix_ipc_create_close),
        "4 KiB create + close no slower than SharedMemory create + unlink (issue 4)",
    )
    _against_shared_memory(
        bench,
        "segments: attach + close a held 4 KiB segment",
        "procshare: with ps.shared(name, bytes, size=4096, create=False) (layout checked)",
        (ps_attach, mp_attach, posix_ipc_attach),
        "attach no slower than SharedMemory attach (issue 4)",
    )
    g = bench.group(
        "segments: create + close an anonymous 4 KiB segment",
        note="procshare: with ps.shared(bytes, size=4096) (no name: one shared mapping "
        "a forked child inherits), against the named form and a bare mmap.mmap(-1, 4096)",
    )
    g.add("procshare anonymous", ps_anonymous_create_close)
    g.add("procshare named", ps_create_close)
    g.add("mmap.mmap(-1) + close", mmap_anonymous_create_close)
    g.measure(n=2000)
    g.target(
        "procshare anonymous",
        "procshare named",
        max_ratio=1.0,
        text="anonymous 4 KiB create + close at most the cost of a named one (issue 19)",
    )
    _child_attach_contenders(bench)
    _many_contenders(bench)
    _copy_contenders(bench)
    _scalar_contenders(bench)
    _increment_contenders(bench)
