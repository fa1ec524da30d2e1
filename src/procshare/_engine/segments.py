"""The engine's part for shared segments: the registry of what this process holds.

The front end (``procshare._shared``) resolves a kind into a layout and asks
this part to open a segment; this part

* turns the user's name into an OS name (per user and namespace),
* encodes what the segment holds as metadata and checks it on attach,
  raising :class:`SharedTypeError` naming both sides,
* runs the create-or-attach protocol (``create=None/True/False``) over the
  backend's atomic create and kernel-counted open,
* turns ``OSError(ENOSPC)`` into :class:`SharedMemoryFull`,
* keeps every open segment in a registry, so interpreter exit closes what the
  user left open (newest first), and
* invalidates views on close, so a scalar or struct view used afterwards
  raises :class:`SegmentClosed` instead of touching unmapped memory.

Metadata is UTF-8 JSON (what ``ps.segments()`` reads)::

    {"name": "sum", "namespace": "app", "kind": "u64", "layout": "u64", "size": 8}

``kind`` is for people; ``layout`` is compared on attach and depends only on
the memory layout, so ``int`` and ``ps.i64`` (or an attrs class and a ctypes
``Structure`` with the same fields) open the same segment.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from collections.abc import Callable
from typing import Any, NoReturn

import attrs

from procshare._backends.api_segment import KeepOrphan, NativeKind, SegmentHandle
from procshare._engine import _cengine, names
from procshare._engine import core as _core
from procshare._engine.core import Engine, get_engine, prebuild_part
from procshare.errors import (
    DescriptorLimit,
    MappingLimit,
    ProcshareError,
    SegmentExists,
    SegmentNotFound,
    SharedMemoryFull,
    SharedMemoryUnavailable,
    SharedTypeError,
)

#: What ``initial=`` becomes for the engine: bytes copied to the start of the
#: data area, or a function that fills the data area itself (numpy arrays).
Initialiser = bytes | Callable[[memoryview], None] | None


@attrs.frozen
class Layout:
    """What a segment holds, as recorded in its metadata."""

    #: Compared on attach; depends only on the memory layout.
    layout: str
    #: For people: ``"u64"``, ``"numpy float64 (3, 4)"``, ``"struct Counter"``.
    kind: str
    #: Bytes of data.
    size: int


#: One segment this process opened (one ``ps.shared`` call): its ``name``,
#: ``namespace``, the backend's ``handle``, whether this open ``created`` it,
#: its ``layout``; ``view``, a weak reference to the view to invalidate at
#: close (scalar and struct views: they drop their memory then), if any;
#: ``closed``; ``forks``, the engine's fork count when opened (children
#: forked since inherited it and may use it after this process closed it).
#: A C type (``_cengine.c``): one is built on every open, often in a freshly
#: forked child, where a Python ``__init__`` copied pages.
OpenSegment = _cengine.OpenSegment
#: ``(OpenSegment, offsets of its closed, view and handle)``, for the front end's C.
record_offsets = _cengine.record_offsets


# (kind, name, namespace, euid) -> OS name, for every part of this process and
# inherited by forked children: a child's own (new, empty) part finds the names
# its parent computed here instead of hashing them again, which in a fresh
# child touches, and so copies, dozens of pages of interpreter objects.
_inherited_os_names: dict[tuple[str, str, str, int], str] = {}


def os_name(kind: str, name: str, namespace: str) -> str:
    """``names.os_name(kind, name, namespace)``, remembered per user."""
    uid = os.geteuid()
    key = (kind, name, namespace, uid)
    found = _inherited_os_names.get(key)
    if found is None:
        found = _cengine.os_name(kind, name, namespace, uid)  # (names.os_name, in C)
        if len(_inherited_os_names) >= 4096:
            _inherited_os_names.clear()
        _inherited_os_names[key] = found
    return found


# Names names.validate_name() accepted, inherited by forked children: a set
# lookup touches far fewer pages than the regular expression.
_valid_names: set[str] = set()


def validate_name(name: object) -> str:
    """``names.validate_name(name)``, remembered."""
    if type(name) is str and name in _valid_names:
        return name
    names.validate_name(name)
    assert isinstance(name, str)
    if type(name) is str and len(_valid_names) < 4096:
        _valid_names.add(name)
    return name


# -- reclaiming orphans ------------------------------------------------------

#: Namespaces whose orphans this process, or the parent it was forked from,
#: has reclaimed already (see :func:`reclaim_orphans`).
swept_namespaces: set[str] = set()


def orphan_keeper(namespace: str, backend: Any, *, everything: bool = False) -> KeepOrphan:
    """What to keep of ``namespace``'s objects that no living process holds.

    Always kept: an object recording another namespace (two namespaces whose
    OS-name prefixes collide). Unless ``everything``: ``persist=True``
    segments (meant to outlive their users) and locks whose holder died
    unconfirmed (kept so the next opener is told ``OwnerDied``). The rest is
    an orphan: its memory is reclaimed.
    """
    lock_at = len(names.PREFIX) + 7

    def keep(handle: SegmentHandle) -> bool:
        owner = decode_meta(handle.meta).get("namespace")
        if isinstance(owner, str) and owner != namespace:
            return True  # not this namespace's to judge
        if everything:
            return False
        if handle.persist:
            return True
        if handle.os_name[lock_at : lock_at + 1] != names.LOCK:
            return False
        try:
            return bool(backend.lock_keep(handle))
        except Exception:  # too small or garbled to read: keep rather than guess
            return True

    return keep


def reclaim_orphans(namespace: str, engine: Engine | None = None) -> list[str]:
    """Remove every object of ``namespace`` that no living process holds (see
    :func:`orphan_keeper` for what is kept); return the OS names removed.

    Run by the first open of a segment or lock of each namespace in a
    process (forked children inherit that it ran), and by a ``children()``
    scope that saw a child die by a signal: so the memory of a segment whose
    every holder was killed does not wait for ``gc``. Housekeeping only: an
    ``OSError`` here never fails the caller's open.
    """
    engine = engine or get_engine()
    swept_namespaces.add(namespace)
    backend = engine.backend
    try:
        # Junk under a name is left alone (opening it says what it is and how
        # to remove it), and so are temporaries (one may be a creation a
        # moment before its creator holds it): `gc` removes them.
        return backend.segment_collect(
            names.namespace_prefix(namespace),
            keep=orphan_keeper(namespace, backend),
            junk=False,
        )
    except OSError:
        return []


def reclaim_after_kills(records: Any) -> None:
    """Reclaim orphans of every namespace this process used (and the current
    one) if one of ``records`` (children of a scope) was ended by a signal:
    whatever it held alone is an orphan now."""
    if not any(r.exit is not None and r.exit.signal is not None for r in records):
        return
    for namespace in {*swept_namespaces, names.current_namespace()}:
        reclaim_orphans(namespace)


def _keep_nothing(handle: SegmentHandle) -> bool:
    # A segment nobody living holds is stale: reclaim it. (The backend itself
    # keeps persist=True segments.)
    return False


@functools.lru_cache(maxsize=1024)
def encode_meta(name: str, namespace: str, layout: Layout, origin: str | None = None) -> bytes:
    """The metadata of a new segment. ``origin`` (the creator's
    ``$PROCSHARE_NAMESPACE``, :func:`names.env_namespace`) is recorded only
    when it differs from ``namespace``: it tells the pytest plugin that a
    test's processes made it (see ``procshare.testing``)."""
    fields: dict[str, object] = {
        "name": name,
        "namespace": namespace,
        "kind": layout.kind,
        "layout": layout.layout,
        "size": layout.size,
    }
    if origin is not None and origin != namespace:
        fields["origin"] = origin
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_meta(meta: bytes) -> dict[str, Any]:
    """The metadata of a segment as a dict (empty if it is not ours)."""
    try:
        value = json.loads(meta.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class SegmentsPart:
    """The engine part that owns every segment this process opened.

    Slotted: a forked child that opens a segment builds its own, and an
    instance dictionary is one more object (and page) to make there.
    """

    __slots__ = ("_created_last", "_open", "engine", "init_hook", "open_fast")

    order = 20

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        #: The backend's one-call open (``segment_open_fast``, or ``None``), which
        #: the front end's C planned open calls: found once, here (in the
        #: parent, for the part a forked child adopts, which then looks
        #: nothing up). The Python open uses ``segment_open``.
        self.open_fast = getattr(engine.backend, "segment_open_fast", None)
        #: Test hook: called during initialisation of a new segment, half-way
        #: through writing ``initial`` and before publication. Tests set it in a
        #: forked child to pause (or die) there and prove nobody sees the half.
        self.init_hook: Callable[[str], None] | None = None
        self._open: dict[int, OpenSegment] = {}
        #: Whether this process's last open of each OS name created it (a hint).
        self._created_last: dict[str, bool] = {}

    # -- native (ctypes) kinds, which only the backend may touch --------------

    def native_kind(self, kind: object) -> NativeKind | None:
        return self.engine.backend.native_kind(kind)

    def native_view(self, kind: object, buffer: memoryview) -> Any:
        return self.engine.backend.native_view(kind, buffer)

    def native_bytes(self, kind: object, initial: object) -> bytes:
        return self.engine.backend.native_bytes(kind, initial)

    # -- open / close -------------------------------------------------------

    def open(
        self,
        name: str,
        namespace: str,
        os_name: str,
        meta: bytes,
        layout: Layout,
        *,
        create: bool | None,
        initial: Initialiser,
        persist: bool,
        mode: int,
    ) -> OpenSegment:
        """Create or attach ``name`` holding ``layout``; see ``ps.shared``.

        The caller gives the OS name and the metadata (``os_name()``,
        ``encode_meta()``), so that one that opens the same segment
        repeatedly works them out once.
        """
        if namespace not in swept_namespaces:
            reclaim_orphans(namespace, self.engine)
        # (A try costs nothing until something raises: this is a hot path.)
        try:
            backend = self.engine.backend
            # create=None usually looks before it creates. When this process created
            # the name last time (a scratch segment opened and closed in a loop), it
            # creates first: a failed create costs more than a failed look, but the
            # look is wasted every time the guess is right.
            skip_look = create is None and self._created_last.get(os_name, False)
            while True:
                if create is not True and not skip_look:
                    handle = backend.segment_open(os_name, keep_orphan=_keep_nothing, meta=meta)
                    if handle is not None:
                        return self._register(name, namespace, handle, False, layout, meta)
                    if create is False:
                        raise SegmentNotFound(name)
                try:
                    handle = backend.segment_create(
                        os_name,
                        meta=meta,
                        data_size=layout.size,
                        mode=mode,
                        persist=persist,
                        init=self._initialiser(name, initial),
                    )
                except OSError as exc:
                    error = storage_error(exc, name, backend, requested=layout.size)
                    if error is not None:
                        raise error from None
                    raise
                if handle is not None:
                    return self._register(name, namespace, handle, True, layout, meta)
                skip_look = False
                if create is True:
                    # The name is taken; it is an error only if a living process
                    # holds it (opening reclaims a stale one, then we retry).
                    handle = backend.segment_open(os_name, keep_orphan=_keep_nothing)
                    if handle is not None:
                        backend.segment_close(handle, keep=None)
                        raise SegmentExists(name)
                # Lost a race with another creator (or a closer): look again.
        except OSError as exc:
            if isinstance(exc, ProcshareError):
                raise
            if exc.errno != errno.EBADMSG:
                error = storage_error(exc, name, self.engine.backend)
                if error is not None:
                    raise error from None
                raise
            # Something that is not a procshare object sits under the name.
            raise SharedTypeError(
                name,
                expected=describe(layout.kind, layout.layout),
                found="something that is not a procshare object",
                detail=f"remove it with `python -m procshare rm {name}`",
            ) from None

    def _initialiser(self, name: str, initial: Initialiser) -> Callable[[memoryview], None] | None:
        if initial is None and self.init_hook is None:
            return None  # a new object is zeroed already

        def init(data: memoryview) -> None:
            hook = self.init_hook
            if isinstance(initial, bytes):
                half = len(initial) // 2
                data[:half] = initial[:half]
                if hook is not None:
                    hook(name)
                data[half : len(initial)] = initial[half:]
            else:
                if initial is not None:
                    initial(data)
                if hook is not None:
                    hook(name)

        return init

    def _register(  # noqa: PLR0917
        self,
        name: str,
        namespace: str,
        handle: SegmentHandle,
        created: bool,
        layout: Layout,
        meta: bytes,
    ) -> OpenSegment:
        if handle.meta != meta:
            found = decode_meta(handle.meta)
            if found.get("layout") != layout.layout or found.get("name") != name:
                self.engine.backend.segment_close(handle, keep=None)
                raise SharedTypeError(
                    name,
                    expected=describe(layout.kind, layout.layout),
                    found=_describe_found(found, name),
                )
        rec = OpenSegment(name, namespace, handle, created, layout)
        # Below any fork under way in another thread: its child inherits this.
        rec.forks = self.engine.forks - self.engine.forking
        # (Single dict operations are atomic: no lock needed for these.)
        self._open[id(rec)] = rec
        if len(self._created_last) > 4096:
            self._created_last.clear()  # a hint: losing it costs one extra look
        self._created_last[handle.os_name] = created
        return rec

    def close(self, rec: OpenSegment) -> None:
        """Close ``rec`` (idempotent). A segment inherited across fork is only
        forgotten: the parent still holds it."""
        # Taking the record out of the registry is the claim: dict.pop is
        # atomic, so of two threads closing one handle only one goes on.
        if self._open.pop(id(rec), None) is not rec:
            return
        rec.closed = True
        ref, rec.view = rec.view, None
        view = None if ref is None else ref()
        if view is not None:
            view._ps_invalidate()  # later uses raise SegmentClosed
        engine = self.engine
        if engine.pid != _core._pid:  # (current_pid(), without the call)
            return  # inherited: never close, unlink or release the parent's
        if engine.forks > rec.forks or engine.forking > 0:  # (else no child has it)
            # Children forked while it was open share this process's hold and
            # may still use it: released once they are reaped. This process
            # lets go now, so children forked from now on inherit no hold.
            backend, handle = engine.backend, rec.handle
            backend.segment_let_go(handle)
            engine.release_after_children(
                rec.forks, lambda: backend.segment_close(handle, keep=None)
            )
            return
        try:
            engine.backend.segment_close(rec.handle, keep=None)
        except OSError as exc:
            self._close_failed(exc, rec)

    def _close_failed(self, exc: OSError, rec: OpenSegment) -> NoReturn:
        """Raise what the close of ``rec`` failing with ``exc`` means (the C
        close, ``_cview_close.h``, calls this too)."""
        # Closing opens the name again for a moment (to see whether this was
        # the last holder): it can meet the descriptor limit too.
        error = storage_error(exc, rec.name, self.engine.backend)
        if error is not None:
            raise error from None
        raise exc

    def unlink(self, name: str) -> bool:
        """Remove ``name`` now (mappings stay valid); whether it existed."""
        target = os_name(names.SEGMENT, name, names.current_namespace())
        return self.engine.backend.segment_unlink(target)

    def held(self) -> list[OpenSegment]:
        """Every segment this process holds open, oldest first."""
        with self.engine.lock:
            return list(self._open.values())

    # -- EnginePart ---------------------------------------------------------

    def poll(self) -> None:
        """Nothing: deferred releases are the engine's (``release_after_children``)."""

    def shutdown(self) -> None:
        self._close_all()

    def _close_all(self) -> None:
        if self._open:
            close_newest_first(self.held(), self.close, "shared segments")


def close_newest_first(
    recs: list[OpenSegment], close: Callable[[OpenSegment], None], what: str
) -> None:
    """``close`` every one of ``recs`` (oldest first), newest first; one that
    fails does not stop the rest, and the failures are raised together."""
    errors: list[BaseException] = []
    for rec in reversed(recs):
        try:
            close(rec)
        except Exception as exc:  # close the rest, then report
            errors.append(exc)
    if errors:
        raise ExceptionGroup(f"closing {what} failed", errors)  # type: ignore[type-var]


#: What a refused creation or open can say more about than the OS's errno.
_STORE_ERRNOS = frozenset({errno.EROFS, errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR})


def storage_error(
    exc: OSError,
    name: str,
    backend: Any,
    *,
    requested: int | None = None,
    what: str = "shared segment",
) -> ProcshareError | None:
    """The procshare error (also an ``OSError``) for an ``OSError`` from creating
    or opening ``name``, saying what to do; ``None`` to let ``exc`` through.

    ``ENOSPC`` / ``EFBIG``: :class:`SharedMemoryFull`; ``EMFILE`` / ``ENFILE``:
    :class:`DescriptorLimit` (``ulimit -n``); ``ENOMEM`` (a mapping refused):
    :class:`MappingLimit` (``vm.max_map_count``); a missing, read-only or
    unwritable ``/dev/shm``: :class:`SharedMemoryUnavailable`.
    """
    code = exc.errno
    if code == errno.ENOSPC or (code == errno.EFBIG and requested is not None):
        if code == errno.EFBIG:
            return SharedMemoryFull(
                name,
                requested=requested,
                file_size_limit=backend.segment_size_limit(),
                what=what,
            )
        return SharedMemoryFull(
            name, requested=requested, available=backend.segment_space(), what=what
        )
    if code in (errno.EMFILE, errno.ENFILE):
        return DescriptorLimit(
            name, limit=backend.descriptor_limit(), system=code == errno.ENFILE, what=what
        )
    if code == errno.ENOMEM:
        # A refused mapping: every open segment or lock is one (and no descriptor).
        usage = backend.mapping_limit()
        mappings, limit = (None, None) if usage is None else usage
        return MappingLimit(name, mappings=mappings, limit=limit, what=what)
    if code in _STORE_ERRNOS:
        problem = backend.segment_store_problem()
        if problem is None and code == errno.EROFS:
            problem = "the shared-memory filesystem refused to write (read-only)"
        if problem is not None:
            return SharedMemoryUnavailable(name, reason=problem, code=code, what=what)
    return None


def check_mode(mode: object) -> int:
    """``mode`` if it is valid permission bits for a new segment or lock, else
    ``ValueError`` saying why (``ps.shared`` and ``ps.interprocess_lock`` agree)."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode= must be permission bits such as 0o600, not {mode!r}")
    if mode & 0o600 != 0o600:
        raise ValueError(
            f"mode={mode:#o} lacks owner read and write (0o600); the owner's own processes "
            "could not attach. Use 0o600 (default) or add group/other bits to it"
        )
    return mode


def describe(kind: str, layout: str) -> str:
    return kind if kind == layout else f"{kind} (layout {layout})"


def _describe_found(found: dict[str, Any], name: str) -> str:
    if not found:
        return "something that is not a procshare segment"
    text = describe(str(found.get("kind", "?")), str(found.get("layout", "?")))
    if found.get("name") != name:  # two names whose hashes collide: say so
        text += f" created under the name {found.get('name')!r}"
    return text


def planned_open_setup(plans: dict[Any, Any], mode: int) -> dict[str, object]:
    """What the front end's C planned open (``_cview.open_planned``) reads: the
    front end's ``plans`` and default ``mode``, and where this engine keeps its
    state (the current engine, namespace, environment, swept namespaces), with
    the Python steps it calls when it must."""
    return {
        "plans": plans,
        "core": vars(_core),
        "nsvar": names._namespace,
        "env": names._ENV_DATA,
        "env_key": names._ENV_KEY,
        "swept": globals(),  # (its swept_namespaces, looked up per open)
        "keep_nothing": _keep_nothing,
        "default_namespace": names._DEFAULT_NAMESPACE,
        "mode": mode,
        "current_namespace": names.current_namespace,
        "get_engine": get_engine,
        "segments_part": segments_part,
    }


def segments_part(engine: Engine | None = None) -> SegmentsPart:
    """This process's segments part."""
    return (engine or get_engine()).part("segments", SegmentsPart)


prebuild_part("segments", SegmentsPart)  # (a forked child adopts it ready-made)
