"""``ps.map``, ``ps.imap`` and ``ps.pool``: results, streaming, the pool's API, progress."""

# ruff: noqa: PT012 - the block under pytest.raises is the pool or the map under test
from __future__ import annotations

import itertools
import os
import pickle
import sys
import time
from typing import Any

import pytest

import procshare as ps
from pool_support import Unpicklable, double, getpid, len_first
from procshare.testing import child_pids


@pytest.mark.timeout(60)
def test_map_gives_results_in_order_for_any_iterable() -> None:
    square = lambda x: x * x  # noqa: E731 - a lambda on purpose: it is never pickled
    assert ps.map(square, range(50), workers=2) == [x * x for x in range(50)]
    assert ps.map(square, [3, 1, 2], workers=2) == [9, 1, 4]
    assert ps.map(square, (x for x in range(7)), workers=2) == [x * x for x in range(7)]
    assert ps.map(square, [], workers=2) == []
    assert ps.map(lambda x: None, range(5), workers=2) == [None] * 5
    assert child_pids() == {}


@pytest.mark.timeout(60)
def test_closures_locks_and_views_need_no_pickling() -> None:
    offset = 1000
    # Opened, not held (no `with`): the workers take it item by item.
    lock = ps.interprocess_lock("pool-lock")
    try:
        with ps.shared("pool-sum", ps.u64) as total:

            def add(x: int) -> int:
                with lock:
                    total.value += x
                return x + offset

            assert ps.map(add, range(100), workers=2) == [x + offset for x in range(100)]
            assert total.value == sum(range(100))
    finally:
        lock.close()


@pytest.mark.timeout(60)
def test_an_inherited_sequence_is_not_pickled() -> None:
    items = [Unpicklable(i) for i in range(40)]
    assert ps.map(lambda u: u.value, items, workers=2) == list(range(40))
    # Negative control: the same items from a generator must be pickled, and fail.
    with pytest.raises(ExceptionGroup) as info:
        ps.map(lambda u: u.value, (u for u in items[:3]), workers=2)
    assert len(info.value.exceptions) == 3
    for err in info.value.exceptions:
        assert isinstance(err, ps.ChildRaised)
        assert "could not be pickled to send it to a worker" in str(err)


@pytest.mark.timeout(60)
def test_a_numpy_array_is_indexed_by_the_workers() -> None:
    np = pytest.importorskip("numpy")
    data = np.arange(1000, dtype=np.int64)
    assert ps.map(lambda v: int(v) * 3, data, workers=2) == [3 * i for i in range(1000)]


@pytest.mark.timeout(60)
def test_ordered_and_unordered_imap() -> None:
    def slow_first(x: int) -> int:
        if x == 0:
            time.sleep(1.0)  # long enough for the other worker, even on a loaded machine
        return x

    ordered = list(ps.imap(slow_first, range(6), workers=2, chunksize=1))
    assert ordered == list(range(6))
    unordered = list(ps.imap(slow_first, range(6), workers=2, chunksize=1, ordered=False))
    assert sorted(unordered) == list(range(6))
    assert unordered.index(0) >= 2  # the slow one did not hold the others back
    unordered_map = ps.map(slow_first, range(6), workers=2, chunksize=1, ordered=False)
    assert unordered_map.index(0) >= 2


@pytest.mark.timeout(60)
def test_a_slow_items_result_comes_back_when_it_ends() -> None:
    # Not held back until the next item of its chunk ends too: item 1 waits
    # for the parent to have item 0's result (and says whether it did).
    got_first = ps.interprocess_event()

    def second_waits(x: int) -> bool:
        if x == 0:
            time.sleep(0.005)  # slower than a batch of results may wait
            return True
        return got_first.wait(10)

    it = ps.imap(second_waits, [0, 1], workers=1, chunksize=2)
    try:
        assert next(it) is True
        got_first.set()
        assert next(it) is True
        assert list(it) == []
    finally:
        it.close()  # type: ignore[attr-defined]
        got_first.close()


@pytest.mark.timeout(60)
def test_a_worker_gets_its_next_chunk_while_it_runs_the_last_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Slow items: one chunk each, and the next one sent while the worker runs
    # the last item of the current one, so it never waits for a round trip.
    # Item 3 (the last of the chunk [2, 3]) waits until the chunk [4, 5] is sent.
    from procshare._engine import pool as _pool_engine

    sent_next = ps.interprocess_event()
    real = _pool_engine.Core._dispatch

    def dispatch(core: Any, w: Any, task: Any) -> None:
        real(core, w, task)
        if task.start == 4:
            sent_next.set()

    monkeypatch.setattr(_pool_engine.Core, "_dispatch", dispatch)
    try:

        def last_waits(x: int) -> bool:
            if x == 3:
                return sent_next.wait(10)
            time.sleep(0.005)  # slow items: over a millisecond each
            return True

        assert ps.map(last_waits, range(6), workers=1, chunksize=2) == [True] * 6
    finally:
        sent_next.close()


@pytest.mark.timeout(60)
def test_imap_is_lazy_and_leaving_it_early_reaps_the_workers() -> None:
    taken = []
    endless = itertools.count()
    it = ps.imap(double, endless, workers=2)
    for value in it:
        taken.append(value)
        if len(taken) == 25:
            break
    it.close()  # type: ignore[attr-defined]
    assert taken == [2 * x for x in range(25)]
    assert child_pids() == {}
    # A slow imap dropped mid-way: its running items are cancelled, no one waits.
    started = time.monotonic()
    slow = ps.imap(time.sleep, [0.01, 30, 30, 30], workers=2, chunksize=1)
    next(slow)
    slow.close()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 20
    assert child_pids() == {}


@pytest.mark.timeout(60)
def test_initializer_runs_in_each_worker() -> None:
    state: dict[str, int] = {}

    def init(value: int) -> None:
        state["value"] = value
        state["pid"] = os.getpid()

    with ps.pool(workers=2, initializer=init, initargs=(42,)) as pool:
        got = pool.map(lambda _: (state["value"], state["pid"]), range(20), chunksize=1)
    assert {v for v, _ in got} == {42}
    assert all(pid != os.getpid() for _, pid in got)
    assert "value" not in state  # ran in the workers, not here


@pytest.mark.timeout(60)
def test_submit_and_join() -> None:
    with ps.pool(workers=2) as pool:
        handles = [pool.submit(pow, 2, i) for i in range(10)]
        assert [h.join() for h in handles] == [2**i for i in range(10)]
        bad = pool.submit(lambda: {}["missing"])
        with pytest.raises(ps.ChildRaised) as info:
            bad.join()
        assert isinstance(info.value.__cause__, KeyError)
        slow = pool.submit(time.sleep, 0.5)
        with pytest.raises(ps.JoinTimeout):
            slow.join(timeout=0.01)
        assert slow.join() is None
        assert slow.done


@pytest.mark.timeout(60)
def test_pool_function_defined_later_or_pickled() -> None:
    with ps.pool(workers=2) as pool:
        first = set(pool.map(getpid, range(20), chunksize=1))
        # A module-level function pickles by name: the same workers run it.
        assert set(pool.map(getpid, range(20), chunksize=1)) <= first
        assert pool.map(double, range(5)) == [0, 2, 4, 6, 8]
        # A closure made now cannot be pickled: fresh workers inherit it.
        k = 7
        assert pool.map(lambda x: x + k, range(5)) == [7, 8, 9, 10, 11]
        assert pool.map(double, range(3)) == [0, 2, 4]
    assert child_pids() == {}


@pytest.mark.timeout(60)
def test_workers_do_not_join_the_callers_children_scope() -> None:
    with ps.children() as kids:
        assert ps.map(double, range(10), workers=2) == [2 * x for x in range(10)]
    assert kids.children == []


@pytest.mark.timeout(60)
def test_a_pool_is_used_inside_its_block_and_by_its_process_only() -> None:
    pool = ps.pool(workers=1)
    with pytest.raises(ps.UsageError, match="outside its"):
        pool.map(double, [1])
    with pool:
        assert pool.map(double, [1]) == [2]
    with pytest.raises(ps.UsageError, match="outside its"):
        pool.submit(double, 1)
    with pytest.raises(ps.UsageError, match="only once"):
        pool.__enter__()


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="callable"):
        ps.map(3, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        ps.map(double, [1], workers=0)
    with pytest.raises(TypeError, match="workers"):
        ps.map(double, [1], workers=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunksize"):
        ps.imap(double, [1], chunksize=0)
    with pytest.raises(ValueError, match="timeout"):
        ps.map(double, [1], timeout=-1)
    with pytest.raises(TypeError, match="progress"):
        ps.map(double, [1], progress="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initializer"):
        ps.pool(initializer=3)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_progress_bar_shows_done_and_failed(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")

    def fn(x: int) -> int:
        if x == 4:
            raise ValueError(x)
        return x

    with pytest.raises(ExceptionGroup):
        ps.map(fn, range(10), workers=2, progress=True)
    err = capfd.readouterr().err
    assert "10/10" in err
    assert "failed=1" in err


def test_progress_without_tqdm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises
    with pytest.raises(ps.MissingDependency) as info:
        ps.map(double, [1, 2], workers=1, progress=True)
    err = info.value
    assert isinstance(err, ModuleNotFoundError)
    assert isinstance(err, ps.ProcshareError)
    assert err.name == "tqdm"
    assert "procshare[progress]" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    assert again.name == "tqdm"
    assert child_pids() == {}


@pytest.mark.timeout(60)
def test_children_progress_bar_counts_the_scope(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")

    @ps.forked
    def job(i: int) -> int:
        if i == 2:
            raise ValueError(i)
        return i

    with pytest.raises(ExceptionGroup):
        with ps.children(progress=True, cancel_on_error=False):
            for i in range(5):
                job(i)
    err = capfd.readouterr().err
    assert "5/5" in err
    assert "failed=1" in err
    with ps.children(progress=True) as kids:
        for i in (0, 1, 3):
            job(i)
    assert kids.results == [0, 1, 3]
    assert "3/3" in capfd.readouterr().err


def test_children_progress_without_tqdm_forks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    scope = ps.children(progress=True)
    with pytest.raises(ps.MissingDependency, match="procshare\\[progress\\]"):
        scope.__enter__()
    with pytest.raises(TypeError, match="progress"):
        ps.children(progress=1)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_a_worker_can_run_its_own_map() -> None:
    def inner(n: int) -> int:
        return sum(ps.map(double, range(n), workers=1))

    assert ps.map(inner, [3, 4], workers=2) == [6, 12]


@pytest.mark.timeout(60)
def test_big_items_are_sent_in_small_tasks() -> None:
    big = [bytes([i]) * (3 << 20) for i in range(6)]  # 3 MiB each: one per task
    with ps.pool(workers=2) as pool:
        pool.map(double, [0])  # the workers exist before `big`: it must be sent
        assert pool.map(len_first, big) == [(3 << 20, i) for i in range(6)]
        assert list(ps.imap(len, iter(big), workers=2)) == [3 << 20] * 6
