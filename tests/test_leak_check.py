"""The leak check itself: a test that leaks must fail, and the leftovers go away."""

from __future__ import annotations

import os

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
    open("/dev/shm/procshare-leak-check-probe", "w").close()
"""

LEAKY_ZOMBIE = """
import os, time

def test_leaves_a_zombie():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    time.sleep(0.2)  # exited, never waited for: a zombie
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
        (LEAKY_RAW_FILE, "/procshare-leak-check-probe"),
        (LEAKY_ZOMBIE, "zombie: never reaped"),
        (LEAKY_RUNNER, "still running"),
    ],
    ids=["segment", "raw-file", "zombie", "running-child"],
)
def test_a_leaking_test_fails(pytester: pytest.Pytester, source: str, expected: str) -> None:
    before = get_backend().os_objects()
    result = _run(pytester, source)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*leaked*{expected}*"])
    # ... and the check removed what the test left, so later tests start clean.
    assert get_backend().os_objects() - before == frozenset()


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
