"""A pytest plugin: each test gets its own namespace and fails if it leaks.

Enable it in a ``conftest.py``::

    pytest_plugins = ["procshare.testing"]

or on the command line with ``pytest -p procshare.testing``. For every test
it

* sets ``PROCSHARE_NAMESPACE`` to a fresh namespace, so tests never see each
  other's segments and locks (subprocesses inherit it);
* records the backend's objects (``/dev/shm`` on Linux) and this process's
  children before the test, and after it fails the test (as an error in
  teardown) if a segment, a lock, a temporary, a live child or a zombie was
  left behind. The leftovers are then removed and reaped, so one leaky test
  does not make every later one fail too. Objects recorded as belonging to
  another test's namespace are left alone: they are a concurrently running
  session's, not this test's.

It is not auto-enabled on install: a library must not change the outcome
of its users' tests unasked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from procshare._backends import get_backend
from procshare._engine import get_engine, names
from procshare._engine.segments import decode_meta


def _stat(pid: int | str) -> tuple[str, int] | None:
    """``(state letter, parent pid)`` of ``pid`` from /proc, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = stat.rsplit(")", 1)[-1].split()
    return (fields[0], int(fields[1])) if len(fields) >= 2 else None


def child_pids(parent: int | None = None) -> dict[int, str]:
    """Children of ``parent`` (default: this process) mapped to their state letter."""
    parent = os.getpid() if parent is None else parent
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(entry)) is not None and st[1] == parent:
            found[int(entry)] = st[0]
    return found


def _reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.01)


def _settle(before: dict[int, str], seconds: float) -> dict[int, str]:
    """Children not there before; waits briefly for ones that are already exiting."""
    deadline = time.monotonic() + seconds
    while True:
        extra = {p: s for p, s in child_pids().items() if p not in before}
        if not extra or time.monotonic() >= deadline:
            return extra
        time.sleep(0.02)


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its ancestors up to init, from /proc (empty if ``pid`` is gone)."""
    chain: set[int] = set()
    while pid > 1 and pid not in chain and (st := _stat(pid)) is not None:
        chain.add(pid)
        pid = st[1]
    return chain


def _own(new_objects: frozenset[str], namespace: str) -> list[str]:
    """The new objects this test is answerable for.

    Everything new counts (raw files, other namespaces a test chose with
    ``ps.namespace``), except procshare objects that are visibly another
    program's: recorded as belonging to *another* test's namespace, or
    created or held open by a process that is still alive and is neither
    this process nor one of its descendants (a concurrently running demo or
    test session, whose creator may already have exited while another of its
    processes holds the object). Removing those would break the program that
    owns them.
    """
    if not new_objects:
        return []
    me = os.getpid()

    def foreign(pid: int) -> bool:
        if not pid or pid == me:
            return False
        lineage = _ancestors(pid)
        return bool(lineage) and me not in lineage

    others = set()
    for info in get_backend().segment_list(names.PREFIX):
        if info.os_name not in new_objects:
            continue
        owner = decode_meta(info.meta).get("namespace")
        another_tests = isinstance(owner, str) and owner.startswith("t-") and owner != namespace
        in_use_elsewhere = foreign(info.creator_pid) or any(map(foreign, info.holders))
        if another_tests or in_use_elsewhere:
            others.add(info.os_name)
    return sorted(new_objects - others)


@pytest.fixture(autouse=True)
def procshare_leak_check(request: pytest.FixtureRequest) -> Iterator[str]:
    """Give the test its own namespace and fail it if it leaves anything behind."""
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    saved = os.environ.get("PROCSHARE_NAMESPACE")
    os.environ["PROCSHARE_NAMESPACE"] = namespace
    backend = get_backend()
    objects_before = backend.os_objects()
    children_before = child_pids()
    try:
        yield namespace
    finally:
        if saved is None:
            os.environ.pop("PROCSHARE_NAMESPACE", None)
        else:
            os.environ["PROCSHARE_NAMESPACE"] = saved
    # A call into procshare reaps children whose handles were dropped.
    get_engine().poll()
    leaked_children = _settle(children_before, seconds=0.5)
    leaked_objects = _own(backend.os_objects() - objects_before, namespace)
    if not (leaked_children or leaked_objects):
        return
    problems = []
    if leaked_objects:
        problems.append(f"shared-memory objects left behind: {', '.join(leaked_objects)}")
        for name in leaked_objects:
            backend.segment_unlink(name)
    if leaked_children:
        described = ", ".join(
            f"{pid} ({'zombie: never reaped' if st == 'Z' else 'still running'})"
            for pid, st in sorted(leaked_children.items())
        )
        problems.append(f"child processes left behind: {described}")
        _reap(sorted(leaked_children))
    pytest.fail(
        f"{request.node.nodeid} leaked: " + "; ".join(problems) + ". (They have been cleaned up.)",
        pytrace=False,
    )
