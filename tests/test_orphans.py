"""kill -9 leaks nothing: orphans are reclaimed without anybody running ``gc``.

A segment whose every holder was SIGKILLed keeps its memory in /dev/shm
until something removes it. The next procshare use of its namespace by any
process of the user does (once per process and namespace), and so does a
``children()`` scope that saw a child die by a signal. Never reclaimed: a
lock whose holder died (the next opener must be told ``OwnerDied``) and a
``persist=True`` segment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import procshare as ps
from procshare._engine import get_engine, names
from procshare._engine import inspect as ps_inspect
from procshare._engine import segments as ps_segments

pytestmark = pytest.mark.timeout(120)

# A fresh process that leaves, in the current namespace, a 1 MiB segment
# whose only holder was SIGKILLed, a lock whose holder died, and a persistent
# segment, then is SIGKILLed itself.
LEAVE_ORPHANS = """
import os, signal
import procshare as ps

lock = ps.interprocess_lock("dead-holder")

@ps.forked
def die_holding():
    lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)

try:
    die_holding().join()
except ps.ChildKilled:
    pass
lock.close()
with ps.shared("kept", ps.u64, persist=True) as kept:
    kept.value = 7
big = ps.shared("big", bytes, size=1 << 20)
big.view[:4] = b"dead"
os.kill(os.getpid(), signal.SIGKILL)
"""


def _objects() -> dict[str | None, ps_inspect.SegmentInfo]:
    return {i.name: i for i in ps.segments()}


def _run(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], check=False).returncode


def _cleanup() -> None:
    ps.unlink("kept")
    ps_inspect.collect(everything=True)


def test_the_next_process_to_use_the_namespace_reclaims_a_killed_holders_segment() -> None:
    try:
        assert _run(LEAVE_ORPHANS) == -signal.SIGKILL
        left = _objects()
        assert {"big", "dead-holder", "kept"} <= set(left)  # listing reclaims nothing
        assert left["big"].holders == ()
        # Another process uses the namespace, under another name: no gc, no
        # reopening of "big".
        assert _run("import procshare as ps\nps.shared('other', ps.u8).close()") == 0
        after = _objects()
        assert "big" not in after
        assert after["kept"].persist  # persistent data is kept
        lock = ps.interprocess_lock("dead-holder")  # and the lock still tells
        with pytest.raises(ps.OwnerDied):
            lock.acquire()
        lock.mark_consistent()
        lock.release()
        lock.close()
    finally:
        _cleanup()


def test_a_lock_opened_first_reclaims_too() -> None:
    try:
        assert _run(LEAVE_ORPHANS) == -signal.SIGKILL
        assert _run("import procshare as ps\nps.interprocess_lock('x').close()") == 0
        assert "big" not in _objects()
    finally:
        _cleanup()


def test_a_process_sweeps_each_namespace_once(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_engine().backend
    calls: list[str] = []
    real = backend.segment_collect

    def counting(prefix: str, **kw: object) -> list[str]:
        calls.append(prefix)
        return real(prefix, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "segment_collect", counting)
    monkeypatch.setattr(ps_segments, "swept_namespaces", set())
    for _ in range(3):
        with ps.shared("a", ps.u64), ps.shared("b", ps.u8), ps.interprocess_lock("m"):
            pass
    with ps.namespace("other-ns"), ps.shared("a", ps.u64):
        pass

    @ps.forked
    def child() -> None:  # inherits that both were swept
        with ps.shared("c", ps.u64), ps.namespace("other-ns"), ps.shared("c", ps.u64):
            pass

    child().join()
    assert calls == [names.namespace_prefix(), names.namespace_prefix("other-ns")]


def test_a_scope_that_saw_a_child_killed_reclaims_its_orphans() -> None:
    with ps.shared("warm-up", ps.u8):  # this process has swept the namespace
        pass

    @ps.forked
    def holder() -> None:
        seg = ps.shared("left", bytes, size=1 << 20)
        seg.view[:4] = b"dead"
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(ExceptionGroup) as info, ps.children():
        holder()
    assert info.group_contains(ps.ChildKilled)
    assert "left" not in {i.name for i in ps.segments()}


def test_a_clean_scope_does_not_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ps_segments, "reclaim_orphans", lambda ns, *a: calls.append(ns))

    @ps.forked
    def fine() -> int:
        return 1

    with ps.children() as kids:
        fine()
    assert kids.results == [1]
    assert calls == []
