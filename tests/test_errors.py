"""The exception hierarchy: builtin bases, fields, messages, pickling."""

from __future__ import annotations

import errno
import pickle
import queue
import signal
import threading

import pytest

import procshare as ps
from procshare import errors

# One fully populated instance of every public error class.
SAMPLES: list[ps.ProcshareError] = [
    ps.ProcshareError("something went wrong"),
    ps.ChildError("lost", pid=12, name="job", exitcode=3, signal=None),
    ps.ChildRaised(
        exc_type="ValueError",
        exc_message="bad input",
        child_traceback='Traceback (most recent call last):\n  File "x.py"\nValueError: bad',
        pid=12,
        name="job",
        exitcode=1,
    ),
    ps.ChildExited(pid=12, name="job", exitcode=3),
    ps.ChildKilled(pid=12, name="job", exitcode=-9, signal=signal.SIGKILL),
    ps.ChildTimeout(timeout=1.5, pid=12, name="job", exitcode=-9, signal=signal.SIGKILL),
    ps.JoinTimeout(pid=12, name="job", timeout=0.5),
    ps.SegmentExists("sum"),
    ps.SegmentNotFound("sum"),
    ps.SharedTypeError("sum", expected="u64", found="f64"),
    ps.SegmentClosed("sum"),
    ps.SharedMemoryFull("big", requested=1 << 40, available=1 << 30),
    ps.SharedMemoryFull("big", requested=1 << 20, file_size_limit=4096),
    ps.SharedMemoryFull("m", requested=128, available=0, what="lock"),
    ps.SharedMemoryUnavailable("sum", reason="/dev/shm is mounted read-only", code=30),
    ps.DescriptorLimit("sum", limit=1024),
    ps.DescriptorLimit("m", system=True, what="lock"),
    ps.InvalidName("bad/name", "the name contains '/'"),
    ps.LockTimeout("m", timeout=0.2),
    ps.OwnerDied("m", owner_pid=77, held=True),
    ps.UsageError("cannot release lock 'm': the calling thread does not hold it"),
    # the coordination families (issue 15)
    ps.HolderDied("s", owner_pid=77, held=True, what="semaphore"),
    ps.WaitTimeout("s", what="semaphore", timeout=0.2),
    ps.BrokenBarrier("b", reason="a party died"),
    ps.QueueEmpty("q"),
    ps.QueueFull("q"),
    ps.ForkError(name="job", errno_code=errno.EMFILE, running=1021),
    ps.AnonymousError("an anonymous lock", "pickled", named="ps.interprocess_lock('NAME')"),
    ps.SharedMemoryFull("(anonymous)", requested=1 << 40, available=1 << 30),
    ps.MissingDependency(module="tqdm", extra="progress", feature="progress=True"),
    ps.MappingLimit("sum", mappings=65530, limit=65530),
    ps.MappingLimit("(anonymous)", mappings=120, limit=65530),
    # the cluster front end (issue 17)
    ps.NotOnCluster("ps.interprocess_barrier()", "join the tasks with ps.children()"),
    ps.ClusterUnreachable("tcp://10.0.0.5:8786", 30.0, "connection refused"),
    ps.ClusterUnreachable("tcp://10.0.0.5:8786"),
]

BUILTINS: dict[type[ps.ProcshareError], tuple[type[BaseException], ...]] = {
    ps.ChildError: (ChildProcessError,),
    ps.ChildRaised: (ChildProcessError,),
    ps.ChildExited: (ChildProcessError,),
    ps.ChildKilled: (ChildProcessError,),
    ps.ChildTimeout: (ChildProcessError, TimeoutError),
    ps.JoinTimeout: (TimeoutError,),
    ps.SegmentExists: (FileExistsError,),
    ps.SegmentNotFound: (FileNotFoundError,),
    ps.SharedTypeError: (TypeError,),
    ps.SegmentClosed: (ValueError,),
    ps.SharedMemoryFull: (OSError,),
    ps.SharedMemoryUnavailable: (OSError,),
    ps.DescriptorLimit: (OSError,),
    ps.InvalidName: (ValueError,),
    ps.LockTimeout: (TimeoutError,),
    ps.UsageError: (RuntimeError,),
    ps.HolderDied: (ps.OwnerDied,),
    ps.WaitTimeout: (TimeoutError,),
    ps.BrokenBarrier: (threading.BrokenBarrierError, RuntimeError),
    ps.QueueEmpty: (queue.Empty,),
    ps.QueueFull: (queue.Full,),
    ps.ForkError: (OSError,),
    ps.AnonymousError: (TypeError,),
    ps.MissingDependency: (ModuleNotFoundError, ImportError),
    ps.MappingLimit: (OSError,),
    ps.NotOnCluster: (NotImplementedError, RuntimeError),
    ps.ClusterUnreachable: (ConnectionError, OSError),
}


def test_every_public_error_has_a_sample() -> None:
    public = {
        getattr(ps, n)
        for n in ps.__all__
        if isinstance(getattr(ps, n), type) and issubclass(getattr(ps, n), BaseException)
    }
    # ps.Cancelled is no error: a BaseException, tested in tests/test_cancel.py.
    assert public - {ps.Cancelled} == {type(e) for e in SAMPLES}


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip_keeps_fields_and_message(exc: ps.ProcshareError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    for field in type(exc)._fields:
        assert getattr(copy, field) == getattr(exc, field), field
    assert str(copy) == str(exc)
    assert copy.args == exc.args


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_is_a_procshare_error_and_the_builtin_users_catch(exc: ps.ProcshareError) -> None:
    assert isinstance(exc, ps.ProcshareError)
    for builtin in BUILTINS.get(type(exc), ()):
        assert isinstance(exc, builtin)


@pytest.mark.parametrize("exc", SAMPLES[1:], ids=lambda e: type(e).__name__)
def test_message_is_specific(exc: ps.ProcshareError) -> None:
    text = str(exc)
    assert len(text) > 40
    # Every message names the object it is about.
    name = getattr(exc, "name", None)
    if name:
        assert name in text


def test_pickle_keeps_extra_attributes_and_notes() -> None:
    exc = ps.SegmentNotFound("sum")
    exc.add_note("while opening the totals")
    copy = pickle.loads(pickle.dumps(exc))
    assert copy.__notes__ == ["while opening the totals"]


def test_child_killed_names_the_signal_and_a_cause() -> None:
    text = str(ps.ChildKilled(pid=5, name="w", exitcode=-11, signal=signal.SIGSEGV))
    assert "SIGSEGV" in text
    assert "segmentation fault" in text
    assert "OOM" in str(ps.ChildKilled(pid=5, name="w", exitcode=-9, signal=signal.SIGKILL))
    assert "signal 63" in str(ps.ChildKilled(pid=5, name="w", exitcode=-63, signal=63))


def test_child_raised_shows_the_child_traceback() -> None:
    exc = SAMPLES[2]
    assert "ValueError: bad input" in str(exc)
    assert "Traceback in the child" in str(exc)


def test_shared_memory_full_is_enospc() -> None:
    exc = ps.SharedMemoryFull("big", requested=10, available=5)
    assert exc.errno == errno.ENOSPC
    assert pickle.loads(pickle.dumps(exc)).errno == errno.ENOSPC
    assert "10 bytes" in str(exc)
    assert "5 bytes are free" in str(exc)


@pytest.mark.parametrize(
    ("exc", "code"),
    [(ps.SegmentExists("sum"), errno.EEXIST), (ps.SegmentNotFound("sum"), errno.ENOENT)],
)
def test_exists_and_not_found_carry_the_errno_of_their_builtin(exc: OSError, code: int) -> None:
    # Code written for the OS's own FileExistsError / FileNotFoundError may test errno.
    assert exc.errno == code
    assert pickle.loads(pickle.dumps(exc)).errno == code
    assert "sum" in str(exc)


def test_owner_died_says_what_to_do_in_both_states() -> None:
    held = str(ps.OwnerDied("m", owner_pid=3, held=True))
    released = str(ps.OwnerDied("m", owner_pid=3, held=False))
    assert "mark_consistent" in held
    assert "release()" in held
    assert "on_owner_death" in released


def test_signal_name_helper() -> None:
    assert errors.signal_name(9) == "SIGKILL"
    assert errors.signal_name(None) == "no signal"


def test_misuse_is_a_usage_error_which_is_a_runtime_error() -> None:
    lock = ps.interprocess_lock("m")
    with pytest.raises(ps.UsageError, match="does not hold it") as info:
        lock.release()
    assert isinstance(info.value, RuntimeError)
    with lock, pytest.raises(ps.UsageError, match="reentrant=True"):
        lock.acquire()
    lock.close()
    with pytest.raises(ps.UsageError, match=r"kids\.results"):
        _ = ps.children().results


# -- a ChildRaised is also an instance of the child's exception type ----------


class _Coded(Exception):
    """A user exception with a field of its own (module level: it pickles)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _raised(original: BaseException) -> ps.ChildRaised:
    err = ps.ChildRaised.matching(type(original))(
        exc_type=type(original).__name__, exc_message=str(original), pid=7, name="job"
    )
    err.__cause__ = original
    return err


def test_a_child_raised_for_a_key_error_is_a_key_error_too() -> None:
    err = _raised(KeyError("k"))
    assert isinstance(err, ps.ChildRaised)
    assert isinstance(err, KeyError)
    assert isinstance(err, ChildProcessError)
    assert type(err) is ps.ChildRaised.matching(KeyError)  # one class per type
    assert type(err).__name__ == "ChildRaised[KeyError]"
    assert str(err).startswith("child 'job' (pid 7) raised KeyError: 'k'")
    with pytest.raises(KeyError):
        raise err
    caught: list[BaseException] = []
    try:
        raise ExceptionGroup("scope", [err])
    except* KeyError as group:
        caught.extend(group.exceptions)
    assert caught == [err]


def test_matching_pickles_keeps_its_type_fields_and_cause() -> None:
    err = _raised(_Coded(42))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert isinstance(copy, _Coded)
    assert str(copy) == str(err)
    assert copy.pid == 7
    assert isinstance(copy.__cause__, _Coded)
    assert copy.code == 42  # what the ChildRaised has not itself comes from the cause
    plain = pickle.loads(pickle.dumps(ps.ChildRaised(exc_type="X", pid=1, name="j")))
    assert type(plain) is ps.ChildRaised


def test_a_ChildRaised_of_a_ChildRaised_matches_the_original_type() -> None:
    inner = _raised(KeyError("k"))
    outer = _raised(inner)
    assert isinstance(outer, KeyError)
    assert type(outer) is type(inner)


@pytest.mark.parametrize(
    "original",
    [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), StopIteration(3), KeyboardInterrupt()],
    ids=lambda e: type(e).__name__,
)
def test_types_that_cannot_be_matched_give_a_plain_child_raised(original: BaseException) -> None:
    # A layout that cannot be combined, and anything that is not an Exception
    # (a parent's `except KeyboardInterrupt` must not catch a child's failure).
    assert type(_raised(original)) is ps.ChildRaised
