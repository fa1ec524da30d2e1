"""The leak check itself: a test that leaks must fail, and the leftovers go away."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

import pytest

from procshare._backends import get_backend
from procshare.testing import child_pids

pytestmark = pytest.mark.timeout(60)

LEAKY_SEGMENT = """
import os
from procshare._backends import get_backend
from procshare._engine import names

def test_leaks_a_segment():
    get_backend().segment_create(
        names.os_name(names.SEGMENT, "leaky"), meta=b"{}", data_size=8, mode=0o600,
        persist=False)
"""

LEAKY_RAW_FILE = """
def test_leaks_a_raw_shm_file():
    open({path!r}, "w").close()
"""

LEAKY_ZOMBIE = """
import os, time

def test_leaves_a_zombie():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, never reaped: a zombie
"""

LEAKY_RUNNER = """
import os, time

def test_leaves_a_running_child():
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(60)
        finally:
            os._exit(0)
"""

CLEAN = """
import os

def test_cleans_up():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    open("/dev/shm/procshare-leak-check-clean", "w").close()
    os.unlink("/dev/shm/procshare-leak-check-clean")
"""


def _run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makepyfile(source)
    return pytester.runpytest_subprocess("-p", "procshare.testing", "-p", "no:cacheprovider")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (LEAKY_SEGMENT, "shared-memory objects left behind: /ps"),
        (LEAKY_ZOMBIE, "zombie: never reaped"),
        (LEAKY_RUNNER, "still running"),
    ],
    ids=["segment", "zombie", "running-child"],
)
def test_a_leaking_test_fails(pytester: pytest.Pytester, source: str, expected: str) -> None:
    result = _run(pytester, source)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*leaked*{expected}*"])
    # ... and the check removed what the test left, so later tests start clean.
    reported = re.findall(r"(/(?:ps|procshare)[\w.-]+)", result.stdout.str())
    assert source in (LEAKY_ZOMBIE, LEAKY_RUNNER) or reported
    assert set(reported) & get_backend().os_objects() == set()


def test_a_raw_file_is_neither_blamed_nor_removed(pytester: pytest.Pytester) -> None:
    # Not procshare's, and nothing records who made it: it may be another
    # program's, so the plugin does not touch it (SPEC 5).
    path = f"/dev/shm/procshare-leak-check-probe-{os.getpid()}"
    try:
        result = _run(pytester, LEAKY_RAW_FILE.format(path=path))
        result.assert_outcomes(passed=1)  # never blamed
        assert os.path.exists(path), f"the plugin removed {path}, which is not procshare's"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_a_clean_test_passes(pytester: pytest.Pytester) -> None:
    result = _run(pytester, CLEAN)
    result.assert_outcomes(passed=1)


def test_each_test_gets_its_own_namespace(procshare_leak_check: str) -> None:
    assert os.environ["PROCSHARE_NAMESPACE"] == procshare_leak_check
    assert procshare_leak_check.startswith("t-")


def test_child_pids_sees_a_child_and_its_state() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        assert pid in child_pids()
    finally:
        os.waitpid(pid, 0)
    assert pid not in child_pids()


OTHER_SESSION = """
import subprocess, sys

# Another session's test process (here: one that has exited) made it.
CODE = (
    "import json\\n"
    "from procshare._backends import get_backend\\n"
    "from procshare._engine import names\\n"
    "with names.use_namespace('t-othersession'):\\n"
    "    os_name = names.os_name(names.SEGMENT, 'theirs')\\n"
    "meta = json.dumps({'name': 'theirs', 'namespace': 't-othersession', 'kind': 'u8'})\\n"
    "get_backend().segment_create(\\n"
    "    os_name, meta=meta.encode(), data_size=1, mode=0o600, persist=True)\\n"
)

def test_another_sessions_object_is_not_blamed_here():
    subprocess.run([sys.executable, "-c", CODE], check=True)
"""


def test_objects_of_another_test_namespace_are_neither_blamed_nor_removed(
    pytester: pytest.Pytester,
) -> None:
    result = _run(pytester, OTHER_SESSION)
    result.assert_outcomes(passed=1)
    from procshare._engine import names

    with names.use_namespace("t-othersession"):
        os_name = names.os_name(names.SEGMENT, "theirs")
    assert os_name in get_backend().os_objects()
    get_backend().segment_unlink(os_name)


# The unrelated program creates its object only once the inner test has
# started (and so has recorded what existed before it): "go" file.
_WAIT_FOR_GO = (
    "deadline = time.monotonic() + 30\n"
    "while not __import__('os').path.exists({go!r}) and time.monotonic() < deadline:\n"
    "    time.sleep(0.01)\n"
)
_INNER = """
import os, time

def test_runs_while_another_program_creates_objects():
    open({go!r}, "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists({ready!r}) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists({ready!r})
"""


def _run_beside(pytester: pytest.Pytester, program: str, go: Path, ready: Path) -> None:
    """Run an inner test session while ``program`` runs beside it, unrelated."""
    import subprocess
    import sys

    pytester.makepyfile(_INNER.format(go=str(go), ready=str(ready)))
    env_program = subprocess.Popen(
        [sys.executable, "-c", program], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        result = pytester.runpytest_subprocess("-p", "procshare.testing", "-p", "no:cacheprovider")
        assert ready.exists()
        result.assert_outcomes(passed=1)  # not blamed
    finally:
        _, err = env_program.communicate("", timeout=20)
        assert env_program.returncode == 0, err  # and its object was not removed under it


def test_a_live_unrelated_programs_object_is_neither_blamed_nor_removed(
    pytester: pytest.Pytester,
) -> None:
    # A program that is not a descendant of the inner pytest (here: started by
    # this outer test, so a sibling of the inner run) creates an object while
    # the inner test runs, as a concurrent demo would.
    go, ready = pytester.path / "go", pytester.path / "ready"
    program = (
        "import json, sys, time\n"
        "from procshare._backends import get_backend\n"
        "from procshare._engine import names\n"
        f"{_WAIT_FOR_GO.format(go=str(go))}"
        "with names.use_namespace('demo-unrelated'):\n"
        "    n = names.os_name(names.SEGMENT, 'live')\n"
        "h = get_backend().segment_create(n, meta=b'{}', data_size=1, mode=0o600, persist=False)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "sys.stdin.read()\n"
        "assert __import__('os').path.exists('/dev/shm' + n), 'removed under it'\n"
        "get_backend().segment_close(h, keep=lambda h: False)\n"
    )
    _run_beside(pytester, program, go, ready)


def test_an_object_held_by_a_live_unrelated_program_is_not_removed_after_its_creator_exits(
    pytester: pytest.Pytester,
) -> None:
    # The unrelated program's child creates the object and exits once the
    # program itself holds it: the creator is gone, a live stranger holds it.
    go, ready = pytester.path / "go", pytester.path / "ready"
    program = (
        "import os, sys, time\n"
        "from procshare._backends import get_backend\n"
        "from procshare._engine import names\n"
        f"{_WAIT_FOR_GO.format(go=str(go))}"
        "b = get_backend()\n"
        "with names.use_namespace('demo-unrelated'):\n"
        "    n = names.os_name(names.SEGMENT, 'handed-over')\n"
        "made_r, made_w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    b.segment_create(n, meta=b'{}', data_size=1, mode=0o600, persist=False)\n"
        "    os.write(made_w, b'x')\n"
        "    time.sleep(0.5)\n"  # the program attaches meanwhile
        "    os._exit(0)\n"
        "os.read(made_r, 1)\n"
        "h = b.segment_open(n, keep_orphan=lambda h: True)\n"
        "assert h is not None\n"
        "os.waitpid(pid, 0)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "sys.stdin.read()\n"
        "assert __import__('os').path.exists('/dev/shm' + n), 'removed under it'\n"
        "b.segment_close(h, keep=lambda h: False)\n"
    )
    _run_beside(pytester, program, go, ready)


def test_a_raw_file_a_live_unrelated_program_maps_is_neither_blamed_nor_removed(
    pytester: pytest.Pytester,
) -> None:
    # Not procshare's, and mapped with its descriptor already closed (as
    # posix_ipc users do): only /proc/PID/maps shows who uses it.
    go, ready = pytester.path / "go", pytester.path / "ready"
    n = f"/procshare-leak-check-foreign-{os.getpid()}"
    program = (
        "import mmap, os, sys, time\n"
        f"{_WAIT_FOR_GO.format(go=str(go))}"
        f"n = {n!r}\n"
        "fd = os.open('/dev/shm' + n, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)\n"
        "os.ftruncate(fd, 4096)\n"
        "m = mmap.mmap(fd, 4096)\n"
        "os.close(fd)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "sys.stdin.read()\n"
        "assert os.path.exists('/dev/shm' + n), 'removed under it'\n"
        "m.close()\n"
        "os.unlink('/dev/shm' + n)\n"
    )
    _run_beside(pytester, program, go, ready)


PERSISTS_ELSEWHERE = """
import subprocess, sys

def test_a_child_leaves_persistent_data_in_another_namespace():
    code = (
        "import procshare as ps\\n"
        "with ps.namespace('elsewhere'), ps.shared('kept', ps.u64, persist=True) as v:\\n"
        "    v.value = 7\\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
"""


def test_persistent_data_a_tests_subprocess_left_in_another_namespace_is_blamed(
    pytester: pytest.Pytester,
) -> None:
    # Its creator has exited and nobody holds it, but it records the test's
    # namespace as its origin (the subprocess inherited PROCSHARE_NAMESPACE):
    # the test made it, so it is blamed and removed.
    result = _run(pytester, PERSISTS_ELSEWHERE)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*leaked*segment 'kept' of namespace 'elsewhere' (/ps*, persistent)*cleaned up*"]
    )
    from procshare._engine import names

    with names.use_namespace("elsewhere"):
        os_name = names.os_name(names.SEGMENT, "kept")
    assert os_name not in get_backend().os_objects()


LEAKS_A_NAMED_SEGMENT = """
import procshare as ps

def test_leaks_a_segment_by_name():
    ps.shared("leaky", ps.u64, persist=True).close()
"""


def test_the_report_names_what_was_left_behind(pytester: pytest.Pytester) -> None:
    result = _run(pytester, LEAKS_A_NAMED_SEGMENT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*leaked*segment 'leaky' (/ps*They have been cleaned up*"])


def test_what_vanished_or_is_another_users_is_neither_blamed_nor_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procshare import testing

    # Gone between the listing and the judging: a concurrent program's
    # short-lived object (its name may even be reused by now).
    assert testing._judge(frozenset({"/procshare-leak-check-gone"}), "t-x") == ([], [])
    path = "/dev/shm/procshare-leak-check-theirs"
    with open(path, "wb") as f:
        f.write(b"x")
    try:
        # Nobody holds it and nothing says who made it: not this test's.
        assert testing._judge(frozenset({path[8:]}), "t-x") == ([], [])
        with open(path, "rb"):  # held by this process: this test's
            blamed, removable = testing._judge(frozenset({path[8:]}), "t-x")
            assert blamed == [f"a file {path[8:]} that is not procshare's"]
            assert [r.os_name for r in removable] == [path[8:]]
            # The same file as seen by another user: not this test's business.
            me = os.geteuid()
            monkeypatch.setattr(os, "geteuid", lambda: me + 1)
            assert testing._judge(frozenset({path[8:]}), "t-x") == ([], [])
    finally:
        os.unlink(path)


# A live procshare program in its own namespace, run beside a plugin-checked
# session: while the inner tests run it leaves a lock whose holder died, a
# persistent segment and a raw file, none of them held by anyone.
APP_PROGRAM = """
import os, signal, sys, time
import procshare as ps

{wait}
lock = ps.interprocess_lock("app-lock")

@ps.forked
def die_holding():
    lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)

try:
    die_holding().join()
except ps.ChildKilled:
    pass
lock.close()  # kept: its holder died, the next opener must be told
with ps.shared("app-data", ps.u64, persist=True) as v:
    v.value = 42
open({raw!r}, "w").close()
open({ready!r}, "w").close()
sys.stdin.read()
"""

BESIDE_THE_APP = """
import os, time
import procshare as ps

def test_runs_while_the_app_leaves_its_objects():
    open({go!r}, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists({ready!r}) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists({ready!r})

def test_uses_procshare_normally():
    with ps.shared("n", ps.u64) as n, ps.interprocess_lock("m"):
        n.value += 1

def test_still_catches_its_own_leak():
    ps.shared("mine", ps.u64, persist=True).close()
"""


@pytest.mark.timeout(120)
def test_a_test_session_beside_a_live_program_never_touches_its_objects(
    pytester: pytest.Pytester,
) -> None:
    import subprocess
    import sys

    import procshare as ps
    from procshare._engine import inspect as ps_inspect

    go, ready = pytester.path / "go", pytester.path / "ready"
    app_ns = f"app-beside-{os.getpid()}"
    raw = f"/dev/shm/procshare-leak-check-app-{os.getpid()}"
    program = APP_PROGRAM.format(wait=_WAIT_FOR_GO.format(go=str(go)), raw=raw, ready=str(ready))
    env = {**os.environ, "PROCSHARE_NAMESPACE": app_ns}
    app = subprocess.Popen(
        [sys.executable, "-c", program],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        pytester.makepyfile(BESIDE_THE_APP.format(go=str(go), ready=str(ready)))
        result = pytester.runpytest_subprocess("-p", "procshare.testing", "-p", "no:cacheprovider")
        # The session's own leak is still caught; the program is not blamed.
        result.assert_outcomes(passed=3, errors=1)
        result.stdout.fnmatch_lines(["*test_still_catches_its_own_leak*leaked*'mine'*"])
        assert "app-" not in "\n".join(line for line in result.stdout.lines if "leaked" in line)
        assert "procshare-leak-check-app" not in result.stdout.str()
        # ... and nothing of the program's was removed.
        with ps.namespace(app_ns):
            kinds = {(i.name, i.type, i.persist) for i in ps.segments()}
        assert os.path.exists(raw), "the session removed the program's raw file"
        assert {("app-lock", "lock", False), ("app-data", "segment", True)} <= kinds, (
            f"the session removed the program's objects: {kinds}"
        )
        with ps.namespace(app_ns):
            with ps.shared("app-data", ps.u64, create=False) as v:
                assert v.value == 42
            lock = ps.interprocess_lock("app-lock")
            with pytest.raises(ps.OwnerDied):  # the program's next run is told
                lock.acquire()
            lock.mark_consistent()
            lock.release()
            lock.close()
    finally:
        _, err = app.communicate("", timeout=30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(raw)
        with ps.namespace(app_ns):
            ps.unlink("app-data")
        ps_inspect.collect(app_ns, everything=True)
    assert app.returncode == 0, err


def test_a_reused_creator_pid_does_not_make_an_object_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from procshare import testing
    from procshare._engine import names

    backend = get_backend()
    with names.use_namespace("app-reused-pid"):
        os_name = names.os_name(names.SEGMENT, "theirs")
    meta = json.dumps({"name": "theirs", "namespace": "app-reused-pid", "kind": "u8"}).encode()
    handle = backend.segment_create(os_name, meta=meta, data_size=1, mode=0o600, persist=False)
    assert handle is not None
    backend.segment_close(handle, keep=lambda _h: True)  # kept, held by nobody
    try:
        # Recorded as created by this process: this test's.
        blamed, _ = testing._judge(frozenset({os_name}), "t-x")
        assert blamed == [f"segment 'theirs' of namespace 'app-reused-pid' ({os_name})"]
        # ... unless this process started after it was made: then the pid
        # was reused, and the object is another program's.
        monkeypatch.setattr(testing, "_started_ns", lambda _pid: time.time_ns() + 10**10)
        assert testing._judge(frozenset({os_name}), "t-x") == ([], [])
    finally:
        backend.segment_unlink(os_name)
