"""``ps.shared`` on the cluster: a view whose bytes live in a Dask ``Variable``.

The ``Variable`` ``procshare/<namespace>/shared/<name>`` holds
``[layout, bytes]``: the same layout string and bytes a segment holds on
one host. Each open keeps a private copy of the bytes under the one-host
view classes (so ranges, types and messages are the same) behind a proxy
that reads and writes the ``Variable``:

* outside any lock, a read fetches the bytes and a write publishes them at
  once (one scheduler round trip each);
* while this process holds a cluster lock or semaphore, reads and writes use
  the private copy; taking the lock makes the next read fetch, and releasing
  it publishes what was written first (release consistency). So
  ``s.value += x`` under ``ps.interprocess_lock`` is safe, as on one host,
  and costs two round trips per critical section, not two per access.

Lifetime: the open that created the ``Variable`` owns it; closing that
handle deletes it (``persist=True``: ``ps.unlink(name)`` does). A segment
a task created and never closed (its worker died) is deleted when the
``ps.cluster()`` block ends.
"""

from __future__ import annotations

import threading
from typing import Any

import distributed

from procshare import _kinds, _views
from procshare._dask.runtime import DaskRuntime, dask_object
from procshare._engine.names import validate_name
from procshare.errors import (
    NotOnCluster,
    SegmentClosed,
    SegmentExists,
    SegmentNotFound,
    SharedTypeError,
)


def _peek_on_scheduler(name: str, dask_scheduler: Any = None) -> Any:
    """Run on the scheduler: the data of Variable ``name``, or ``None`` if it is
    not set. (``Variable.get`` would wait for it to be set, and a timeout there
    is logged as an error by the scheduler.)"""
    record = dask_scheduler.extensions["variables"].variables.get(name)
    if record is None or record.get("type") != "msgpack":
        return None
    return record["value"]


async def _delete_on_scheduler(name: str, dask_scheduler: Any = None) -> None:
    """Run on the scheduler: delete Variable ``name`` now. (``Variable.delete``
    is sent on the batched stream, after later calls: a segment created again
    right after would be deleted by it.)"""
    await dask_scheduler.extensions["variables"].delete(name=name)


def delete(rt: DaskRuntime, dname: str) -> None:
    """Delete a cluster segment's Variable, done when this returns."""
    rt.client.run_on_scheduler(_delete_on_scheduler, dname)


def peek(rt: DaskRuntime, dname: str) -> Any:
    """The ``[layout, bytes]`` of a cluster segment, or ``None`` if there is none."""
    return rt.client.run_on_scheduler(_peek_on_scheduler, dname)


class _Coherence:
    """Which views of this process cache, and what they must publish."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held = 0  # cluster locks and semaphore units this process holds
        self.open: set[ClusterSegment] = set()

    def acquired(self) -> None:
        with self.lock:
            self.held += 1
            for seg in self.open:
                seg.fresh = False

    def releasing(self) -> None:
        for seg in list(self.open):
            if seg.dirty:
                seg.publish()

    def released(self) -> None:
        with self.lock:
            self.held = max(0, self.held - 1)
            for seg in self.open:
                seg.fresh = False


coherence = _Coherence()


class _NoNative:
    """Stands in for the engine when resolving a kind: ctypes kinds have no
    cluster form (their layout is the host's C layout)."""

    @staticmethod
    def native_kind(kind: object) -> None:
        mro = getattr(kind, "__mro__", None) or type(kind).__mro__
        if any(getattr(c, "__module__", "") in {"_ctypes", "ctypes"} for c in mro):
            raise NotOnCluster(
                f"a ctypes kind ({getattr(kind, '__qualname__', kind)!r}) in ps.shared",
                "use ps.u8 ... ps.f64, int, float or bool, an attrs class of those, or "
                "bytes with size=",
            )


def _resolve(name: str, kind: object, shape: object, size: object) -> Any:
    resolved = _kinds.resolve(name, kind, shape, size, _NoNative())  # type: ignore[arg-type]
    if isinstance(resolved, _kinds.NumpyKind):
        raise NotOnCluster(
            f"ps.shared({name!r}, <numpy {resolved.layout.kind}>)",
            "an array is not kept in the scheduler. Scatter it and share the future "
            "(client.scatter(array), or a Dask Variable holding it), use dask.array for "
            "an array split across the workers, or keep each task's part in the value "
            "it returns",
        )
    return resolved


class ClusterSegment:
    """One open of a cluster segment: what ``ps.shared(...)`` returns in the block."""

    def __init__(  # noqa: PLR0917 - the checked arguments of ps.shared
        self,
        rt: DaskRuntime,
        name: str,
        resolved: Any,
        initial: bytes | None,
        create: bool | None,
        persist: bool,
    ) -> None:
        self._name = name
        self._dname = rt.dask_name("shared", name)
        self._layout = resolved.layout
        self._rt = rt
        self._var = distributed.Variable(self._dname, client=rt.client)
        self._persist = persist
        self.fresh = False
        self.dirty = False
        self._closed = False
        blob, self._created = self._open(rt, initial, create)
        self._buf = bytearray(blob)
        self._mv = memoryview(self._buf)
        self._view = _proxy(self, resolved)
        with coherence.lock:
            coherence.open.add(self)

    def _fetch(self) -> bytes | None:
        record = peek(self._rt, self._dname)
        if record is None:
            return None
        layout, blob = record
        if layout != self._layout.layout:
            raise SharedTypeError(
                self._name, self._layout.kind, _describe(layout), "on the cluster"
            )
        return bytes(blob)

    def _open(
        self, rt: DaskRuntime, initial: bytes | None, create: bool | None
    ) -> tuple[bytes, bool]:
        found = self._fetch()
        if found is not None:
            if create:
                raise SegmentExists(self._name, "on the cluster")
            return found, False
        if create is False:
            raise SegmentNotFound(self._name, "on the cluster")
        # Create under a lock of its own: two openers never both create.
        client = rt.client
        guard = dask_object(
            rt,
            "lock",
            self._dname + "/create",
            lambda: distributed.Lock(
                self._dname + "/create", scheduler_rpc=client.scheduler, loop=client.loop
            ),
        )
        with guard:
            found = self._fetch()
            if found is not None:
                if create:
                    raise SegmentExists(self._name, "on the cluster")
                return found, False
            blob = initial if initial is not None else bytes(self._layout.size)
            blob = blob.ljust(self._layout.size, b"\0")
            self._var.set([self._layout.layout, blob])
        if rt.in_task and not self._persist:
            # Told to the block: if this task's worker dies, the block's end removes it.
            distributed.Queue(f"procshare-block-{rt.block}", client=client).put(self._dname)
        return blob, True

    @property
    def name(self) -> str:
        return self._name

    @property
    def namespace(self) -> str:
        return self._dname.split("/")[1]

    @property
    def anonymous(self) -> bool:
        return False

    @property
    def created(self) -> bool:
        return self._created

    @property
    def kind(self) -> str:
        return str(self._layout.kind)

    @property
    def size(self) -> int:
        return int(self._layout.size)

    @property
    def persist(self) -> bool:
        return self._persist

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def view(self) -> Any:
        if self._closed:
            raise SegmentClosed(self._name)
        return self._view

    def pull(self) -> None:
        """Before a read: fetch the bytes unless the copy is fresh (under a lock)."""
        if self._closed:
            raise SegmentClosed(self._name)
        if self.fresh:
            return
        blob = self._fetch()
        if blob is None:
            raise SegmentNotFound(
                self._name,
                "on the cluster: the handle that created it was closed, which removed it; "
                "keep the creator's `with ps.shared(...)` open while others use it, or "
                "create it with persist=True",
            )
        self._mv[:] = blob
        self.fresh = coherence.held > 0

    def push(self) -> None:
        """After a write: publish now, or at the lock's release when one is held."""
        if coherence.held > 0:
            self.dirty = True
            self.fresh = True
        else:
            self.publish()

    def publish(self) -> None:
        self.dirty = False
        self._var.set([self._layout.layout, bytes(self._buf)])

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.dirty:
                self.publish()
        finally:
            self._closed = True
            with coherence.lock:
                coherence.open.discard(self)
            if self._created and not self._persist:
                delete(self._rt, self._dname)

    def __enter__(self) -> Any:
        return self.view

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ClusterSegment {self._name!r} {self.kind} {state} (Dask Variable)>"


def _describe(layout: str) -> str:
    return layout


class _ValueProxy:
    """A scalar or struct view on the cluster: the one-host view over a private
    copy, with a fetch before each read and a publish after each write."""

    __slots__ = ("_ps_inner", "_ps_seg")

    def __init__(self, seg: ClusterSegment, inner: Any) -> None:
        object.__setattr__(self, "_ps_seg", seg)
        object.__setattr__(self, "_ps_inner", inner)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_ps_"):
            raise AttributeError(attr)
        self._ps_seg.pull()
        return getattr(self._ps_inner, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        seg = self._ps_seg
        seg.pull()
        setattr(self._ps_inner, attr, value)
        seg.push()

    def __reduce_ex__(self, protocol: object) -> Any:
        raise _views.not_picklable("a view", self._ps_seg.name)

    def __repr__(self) -> str:
        seg = self._ps_seg
        if seg.closed:
            return f"<shared {seg.kind} {seg.name!r} on the cluster (closed)>"
        seg.pull()
        return repr(self._ps_inner).replace("<shared", "<shared (cluster)", 1)


class ClusterBytes:
    """A ``bytes`` segment's view on the cluster: indexing and slicing like the
    one-host ``memoryview`` (``view[0:4] = b"abcd"``, ``bytes(view)``), but
    not a ``memoryview`` itself: each access reads or writes the Variable."""

    __slots__ = ("_ps_seg",)

    def __init__(self, seg: ClusterSegment) -> None:
        self._ps_seg = seg

    def __len__(self) -> int:
        return self._ps_seg.size

    def __getitem__(self, index: Any) -> Any:
        seg = self._ps_seg
        seg.pull()
        got = seg._mv[index]
        return got.tobytes() if isinstance(got, memoryview) else got

    def __setitem__(self, index: Any, value: Any) -> None:
        seg = self._ps_seg
        seg.pull()
        seg._mv[index] = value
        seg.push()

    def tobytes(self) -> bytes:
        seg = self._ps_seg
        seg.pull()
        return bytes(seg._buf)

    def __bytes__(self) -> bytes:
        return self.tobytes()

    def __reduce_ex__(self, protocol: object) -> Any:
        raise _views.not_picklable("a view", self._ps_seg.name)

    def __repr__(self) -> str:
        return f"<shared bytes[{len(self)}] {self._ps_seg.name!r} on the cluster>"


def _proxy(seg: ClusterSegment, resolved: Any) -> Any:
    mv = seg._mv
    if isinstance(resolved, _kinds.BytesKind):
        return ClusterBytes(seg)
    if isinstance(resolved, _kinds.ScalarKind):
        scalar = resolved.scalar
        cell = mv.cast(scalar.format)  # type: ignore[call-overload]
        return _ValueProxy(seg, _views.ScalarView(seg, seg.name, scalar.name, cell))
    cells = tuple(mv[off : off + sc.size].cast(sc.format) for _, sc, off in resolved.fields)
    return _ValueProxy(seg, resolved.view_class(seg, seg.name, cells))


def open_segment(  # noqa: PLR0917
    rt: DaskRuntime,
    name: object,
    kind: object,
    shape: object,
    size: object,
    initial: object,
    create: bool | None,
    persist: bool,
) -> ClusterSegment:
    """``ps.shared(name, kind, ...)`` in a cluster block."""
    if not isinstance(name, str):
        raise NotOnCluster(
            "an anonymous segment (ps.shared(kind) without a name)",
            "give it a name, ps.shared('NAME', kind): tasks on other hosts open it by name",
        )
    validate_name(name)
    resolved = _resolve(name, kind, shape, size)
    blob = resolved.initial(initial)
    return ClusterSegment(rt, name, resolved, blob, create, persist)


def unlink(rt: DaskRuntime, name: str) -> bool:
    """``ps.unlink(name)`` in a cluster block: delete the Variable now."""
    validate_name(name)
    dname = rt.dask_name("shared", name)
    if peek(rt, dname) is None:
        return False
    delete(rt, dname)
    return True


def remove_left_by_tasks(rt: DaskRuntime) -> None:
    """At the block's end: delete what tasks created and did not remove."""
    client = rt.client
    if client.status != "running":
        return
    queue = distributed.Queue(f"procshare-block-{rt.block}", client=client)
    try:
        left = queue.get(batch=True)
    except Exception:
        return
    for dname in set(left):
        delete(rt, dname)
