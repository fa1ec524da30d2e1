"""ps.segments() and `python -m procshare ls | gc | rm`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import procshare as ps
from lockhelpers import killed_holder
from procshare._backends import get_backend
from procshare._engine import names
from shared_support import another_namespace

pytestmark = pytest.mark.timeout(60)


def _make(name: str, *, persist: bool = False, kind: str = names.SEGMENT) -> object:
    meta = json.dumps({"name": name, "namespace": names.current_namespace(), "kind": "u64"})
    handle = get_backend().segment_create(
        names.os_name(kind, name),
        meta=meta.encode(),
        data_size=8,
        mode=0o600,
        persist=persist,
    )
    assert handle is not None
    return handle


def _close(handle: object) -> None:
    get_backend().segment_close(handle, keep=lambda h: False)  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procshare", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_segments_lists_name_kind_holders_and_age() -> None:
    handle = _make("totals")
    try:
        (info,) = ps.segments()
        assert info.name == "totals"
        assert info.type == "segment"
        assert info.kind == "u64"
        assert info.holders == (os.getpid(),)
        assert info.size >= 8
        assert 0 <= info.age < 60
        assert not info.persist
        assert info.namespace == names.current_namespace()
    finally:
        _close(handle)
    assert ps.segments() == []


def test_segments_of_another_namespace_are_not_listed() -> None:
    elsewhere = another_namespace("elsewhere")
    with ps.namespace(elsewhere):
        handle = _make("hidden")
    try:
        assert ps.segments() == []
        assert [i.name for i in ps.segments(elsewhere)] == ["hidden"]
    finally:
        _close(handle)


def test_cli_ls_prints_a_table() -> None:
    handle = _make("totals")
    try:
        out = _cli("ls")
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()
        assert header.split()[:3] == ["NAME", "TYPE", "KIND"]
        assert row.split()[:3] == ["totals", "segment", "u64"]
        assert str(os.getpid()) in row
    finally:
        _close(handle)
    assert "nothing in namespace" in _cli("ls").stdout


def _orphan(name: str, *, persist: bool = False) -> None:
    """Create an object in a child that is then SIGKILLed while holding it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _make(name, persist=persist)
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_gc_removes_what_a_killed_holder_left_and_keeps_persistent_and_live() -> None:
    _orphan("dead")
    _orphan("kept", persist=True)
    live = _make("live")
    try:
        assert {i.name for i in ps.segments()} == {"dead", "kept", "live"}
        out = _cli("gc")
        assert out.returncode == 0, out.stderr
        assert "1 object(s) removed" in out.stdout
        assert {i.name for i in ps.segments()} == {"kept", "live"}
        out = _cli("gc", "--all")
        assert "1 object(s) removed" in out.stdout
        assert {i.name for i in ps.segments()} == {"live"}
    finally:
        _close(live)


def test_gc_removes_an_abandoned_temporary() -> None:
    # A creator killed before publishing leaves only its temporary behind.
    tmp = names.temp_os_name()
    fd = os.open("/dev/shm" + tmp, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    (info,) = ps.segments()
    assert info.type == "temporary"
    assert _cli("gc").stdout.strip().endswith("1 object(s) removed")
    assert ps.segments() == []


def test_rm_removes_one_object_and_reports_a_missing_one() -> None:
    _orphan("doomed", persist=True)
    out = _cli("rm", "doomed")
    assert out.returncode == 0
    assert "removed segment 'doomed'" in out.stdout
    assert ps.segments() == []
    out = _cli("rm", "doomed")
    assert out.returncode == 1
    assert "no segment named 'doomed'" in out.stderr


def test_rm_of_the_wrong_type_says_which_command_would_do() -> None:
    lock = ps.interprocess_lock("m")
    out = _cli("rm", "m")
    assert out.returncode == 1
    assert "there is a lock of that name: `python -m procshare rm --lock m`" in out.stderr
    lock.close()


def test_cli_reports_an_invalid_name_clearly() -> None:
    out = _cli("rm", "bad name")
    assert out.returncode == 2
    assert "A-Z a-z 0-9 . _ -" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [["ls"], ["gc"], ["rm", "totals"], ["rm", "m", "--lock"]])
def test_cli_refuses_an_invalid_namespace_for_every_command(command: list[str]) -> None:
    out = _cli(*command, "--namespace", "bad/ns")
    assert out.returncode == 2
    assert "the namespace contains '/'" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_segments_refuses_an_invalid_namespace() -> None:
    with pytest.raises(ps.InvalidName, match="the namespace is empty"):
        ps.segments("")


def test_gc_keeps_a_lock_whose_holder_died_until_gc_all() -> None:
    dead = killed_holder("m")
    (info,) = ps.segments()
    assert (info.name, info.type, info.owner, info.holders) == ("m", "lock", dead, ())
    assert "0 object(s) removed" in _cli("gc").stdout  # kept: the next user must be told
    assert [i.name for i in ps.segments()] == ["m"]
    assert "1 object(s) removed" in _cli("gc", "--all").stdout
    assert ps.segments() == []


@ps.forked
def _open_a_lock_and_die(name: str) -> None:
    ps.interprocess_lock(name)  # opened, never taken
    os.kill(os.getpid(), signal.SIGKILL)


def test_listing_changes_nothing_it_lists() -> None:
    # A lock object its only user left behind without ever taking it is an
    # orphan: gc removes it, ls and ps.segments() only show it.
    with pytest.raises(ps.ChildKilled):
        _open_a_lock_and_die("idle").join()
    for _ in range(2):
        assert [(i.name, i.type, i.holders) for i in ps.segments()] == [("idle", "lock", ())]
        assert "idle" in _cli("ls").stdout
    assert ps.segments()[0].owner is None
    out = _cli("gc")
    assert out.returncode == 0
    assert "1 object(s) removed" in out.stdout
    assert ps.segments() == []


def _junk(kind: str, name: str, data: bytes) -> str:
    path = "/dev/shm" + names.os_name(kind, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("data", [b"", b"not a procshare object" * 10])
def test_junk_under_a_name_is_listed_and_refused_with_the_command_that_removes_it(
    data: bytes,
) -> None:
    _junk(names.LOCK, "m", data)
    _junk(names.SEGMENT, "s", data)
    # Listed with what can be known (no name, kind '?'), never trusted.
    assert sorted((i.name, i.type, i.kind) for i in ps.segments()) == [
        (None, "lock", "?"),
        (None, "segment", "?"),
    ]
    assert _cli("ls").returncode == 0
    with pytest.raises(ps.SharedTypeError, match=r"rm --lock m") as lock_err:
        ps.interprocess_lock("m")
    assert "lock 'm' holds something that is not a procshare object" in str(lock_err.value)
    with pytest.raises(ps.SharedTypeError, match=r"procshare rm s`") as seg_err:
        ps.shared("s", ps.u64)
    assert "not a procshare object" in str(seg_err.value)
    assert _cli("rm", "--lock", "m").returncode == 0
    assert _cli("rm", "s").returncode == 0
    assert ps.segments() == []


def _namespaces_sharing_a_prefix() -> tuple[str, str]:
    seen: dict[str, str] = {}
    for i in range(1_000_000):
        ns = f"collide-{i}"
        prefix = names.namespace_prefix(ns)
        if prefix in seen:
            return seen[prefix], ns
        seen[prefix] = ns
    raise AssertionError("no two namespaces share a prefix: is it still 28 bits?")


def test_ls_and_gc_keep_to_their_namespace_when_another_shares_its_prefix() -> None:
    mine, theirs = _namespaces_sharing_a_prefix()
    with ps.namespace(theirs):
        ps.shared("precious", ps.u64, initial=7, persist=True).close()
    assert ps.segments(mine) == []
    assert "nothing" in _cli("ls", "--namespace", mine).stdout
    assert _cli("gc", "--all", "--namespace", mine).returncode == 0
    with ps.namespace(theirs), ps.shared("precious", ps.u64, create=False) as kept:
        assert kept.value == 7
    with ps.namespace(theirs):
        assert ps.unlink("precious")


@pytest.mark.timeout(30)
def test_a_fifo_under_a_name_does_not_hang_the_listing() -> None:
    path = "/dev/shm" + names.os_name(names.LOCK, "fifo")
    os.mkfifo(path, 0o600)
    try:
        assert [(i.type, i.owner) for i in ps.segments()] == [("lock", None)]
    finally:
        os.unlink(path)


def test_the_cli_help_is_readable_and_lists_every_command() -> None:
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("ls", "gc", "rm", "demo"):  # one line each, in the command list
        assert re.search(rf"^    {command} +\w", out.stdout, re.M), out.stdout
        assert _cli(command, "--help").returncode == 0
    assert "examples:" in out.stdout
    assert "::" not in out.stdout  # no reStructuredText from the module docstring
