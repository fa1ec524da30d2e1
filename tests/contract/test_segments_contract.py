"""The segment half of the backend contract: what any backend must do.

These tests talk to the backend directly (no engine, no front end), so a new
backend is checked against exactly the promises ``api_segment.py`` makes:
atomic publication, kernel-counted holders, orphan reclaim, ENOSPC at
creation, collect, fork inheritance, mappings that outlive their handle
while buffers exported from them live, and the native (ctypes) kinds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from procshare._backends import get_backend
from procshare._backends.api_segment import SegmentBackend, SegmentHandle
from procshare._engine import names
from shared_support import Helper, run_in_child


def keep_nothing(handle: SegmentHandle) -> bool:
    return False


def keep_all(handle: SegmentHandle) -> bool:
    return True


#: What the tests pass to segment_close() to keep nothing: both a callback and
#: None (the backend then decides without calling back) must behave the same.
CLOSE_KEEP: Callable[[SegmentHandle], bool] | None = keep_nothing


@pytest.fixture(autouse=True, params=["callback", "None"])
def _close_keep(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        sys.modules[__name__], "CLOSE_KEEP", keep_nothing if request.param == "callback" else None
    )


@pytest.fixture(params=["posix"])
def backend(request: pytest.FixtureRequest) -> SegmentBackend:
    assert request.param == get_backend().name
    return get_backend()


@pytest.fixture(autouse=True, params=["descriptor", "mapping"])
def _hold_kind(request: pytest.FixtureRequest) -> Iterator[None]:
    """POSIX keeps a hold on its descriptor while a process is far below its
    descriptor limit, on its mapping beyond it: every promise, both ways."""
    if get_backend().name != "posix":
        yield
        return
    from procshare._backends.posix import _shmstep

    before = _shmstep.set_descriptor_budget(0 if request.param == "mapping" else -1)
    try:
        yield
    finally:
        _shmstep.set_descriptor_budget(before)


@pytest.fixture
def os_name() -> Iterator[str]:
    name = names.os_name(names.SEGMENT, "contract")
    yield name
    get_backend().segment_unlink(name)  # in case a test failed half-way


def create(backend: SegmentBackend, os_name: str, **kw: object) -> SegmentHandle:
    options: dict[str, object] = {"meta": b'{"m":1}', "data_size": 4096, "mode": 0o600}
    options["persist"] = False
    options.update(kw)
    handle = backend.segment_create(os_name, **options)  # type: ignore[arg-type]
    assert handle is not None
    return handle


def listed(backend: SegmentBackend, os_name: str) -> bool:
    return os_name in backend.os_objects()


def ours(backend: SegmentBackend) -> frozenset[str]:
    """The objects of this test's namespace: never all of them, which other programs change."""
    prefix = names.namespace_prefix()
    return frozenset(n for n in backend.os_objects() if n.startswith(prefix))


def test_create_publishes_meta_and_zeroed_aligned_data(
    backend: SegmentBackend, os_name: str
) -> None:
    h = create(backend, os_name, data_size=100)
    try:
        assert h.meta == b'{"m":1}'
        assert h.data_size == 100
        assert len(h.data) == 100
        assert bytes(h.data) == bytes(100)
        assert h.address % 64 == 0
        assert h.opener_pid == os.getpid()
        assert not h.persist
        assert not h.closed
    finally:
        assert backend.segment_close(h, keep=CLOSE_KEEP) is True
    assert h.closed
    assert not listed(backend, os_name)


def test_nobody_sees_the_object_before_init_returns(backend: SegmentBackend, os_name: str) -> None:
    seen: list[object] = []

    def init(data: memoryview) -> None:
        data[:4] = b"abcd"
        seen.append(backend.segment_open(os_name, keep_orphan=keep_nothing))
        seen.append(listed(backend, os_name))

    h = create(backend, os_name, init=init)
    try:
        assert seen == [None, False]
        assert bytes(h.data[:4]) == b"abcd"
    finally:
        backend.segment_close(h, keep=CLOSE_KEEP)


def test_a_second_create_returns_none_and_changes_nothing(
    backend: SegmentBackend, os_name: str
) -> None:
    h = create(backend, os_name, init=lambda d: d.__setitem__(0, 1))
    try:
        again = backend.segment_create(
            os_name, meta=b"other", data_size=8, mode=0o600, persist=False, init=None
        )
        assert again is None
        other = backend.segment_open(os_name, keep_orphan=keep_nothing)
        assert other is not None
        assert other.meta == b'{"m":1}'
        assert other.data[0] == 1
        backend.segment_close(other, keep=CLOSE_KEEP)
    finally:
        backend.segment_close(h, keep=CLOSE_KEEP)


@pytest.mark.timeout(60)
def test_a_creator_killed_during_init_leaves_nothing(
    backend: SegmentBackend, os_name: str
) -> None:
    before = ours(backend)

    def creator(helper: Helper) -> None:
        def init(data: memoryview) -> None:
            helper.ready()
            time.sleep(600)

        create(backend, os_name, init=init)

    helper = Helper(creator)
    helper.wait_ready()
    helper.kill()
    assert backend.segment_open(os_name, keep_orphan=keep_nothing) is None
    # Named temporaries (where the platform needs them) are collectable.
    backend.segment_collect(names.namespace_prefix(), keep=keep_nothing)
    assert ours(backend) == before


def test_holders_are_counted(backend: SegmentBackend, os_name: str) -> None:
    a = create(backend, os_name)
    b = backend.segment_open(os_name, keep_orphan=keep_nothing)
    assert b is not None
    b.data[0] = 7
    assert a.data[0] == 7  # the same memory
    assert backend.segment_close(a, keep=CLOSE_KEEP) is False
    assert listed(backend, os_name)
    assert backend.segment_close(b, keep=CLOSE_KEEP) is True
    assert not listed(backend, os_name)


def test_persist_and_keep_stop_the_last_close_from_removing(
    backend: SegmentBackend, os_name: str
) -> None:
    h = create(backend, os_name, persist=True)
    assert backend.segment_close(h, keep=CLOSE_KEEP) is False
    again = backend.segment_open(os_name, keep_orphan=keep_nothing)
    assert again is not None
    assert again.persist
    assert backend.segment_close(again, keep=CLOSE_KEEP) is False
    assert backend.segment_unlink(os_name) is True
    assert backend.segment_unlink(os_name) is False
    h = create(backend, os_name)
    assert backend.segment_close(h, keep=keep_all) is False
    assert backend.segment_unlink(os_name) is True


@pytest.mark.timeout(60)
def test_a_killed_holder_is_an_orphan_reclaimed_unless_kept(
    backend: SegmentBackend, os_name: str
) -> None:
    def holder(helper: Helper) -> None:
        h = create(backend, os_name)
        h.data[0] = 42
        helper.ready()
        time.sleep(600)

    for keep, expect in ((keep_all, 42), (keep_nothing, None)):
        helper = Helper(holder)
        helper.wait_ready()
        helper.kill()
        assert listed(backend, os_name)
        asked: list[SegmentHandle] = []

        def recorder(
            handle: SegmentHandle, keep: object = keep, asked: list[SegmentHandle] = asked
        ) -> bool:
            asked.append(handle)
            return keep(handle)  # type: ignore[operator]

        h = backend.segment_open(os_name, keep_orphan=recorder)
        assert len(asked) == 1
        if expect is None:
            assert h is None
            assert not listed(backend, os_name)
        else:
            assert h is not None
            assert h.data[0] == expect
            assert backend.segment_close(h, keep=CLOSE_KEEP) is True


@pytest.mark.timeout(60)
def test_collect_removes_orphans_and_spares_held_objects(
    backend: SegmentBackend, os_name: str
) -> None:
    other = names.os_name(names.SEGMENT, "contract-held")
    held = create(backend, other)
    try:

        def holder(helper: Helper) -> None:
            create(backend, os_name)
            helper.ready()
            time.sleep(600)

        helper = Helper(holder)
        helper.wait_ready()
        helper.kill()
        removed = backend.segment_collect(names.namespace_prefix(), keep=keep_nothing)
        assert removed == [os_name]
        assert listed(backend, other)
        infos = {i.os_name: i for i in backend.segment_list(names.namespace_prefix())}
        assert infos[other].holders == (os.getpid(),)
        assert infos[other].meta == b'{"m":1}'
    finally:
        backend.segment_close(held, keep=CLOSE_KEEP)


def test_out_of_space_is_enospc_at_creation(backend: SegmentBackend, os_name: str) -> None:
    free = backend.segment_space()
    assert free is not None
    assert free > 0
    vfs = os.statvfs("/dev/shm")
    with pytest.raises(OSError) as info:
        create(backend, os_name, data_size=vfs.f_blocks * vfs.f_frsize + (1 << 30))
    assert info.value.errno == errno.ENOSPC
    assert not listed(backend, os_name)


def test_a_fork_child_never_releases_an_inherited_handle(
    backend: SegmentBackend, os_name: str
) -> None:
    h = create(backend, os_name)
    try:

        def child() -> bool:
            h.data[1] = 5
            return backend.segment_close(h, keep=CLOSE_KEEP)

        assert run_in_child(child) is False
        assert h.data[1] == 5
        assert not h.closed
        assert listed(backend, os_name)
        # still counted as held: a second holder's close does not remove it
        other = backend.segment_open(os_name, keep_orphan=keep_nothing)
        assert other is not None
        assert backend.segment_close(other, keep=CLOSE_KEEP) is False
    finally:
        backend.segment_close(h, keep=CLOSE_KEEP)


def _sleeper(release_r: int, *write_ends: int) -> int:
    """Fork a child that waits until ``release_r`` reads end of file, then exits
    (it closes its copies of ``write_ends``, so that closing the parent's ends
    is that end of file)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            for fd in write_ends:
                os.close(fd)
            os.read(release_r, 1)
        finally:
            os._exit(0)
    return pid


@pytest.mark.timeout(60)
def test_let_go_keeps_earlier_children_holding_and_later_ones_out(
    backend: SegmentBackend, os_name: str
) -> None:
    # A close deferred for children: the parent lets go at once, the child
    # forked before keeps holding, one forked after inherits no hold, and the
    # close once the first child is gone finds itself the last holder.
    h = create(backend, os_name)
    first_r, first_w = os.pipe()
    later_r, later_w = os.pipe()
    first = _sleeper(first_r, first_w, later_w)
    later = None
    try:
        arr = np.frombuffer(h.data, dtype=np.uint8)  # a live buffer: the mapping moves
        backend.segment_let_go(h)
        arr[0] = 9  # still mapped
        later = _sleeper(later_r, first_w, later_w)
        # Still held (by the first child): another holder's close does not remove it.
        other = backend.segment_open(os_name, keep_orphan=keep_nothing)
        assert other is not None
        assert other.data[0] == 9
        assert backend.segment_close(other, keep=CLOSE_KEEP) is False
        assert listed(backend, os_name)
        os.close(first_w)
        first_w = -1
        os.waitpid(first, 0)
        # The later child still runs, but holds nothing: this close is the last.
        assert backend.segment_close(h, keep=CLOSE_KEEP) is True
        assert not listed(backend, os_name)
        del arr
    finally:
        for fd in (first_w, later_w, first_r, later_r):
            if fd >= 0:
                os.close(fd)
        if later is not None:
            os.waitpid(later, 0)
        if first_w >= 0:
            os.waitpid(first, 0)


@pytest.mark.timeout(60)
def test_an_exported_buffer_outlives_close_without_blocking_others(
    backend: SegmentBackend, os_name: str
) -> None:
    a = create(backend, os_name)
    b = backend.segment_open(os_name, keep_orphan=keep_nothing)
    assert b is not None
    arr = np.frombuffer(a.data, dtype=np.uint8)
    backend.segment_close(a, keep=CLOSE_KEEP)
    arr[0] = 3  # still mapped: no crash
    assert b.data[0] == 3
    # a's close must not leave a lock on the description the array keeps alive
    result: list[object] = []
    opener = threading.Thread(
        target=lambda: result.append(backend.segment_open(os_name, keep_orphan=keep_nothing))
    )
    opener.start()
    opener.join(10)
    assert not opener.is_alive(), "an opener blocked on a lock left by a closed handle"
    c = result[0]
    assert c is not None
    backend.segment_close(c, keep=CLOSE_KEEP)  # type: ignore[arg-type]
    assert backend.segment_close(b, keep=CLOSE_KEEP) is True
    del arr


def test_native_kinds(backend: SegmentBackend, os_name: str) -> None:
    class P(ctypes.Structure):
        _fields_ = (("x", ctypes.c_int32), ("y", ctypes.c_double))

    info = backend.native_kind(P)
    assert info is not None
    assert info.canonical == "struct{x:i32@0,y:f64@8}:16"
    assert (info.size, info.align, info.category, info.format) == (16, 8, "struct", None)
    scalar = backend.native_kind(ctypes.c_uint32)
    assert scalar is not None
    assert (scalar.canonical, scalar.format) == ("u32", "I")
    assert backend.native_kind(int) is None
    with pytest.raises(TypeError, match="pointer"):
        backend.native_kind(ctypes.c_char_p)
    assert backend.native_bytes(P, (1, 2.0)) == bytes(P(1, 2.0))
    h = create(backend, os_name, data_size=16)
    try:
        obj = backend.native_view(P, h.data)
        obj.x = 9
        assert h.data[0] == 9
        del obj
    finally:
        backend.segment_close(h, keep=CLOSE_KEEP)


# -- anonymous objects: segment_create_anonymous -------------------------------


@pytest.mark.parametrize("size", [1, 4096, (1 << 20) + 1], ids=["1B", "4KiB", "over-1MiB"])
def test_an_anonymous_object_is_zeroed_initialised_and_named_nowhere(
    backend: SegmentBackend, size: int
) -> None:
    before = backend.os_objects()
    seen: list[int] = []

    def init(data: memoryview) -> None:
        seen.append(sum(data[:64]))  # zeroed before init runs
        data[:2] = b"hi"[: len(data)]

    handle = backend.segment_create_anonymous(data_size=size, init=init)
    try:
        assert seen == [0]
        assert handle.data_size == size
        assert len(handle.data) == size
        assert bytes(handle.data[:2]) == b"hi"[:size]
        assert handle.os_name == ""
        assert handle.meta == b""
        assert not handle.persist
        assert handle.address != 0
        # No name anywhere: nothing new that this process holds or maps (other
        # programs may create objects meanwhile: they are not ours to judge).
        new = set(backend.os_objects() - before)
        held = backend.segment_holders(new, mapped=True)
        assert [n for n, pids in held.items() if os.getpid() in pids] == []
    finally:
        assert backend.segment_close(handle, keep=CLOSE_KEEP) is True
    assert handle.closed
    assert backend.segment_close(handle, keep=CLOSE_KEEP) is False  # idempotent


def test_an_anonymous_object_is_shared_with_children_forked_while_open(
    backend: SegmentBackend,
) -> None:
    handle = backend.segment_create_anonymous(data_size=64)
    try:

        def child() -> bool:
            handle.data[0:5] = b"child"
            # Closing an inherited handle never takes the parent's memory away.
            return backend.segment_close(handle, keep=CLOSE_KEEP)

        assert run_in_child(child) is False
        assert bytes(handle.data[:5]) == b"child"
        assert not handle.closed
    finally:
        backend.segment_close(handle, keep=CLOSE_KEEP)


def test_an_anonymous_object_stays_mapped_while_a_buffer_of_it_lives(
    backend: SegmentBackend,
) -> None:
    handle = backend.segment_create_anonymous(data_size=8 * 16)
    array = np.frombuffer(handle.data, dtype=np.int64)
    array[:] = 7
    backend.segment_close(handle, keep=CLOSE_KEEP)
    assert int(array.sum()) == 7 * 16  # still mapped: no crash
    del array


def test_an_anonymous_init_that_raises_frees_the_object(backend: SegmentBackend) -> None:
    def init(data: memoryview) -> None:
        raise ValueError("bad initial")

    with pytest.raises(ValueError, match="bad initial"):
        backend.segment_create_anonymous(data_size=64, init=init)


def test_an_anonymous_object_that_cannot_fit_is_enospc_at_creation(
    backend: SegmentBackend,
) -> None:
    space = backend.anonymous_space()
    assert space is not None
    assert space > 0
    with pytest.raises(OSError) as info:
        backend.segment_create_anonymous(data_size=space + (1 << 30))
    assert info.value.errno == errno.ENOSPC


def test_a_large_anonymous_object_is_reserved_at_creation(backend: SegmentBackend) -> None:
    """Above 1 MiB the pages are allocated at creation: under a file-size limit
    smaller than the object the POSIX backend's memfd says EFBIG right away
    (what the engine reports as SharedMemoryFull naming `ulimit -f`)."""

    def child() -> int | None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            backend.segment_create_anonymous(data_size=4 << 20)
        except OSError as exc:
            return exc.errno
        return None

    assert run_in_child(child) == errno.EFBIG
