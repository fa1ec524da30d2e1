"""The backend's C start and join (``_forkfast.c``): which calls take them, and
that they behave as the Python path does.

The C code takes only the common case and hands everything else to the
Python code (``_Forked._call``, ``Child._join``), which stays the reference;
``test_forked_python_path.py`` runs ``test_forked.py`` again with the C
paths switched off.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator

import pytest

import procshare as ps
from procshare._backends.posix import _forkstep
from procshare._engine import children as children_engine
from procshare._engine import get_engine
from shared_support import wait_for


@pytest.fixture(params=[True, False], ids=["c-path", "python-path"])
def fast(request: pytest.FixtureRequest) -> Iterator[bool]:
    was = _forkstep.fast_enable(request.param)
    try:
        yield request.param
    finally:
        _forkstep.fast_enable(was)


def _stats() -> tuple[int, int]:
    return _forkstep.fast_stats()


@ps.forked
def _noop() -> None:
    return None


@ps.forked
def _value(n: int) -> bytes:
    return b"x" * n


def test_the_common_case_takes_the_c_start_and_join() -> None:
    _noop().join()  # the first fork of a process finds its children part in Python
    starts, joins = _stats()
    for _ in range(3):
        child = _noop()
        assert isinstance(child, ps.Child)
        assert child.join() is None
        assert child.exitcode == 0
        assert not child.running
    assert _stats() == (starts + 3, joins + 3)
    child = _value(10)
    assert child.join(timeout=None) == b"x" * 10  # a value: read and reaped in C too
    assert child.join() == b"x" * 10  # done: the Python path gives the same value
    assert _stats() == (starts + 4, joins + 4)


def test_switched_off_nothing_takes_the_c_paths() -> None:
    _noop().join()
    was = _forkstep.fast_enable(False)
    try:
        before = _stats()
        assert _value(3).join() == b"xxx"
        assert _stats() == before
    finally:
        _forkstep.fast_enable(was)


def test_uncommon_starts_take_the_python_path() -> None:
    _noop().join()

    @ps.forked(timeout=30)
    def with_timeout() -> int:
        return 1

    starts, _ = _stats()
    assert with_timeout().join() == 1  # a deadline: Python
    with ps.children(limit=2) as kids:  # a limit: Python waits for a free slot
        _noop()
        _value(1)
    assert kids.results == [None, b"x"]
    assert _stats()[0] == starts

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        with pytest.warns(RuntimeWarning, match="Python threads"):
            _noop().join()  # another thread runs: Python warns
    finally:
        release.set()
        thread.join()
    assert _stats()[0] == starts
    _noop().join()
    assert _stats()[0] == starts + 1


def test_a_scope_without_a_limit_records_its_children_on_both_paths(fast: bool) -> None:
    _noop().join()
    starts, _ = _stats()
    with ps.children() as outer:
        _value(1)
        with ps.children() as inner:
            _value(2)
            _value(3)
        _value(4)
        loose = _value(5)  # a handle kept: the scope still owns and joins it
    assert outer.results == [b"x", b"xxxx", b"xxxxx"]
    assert inner.results == [b"xx", b"xxx"]
    assert loose.join() == b"xxxxx"
    assert _stats()[0] == starts + (5 if fast else 0)


def test_a_failure_in_a_scope_without_a_limit_is_grouped_on_both_paths(fast: bool) -> None:
    @ps.forked
    def fails() -> None:
        raise ValueError("first")

    seen: list[ps.Children] = []

    def block() -> None:
        with ps.children() as kids:
            seen.append(kids)
            fails()
            assert kids.children[0].wait() is not None
            with ps.children(cancel_on_error=False):
                pass  # a scope entered and left: the outer one is still the one
            for _ in range(5):
                _noop()

    with pytest.raises(ExceptionGroup) as group:
        block()
    [error] = group.value.exceptions
    assert isinstance(error, ps.ChildRaised)
    assert isinstance(error, ValueError)
    assert len(seen[0].children) == 6


def test_housekeeping_pending_takes_the_python_start_which_reaps(fast: bool) -> None:
    _noop().join()
    pid = _noop().pid  # dropped unjoined: housekeeping pending
    gc.collect()
    assert get_engine().pending
    starts, _ = _stats()
    child = _noop()
    assert _stats()[0] == starts  # the Python start ran the housekeeping first
    child.join()
    assert wait_for(lambda: pid not in children_engine.current_children()._live)


def test_a_join_with_a_timeout_takes_the_python_path() -> None:
    _noop().join()
    _, joins = _stats()
    assert _value(2).join(timeout=30) == b"xx"
    assert _value(2).join(30) == b"xx"
    assert _stats()[1] == joins


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 65535, 65536, 200_000, 3 << 20])
def test_results_of_every_size_arrive_whole(fast: bool, size: int) -> None:
    assert _value(size).join() == b"x" * size


def test_failures_are_the_same_on_both_paths(fast: bool) -> None:
    @ps.forked
    def raises() -> None:
        raise KeyError("k")

    @ps.forked
    def exits() -> None:
        sys.exit(3)

    @ps.forked
    def killed() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(KeyError) as raised:
        raises().join()
    assert isinstance(raised.value, ps.ChildRaised)
    with pytest.raises(ps.ChildExited) as exited:
        exits().join()
    assert exited.value.exitcode == 3
    with pytest.raises(ps.ChildKilled) as kill:
        killed().join()
    assert kill.value.signal == signal.SIGKILL
    child = exits()
    with pytest.raises(ps.ChildExited):
        child.join()
    status = child.wait()
    assert status is not None
    assert status.outcome == "exited"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("returns", [None, 7])
def test_a_child_that_ends_holding_a_lock_is_warned_about(fast: bool, returns: int | None) -> None:
    lock = ps.interprocess_lock()
    try:

        @ps.forked
        def forgets() -> int | None:
            lock.acquire()  # inherited, never released
            return returns

        with pytest.warns(RuntimeWarning, match=r"ended while holding interprocess lock '\(anon"):
            assert forgets().join() == returns
        with pytest.raises(ps.OwnerDied):
            lock.acquire(timeout=10)
        lock.mark_consistent()
        lock.release()
    finally:
        lock.close()


def test_a_slow_child_is_waited_for_and_its_result_read_as_it_comes(fast: bool) -> None:
    @ps.forked
    def slow() -> list[int]:
        time.sleep(0.2)
        return list(range(50_000))  # ~250 kB: more than a pipe holds

    assert slow().join() == list(range(50_000))


def test_two_threads_joining_one_child_both_get_its_value(fast: bool) -> None:
    @ps.forked
    def slow() -> int:
        time.sleep(0.3)
        return 7

    child = slow()
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(child.join()))
    thread.start()
    assert child.join() == 7
    thread.join()
    assert got == [7]
    status = child.wait()
    assert status is not None
    assert status.outcome == "returned"


def test_a_handle_inherited_by_a_fork_is_refused_there(fast: bool) -> None:
    outer = _value(1)
    outer.join()
    pending = _noop()  # still running or not, it is the parent's

    @ps.forked
    def child() -> str:
        try:
            pending.join()
        except ps.UsageError as exc:
            return str(exc)
        return "joined"

    assert "cannot wait for or signal a child that is not its own" in child().join()
    pending.join()


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_c_join_waits_propagates_and_the_child_is_reaped(fast: bool) -> None:
    @ps.forked
    def sleeper() -> None:
        time.sleep(30)

    child = sleeper()
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            child.join()
    finally:
        timer.join()
    assert child.running
    child.kill()
    with pytest.raises(ps.ChildKilled):
        child.join()


def test_a_dropped_c_handle_is_reaped_and_its_failure_warned(fast: bool) -> None:
    @ps.forked
    def fails() -> None:
        raise ValueError("nobody looks")

    fails()  # dropped at once: the C finalizer marks it dropped
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert wait_for(
            lambda: (ps.segments(), not children_engine.current_children()._dropped)[1]
        )
    assert any("dropped without join()" in str(w.message) for w in caught)


def test_the_handle_and_the_decorated_function_keep_their_python_faces() -> None:
    child = _noop()
    assert isinstance(child, ps.Child)
    assert repr(child).startswith("<Child '_noop' pid=")
    child.join()
    assert repr(child).endswith("exitcode=0>")
    assert ps.Child.join.__doc__
    assert "timeout" in ps.Child.join.__doc__
    assert _noop.__name__ == "_noop"
    assert _noop.__wrapped__.__name__ == "_noop"
    assert repr(_noop) == "<forked function _noop>"
    import weakref

    assert weakref.ref(child)() is child


def test_the_parent_keeps_a_fast_childs_pipe_open_until_it_is_reaped() -> None:
    """The C start keeps the result pipe's write end (private: later children
    close it): the child's exit then wakes the parent once, on the pidfd."""
    _noop().join()
    before = set(_forkstep.private())

    @ps.forked
    def slow() -> int:
        time.sleep(0.3)
        return 5

    child = slow()
    rec = child._rec
    mine = set(_forkstep.private()) - before
    assert {rec.result_fd, rec.wait_fd} < mine
    assert len(mine) == 3  # the write end too
    with pytest.raises(BlockingIOError):  # no end of file while the parent keeps it
        os.read(rec.result_fd, 1)
    assert child.join() == 5
    assert set(_forkstep.private()) == before
    was = _forkstep.fast_enable(False)
    try:
        child = slow()  # the Python start closes it at once, as the backend contract says
        assert len(set(_forkstep.private()) - before) == 2
        assert child.join() == 5
    finally:
        _forkstep.fast_enable(was)


def test_a_forked_function_copies_and_pickles_with_its_fields() -> None:
    """Its C base keeps the function, name, timeout and daemon flag outside
    ``__dict__``; a copy or a pickle (cloudpickle sends one to a cluster's
    workers) still carries them."""
    import copy
    import pickle

    forked_getpid = ps.forked(name="pid", daemon=True)(os.getpid)
    for clone in (
        copy.copy(forked_getpid),
        copy.deepcopy(forked_getpid),
        pickle.loads(pickle.dumps(forked_getpid)),
    ):
        assert repr(clone) == "<forked function pid>"
        assert clone.__wrapped__ is os.getpid
        child = clone()
        assert child.name == "pid"
        assert child.daemon
        assert child.join() == child.pid


# -- the end of a child that opened things by name (_cengine_end.h) ------------------


def _python_end_marker(w: int) -> None:
    """In a child: the Python end, if it runs, writes b"P" to ``w`` first."""
    from procshare._engine import core

    shutdown = core.shutdown_engine

    def marked() -> None:
        os.write(w, b"P")
        shutdown()

    core.shutdown_engine = marked


def _ended_in_python(r: int) -> bool:
    os.set_blocking(r, False)
    try:
        return b"P" in os.read(r, 64)
    except BlockingIOError:
        return False
    finally:
        os.close(r)


def _lock_exists(name: str) -> bool:
    from procshare._engine import names

    return get_engine().backend.object_identity(names.os_name(names.LOCK, name)) is not None


@pytest.mark.timeout(60)
def test_a_child_that_opened_by_name_ends_in_c_and_leaves_nothing(fast: bool) -> None:
    # The README example's child: a value and a lock by name, both closed by
    # `with`; the lock is kept for reuse until the engine ends, which the C end
    # does (the Python end, the reference, with the C paths off).
    r, w = os.pipe()

    @ps.forked
    def job(i: int) -> None:
        _python_end_marker(w)
        with ps.shared("ff-sum", ps.u64) as s, ps.interprocess_lock("ff-m"):
            s.value += i

    with ps.shared("ff-sum", ps.u64) as total:
        _noop().join()  # (the first fork of a process is a Python one)
        with ps.children():
            for i in range(1, 4):
                job(i)
        assert total.value == 6
    os.close(w)
    assert _ended_in_python(r) is not fast
    assert not _lock_exists("ff-m")  # its last holder removed it


@pytest.mark.timeout(60)
def test_a_c_end_keeps_a_lock_whose_death_nobody_confirmed(fast: bool) -> None:
    r, w = os.pipe()

    @ps.forked
    def dies_holding() -> None:
        ps.interprocess_lock("ff-k").acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    @ps.forked
    def is_told_and_leaves_it_unconfirmed() -> None:
        _python_end_marker(w)
        lock = ps.interprocess_lock("ff-k")
        try:
            lock.acquire(timeout=10)
        except ps.OwnerDied:
            lock.release()  # released unconfirmed: the next one is told again
        else:
            raise AssertionError("the death was not told")

    _noop().join()
    with pytest.raises(ps.ChildKilled):
        dies_holding().join()
    assert _lock_exists("ff-k")  # an orphan that must be kept: the death is news
    is_told_and_leaves_it_unconfirmed().join()
    os.close(w)
    assert _ended_in_python(r) is not fast
    assert _lock_exists("ff-k")  # its last holder kept it
    lock = ps.interprocess_lock("ff-k")
    try:
        with pytest.raises(ps.OwnerDied):
            lock.acquire(timeout=10)
        lock.mark_consistent()
        lock.release()
    finally:
        lock.close()
    assert not _lock_exists("ff-k")  # confirmed: the last holder removed it


@pytest.mark.timeout(60)
def test_a_close_that_fails_at_a_childs_end_is_reported_on_both_paths(fast: bool) -> None:
    @ps.forked
    def job() -> None:
        engine = get_engine()

        def refuses(handle: object) -> bool:
            raise OSError(5, "injected: the close of the lock object failed")

        with ps.interprocess_lock("ff-e"):
            pass
        engine.backend.lock_close = refuses  # (this child's backend only)

    _noop().join()
    with pytest.raises(ps.ChildRaised, match="raised while the child released") as info:
        job().join()
    assert "injected" in str(info.value)
    # The lock object was never closed by the child: its hold ended with the
    # process, and the next opener finds an orphan with nothing to tell.
    lock = ps.interprocess_lock("ff-e")
    try:
        with lock:
            pass
    finally:
        lock.close()
    assert not _lock_exists("ff-e")
