"""The front end on Dask distributed: ``with ps.cluster(client):`` (issue 17, SPEC 8).

One LocalCluster (2 single-threaded worker processes) serves the module;
the dying-worker and dead-lock-holder tests make their own, configured to
fail fast. Every mapping of the front end has a test here.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import procshare as ps
import procshare._demo
from cluster_support import local_cluster

ROOT = Path(__file__).resolve().parents[1]
SEED_SUM = 193107012120


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with local_cluster(2) as c:
        yield c


@pytest.fixture
def cluster(client: Any) -> Iterator[Any]:
    with ps.cluster(client):
        yield client


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the seed program


@pytest.mark.timeout(180)
def test_the_seed_program_runs_unchanged_on_the_cluster(cluster: Any, capsys: Any) -> None:
    seed_runner = _load(ROOT / "tests" / "seed_runner.py", "seed_runner_on_cluster")
    assert seed_runner.seed_scenario(100) == SEED_SUM
    seed_sum = _load(ROOT / "examples" / "seed_sum.py", "seed_sum_on_cluster")
    assert seed_sum.main(100) == 0
    assert f"sum {SEED_SUM}" in capsys.readouterr().out
    # The demo's own scenario too (what `make demo CLUSTER=1` runs).
    from procshare import _demo

    assert _demo.scenario(100) == SEED_SUM


@ps.forked
def _add_unlocked(i: int, rounds: int, locked: bool) -> None:
    with ps.shared("n", int) as n:
        for _ in range(rounds):
            with ps.interprocess_lock("m") if locked else _nothing():
                seen = n.value
                time.sleep(0.01)  # inside: the other worker's update overlaps
                n.value = seen + 1


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("locked", [True, False], ids=["locked", "unlocked-negative-control"])
def test_read_modify_write_is_safe_under_the_lock_only(cluster: Any, locked: bool) -> None:
    with ps.shared("n", int) as n:
        with ps.children():
            for _ in range(6):
                _add_unlocked(0, 5, locked)
        total = n.value
    if locked:
        assert total == 30
    else:
        assert total < 30  # two workers at once lose updates without the lock


# ---------------------------------------------------------------- @forked and children()


@ps.forked
def _square(x: int) -> int:
    return x * x


@ps.forked
def _fail(kind: type[Exception], message: str) -> None:
    raise kind(message)


@ps.forked
def _wait_event(name: str, seconds: float) -> str:
    ps.interprocess_event(name).wait(seconds)
    return "woke"


@pytest.mark.timeout(120)
def test_forked_calls_are_tasks_with_child_handles(cluster: Any) -> None:
    child = _square(7)
    assert child.join() == 49
    status = child.wait()
    assert status is not None
    assert status.ok
    assert status.outcome == "returned"
    assert not child.running
    with _square(3) as c:
        pass
    assert c.join() == 9

    slow = _wait_event("go", 30)
    with pytest.raises(ps.JoinTimeout):
        slow.join(timeout=0.2)
    assert slow.wait(timeout=0.1) is None
    assert slow.running
    ps.interprocess_event("go").set()
    assert slow.join(timeout=30) == "woke"


@pytest.mark.timeout(120)
def test_a_raising_task_is_child_raised_of_the_same_type(cluster: Any) -> None:
    with pytest.raises(KeyError) as info:
        _fail(KeyError, "nope").join()
    err = info.value
    assert isinstance(err, ps.ChildRaised)
    assert isinstance(err.__cause__, KeyError)
    assert "in _fail" in err.child_traceback
    assert "on the cluster" in str(err)  # a task has no pid to name
    assert "pid None" not in str(err)
    assert _fail(ValueError, "bad").wait().outcome == "raised"  # type: ignore[union-attr]


@pytest.mark.timeout(120)
def test_kill_and_timeout_cancel_the_task(cluster: Any) -> None:
    stuck = _wait_event("never-set", 3)
    stuck.kill()
    with pytest.raises(ps.ChildKilled, match="cancelled"):
        stuck.join()
    assert stuck.wait().outcome == "cancelled"  # type: ignore[union-attr]

    timed = ps.forked(timeout=0.3)(_wait_event.__wrapped__)("never-set-either", 3)
    with pytest.raises(ps.ChildTimeout):
        timed.join()


@ps.forked
def _sum_of_squares(n: int) -> int:
    with ps.children() as kids:  # tasks started by a task
        for i in range(n):
            _square(i)
    return sum(kids.results)


@pytest.mark.timeout(120)
def test_a_task_can_start_and_wait_for_tasks(cluster: Any) -> None:
    # Two single-threaded workers, three tasks waiting for their own: the
    # waiting ones give their thread back, or this would deadlock.
    with ps.children() as kids:
        for n in (3, 4, 5):
            _sum_of_squares(n)
    assert kids.results == [5, 14, 30]


@pytest.mark.timeout(120)
def test_children_scope_gives_results_in_order(cluster: Any, capsys: Any) -> None:
    with ps.children(progress=True) as kids:
        for i in range(6):
            _square(i)
    assert kids.results == [0, 1, 4, 9, 16, 25]
    assert len(kids.children) == 6
    assert "6/6" in capsys.readouterr().err  # the bar counted every task


@pytest.mark.timeout(120)
def test_children_scope_raises_every_failure_as_a_group(cluster: Any) -> None:
    def scope() -> None:
        with ps.children(cancel_on_error=False):
            _fail(ValueError, "one")
            _square(2)
            _fail(KeyError, "two")
            raise RuntimeError("the block")

    with pytest.raises(ExceptionGroup) as info:
        scope()
    group = info.value
    kinds = [
        next(k for k in (RuntimeError, ValueError, KeyError) if isinstance(e, k))
        for e in group.exceptions
    ]
    assert kinds == [RuntimeError, ValueError, KeyError]
    assert [isinstance(e, ps.ChildRaised) for e in group.exceptions] == [False, True, True]
    assert group.subgroup(ValueError) is not None


@pytest.mark.timeout(120)
def test_cancel_on_error_cancels_the_rest(cluster: Any) -> None:
    kids = ps.children()
    waiting: list[Any] = []

    def scope() -> None:
        with kids:
            _fail(ValueError, "first failure")  # first: it fails while the others wait
            waiting.extend(_wait_event("cancel-me", 10) for _ in range(3))

    with pytest.raises(ExceptionGroup) as info:
        scope()
    (err,) = info.value.exceptions
    assert isinstance(err, ValueError)
    assert all(w.cancelled for w in waiting)
    assert "cancelled" in str(info.value)
    assert len(kids.children) == 4
    ps.interprocess_event("cancel-me").set()  # let the ones already running end


@ps.forked
def _count_running(pause: float) -> int:
    with ps.shared("running", int) as running, ps.shared("most", int) as most:
        with ps.interprocess_lock("c"):
            running.value += 1
            most.value = max(most.value, running.value)
        time.sleep(pause)
        with ps.interprocess_lock("c"):
            running.value -= 1
    return 0


@pytest.mark.timeout(120)
def test_limit_caps_the_tasks_running_at_once(cluster: Any) -> None:
    with ps.shared("running", int), ps.shared("most", int) as most:
        with ps.children(limit=1):
            for _ in range(4):
                _count_running(0.1)
        assert most.value == 1


# ---------------------------------------------------------------- pools


def _item(x: int) -> int:
    if x == 3:
        raise KeyError(x)
    return x + 100


@pytest.mark.timeout(120)
def test_map_imap_and_pool_run_items_as_tasks(cluster: Any) -> None:
    assert ps.map(lambda x: x * 2, range(8)) == [x * 2 for x in range(8)]
    assert ps.map(abs, [-1, -2], progress=True) == [1, 2]
    assert sorted(ps.imap(abs, [-1, -2, 3], ordered=False)) == [1, 2, 3]
    assert list(ps.imap(abs, iter([-5, 6, -7]))) == [5, 6, 7]  # not sized: fed as they end
    for chunksize in (None, 2):
        with pytest.raises(ExceptionGroup) as info:
            ps.map(_item, range(6), chunksize=chunksize)
        (err,) = info.value.exceptions
        assert isinstance(err, KeyError)
        assert isinstance(err, ps.ChildRaised)
        assert err.name == "_item[3]"

    def use_pool() -> None:
        with ps.pool(workers=2) as pool:
            assert pool.map(_item, [0, 1]) == [100, 101]
            handle = pool.submit(pow, 2, 10)
            assert handle.join() == 1024
            pool.submit(_item, 3)  # not joined: the pool's exit raises it

    with pytest.raises(ExceptionGroup) as info:
        use_pool()
    (err,) = info.value.exceptions
    assert isinstance(err, KeyError)


@pytest.mark.timeout(120)
def test_a_cluster_pool_checks_its_arguments_as_the_local_one(cluster: Any) -> None:
    with ps.pool(workers=2) as pool:
        assert pool.workers == 2
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(abs, [1], chunksize=0)
        with pytest.raises(TypeError, match="callable"):
            pool.imap(3, [1])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            pool.map(abs, [1], timeout=-1)
        with pytest.raises(TypeError, match="progress"):
            pool.map(abs, [1], progress="yes")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            pool.submit(3)  # type: ignore[arg-type]
    with pytest.raises(ps.UsageError, match="outside its"):
        pool.map(abs, [1])


@pytest.mark.timeout(120)
def test_map_timeout_fails_what_is_left(cluster: Any) -> None:
    with pytest.raises(ExceptionGroup) as info:
        ps.map(time.sleep, [5, 5], timeout=0.3)
    assert all(isinstance(e, ps.ChildTimeout) for e in info.value.exceptions)


# ---------------------------------------------------------------- coordination


@pytest.mark.timeout(120)
def test_lock_keeps_the_one_host_rules(cluster: Any) -> None:
    lock = ps.interprocess_lock("rules")
    assert lock.acquire()
    assert lock.locked()
    assert lock.acquire(timeout=0.1) is False  # non-reentrant, held by this thread
    with pytest.raises(ps.UsageError):
        lock.acquire()  # would wait forever
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    again = ps.interprocess_lock("rules-r", reentrant=True)
    with again, again:
        assert again.owned()
    assert not again.owned()

    @ps.forked
    def try_it() -> None:
        with ps.interprocess_lock("held", timeout=0.2):
            pass

    with ps.interprocess_lock("held"):
        with pytest.raises(TimeoutError) as info:
            try_it().join()
    assert isinstance(info.value, ps.LockTimeout)


@pytest.mark.timeout(120)
def test_names_live_in_their_namespace(cluster: Any) -> None:
    with ps.namespace("app-a"), ps.interprocess_lock("m"):
        assert ps.interprocess_lock("m").locked()
        with ps.namespace("app-b"):
            other = ps.interprocess_lock("m")
            assert not other.locked()
            assert other.acquire(timeout=0.5)
            other.release()


@ps.forked
def _produce(name: str, items: list[Any]) -> None:
    q = ps.interprocess_queue(name)
    for item in items:
        q.put(item)


@pytest.mark.timeout(120)
def test_semaphore_event_and_queue_are_dask_objects(cluster: Any) -> None:
    sem = ps.interprocess_semaphore("s", 2)
    assert sem.value == 2
    with sem:
        assert sem.value == 1
        assert sem.acquire(timeout=0.1)
        assert not sem.acquire(timeout=0.1)
        sem.release()
    with pytest.raises(RuntimeError):
        sem.release()

    event = ps.interprocess_event("e")
    assert not event.is_set()
    assert event.wait(0.05) is False
    waiter = _wait_event("e", 30)
    event.set()
    assert waiter.join() == "woke"
    event.clear()
    assert not event.is_set()

    q = ps.interprocess_queue("q")
    _produce("q", [b"bytes", {"a": (1, 2)}, 3]).join()
    assert [q.get(timeout=5) for _ in range(3)] == [b"bytes", {"a": (1, 2)}, 3]
    with pytest.raises(queue.Empty):
        q.get_nowait()
    small = ps.interprocess_queue("q1", maxsize=1)
    small.put_nowait(1)
    assert small.full()
    with pytest.raises(ps.QueueFull):
        small.put_nowait(2)
    assert list(small) == [1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("make", "instead"),
    [
        (lambda: ps.interprocess_condition("c"), "event"),
        (lambda: ps.interprocess_barrier("b", 2), "ps.children()"),
        (lambda: ps.interprocess_rwlock("rw"), "interprocess_lock"),
        (ps.interprocess_lock, "give it a name"),
        (lambda: ps.interprocess_semaphore(3), "give it a name"),
        (ps.interprocess_event, "give it a name"),
        (lambda: ps.interprocess_queue(10), "give it a name"),
    ],
    ids=[
        "condition",
        "barrier",
        "rwlock",
        "anon-lock",
        "anon-semaphore",
        "anon-event",
        "anon-queue",
    ],
)
def test_what_dask_lacks_is_a_clear_error(cluster: Any, make: Any, instead: str) -> None:
    with pytest.raises(ps.NotOnCluster, match=instead) as info:
        make()
    assert isinstance(info.value, NotImplementedError)


# ---------------------------------------------------------------- shared data


@attrs.define
class Stats:
    count: ps.u32  # type: ignore[valid-type]
    total: float


@ps.forked
def _record(x: float) -> None:
    with ps.shared("stats", Stats) as s, ps.interprocess_lock("stats"):
        s.count += 1
        s.total += x


@pytest.mark.timeout(120)
def test_shared_scalar_struct_and_bytes_views(cluster: Any) -> None:
    with ps.shared("u8", ps.u8, initial=7) as small:
        assert small.value == 7
        with pytest.raises(ValueError, match="u8"):
            small.value = 300
        small.value = 255
        assert small.value == 255
    with ps.shared("stats", Stats) as stats:
        with ps.children():
            for x in (1.5, 2.5, 3.0):
                _record(x)
        assert (stats.count, stats.total) == (3, 7.0)
    with ps.shared("blob", bytes, size=8) as blob:
        blob[0:4] = b"abcd"
        assert bytes(blob) == b"abcd\0\0\0\0"
        assert blob[1] == ord("b")
        assert len(blob) == 8


@pytest.mark.timeout(120)
def test_shared_create_attach_kinds_and_lifetime(cluster: Any) -> None:
    with ps.shared("x", ps.u64) as x:
        x.value = 5
        with pytest.raises(ps.SegmentExists):
            ps.shared("x", ps.u64, create=True)
        with pytest.raises(ps.SharedTypeError):
            ps.shared("x", ps.f64)
        with ps.shared("x", ps.u64, create=False) as same:
            assert same.value == 5
    # Closing the creator removed it.
    with pytest.raises(ps.SegmentNotFound):
        ps.shared("x", ps.u64, create=False)
    seg = ps.shared("kept", int, persist=True)
    seg.close()
    with ps.shared("kept", int, create=False):
        pass
    assert ps.unlink("kept") is True
    assert ps.unlink("kept") is False
    with pytest.raises(ps.SegmentClosed):
        _ = seg.view


@pytest.mark.timeout(60)
def test_numpy_and_anonymous_segments_say_what_to_do(cluster: Any) -> None:
    import numpy as np

    with pytest.raises(ps.NotOnCluster, match="scatter"):
        ps.shared("arr", np.float64, shape=(3,))
    with pytest.raises(ps.NotOnCluster, match="give it a name"):
        ps.shared(ps.u64)


# ---------------------------------------------------------------- failures


def _die_in_worker(name: str) -> None:
    ps.interprocess_queue(name).put(os.getpid())
    os._exit(1)


def _die_holding(lock: str) -> None:
    ps.interprocess_lock(lock).acquire()
    ps.interprocess_event("holding").set()
    os._exit(1)


@pytest.mark.timeout(240)
def test_a_dying_worker_is_retried_then_child_killed() -> None:
    config = {
        "distributed.scheduler.allowed-failures": 1,
        "distributed.scheduler.locks.lease-timeout": "2s",
        "distributed.scheduler.locks.lease-validation-interval": "200ms",
    }
    with local_cluster(2, **config) as client, ps.cluster(client):
        child = ps.forked(_die_in_worker)("attempts")
        with pytest.raises(ps.ChildKilled) as info:
            child.join(timeout=120)
        assert "lost its Dask worker" in str(info.value)
        attempts = list(ps.interprocess_queue("attempts"))
        assert len(attempts) == 2  # the first try and allowed-failures=1 retry
        # A lock whose holder died comes back when its lease expires; no OwnerDied.
        ps.forked(_die_holding)("m")
        assert ps.interprocess_event("holding").wait(60)
        started = time.monotonic()
        lock = ps.interprocess_lock("m")
        assert lock.acquire(timeout=60)
        lock.release()
        assert time.monotonic() - started < 60


# ---------------------------------------------------------------- layering


def test_the_core_never_imports_dask() -> None:
    code = (
        "import sys\n"
        "import procshare as ps\n"
        "@ps.forked\n"
        "def f(): return 1\n"
        "with ps.namespace():\n"
        "    with ps.shared('x', int) as x, ps.interprocess_lock('m'):\n"
        "        x.value = f().join()\n"
        "    assert ps.map(abs, [-1]) == [1]\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'dask', 'distributed'} "
        "or m.startswith('procshare._dask'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_without_distributed_cluster_says_how_to_install_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['distributed'] = None\n"
        "import procshare as ps\n"
        "try:\n"
        "    ps.cluster('tcp://127.0.0.1:1')\n"
        "except ps.MissingDependency as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'procshare[dask]'" in done.stdout


@pytest.mark.timeout(180)
def test_the_demo_runs_on_a_local_cluster() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "procshare", "demo", "--cluster", "--processes", "30"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every child is a Dask task on a LocalCluster" in done.stdout
    assert f"ok: all 1 run(s) summed to {ps._demo.expected_sum(30)}" in done.stdout


def test_the_demo_says_how_to_install_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['distributed'] = None\n"
        "from procshare._demo import main\n"
        "sys.exit(main(['--cluster']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'procshare[dask]'" in done.stderr


def test_cluster_refuses_what_is_not_a_client() -> None:
    with pytest.raises(TypeError, match=r"distributed\.Client"), ps.cluster(42):
        pass


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound once, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.timeout(60)
def test_cluster_at_an_address_nobody_answers_says_what_to_do() -> None:
    address = f"tcp://127.0.0.1:{_closed_port()}"
    threads = set(threading.enumerate())
    started = time.monotonic()
    with pytest.raises(ps.ClusterUnreachable) as info, ps.cluster(address, timeout=1):
        pytest.fail("the block ran without a scheduler")
    assert time.monotonic() - started < 30  # the timeout given, not Dask's 30 s default
    err = info.value
    assert isinstance(err, ConnectionError)
    assert isinstance(err, OSError)  # what Dask raised before: old handlers still catch it
    assert err.address == address
    assert err.timeout == 1.0
    assert f"no Dask scheduler answered at {address!r} within 1 s" in str(err)
    assert "dask scheduler" in str(err)
    assert isinstance(err.__cause__, OSError)
    # distributed leaves a failed client's loop thread running; ps.cluster stops it.
    assert set(threading.enumerate()) <= threads


def test_cluster_timeout_is_checked() -> None:
    # A number out of range is a ValueError; what is not a number is a
    # TypeError, as for every other timeout=. Both say what to pass.
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match=r"timeout=\) must be a number of seconds > 0"):
            ps.cluster("tcp://127.0.0.1:8786", timeout=bad)
    for wrong in (True, "5", [5]):
        with pytest.raises(TypeError, match=r"timeout=\) must be a number of seconds > 0"):
            ps.cluster("tcp://127.0.0.1:8786", timeout=wrong)  # type: ignore[arg-type]


def test_cluster_refuses_a_timeout_with_a_connected_client(client: Any) -> None:
    with pytest.raises(TypeError, match="already connected"), ps.cluster(client, timeout=5):
        pass


@pytest.mark.timeout(60)
def test_the_demo_says_when_no_scheduler_answers() -> None:
    address = f"tcp://127.0.0.1:{_closed_port()}"
    # Dask's own setting, from the environment: the demo has no flag for it.
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    done = subprocess.run(
        [sys.executable, "-m", "procshare", "demo", "--cluster", address],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        env=env,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"no Dask scheduler answered at {address!r} within Dask's" in done.stderr
    assert "Traceback" not in done.stderr
