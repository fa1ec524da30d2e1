"""One mechanism for "release once the children forked while it was open are
reaped": ``Engine.release_after_children``, used by segments and locks alike."""

from __future__ import annotations

import os

import pytest

import procshare as ps
from procshare._engine import get_engine, names

pytestmark = pytest.mark.timeout(60)


def _present(kind: str, name: str) -> bool:
    return os.path.exists("/dev/shm" + names.os_name(kind, name))


def test_without_a_child_forked_since_the_open_the_release_runs_now() -> None:
    engine = get_engine()
    ran: list[str] = []
    assert engine.release_after_children(engine.forks, lambda: ran.append("now"))
    assert ran == ["now"]
    assert engine.deferred == 0


@pytest.mark.timeout(60)
def test_segments_and_locks_wait_in_one_list_and_go_when_the_child_is_reaped() -> None:
    engine = get_engine()
    seg = ps.shared("s", ps.u64)
    lock = ps.interprocess_lock("m")
    r, w = os.pipe()

    @ps.forked
    def child() -> int:
        os.read(r, 1)  # runs until told
        return 1

    kid = child()
    seg.close()
    lock.close()
    # Both wait in the engine's one list, the names kept for the child.
    assert engine.deferred == 2
    assert _present(names.SEGMENT, "s")
    assert _present(names.LOCK, "m")
    os.write(w, b"x")
    assert kid.join() == 1  # reaped: the next call into procshare releases both
    assert engine.deferred == 0
    assert not _present(names.SEGMENT, "s")
    assert not _present(names.LOCK, "m")
    os.close(r)
    os.close(w)


def test_a_release_waiting_at_shutdown_runs_then() -> None:
    from procshare._backends import get_backend
    from procshare._engine import Engine

    engine = Engine(get_backend())
    ran: list[str] = []
    engine.forks = 1
    engine.forking = 1  # a fork under way: its child may have inherited it
    assert not engine.release_after_children(0, lambda: ran.append("late"))
    assert engine.deferred == 1
    assert ran == []
    engine.shutdown()
    assert ran == ["late"]
    assert engine.deferred == 0
