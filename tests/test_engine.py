"""The per-process engine: lazy parts, ordered shutdown, a fresh engine after fork."""

from __future__ import annotations

import os

import attrs
import pytest

from procshare._backends import get_backend
from procshare._backends.posix import segment_object
from procshare._backends.posix import sync as sync_posix
from procshare._engine import Engine, get_engine
from procshare._engine import core as engine_core


@attrs.define
class Recorder:
    order: int
    log: list[str]
    fail: bool = False
    polls: int = 0

    def poll(self) -> None:
        self.polls += 1

    def shutdown(self) -> None:
        self.log.append(f"shutdown {self.order}")
        if self.fail:
            raise RuntimeError(f"part {self.order} failed")


def test_one_engine_per_process() -> None:
    assert get_engine() is get_engine()
    assert get_engine().pid == os.getpid()
    assert get_engine().backend is get_backend()


def test_parts_are_created_once_and_polled_when_one_asks() -> None:
    engine = Engine(get_backend())
    log: list[str] = []
    part = engine.part("rec", lambda e: Recorder(5, log))
    assert engine.part("rec", lambda e: Recorder(99, log)) is part
    engine.poll()
    assert part.polls == 0  # nothing pending: every call into procshare stays cheap
    engine.pending = True
    engine.poll()
    engine.poll()
    assert part.polls == 1  # once per request
    assert not engine.pending


def test_shutdown_runs_in_order_reports_every_failure_and_runs_once() -> None:
    engine = Engine(get_backend())
    log: list[str] = []
    engine.part("segments", lambda e: Recorder(20, log, fail=True))
    engine.part("children", lambda e: Recorder(0, log, fail=True))
    engine.part("locks", lambda e: Recorder(10, log))
    with pytest.raises(BaseExceptionGroup) as info:
        engine.shutdown()
    assert log == ["shutdown 0", "shutdown 10", "shutdown 20"]
    assert sorted(str(e) for e in info.value.exceptions) == ["part 0 failed", "part 20 failed"]
    engine.shutdown()
    assert len(log) == 3


def test_a_forked_child_gets_an_empty_engine_and_never_shuts_down_the_parents() -> None:
    parent_engine = get_engine()
    log: list[str] = []
    parent_engine.part("probe", lambda e: Recorder(50, log))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child_engine = get_engine()
            ok = (
                child_engine is not parent_engine
                and child_engine.pid == os.getpid()
                and "probe" not in child_engine._parts
            )
            engine_core.shutdown_engine()  # must not reach the parent's parts
            parent_engine.shutdown()  # refused: wrong pid
            os.write(w, b"1" if ok and not log else b"0")
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert log == []
    parent_engine._parts.pop("probe")


@pytest.mark.timeout(60)
def test_every_forked_child_resets_the_per_process_state_first() -> None:
    # The after-fork hooks (C: _cengine.after_fork_child, _shmstep.refresh_pid,
    # the token list's clear) run in any child, a raw os.fork's included: the
    # pids cached in two modules, a fresh engine lock even when the parent's
    # was held at the fork, the parent's engine set aside, no process token.
    parent = get_engine()
    get_backend().process_token()  # remembered in this process from now on
    assert sync_posix._token
    r, w = os.pipe()
    with engine_core._engine_lock:  # held by the parent while it forks
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                me = os.getpid()
                said = [
                    engine_core._pid == me,
                    segment_object._pid == me,
                    not engine_core._engine_lock.locked(),
                    engine_core._engine is None,
                    engine_core._inherited[-1] is parent,
                    sync_posix._token == [],
                ]
                os.write(w, bytes(int(x) for x in said))
                code = 0
            finally:
                os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    said = list(os.read(r, 16))
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert said == [1, 1, 1, 1, 1, 1]
    assert engine_core._engine is parent  # the parent's own state is untouched
    assert engine_core._pid == segment_object._pid == os.getpid()


@pytest.mark.timeout(60)
def test_a_forked_child_adopts_the_spare_engine_and_its_children_build_their_own() -> None:
    # get_engine is C (_cengine_get.h); get_engine_py, the reference, must agree.
    parent = get_engine()
    spare = engine_core._spare
    assert spare is not None  # built beside this process's first engine
    assert spare is not parent
    assert spare.pid == os.getpid()  # never used here
    assert engine_core.get_engine_py() is parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            mine = get_engine()
            ok = (
                mine is spare  # adopted, parts and all
                and mine.pid == os.getpid()
                and engine_core._spare is None
                and parent in engine_core._inherited
                and get_engine() is mine
                and engine_core.get_engine_py() is mine
                and sorted(mine._parts) == sorted(k for k, _ in engine_core._prebuilt)
            )
            # A grandchild finds no spare (only a tree's first process builds
            # one): the Python path builds it a new engine.
            grandchild = os.fork()
            if grandchild == 0:
                own = get_engine()
                os._exit(0 if own is not mine and own.pid == os.getpid() else 3)
            _, status = os.waitpid(grandchild, 0)
            ok = ok and os.waitstatus_to_exitcode(status) == 0
            os.write(w, b"ok" if ok else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.read(r, 2) == b"ok"
    os.close(r)
    assert get_engine() is parent
    assert engine_core._spare is spare  # the parent's is untouched
