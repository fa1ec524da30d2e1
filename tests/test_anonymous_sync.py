"""The coordination families without a name (issue 19, SPEC 3 and 4b).

``ps.interprocess_semaphore()``, ``_event()``, ``_condition()``, ``_barrier()``,
``_rwlock()`` and ``_queue()`` called without a name: shared with the children
forked while open (pool workers too), named nowhere, as robust as the named
forms when a participant is SIGKILLed, and refused with ``ps.AnonymousError``
where a name or a pickle is needed.
"""

from __future__ import annotations

import gc
import os
import pickle
import queue
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import procshare as ps
from procshare._backends import get_backend
from procshare._engine import names
from queue_support import die_reading, die_writing
from shared_support import Helper, alive, wait_for
from test_anonymous import _anonymous_inodes, _pids


def _killed(status: ps.ExitStatus | None) -> int:
    assert status is not None
    assert status.outcome == "killed"
    return status.pid


def _backing(address: int) -> str:
    """What backs this process's mapping holding ``address`` (its /proc maps path)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"{address:#x} is not mapped")


def _waiters(obj: Any) -> int:
    """The waiters count its repr shows."""
    return int(repr(obj).split("waiters=")[1].split()[0].rstrip(">"))


def _every_family() -> list[Any]:
    return [
        ps.interprocess_semaphore(),
        ps.interprocess_event(),
        ps.interprocess_condition(),
        ps.interprocess_barrier(2),
        ps.interprocess_rwlock(),
        ps.interprocess_queue(),
    ]


@pytest.fixture
def family_objects() -> Iterator[list[Any]]:
    objects = _every_family()
    yield objects
    for obj in objects:
        obj.close()


# -- named nowhere ---------------------------------------------------------------


def test_every_family_without_a_name_is_anonymous_and_named_nowhere(
    procshare_leak_check: str, family_objects: list[Any]
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    labels = set()
    for obj in family_objects:
        assert obj.anonymous is True
        assert obj.name.startswith("(anonymous #")
        labels.add(obj.name)
        backing = _backing(obj._obj.rec.handle.address)
        # small ones: one anonymous mapping; the queue's ring is over 1 MiB: a memfd
        assert backing == "/dev/zero (deleted)" or backing.startswith("/memfd:"), backing
        assert obj.name in repr(obj)
    assert len(labels) == len(family_objects)  # every one its own label
    assert family_objects[2].lock.anonymous  # the condition's own lock, anonymous too
    prefix = names.namespace_prefix(procshare_leak_check)
    assert not [n for n in get_backend().os_objects() if n.startswith(prefix)]
    assert ps.segments() == []
    # (Other programs may create objects in /dev/shm meanwhile; none is ours.)
    new = set(os.listdir("/dev/shm")) - shm_before
    assert not [n for n in new if n.startswith(prefix.lstrip("/"))]


def test_named_forms_still_have_names() -> None:
    sem = ps.interprocess_semaphore("named-sem", 2)
    assert not sem.anonymous
    assert sem.name == "named-sem"
    copy = pickle.loads(pickle.dumps(sem))
    assert copy.name == "named-sem"
    copy.close()
    sem.close()


def test_the_number_can_come_first_as_in_threading() -> None:
    sem = ps.interprocess_semaphore(3)
    assert sem.anonymous
    assert sem.value == 3
    sem2 = ps.interprocess_semaphore(value=2)
    assert sem2.anonymous
    assert sem2.value == 2
    barrier = ps.interprocess_barrier(3, timeout=5)
    assert barrier.anonymous
    assert barrier.parties == 3
    barrier2 = ps.interprocess_barrier(parties=2)
    assert barrier2.parties == 2
    q = ps.interprocess_queue(2)
    assert q.anonymous
    assert q.maxsize == 2
    for obj in (sem, sem2, barrier, barrier2, q):
        obj.close()
    with pytest.raises(TypeError, match="a name goes first"):
        ps.interprocess_barrier(3, 4)
    with pytest.raises(TypeError, match=r"interprocess_semaphore\(value=5\)"):
        ps.interprocess_semaphore(3, 5)
    with pytest.raises(TypeError, match="number of parties"):
        ps.interprocess_barrier()
    with pytest.raises(TypeError, match="number of parties"):
        ps.interprocess_barrier("b")


# -- each family shared with children, and robust ---------------------------------


@pytest.mark.timeout(60)
def test_an_anonymous_semaphore_limits_forked_children() -> None:
    r, w = os.pipe()
    sem = ps.interprocess_semaphore(2)
    lock = ps.interprocess_lock()
    with ps.shared(ps.i64) as inside, ps.shared(ps.i64) as most:

        @ps.forked
        def work() -> None:
            os.read(r, 1)  # all start together
            with sem:
                with lock:
                    inside.value += 1
                    most.value = max(most.value, inside.value)
                # Until two have been in at once (a deadline, not a sleep a
                # loaded machine can outlast: see test_sync.py).
                deadline = time.monotonic() + 20
                while most.value < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)
                with lock:
                    inside.value -= 1

        try:
            with ps.children():
                for _ in range(5):
                    work()
                os.write(w, b"g" * 5)
        finally:
            os.close(r)
            os.close(w)
        assert most.value == 2
    assert sem.value == 2
    sem.close()
    lock.close()


@pytest.mark.timeout(60)
def test_an_anonymous_semaphore_unit_held_by_a_killed_child_comes_back_and_is_told() -> None:
    sem = ps.interprocess_semaphore(1)

    @ps.forked
    def take_and_die() -> None:
        sem.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    pid = _killed(take_and_die().wait())
    assert sem.value == 0
    with pytest.raises(ps.HolderDied) as info:
        sem.acquire(timeout=10)
    assert info.value.held is True
    assert info.value.owner_pid == pid
    assert sem.name in str(info.value)
    sem.release()
    assert sem.acquire(timeout=0)  # told once
    sem.release()
    sem.close()


@pytest.mark.timeout(60)
def test_with_on_an_anonymous_semaphore_tells_a_waiter_of_a_holder_killed_meanwhile() -> None:
    sem = ps.interprocess_semaphore(1)
    held = ps.interprocess_event()

    @ps.forked
    def hold_forever() -> None:
        sem.acquire()
        held.set()
        time.sleep(60)

    child = hold_forever()
    assert held.wait(30)
    threading.Timer(0.3, child.kill).start()
    with pytest.raises(ps.HolderDied) as info, sem:
        pass
    assert info.value.held is False
    _killed(child.wait())
    assert sem.acquire(timeout=5)
    sem.release()
    sem.close()
    held.close()


@pytest.mark.timeout(60)
def test_an_anonymous_event_wakes_children_and_survives_a_killed_waiter() -> None:
    go = ps.interprocess_event()
    waiting = ps.interprocess_semaphore(0)

    @ps.forked
    def waiter() -> bool:
        waiting.release()
        return go.wait(30)

    @ps.forked
    def waiter_killed() -> None:
        waiting.release()
        go.wait(30)

    victim = waiter_killed()
    with ps.children():
        kids = [waiter() for _ in range(3)]
        for _ in range(4):
            assert waiting.acquire(timeout=30)
        victim.kill()
        _killed(victim.wait())
        go.set()
    assert [k.join() for k in kids] == [True, True, True]
    assert go.is_set()
    go.close()
    waiting.close()


@pytest.mark.timeout(60)
def test_an_anonymous_condition_notifies_a_child() -> None:
    cond = ps.interprocess_condition()
    with ps.shared(ps.u64) as box:

        @ps.forked
        def consumer() -> int:
            with cond:
                assert cond.wait_for(lambda: box.value != 0, timeout=30)
                return int(box.value)

        child = consumer()
        assert wait_for(lambda: "waiters=1" in repr(cond))
        with cond:
            box.value = 42
            cond.notify()
        assert child.join() == 42
    cond.close()
    assert cond.lock.closed  # the lock it made itself goes with it


@pytest.mark.timeout(60)
def test_an_anonymous_condition_takes_an_anonymous_lock_positionally() -> None:
    lock = ps.interprocess_lock()
    cond = ps.interprocess_condition(lock)
    assert cond.anonymous
    assert cond.lock is lock
    with cond:
        assert lock.owned()
        assert cond.wait(0.01) is False
    cond.close()
    assert not lock.closed  # not the condition's to close
    lock.close()


@pytest.mark.timeout(60)
def test_an_anonymous_barrier_between_a_parent_and_children() -> None:
    barrier = ps.interprocess_barrier(3)

    @ps.forked
    def party() -> list[int]:
        return [barrier.wait(30) for _ in range(3)]

    with ps.children():
        kids = [party(), party()]
        mine = [barrier.wait(30) for _ in range(3)]
    rounds = list(zip(mine, *(k.join() for k in kids), strict=True))
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert not barrier.broken
    barrier.close()


@pytest.mark.timeout(60)
def test_an_anonymous_barrier_party_killed_breaks_it_instead_of_hanging() -> None:
    barrier = ps.interprocess_barrier(2)
    first = ps.interprocess_event()

    @ps.forked
    def party_that_dies() -> None:
        barrier.wait(30)  # round one
        first.set()
        os.kill(os.getpid(), signal.SIGKILL)  # never comes to round two

    child = party_that_dies()
    assert barrier.wait(30) in (0, 1)
    assert first.wait(30)
    _killed(child.wait())
    with pytest.raises(ps.BrokenBarrier, match="a party died"):
        barrier.wait()  # no timeout: would hang without the liveness check
    barrier.reset()
    barrier.close()
    first.close()


@pytest.mark.timeout(60)
def test_parties_leaving_normally_do_not_break_one_of_two_anonymous_barriers() -> None:
    """A child waits on two anonymous barriers and exits normally: it leaves
    both. (Told apart by the object, not by an OS name, which both lack.)"""
    one = ps.interprocess_barrier(2)
    two = ps.interprocess_barrier(2)

    @ps.forked
    def both() -> None:
        one.wait(30)
        two.wait(30)

    with ps.children():
        child = both()
        one.wait(30)
        two.wait(30)
    assert child.exitcode == 0

    @ps.forked
    def late() -> int:
        time.sleep(0.6)  # the parent waits alone meanwhile, and looks at the parties
        return one.wait(30)

    with ps.children():
        child = late()
        index = one.wait(30)  # the first child left: not "a party died"
    assert sorted([index, child.join()]) == [0, 1]
    one.close()
    two.close()


@pytest.mark.timeout(60)
def test_an_anonymous_rwlock_shares_reads_with_children_and_excludes_writes() -> None:
    rw = ps.interprocess_rwlock()
    readers_in = ps.interprocess_barrier(3)

    @ps.forked
    def reader() -> bool:
        with rw.read:
            readers_in.wait(30)  # both children and the parent read at once
            return rw.write.acquire(timeout=0)

    with ps.children():
        kids = [reader(), reader()]
        with rw.read:
            readers_in.wait(30)
    assert [k.join() for k in kids] == [False, False]
    assert rw.readers == 0
    with rw.write:
        assert rw.write_locked
    rw.close()
    readers_in.close()


@pytest.mark.timeout(60)
def test_an_anonymous_rwlock_dead_writer_is_told_and_a_dead_reader_comes_back() -> None:
    rw = ps.interprocess_rwlock()

    @ps.forked
    def write_and_die() -> None:
        rw.write.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    @ps.forked
    def read_and_die() -> None:
        rw.read.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    pid = _killed(write_and_die().wait())
    with pytest.raises(ps.HolderDied) as info:
        rw.write.acquire(timeout=10)
    assert info.value.held is True
    assert info.value.owner_pid == pid
    rw.write.release()
    _killed(read_and_die().wait())
    assert rw.readers == 1  # until a waiter looks
    assert rw.write.acquire(timeout=10)  # the dead reader's hold came back
    rw.write.release()
    rw.close()


@pytest.mark.timeout(120)
def test_an_anonymous_queue_between_pool_workers_and_the_parent() -> None:
    q = ps.interprocess_queue()

    def produce(i: int) -> int:
        q.put((i, b"x" * i))
        return i

    assert ps.map(produce, range(40), workers=2) == list(range(40))
    got = sorted(q.get(timeout=10) for _ in range(40))
    assert got == [(i, b"x" * i) for i in range(40)]
    assert q.empty()

    done = ps.interprocess_queue()

    @ps.forked
    def consumer() -> int:
        total = 0
        while (item := q.get(timeout=30)) is not None:
            total += item
        done.put(total)
        return total

    with ps.children():
        kids = [consumer(), consumer()]
        for i in range(100):
            q.put(i)
        for _ in kids:
            q.put(None)
    assert sum(k.join() for k in kids) == sum(range(100))
    assert sorted(done) == sorted(k.join() for k in kids)
    q.close()
    done.close()


@pytest.mark.timeout(60)
def test_an_anonymous_queue_consumer_killed_while_reading_gives_the_item_back() -> None:
    q = ps.interprocess_queue()
    q.put("first")
    q.put("second")

    @ps.forked
    def claim_and_die() -> None:
        die_reading(q)

    _killed(claim_and_die().wait())
    assert q.get(timeout=5) == "second"
    assert q.get(timeout=5) == "first"  # back, once the waiter saw its reader dead
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    q.close()


@pytest.mark.timeout(60)
def test_an_anonymous_queue_producer_killed_while_writing_leaves_padding() -> None:
    q = ps.interprocess_queue()
    q.put("before")

    @ps.forked
    def reserve_and_die() -> None:
        die_writing(q)

    _killed(reserve_and_die().wait())
    q.put("after")
    assert q.get(timeout=5) == "before"
    assert q.get(timeout=5) == "after"  # past the dead producer's record
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    q.close()


@pytest.mark.timeout(60)
def test_an_anonymous_condition_waiter_killed_does_not_swallow_a_notify() -> None:
    cond = ps.interprocess_condition()
    waiting = ps.interprocess_event()

    @ps.forked
    def die_waiting() -> None:
        with cond:
            waiting.set()
            cond.wait(60)

    child = die_waiting()
    assert waiting.wait(30)
    assert wait_for(lambda: "waiters=1" in repr(cond))
    child.kill()
    _killed(child.wait())
    woke: list[bool] = []

    def live_waiter() -> None:
        with cond:
            woke.append(cond.wait(30))

    before = _waiters(cond)  # (whether the dead waiter is still counted or not)
    t = threading.Thread(target=live_waiter)
    t.start()
    assert wait_for(lambda: _waiters(cond) == before + 1)
    with cond:
        cond.notify(1)
    t.join(30)
    assert woke == [True]
    cond.close()
    waiting.close()


# -- lifetime in this process and its children --------------------------------------


@pytest.mark.timeout(60)
def test_everyone_killed_and_the_kernel_frees_an_anonymous_queue() -> None:
    """A child makes an anonymous queue (over 1 MiB: a memfd), forks a
    grandchild that inherits it, and both are SIGKILLed: nothing is in
    /dev/shm and no process maps that memory any more."""
    r, w = os.pipe()

    def setup(helper: Helper) -> None:
        q = ps.interprocess_queue()
        q.put("inherited")
        pid = os.fork()
        if pid == 0:
            try:
                assert q.get(timeout=10) == "inherited"
                os.write(w, b"got\n")
                time.sleep(60)
            finally:
                os._exit(0)
        os.write(w, f"{pid}\n".encode())
        helper.ready()
        helper.wait_release()

    helper = Helper(setup)
    helper.wait_ready()
    lines = b""
    while lines.count(b"\n") < 2:
        lines += os.read(r, 64)
    grandchild = int(next(x for x in lines.split() if x != b"got"))
    os.close(r)
    os.close(w)
    try:
        inodes = _anonymous_inodes(helper.pid)
        assert len(inodes) == 1
        assert inodes <= _anonymous_inodes(grandchild)
    finally:
        os.kill(grandchild, signal.SIGKILL)
        helper.kill()
    assert wait_for(lambda: not alive(grandchild))
    assert wait_for(lambda: all(not inodes & _anonymous_inodes(p) for p in _pids()))


@pytest.mark.timeout(60)
def test_a_child_closing_an_inherited_one_leaves_the_parent_its_own() -> None:
    sem = ps.interprocess_semaphore(2)
    ev = ps.interprocess_event()

    @ps.forked
    def child() -> tuple[bool, bool]:
        sem.close()
        ev.close()
        return sem.closed, ev.closed

    assert child().join() == (True, True)
    assert not sem.closed
    assert not ev.closed
    assert sem.acquire(timeout=0)
    sem.release()
    ev.set()
    assert ev.is_set()
    sem.close()
    ev.close()


@pytest.mark.timeout(60)
def test_a_running_child_keeps_one_its_parent_closed() -> None:
    q = ps.interprocess_queue()
    r, w = os.pipe()

    @ps.forked
    def later() -> Any:
        os.read(r, 1)  # the parent has closed its queue by now
        q.put("still here")
        return q.get(timeout=5)

    child = later()
    q.close()
    os.write(w, b"x")
    try:
        assert child.join() == "still here"
    finally:
        os.close(r)
        os.close(w)


def test_a_dropped_one_is_unmapped_at_once() -> None:
    from procshare._engine import anonymous

    part = anonymous.segments_part()
    before = len(part.held())
    gc.disable()
    try:
        for open_ in _every_opener:
            obj = open_()
            assert len(part.held()) == before + 1
            del obj
            assert len(part.held()) == before
    finally:
        gc.enable()


_every_opener = (
    ps.interprocess_semaphore,
    ps.interprocess_event,
    ps.interprocess_condition,
    lambda: ps.interprocess_barrier(2),
    ps.interprocess_queue,
    # its sides hold the object, not the handle: no cycle to wait for
    ps.interprocess_rwlock,
)


def test_used_after_close_says_it_cannot_be_opened_again(family_objects: list[Any]) -> None:
    sem = family_objects[0]
    sem.close()
    with pytest.raises(ps.UsageError, match="cannot be opened again"):
        sem.acquire(timeout=0)
    assert "closed" in repr(sem)


# -- what an anonymous one cannot do, said clearly -----------------------------------


def test_pickling_any_anonymous_family_object_says_why_and_what_to_do(
    family_objects: list[Any],
) -> None:
    for obj in family_objects:
        with pytest.raises(ps.AnonymousError) as info:
            pickle.dumps(obj)
        message = str(info.value)
        assert isinstance(info.value, TypeError)
        assert f"an anonymous {obj._family} cannot be pickled" in message
        assert "fork while it is open" in message
        assert f"ps.interprocess_{obj._family}('NAME'" in message
        again = pickle.loads(pickle.dumps(info.value))
        assert str(again) == message


def test_sending_one_through_a_queue_is_refused_and_the_queue_goes_on(
    family_objects: list[Any],
) -> None:
    sem = family_objects[0]
    for q in (family_objects[5], ps.interprocess_queue("named-q")):
        with pytest.raises(ps.AnonymousError, match="anonymous semaphore cannot be pickled"):
            q.put(sem)
        assert q.empty()
        q.put("fine")
        assert q.get(timeout=5) == "fine"
    q.close()


@pytest.mark.timeout(60)
def test_a_pool_item_that_is_one_is_refused(family_objects: list[Any]) -> None:
    with pytest.raises(ExceptionGroup) as info:
        ps.map(lambda x: x, iter(family_objects[:1]), workers=1)
    (error,) = info.value.exceptions
    assert isinstance(error, ps.AnonymousError)
    assert "anonymous semaphore cannot be pickled" in str(error)


def _openers() -> list[Callable[[Any], Any]]:
    return [
        ps.interprocess_semaphore,
        ps.interprocess_event,
        ps.interprocess_condition,
        lambda n: ps.interprocess_barrier(n, 2),
        ps.interprocess_rwlock,
        ps.interprocess_queue,
        ps.interprocess_lock,
        lambda n: ps.shared(n, ps.u64),
    ]


def test_one_or_its_label_where_a_name_is_expected_says_why(family_objects: list[Any]) -> None:
    for obj in family_objects:
        for open_ in _openers():
            with pytest.raises(ps.AnonymousError, match="cannot be used as a name"):
                open_(obj)
            with pytest.raises(ps.AnonymousError, match="what an anonymous object has"):
                open_(obj.name)
    with pytest.raises(ps.AnonymousError, match="an anonymous event cannot be used as a name"):
        ps.interprocess_semaphore(family_objects[1])
    with pytest.raises(ps.AnonymousError, match="anonymous barrier"):
        ps.unlink(family_objects[3])  # type: ignore[arg-type]


def test_a_named_condition_refuses_an_anonymous_lock() -> None:
    lock = ps.interprocess_lock()
    with pytest.raises(ps.AnonymousError) as info:
        ps.interprocess_condition("cond", lock)
    assert "lock of the named condition 'cond'" in str(info.value)
    assert "could not reach the lock" in str(info.value)
    assert "ps.interprocess_condition(lock=lock)" in str(info.value)
    lock.close()
    named_lock = ps.interprocess_lock("outer")
    cond = ps.interprocess_condition(lock=named_lock)  # anonymous, a named lock: fine
    assert cond.anonymous
    assert cond.lock is named_lock
    cond.close()
    named_lock.close()


def test_a_mode_without_a_name_is_refused_with_the_reason() -> None:
    for call in (
        lambda: ps.interprocess_semaphore(mode=0o644),
        lambda: ps.interprocess_event(mode=0o644),
        lambda: ps.interprocess_condition(mode=0o644),
        lambda: ps.interprocess_barrier(2, mode=0o644),  # type: ignore[call-overload]
        lambda: ps.interprocess_rwlock(mode=0o644),
        lambda: ps.interprocess_queue(mode=0o644),
    ):
        with pytest.raises(TypeError, match="has no permission bits"):
            call()


@pytest.mark.timeout(60)
def test_a_child_forked_later_has_its_own_objects_not_its_parents() -> None:
    """A child's own anonymous objects are its own (labels go on counting)."""
    mine = ps.interprocess_semaphore(1)

    @ps.forked
    def child() -> tuple[str, int]:
        with closing(ps.interprocess_semaphore(5)) as own:
            return own.name, own.value

    name, value = child().join()
    assert value == 5
    assert name != mine.name
    assert mine.value == 1
    mine.close()


# -- types ---------------------------------------------------------------------------

_TYPED = """
import procshare as ps
from typing import assert_type

assert_type(ps.interprocess_semaphore(3), ps.InterprocessSemaphore)
assert_type(ps.interprocess_semaphore(value=2, timeout=1.0), ps.InterprocessSemaphore)
assert_type(ps.interprocess_semaphore("s", 2, timeout=1, mode=0o600), ps.InterprocessSemaphore)
assert_type(ps.interprocess_event(), ps.InterprocessEvent)
assert_type(ps.interprocess_condition(), ps.InterprocessCondition)
assert_type(ps.interprocess_condition(ps.interprocess_lock()), ps.InterprocessCondition)
assert_type(ps.interprocess_barrier(3), ps.InterprocessBarrier)
assert_type(ps.interprocess_barrier(3, timeout=2), ps.InterprocessBarrier)
assert_type(ps.interprocess_barrier(parties=3), ps.InterprocessBarrier)
assert_type(ps.interprocess_barrier("b", 3, 5.0), ps.InterprocessBarrier)
assert_type(ps.interprocess_rwlock(), ps.InterprocessRWLock)
assert_type(ps.interprocess_queue(10), ps.InterprocessQueue)
assert_type(ps.interprocess_queue("q", 3, capacity=8192), ps.InterprocessQueue)
ps.interprocess_barrier(3, 4)  # line 17: two party counts
ps.interprocess_barrier()  # line 18: no parties
ps.interprocess_semaphore(3, mode=0o644)  # line 19: an anonymous one has no mode
"""


@pytest.mark.timeout(300)
def test_the_anonymous_forms_type_check(tmp_path: Path) -> None:
    from mypy import api

    script = tmp_path / "typed.py"
    script.write_text(textwrap.dedent(_TYPED).lstrip())
    root = Path(__file__).resolve().parents[1]
    out, err, _status = api.run(
        [str(script), "--strict", "--cache-dir", str(root / "build" / "mypy-typing-cache")]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [17, 18, 19], out + err
