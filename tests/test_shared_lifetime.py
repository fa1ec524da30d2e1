"""ps.shared: create/attach, atomic initialisation, lifetime, space, names, fork, permissions."""

from __future__ import annotations

import gc
import os
import resource
import select
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import procshare as ps
from procshare._engine import names
from procshare._engine.inspect import namespace_objects  # never all of /dev/shm: others use it
from procshare._engine.segments import segments_part
from shared_support import ChildFailed, Helper, another_namespace, run_in_child


def shm_path(name: str, namespace: str | None = None) -> str:
    return "/dev/shm" + names.os_name(names.SEGMENT, name, namespace)


def exists(name: str) -> bool:
    return os.path.exists(shm_path(name))


# --------------------------------------------------------------------------
# create=None / True / False, initial, zeroing


def test_create_none_creates_then_attaches() -> None:
    with ps.shared("x", int) as _:
        first = ps.shared("x", int)
        try:
            assert not first.created
        finally:
            first.close()
    seg = ps.shared("x", int)
    try:
        assert seg.created
    finally:
        seg.close()


def test_create_true_refuses_a_live_segment() -> None:
    with ps.shared("x", int, create=True):
        with pytest.raises(ps.SegmentExists, match="'x' already exists") as info:
            ps.shared("x", int, create=True)
        assert isinstance(info.value, FileExistsError)
    with ps.shared("x", int, create=True) as again:  # gone after the block: creatable
        assert again.value == 0


def test_create_false_refuses_a_missing_segment() -> None:
    with pytest.raises(ps.SegmentNotFound, match="no shared segment named 'y'") as info:
        ps.shared("y", int, create=False)
    assert isinstance(info.value, FileNotFoundError)
    with ps.shared("y", int), ps.shared("y", int, create=False) as y:
        assert y.value == 0


def test_create_must_be_none_or_bool() -> None:
    with pytest.raises(TypeError, match="create="):
        ps.shared("x", int, create="yes")  # type: ignore[arg-type]


def test_initial_is_applied_once_and_attaching_never_resets() -> None:
    with ps.shared("x", int, initial=5) as x:
        x.value += 1
        with ps.shared("x", int, initial=100) as again:
            assert again.value == 6

        def child() -> int:
            with ps.shared("x", int, initial=1000) as mine:
                return int(mine.value)

        assert run_in_child(child) == 6


def _race_child(index: int, start_r: int, hold_r: int, report_w: int) -> None:
    os.read(start_r, 1)  # every racer starts at the same moment
    seg = ps.shared("race", ps.u64, initial=1000 + index)
    os.write(report_w, f"{index} {int(seg.created)} {seg.view.value}\n".encode())
    os.read(hold_r, 1)  # hold it until everyone has attached
    seg.close()


@pytest.fixture(params=["O_TMPFILE, AT_EMPTY_PATH", "O_TMPFILE, /proc/self/fd", "named temporary"])
def creation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every way of creating atomically: an unnamed O_TMPFILE inode linked by
    descriptor (Linux 6.10+, or with CAP_DAC_READ_SEARCH) or through
    /proc/self/fd (older kernels), and a named temporary linked into place
    (where O_TMPFILE is missing)."""
    from procshare._backends.posix import _shmstep, segment

    if request.param == "named temporary":
        monkeypatch.setattr(segment, "_tmpfile_ok", False)
    old = _shmstep.link_mode(0 if "/proc" in request.param else -1)
    try:
        yield str(request.param)
    finally:
        _shmstep.link_mode(old)


@pytest.mark.usefixtures("creation")
@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_a_new_segment_gets_the_mode_asked_for_whatever_the_umask(mode: int) -> None:
    # A umask that masks the owner's own bits (0o277) would otherwise leave the
    # object read-only for the other processes of its own user.
    old = os.umask(0o277)
    try:
        with ps.shared("m", int, initial=3, mode=mode):
            (info,) = [i for i in ps.segments() if i.name == "m"]
            assert stat.S_IMODE(os.stat("/dev/shm" + info.os_name).st_mode) == mode
    finally:
        os.umask(old)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("creation")
def test_twenty_racing_creators_initialise_exactly_once() -> None:
    start_r, start_w = os.pipe()
    hold_r, hold_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    try:
        for i in range(20):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    os.close(start_w)
                    os.close(hold_w)
                    os.close(report_r)
                    _race_child(i, start_r, hold_r, report_w)
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(report_w)
        os.close(start_w)  # go
        lines: list[str] = []
        buf = b""
        deadline = time.monotonic() + 90
        while len(lines) < 20 and time.monotonic() < deadline:
            if select.select([report_r], [], [], 1)[0]:
                chunk = os.read(report_r, 4096)
                if not chunk:
                    break
                buf += chunk
                *done, rest = buf.split(b"\n")
                lines += [d.decode() for d in done]
                buf = rest
        os.close(hold_w)  # let them close
    finally:
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        for fd in (start_r, hold_r, report_r):
            os.close(fd)
    assert statuses == [0] * 20
    assert len(lines) == 20
    reports = [tuple(int(x) for x in line.split()) for line in lines]
    creators = [index for index, created, _ in reports if created]
    assert len(creators) == 1
    assert {value for _, _, value in reports} == {1000 + creators[0]}
    assert not exists("race")


@pytest.mark.timeout(60)
def test_a_creator_killed_mid_initialisation_leaves_nothing_half_done() -> None:
    blob = b"\xab" * 8192

    def creator(h: Helper) -> None:
        def pause(name: str) -> None:
            h.ready()  # half of initial is written now
            time.sleep(600)

        segments_part().init_hook = pause
        ps.shared("half", bytes, size=len(blob), initial=blob)

    before = namespace_objects()
    helper = Helper(creator)
    try:
        helper.wait_ready()
        # While the creator is paused half-way, the segment does not exist...
        with pytest.raises(ps.SegmentNotFound):
            ps.shared("half", bytes, size=len(blob), create=False)
    finally:
        helper.kill()
    # ... and once it is dead there is nothing left behind, not even a temporary.
    assert namespace_objects() == before
    with ps.shared("half", bytes, size=len(blob), initial=b"\x01" * 8192) as fresh:
        assert bytes(fresh) == b"\x01" * 8192


@pytest.mark.timeout(60)
def test_an_attacher_racing_a_paused_creator_gets_a_whole_segment() -> None:
    def creator(h: Helper) -> None:
        def pause(name: str) -> None:
            h.ready()
            h.wait_release()

        segments_part().init_hook = pause
        with ps.shared("p", bytes, size=4096, initial=b"A" * 4096) as mine:
            # It lost the race: it attached to the other creator's segment.
            assert bytes(mine) == b"B" * 4096

    helper = Helper(creator)
    try:
        helper.wait_ready()
        with ps.shared("p", bytes, size=4096, initial=b"B" * 4096) as ours:
            assert bytes(ours) == b"B" * 4096
            status = helper.release()
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if helper.pid:
            try:
                os.kill(helper.pid, 9)
                helper.join()
            except (ProcessLookupError, ChildProcessError, OSError):
                pass


# --------------------------------------------------------------------------
# lifetime


def test_the_last_holder_to_close_unlinks() -> None:
    a = ps.shared("life", int)
    b = ps.shared("life", int)
    a.close()
    assert exists("life")
    b.close()
    assert not exists("life")


@pytest.mark.timeout(60)
def test_a_killed_holder_stops_holding() -> None:
    def holder(h: Helper) -> None:
        ps.shared("k", int, initial=3)
        h.ready()
        time.sleep(600)

    helper = Helper(holder)
    try:
        helper.wait_ready()
        seg = ps.shared("k", int)
        assert seg.view.value == 3
    finally:
        helper.kill()
    seg.close()  # the dead child does not count: we were the last holder
    assert not exists("k")


def _leave_an_orphan(name: str) -> None:
    """A holder that set ``name`` to 42 is SIGKILLed: the segment stays, held by nobody."""

    def holder(h: Helper) -> None:
        seg = ps.shared(name, int)
        seg.view.value = 42
        h.ready()
        time.sleep(600)

    helper = Helper(holder)
    helper.wait_ready()
    helper.kill()
    assert exists(name)  # left behind by the SIGKILL


@pytest.mark.timeout(60)
@pytest.mark.parametrize("create", [None, False])
def test_an_orphan_is_never_served_as_live_data(create: bool | None) -> None:
    _leave_an_orphan("o")
    if create is False:
        with pytest.raises(ps.SegmentNotFound):
            ps.shared("o", int, create=False)
        assert not exists("o")  # reclaimed by the next open
    else:
        with ps.shared("o", int) as o:
            assert o.value == 0  # a fresh segment, not the dead one's 42
        assert not exists("o")


def test_persist_keeps_a_segment_until_unlink() -> None:
    with ps.shared("keep", int, persist=True) as k:
        k.value = 9
    assert exists("keep")
    with ps.shared("keep", int, create=False) as k:
        assert k.value == 9
    seg = ps.shared("keep", int)
    assert seg.persist
    seg.close()
    assert ps.unlink("keep") is True
    assert not exists("keep")
    assert ps.unlink("keep") is False


@pytest.mark.timeout(60)
def test_a_persistent_segment_outlives_a_killed_creator() -> None:
    def holder(h: Helper) -> None:
        seg = ps.shared("pk", int, persist=True)
        seg.view.value = 5
        h.ready()
        time.sleep(600)

    helper = Helper(holder)
    helper.wait_ready()
    helper.kill()
    try:
        with ps.shared("pk", int, create=False) as pk:
            assert pk.value == 5
    finally:
        ps.unlink("pk")


def test_unlink_frees_the_name_while_holders_keep_their_memory() -> None:
    with ps.shared("u", int, initial=1) as old:
        assert ps.unlink("u")
        with ps.shared("u", int, initial=2) as new:
            assert (old.value, new.value) == (1, 2)
            old.value = 10
            assert new.value == 2


def test_a_dropped_handle_is_closed_by_garbage_collection() -> None:
    seg = ps.shared("gc", int)
    assert exists("gc")
    del seg
    gc.collect()
    assert not exists("gc")


def test_a_view_keeps_its_handle_open() -> None:
    view = ps.shared("v", int).view
    gc.collect()
    view.value = 3
    assert exists("v")
    del view
    gc.collect()
    assert not exists("v")


def test_interpreter_exit_closes_what_is_left_open() -> None:
    code = textwrap.dedent(
        """
        import procshare as ps
        seg = ps.shared("left-open", int, initial=1)
        keep = [seg]  # still referenced at exit
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr
    assert not exists("left-open")


# --------------------------------------------------------------------------
# out of space


def test_a_segment_bigger_than_free_shared_memory_raises_at_creation() -> None:
    vfs = os.statvfs("/dev/shm")
    too_big = vfs.f_blocks * vfs.f_frsize + (1 << 30)
    before = namespace_objects()
    with pytest.raises(ps.SharedMemoryFull) as info:
        ps.shared("huge", bytes, size=too_big)
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == 28  # ENOSPC
    assert err.requested == too_big
    assert err.available is not None
    assert err.available < too_big
    assert "does not fit" in str(err)
    assert namespace_objects() == before


@ps.forked
def _create_under_a_file_size_limit(size: int) -> tuple[str, int | None, int]:
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    try:
        ps.shared("capped", bytes, size=size)
    except ps.SharedMemoryFull as err:
        return str(err), err.file_size_limit, err.errno
    return "created", None, 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [200_000, 8 << 20])  # one write / posix_fallocate
def test_a_segment_above_the_file_size_limit_says_so(size: int) -> None:
    # Free memory is plentiful: the advice must be about `ulimit -f`, not /dev/shm.
    before = namespace_objects()
    message, limit, code = _create_under_a_file_size_limit(size).join()
    assert limit == 100_000
    assert code == 28  # still a SharedMemoryFull (ENOSPC) for those who catch that
    assert "ulimit -f" in message
    assert "enlarge /dev/shm" not in message
    assert namespace_objects() == before


@pytest.mark.parametrize("size", [4096, 8 << 20])  # one write / posix_fallocate
def test_creation_reserves_the_pages(size: int) -> None:
    with ps.shared("big", bytes, size=size):
        st = os.stat(shm_path("big"))
        assert st.st_blocks * 512 >= size  # reserved: no SIGBUS on first touch


# --------------------------------------------------------------------------
# names and namespaces


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "é", "x" * 129, "semi;colon"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(ps.InvalidName, match="A-Z a-z 0-9"):
        ps.shared(bad, int)
    with pytest.raises(ps.InvalidName):
        ps.unlink(bad)


def test_long_names_map_to_short_os_names() -> None:
    name = "n" * 128
    with ps.shared(name, int, initial=4) as v:
        assert v.value == 4
        assert len(names.os_name(names.SEGMENT, name)) <= 31
        assert exists(name)


def test_namespaces_separate_applications() -> None:
    app1, app2 = another_namespace("app1"), another_namespace("app2")
    with ps.namespace(app1), ps.shared("x", int, initial=1) as one:
        with ps.namespace(app2), ps.shared("x", int, initial=2) as two:
            assert (one.value, two.value) == (1, 2)
            assert os.path.exists(shm_path("x", app2))
        assert os.path.exists(shm_path("x", app1))


def test_the_environment_variable_sets_the_namespace() -> None:
    code = 'import procshare as ps\nprint(ps.shared("e", int, create=False).view.value)'
    envapp = another_namespace("envapp")
    with ps.namespace(envapp), ps.shared("e", int, initial=77):
        env = dict(os.environ, PROCSHARE_NAMESPACE=envapp)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        assert out.stdout.strip() == "77", out.stderr
        env["PROCSHARE_NAMESPACE"] = another_namespace("otherapp")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        assert "SegmentNotFound" in out.stderr


# --------------------------------------------------------------------------
# fork


def test_a_segment_opened_before_fork_is_usable_in_the_child_which_never_unlinks_it() -> None:
    seg = ps.shared("f", int, initial=1)
    try:

        def child() -> int:
            seg.view.value += 10
            seg.close()  # the child's close must not release the parent's hold
            with ps.shared("f", int, create=False) as mine:
                return int(mine.value)

        assert run_in_child(child) == 11
        assert exists("f")
        assert not seg.closed
        assert seg.view.value == 11
        # the parent still counts as a holder: another process attaches fine
        assert run_in_child(lambda: int(ps.shared("f", int, create=False).view.value)) == 11
    finally:
        seg.close()
    assert not exists("f")


def test_a_child_exiting_inside_an_inherited_with_block_releases_nothing() -> None:
    with ps.shared("w", int) as w:

        def child() -> None:
            with ps.shared("w", int) as again:
                again.value = 5
            w.value += 1

        run_in_child(child)
        assert w.value == 6
        assert exists("w")
    assert not exists("w")


# --------------------------------------------------------------------------
# permissions


def test_segments_are_owner_only_by_default() -> None:
    with ps.shared("m", int):
        assert stat.S_IMODE(os.stat(shm_path("m")).st_mode) == 0o600
    with ps.shared("m", int, mode=0o640):
        assert stat.S_IMODE(os.stat(shm_path("m")).st_mode) == 0o640


@pytest.mark.parametrize("mode", [0o400, 0o1777, -1, "0o600"])
def test_bad_modes_are_refused(mode: object) -> None:
    with pytest.raises(ValueError, match="mode="):
        ps.shared("m", int, mode=mode)  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_attach() -> None:
    with ps.shared("secret", int, initial=7):
        os_name = names.os_name(names.SEGMENT, "secret")
        ps.shared("secret", int, create=False).close()  # remembered: a plan for this call
        with ps.interprocess_lock("secret-lock"):
            pass

        def child() -> tuple[str, str]:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            # By name it is another user's namespace: not found, although
            # the parent made this very call before the fork.
            try:
                ps.shared("secret", int, create=False)
                by_name = "attached"
            except ps.SegmentNotFound:
                by_name = "not found"
            # A lock of the same name is another user's lock, not the parent's.
            lock = ps.interprocess_lock("secret-lock")
            assert lock._entry is not None
            assert lock._entry.os_name != names.os_name(names.LOCK, "secret-lock", uid=0)
            lock.close()
            # By the OS name itself, the mode keeps it out.
            from procshare._engine.core import get_engine

            try:
                get_engine().backend.segment_open(os_name, keep_orphan=lambda h: False)
                direct = "attached"
            except PermissionError:
                direct = "denied"
            return by_name, direct

        assert run_in_child(child) == ("not found", "denied")


def test_child_failures_are_reported() -> None:
    # The helper itself must not hide a failing child (a negative control).
    with pytest.raises(ChildFailed, match="ZeroDivisionError"):
        run_in_child(lambda: 1 / 0)


@pytest.mark.timeout(120)
def test_racing_openers_of_an_orphan_never_serve_its_data() -> None:
    _leave_an_orphan("stale")
    start_r, start_w = os.pipe()
    hold_r, hold_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(start_w)
                os.close(hold_w)
                os.read(start_r, 1)
                seg = ps.shared("stale", int)
                os.write(report_w, f"{seg.view.value}\n".encode())
                os.read(hold_r, 1)
                seg.close()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(report_w)
    os.close(start_w)
    seen = b""
    while seen.count(b"\n") < 8:
        chunk = os.read(report_r, 1024)
        if not chunk:
            break
        seen += chunk
    os.close(hold_w)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    for fd in (start_r, hold_r, report_r):
        os.close(fd)
    assert statuses == [0] * 8
    assert seen.split() == [b"0"] * 8  # every one got the fresh segment, none the 42
    assert not exists("stale")


def test_threads_closing_one_handle_at_once_close_it_once() -> None:
    import threading

    seg = ps.shared("t", int)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def close() -> None:
        barrier.wait()
        try:
            seg.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=close) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert seg.closed
    assert not exists("t")


@pytest.mark.timeout(60)
def test_create_none_attaches_even_when_this_process_created_the_name_last_time() -> None:
    # The engine guesses "create first" for a name it created last time; the
    # guess must never cost correctness.
    with ps.shared("hint", int) as first:
        first.value = 1

    def holder(h: Helper) -> None:
        with ps.shared("hint", int, initial=7):
            h.ready()
            h.wait_release()

    helper = Helper(holder)
    try:
        helper.wait_ready()
        seg = ps.shared("hint", int)
        try:
            assert not seg.created
            assert seg.view.value == 7
        finally:
            seg.close()
    finally:
        assert helper.release() == 0
    assert not exists("hint")


def test_a_mapping_is_unmapped_only_when_no_exported_buffer_needs_it() -> None:
    from procshare._backends.posix import _shmstep

    seg = ps.shared("mapping", bytes, size=64)
    mapping = seg._rec.handle.mm
    assert isinstance(mapping, _shmstep.Mapping)
    assert len(mapping) >= 64
    view = memoryview(mapping)
    with pytest.raises(BufferError):
        mapping.close()  # a buffer is exported: refusing beats a segfault
    assert not mapping.closed
    view.release()
    seg.close()  # the segment's own views are gone: now it unmaps
    assert mapping.closed
    mapping.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        memoryview(mapping)


def test_a_held_object_that_is_not_ours_is_refused_not_mapped_as_data() -> None:
    # The C attach step sees a holder, maps, finds no procshare header and
    # hands over to the Python protocol, which says what it found: a
    # SharedTypeError (a procshare error, like every other) with the remedy.
    import fcntl
    import struct

    path = shm_path("junk")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"not a procshare object".ljust(256, b"\0"))
        hold = struct.pack("@hhqqi4x", fcntl.F_RDLCK, 0, 0, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, hold)  # somebody "holds" it
        with pytest.raises(ps.SharedTypeError, match="not a procshare object") as info:
            ps.shared("junk", ps.u8, create=False)
        assert "python -m procshare rm junk" in str(info.value)
    finally:
        os.unlink(path)
        os.close(fd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("remover_unlinks", [False, True])
def test_an_opener_waits_for_a_remover_deciding_and_follows_its_decision(
    remover_unlinks: bool,
) -> None:
    # A last holder deciding whether to remove an object holds WRITE on its
    # holder byte. An opener arriving then (the C step sees the WRITE and
    # hands over to the Python protocol) waits, and attaches only if the
    # object is still there afterwards.
    import fcntl
    import struct
    import threading

    with ps.shared("deciding", ps.u64, persist=True) as view:
        view.value = 42  # the creator leaves; persist keeps it, holding nothing
    path = shm_path("deciding")
    fd = os.open(path, os.O_RDWR)
    outcome: list[object] = []
    try:
        write = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, write)  # the "remover" is deciding

        def opener() -> None:
            try:
                with ps.shared("deciding", ps.u64, create=False) as seen:
                    outcome.append(seen.value)
            except ps.SegmentNotFound as exc:
                outcome.append(exc)

        thread = threading.Thread(target=opener)
        thread.start()
        time.sleep(0.2)
        assert outcome == []  # still waiting for the decision
        if remover_unlinks:
            os.unlink(path)
        unlock = struct.pack("@hhqqi4x", fcntl.F_UNLCK, 0, 0, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, unlock)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        os.close(fd)
        if not remover_unlinks:
            ps.unlink("deciding")
    if remover_unlinks:
        assert len(outcome) == 1
        assert isinstance(outcome[0], ps.SegmentNotFound)
    else:
        assert outcome == [42]


# --------------------------------------------------------------------------
# children that inherited a handle


@pytest.mark.timeout(60)
def test_a_segment_the_parent_closes_lives_on_for_children_that_inherited_it() -> None:
    # A child forked while the segment was open holds it too: the parent's
    # close must not let the name go while the child may still use it, or a
    # later opener would make a second segment under the same name.
    seg = ps.shared("s", ps.u64)
    view = seg.view
    go_r, go_w = os.pipe()

    @ps.forked
    def writes_later() -> int:
        os.read(go_r, 1)  # once the parent has closed its handle
        view.value = 42  # through the handle it inherited
        with ps.shared("s", ps.u64, create=False) as by_name:
            return int(by_name.value)

    child = writes_later()
    seg.close()
    assert exists("s")
    with ps.shared("s", ps.u64, create=False) as later:  # the same segment, not a new one
        os.write(go_w, b"x")
        assert child.join() == 42
        assert later.value == 42
    assert not exists("s")  # the child is reaped and the last handle closed
    os.close(go_r)
    os.close(go_w)


@pytest.mark.timeout(60)
def test_a_child_forked_before_the_open_does_not_keep_it() -> None:
    @ps.forked
    def naps() -> None:
        time.sleep(30)

    child = naps()
    try:
        with ps.shared("s", ps.u64):
            pass
        assert not exists("s")
    finally:
        child.kill()
        child.wait()


@ps.forked
def _naps(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.timeout(60)
def test_only_children_forked_while_it_was_open_keep_it() -> None:
    # A child forked after the close has no handle on the segment: a rolling
    # pool must not keep every scratch segment until its last child ends.
    a = ps.shared("A", ps.u64)
    first = _naps(0.5)
    a.close()
    later = _naps(30)
    try:
        assert exists("A")  # kept for the first child
        first.join()
        assert not exists("A")  # released with it, though a later child runs
    finally:
        later.kill()
        later.wait()


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_scope_releases_what_waited_for_its_children() -> None:
    def interrupted_scope() -> None:
        with ps.children():
            with ps.shared("s", ps.u64):
                _naps(30)
            assert exists("s")  # the child still runs: kept for it
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_scope()
    assert not exists("s")  # children terminated and reaped, and then released


@pytest.mark.timeout(60)
def test_a_deferred_release_that_fails_keeps_the_others_for_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procshare._engine import get_engine

    a, b = ps.shared("a", ps.u64), ps.shared("b", ps.u64)
    child = _naps(0.2)
    a.close()
    b.close()
    backend = type(get_engine().backend)
    real = backend.segment_close
    failures = [OSError("injected")]

    def fails_once(self: object, handle: object, *, keep: object) -> bool:
        if failures:
            raise failures.pop()
        return real(self, handle, keep=keep)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "segment_close", fails_once)
    with pytest.raises(OSError, match="injected"):
        child.join()  # reaps, then releases: the first release fails
    assert get_engine().deferred == 1  # the other one is still listed...
    ps.segments()  # ...and the next call into procshare releases it
    assert get_engine().deferred == 0
    assert not exists("a") or not exists("b")
    for name in ("a", "b"):  # the one whose release failed: clean up by hand
        if exists(name):
            ps.unlink(name)


def _run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(90)
def test_a_collection_in_an_early_fork_hook_cannot_deadlock_the_child() -> None:
    # In the child, hooks registered before procshare's run first; a garbage
    # collection there closes a dropped Segment while procshare still takes
    # the process for the parent, whose engine lock another thread held at
    # the fork. The child must not wait for that lock (it would forever).
    out = _run_script(
        """
        import gc, os, threading, time, warnings
        warnings.simplefilter("ignore")
        os.register_at_fork(after_in_child=gc.collect)  # before procshare's hooks
        import procshare as ps
        from procshare._engine.core import get_engine

        @ps.forked
        def child():
            return "ran"

        child().join()
        gc.disable()
        cycle = [ps.shared("data", ps.u64)]
        cycle.append(cycle)
        del cycle
        held = threading.Event()

        def busy():
            with get_engine().lock:
                held.set()
                time.sleep(2)

        t = threading.Thread(target=busy)
        t.start()
        held.wait()
        c = child()
        t.join()
        status = c.wait(timeout=20)
        if status is None:
            c.kill()
            c.wait()
        print("finished" if status is not None else "hung")
        gc.enable()
        gc.collect()
        """
    )
    assert out.stdout.strip() == "finished", out.stdout + out.stderr


@pytest.mark.timeout(90)
def test_a_segment_opened_while_another_thread_forks_is_kept_for_that_child() -> None:
    # The child inherits what another thread opens between the fork being
    # numbered and the fork itself: its stamp must count that child.
    out = _run_script(
        """
        import os, threading, time, warnings
        warnings.simplefilter("ignore")
        import procshare as ps

        opened, go_on = threading.Event(), threading.Event()
        box = []

        def before():
            if not go_on.is_set():
                go_on.set()
                opened.wait(10)  # the other thread opens meanwhile

        os.register_at_fork(before=before)

        def opener():
            go_on.wait(10)
            box.append(ps.shared("data", ps.u64, initial=7))
            opened.set()

        gate_r, gate_w = os.pipe()

        @ps.forked
        def naps():
            os.close(gate_w)
            os.read(gate_r, 1)  # alive until the parent has looked, however slow

        t = threading.Thread(target=opener)
        t.start()
        child = naps()
        t.join()
        box[0].close()  # the child inherited it: kept until it is reaped
        with ps.shared("data", ps.u64) as again:
            print(again.value)  # 7: the same segment, not a fresh one
        os.close(gate_w)
        child.join()
        """
    )
    assert out.stdout.strip() == "7", out.stdout + out.stderr
