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
  one leaky test does not make every later one fail too. Objects that are
  visibly another program's (another test's namespace, or created, held or
  mapped by a live process outside this one's family) are neither blamed
  nor removed, and a persistent segment nothing ties to the test is
  reported but kept, with the command that removes it.

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


def _judge(
    new_objects: frozenset[str], namespace: str
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Which new ``/dev/shm`` objects this test left behind, described, and which
    of those to remove.

    Everything new counts (raw files, other namespaces a test chose with
    ``ps.namespace``) except what is visibly another program's: recorded as
    belonging to *another* test's namespace, or created or held open or
    mapped by a live process that is neither this process nor one of its
    descendants (a concurrent demo, benchmark or test session, whose creator
    may already have exited while another of its processes holds the object).
    Blaming a test for those would be wrong, and removing them would break
    the program that owns them.

    Of the rest, everything is removed, except a ``persist=True`` segment of
    another namespace that nothing ties to this test (its creator has exited
    and nobody holds it): it may be another program's data, so it is only
    reported, with the command that removes it.
    """
    if not new_objects:
        return [], {}
    me = os.getpid()

    def foreign(pid: int) -> bool:
        if not pid or pid == me:
            return False
        lineage = _ancestors(pid)
        return bool(lineage) and me not in lineage

    def ours(pid: int) -> bool:
        return pid == me or me in _ancestors(pid)

    blamed: list[str] = []
    removable: dict[str, tuple[int, int]] = {}  # OS name -> the (st_dev, st_ino) judged
    prefix = names.namespace_prefix(namespace)
    listed = {i.os_name: i for i in get_backend().segment_list(names.PREFIX)}
    holders = get_backend().segment_holders(set(new_objects), mapped=True)
    uid = os.geteuid()
    for os_name in sorted(new_objects):
        try:
            st = os.lstat("/dev/shm" + os_name)
        except OSError:
            continue  # gone already: another program's short-lived object
        if st.st_uid != uid:
            continue  # another user's: neither ours to blame nor to remove
        inode = (st.st_dev, st.st_ino)
        held_by = holders.get(os_name, [])
        if any(map(foreign, held_by)):
            continue
        info = listed.get(os_name)
        if info is None:  # not procshare's: a raw file
            blamed.append(f"a file {os_name} that is not procshare's")
            removable[os_name] = inode
            continue
        meta = decode_meta(info.meta)
        owner = meta.get("namespace")
        if isinstance(owner, str) and owner.startswith("t-") and owner != namespace:
            continue
        if foreign(info.creator_pid):
            continue
        kind = "lock" if meta.get("kind") == "lock" else "segment"
        what = f"{kind} {meta['name']!r}" if isinstance(meta.get("name"), str) else os_name
        if isinstance(owner, str) and owner != namespace:
            what += f" of namespace {owner!r}"
        tied = os_name.startswith(prefix) or ours(info.creator_pid) or any(map(ours, held_by))
        if info.persist and not tied:
            fix = f"python -m procshare rm {meta.get('name', '?')} --namespace {owner}"
            blamed.append(
                f"{what} ({os_name}, persistent: not removed, as it may be another "
                f"program's data; remove it with `{fix}` if it is this test's)"
            )
            continue
        blamed.append(f"{what} ({os_name})")
        removable[os_name] = inode
    return blamed, removable


def _remove(removable: dict[str, tuple[int, int]]) -> None:
    """Unlink what was judged, if each name still is the object judged (a name a
    concurrent program reused meanwhile is left alone)."""
    for os_name, inode in removable.items():
        with contextlib.suppress(OSError):
            st = os.lstat("/dev/shm" + os_name)
            if (st.st_dev, st.st_ino) == inode:
                os.unlink("/dev/shm" + os_name)


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
    leaked_objects, removable = _judge(backend.os_objects() - objects_before, namespace)
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
        _remove(removable)
    cleaned = "They have been" if len(removable) == len(leaked_objects) else "The rest have been"
    pytest.fail(
        f"{request.node.nodeid} leaked: " + "; ".join(problems) + f". ({cleaned} cleaned up.)",
        pytrace=False,
    )
