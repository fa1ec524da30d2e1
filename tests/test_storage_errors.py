"""No bare OSError: where the system refuses shared memory, the error says why
and what to do, and is a ``ps.ProcshareError`` as well as an ``OSError``.

A missing ``/dev/shm`` and running out of descriptors are real here; a
read-only ``/dev/shm`` and a full one (for a lock) are simulated at the OS
call that would fail, since a test cannot remount ``/dev/shm``.
"""

from __future__ import annotations

import errno
import gc
import os
import pickle
import resource
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import procshare as ps
from procshare._backends.posix import segment as posix_segment
from procshare._backends.posix import segment_object
from procshare._engine import get_engine

pytestmark = pytest.mark.timeout(60)

OPENERS: dict[str, Callable[[], Any]] = {
    "segment": lambda: ps.shared("x", ps.u64),
    "numpy": lambda: ps.shared("arr", np.float64, shape=1 << 20),  # 8 MiB: checks space
    "bytes": lambda: ps.shared("raw", bytes, size=64),
    "lock": lambda: ps.interprocess_lock("m").acquire(),
}


def _move_shm(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    monkeypatch.setattr(segment_object, "SHM_DIR", where)
    monkeypatch.setattr(segment_object, "SHM_DIR_BYTES", where.encode())
    monkeypatch.setattr(segment_object, "path_bytes", {})
    monkeypatch.setattr(posix_segment, "path_bytes", segment_object.path_bytes)
    monkeypatch.setattr(posix_segment, "_tmpfile_ok", posix_segment._tmpfile_ok)


@pytest.mark.parametrize("what", list(OPENERS))
def test_a_missing_dev_shm_says_so_and_how_to_fix_it(
    what: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    missing = str(tmp_path / "no-shm-here")
    _move_shm(monkeypatch, missing)
    with pytest.raises(ps.SharedMemoryUnavailable) as info:
        OPENERS[what]()
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOENT
    assert f"{missing} does not exist" in str(err)
    assert "mount -t tmpfs" in str(err)
    assert ("lock 'm'" if what == "lock" else "shared segment") in str(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    assert posix_segment._tmpfile_ok is not False  # O_TMPFILE is not given up over it


def _read_only_statvfs(real: Callable[[str], os.statvfs_result]) -> Callable[[str], Any]:
    def fake(path: str) -> os.statvfs_result:
        v = real(path)
        return os.statvfs_result(
            (*tuple(v)[:8], v.f_flag | os.ST_RDONLY, v.f_namemax)  # type: ignore[arg-type]
        )

    return fake


@pytest.mark.parametrize("what", list(OPENERS))
def test_a_read_only_dev_shm_says_so_never_full(
    what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_a: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(posix_segment, "_create", refuse)
    monkeypatch.setattr(os, "statvfs", _read_only_statvfs(os.statvfs))
    with pytest.raises(ps.SharedMemoryUnavailable) as info:
        OPENERS[what]()
    err = info.value
    assert not isinstance(err, ps.SharedMemoryFull)  # the numpy case said "full"
    assert err.errno == errno.EROFS
    assert "/dev/shm is mounted read-only" in str(err)


def test_a_lock_on_a_full_dev_shm_is_shared_memory_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ps0000000l0000")

    monkeypatch.setattr(posix_segment, "_create", full)
    with pytest.raises(ps.SharedMemoryFull) as info:
        ps.interprocess_lock("m").acquire()
    err = info.value
    assert err.errno == errno.ENOSPC
    assert str(err).startswith("lock 'm' does not fit")
    assert "/ps0000000l0000" not in str(err)  # never the hashed path
    assert "enlarge /dev/shm" in str(err)


@ps.forked
def _open_with_every_descriptor_taken(kind: str) -> tuple[str, str, int, int | None]:
    # An open segment or lock keeps no descriptor, but opening one needs one
    # for a moment: take them all first, then open.
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    taken: list[int] = []
    try:
        while True:
            try:
                taken.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        if kind == "segment":
            ps.shared("s", ps.u64).close()
        else:
            lock = ps.interprocess_lock("l")
            lock.acquire()
            lock.release()
            lock.close()
    except ps.ProcshareError as err:
        code = err.errno if isinstance(err, OSError) else -1
        return type(err).__name__, str(err), code or 0, getattr(err, "limit", None)
    finally:
        for fd in taken:
            os.close(fd)
    return "nothing raised", "", 0, None


@pytest.mark.parametrize("kind", ["segment", "lock"])
def test_running_out_of_descriptors_names_ulimit_n(kind: str) -> None:
    name, message, code, limit = _open_with_every_descriptor_taken(kind).join()
    assert name == "DescriptorLimit"
    assert code == errno.EMFILE
    assert limit == 48
    assert "ulimit -n" in message
    assert "RLIMIT_NOFILE = 48" in message
    assert "needs one for a moment" in message


@pytest.mark.parametrize("how", ["with", "close", "dropped"])
def test_a_close_that_fails_says_what_limit_it_met(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The end of `with` and a dropped handle close in C (_cview_close.h),
    # close() in Python: a failure of the backend's close means the same.
    backend = get_engine().backend
    real_fast, real_close = backend.segment_close_fast, backend.segment_close
    left: list[Any] = []

    def refuses(handle: Any, **_kw: Any) -> bool:
        left.append(handle)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(backend, "segment_close_fast", refuses, raising=False)
    monkeypatch.setattr(backend, "segment_close", refuses)
    try:
        if how == "dropped":
            seg = ps.shared("closing", ps.u64)
            del seg  # (its view and it refer to each other: the collector finds them)
            gc.collect()  # the finalizer says nothing of the failure
        elif how == "with":
            seg = ps.shared("closing", ps.u64)
            with pytest.raises(ps.DescriptorLimit, match=r"ulimit -n"), seg:
                pass
        else:
            seg = ps.shared("closing", ps.u64)
            with pytest.raises(ps.DescriptorLimit, match=r"ulimit -n"):
                seg.close()
        assert len(left) == 1  # one close was tried, and it is claimed: never twice
    finally:
        monkeypatch.undo()
        for handle in left:
            real_close(handle, keep=None)
    assert real_fast is backend.segment_close_fast
