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
  left behind, naming each. The leftovers are then removed and reaped, so
  one leaky test does not make every later one fail too.

It blames and removes only what the test's own processes made: objects of
the test's namespace, objects that record the test's namespace as their
origin (made in another namespace by a process that inherited the test's
``PROCSHARE_NAMESPACE``), and objects created or held by a live process of
this process's family. Everything else, such as a program running beside
the tests in its own namespace (its lock whose holder died, its persistent
segment) or a raw file that is not procshare's, is neither blamed nor
removed (see ``_judge``). The plugin reaches the backend only through the
engine (``procshare._engine.inspect``).

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

from procshare._engine import get_engine, names
from procshare._engine import inspect as _inspect
from procshare._engine.inspect import ObjectRecord


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


def _started_ns(pid: int) -> int | None:
    """When ``pid`` started (``time.time_ns()`` scale, to about a second), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        ticks = int(fields[19])  # field 22 of stat: starttime, in clock ticks after boot
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return int((btime + ticks / os.sysconf("SC_CLK_TCK")) * 1e9)


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its ancestors up to init, from /proc (empty if ``pid`` is gone)."""
    chain: set[int] = set()
    while pid > 1 and pid not in chain and (st := _stat(pid)) is not None:
        chain.add(pid)
        pid = st[1]
    return chain


# Objects named by their recorded kind in a leak report; anything else is a segment.
_SAID_BY_KIND = ("lock", "semaphore", "event", "condition", "barrier", "rwlock", "queue")


def _judge(new_objects: frozenset[str], namespace: str) -> tuple[list[str], list[ObjectRecord]]:
    """Which new objects this test left behind, described, and which to remove.

    A positive rule: an object is the test's when it is of the test's
    namespace (recorded there, or under its OS-name prefix), or records the
    test's namespace as its *origin* (made by a process that inherited the
    test's ``PROCSHARE_NAMESPACE``: the test's own process family, inside a
    ``ps.namespace()`` block), or was created or is held by a live process
    of this process's family. Those are blamed and removed, persistent
    segments and locks whose holder died included.

    Everything else is another program's and is neither blamed nor removed: a
    raw file that is not procshare's, an object of another namespace (a lock
    whose holder died, a persistent segment), and anything a live process
    outside this family holds or maps, even if it otherwise looks like ours.
    """
    if not new_objects:
        return [], []
    me = os.getpid()

    def family(pid: int) -> bool:
        return pid == me or (pid > 0 and me in _ancestors(pid))

    def created_by_family(rec: ObjectRecord) -> bool:
        # The pid recorded as creator, if it is still (or again) one of ours;
        # a process that started after the object was made is not its
        # creator but a reuse of its pid (2 s: /proc/stat's boot time is whole
        # seconds).
        if not family(rec.creator_pid):
            return False
        started = _started_ns(rec.creator_pid)
        return started is None or not rec.created_ns or started <= rec.created_ns + 2 * 10**9

    def foreign(pid: int) -> bool:
        if not pid or pid == me:
            return False
        lineage = _ancestors(pid)
        return bool(lineage) and me not in lineage

    blamed: list[str] = []
    removable: list[ObjectRecord] = []
    prefix = names.namespace_prefix(namespace)
    uid = os.geteuid()
    for rec in _inspect.describe_objects(new_objects):
        if rec.identity[0] != uid or any(map(foreign, rec.holders)):
            continue  # another user's, or in use by another program
        owner = rec.meta.get("namespace")
        ours = (
            owner == namespace
            or rec.meta.get("origin") == namespace
            or (owner is None and rec.os_name.startswith(prefix))
            or created_by_family(rec)
            or any(map(family, rec.holders))
        )
        if not ours:
            continue
        if not rec.procshare:
            what = f"a file {rec.os_name} that is not procshare's"
        else:
            kind = rec.meta["kind"] if rec.meta.get("kind") in _SAID_BY_KIND else "segment"
            name = rec.meta.get("name")
            what = f"{kind} {name!r}" if isinstance(name, str) else rec.os_name
            if isinstance(owner, str) and owner != namespace:
                what += f" of namespace {owner!r}"
            what += f" ({rec.os_name}{', persistent' if rec.persist else ''})"
        blamed.append(what)
        removable.append(rec)
    return blamed, removable


@pytest.fixture(autouse=True)
def procshare_leak_check(request: pytest.FixtureRequest) -> Iterator[str]:
    """Give the test its own namespace and fail it if it leaves anything behind."""
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    saved = os.environ.get("PROCSHARE_NAMESPACE")
    os.environ["PROCSHARE_NAMESPACE"] = namespace
    objects_before = _inspect.every_object()
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
    leaked_objects, removable = _judge(_inspect.every_object() - objects_before, namespace)
    if not (leaked_children or leaked_objects):
        return
    problems: list[str] = []
    if leaked_children:
        described = ", ".join(
            f"{pid} ({'zombie: never reaped' if st == 'Z' else 'still running'})"
            for pid, st in sorted(leaked_children.items())
        )
        problems.insert(0, f"child processes left behind: {described}")
        _reap(sorted(leaked_children))
    if leaked_objects:
        problems.insert(0, f"shared-memory objects left behind: {', '.join(leaked_objects)}")
        _inspect.remove_objects(removable)
    pytest.fail(
        f"{request.node.nodeid} leaked: " + "; ".join(problems) + ". (They have been cleaned up.)",
        pytrace=False,
    )
