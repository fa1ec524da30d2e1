"""Front end for shared data: ``shared()``, ``unlink()`` and the :class:`Segment` handle."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar, overload

from procshare import _cview, _kinds, _runtime
from procshare._engine import anonymous as _anonymous
from procshare._engine import core as _core
from procshare._engine import names
from procshare._engine import segments as _segments
from procshare._engine.segments import segments_part
from procshare._kinds import Scalar
from procshare._segment import Segment as Segment  # noqa: PLC0414 - re-exported
from procshare._views import ScalarView
from procshare._views import _Closed as _views_Closed
from procshare.errors import AnonymousError

if TYPE_CHECKING:
    from typing import Unpack

    from _typeshed import ReadableBuffer
    from numpy import dtype
    from numpy.typing import ArrayLike, NDArray

    from procshare._kinds.hints import (
        A,
        C,
        CScalar,
        NamedOptions,
        S,
        Sized,
        SizedNamedOptions,
        T,
        V,
    )
else:
    V = TypeVar("V")  # what a segment's view is: Segment[ScalarView[int]]


#: The default ``mode=``: compared by identity (an explicit ``mode=0o600``, an
#: equal int but not this object, takes the checked path).
_MODE = 0o600


class _NoKind:
    """``kind`` not given: ``ps.shared(kind)`` (anonymous), or a forgotten kind."""

    def __repr__(self) -> str:
        return "<no kind>"


_NO_KIND: Any = _NoKind()


# The view's type follows the kind: one overload per kind family, named and
# nameless (anonymous). shape= and size= are ints only in the families that
# take them (elsewhere only their default, None), which is also what tells
# numpy kinds (np.float64 is a float subclass) from float. ctypes kinds are
# matched structurally (the front end may not import ctypes, even for types).
# The nameless forms take no create, persist or mode: an anonymous segment
# refuses them.
@overload
def shared(
    name: str, kind: Scalar[T], *, initial: T | None = None, **options: Unpack[SizedNamedOptions]
) -> Segment[ScalarView[T]]: ...
@overload
def shared(
    name: str,
    kind: type[bool],
    *,
    initial: bool | None = None,
    **options: Unpack[SizedNamedOptions],
) -> Segment[ScalarView[bool]]: ...
@overload
def shared(
    name: str, kind: type[int], *, initial: int | None = None, **options: Unpack[SizedNamedOptions]
) -> Segment[ScalarView[int]]: ...
@overload
def shared(
    name: str,
    kind: type[float],
    *,
    initial: float | None = None,
    **options: Unpack[SizedNamedOptions],
) -> Segment[ScalarView[float]]: ...
@overload
def shared(
    name: str,
    kind: type[bytes],
    *,
    size: int,
    initial: ReadableBuffer | None = None,
    **options: Unpack[NamedOptions],
) -> Segment[memoryview]: ...
@overload
def shared(
    name: str, kind: type[A], *, initial: A | None = None, **options: Unpack[SizedNamedOptions]
) -> Segment[A]: ...
@overload
def shared(
    name: str,
    kind: type[S] | dtype[S],
    *,
    shape: int | tuple[int, ...],
    initial: ArrayLike | None = None,
    **options: Unpack[NamedOptions],
) -> Segment[NDArray[S]]: ...
@overload
def shared(
    name: str,
    kind: str | list[Any],
    *,
    shape: int | tuple[int, ...],
    initial: ArrayLike | None = None,
    **options: Unpack[NamedOptions],
) -> Segment[NDArray[Any]]: ...
@overload
def shared(
    name: str, kind: type[C], *, initial: object = None, **options: Unpack[SizedNamedOptions]
) -> Segment[C]: ...
@overload
def shared(
    name: str,
    kind: type[CScalar[T]],
    *,
    initial: T | None = None,
    **options: Unpack[SizedNamedOptions],
) -> Segment[ScalarView[T]]: ...
@overload
def shared(
    kind: Scalar[T], /, *, initial: T | None = None, **fixed: Unpack[Sized]
) -> Segment[ScalarView[T]]: ...
@overload
def shared(
    kind: type[bool], /, *, initial: bool | None = None, **fixed: Unpack[Sized]
) -> Segment[ScalarView[bool]]: ...
@overload
def shared(
    kind: type[int], /, *, initial: int | None = None, **fixed: Unpack[Sized]
) -> Segment[ScalarView[int]]: ...
@overload
def shared(
    kind: type[float], /, *, initial: float | None = None, **fixed: Unpack[Sized]
) -> Segment[ScalarView[float]]: ...
@overload
def shared(
    kind: type[bytes], /, *, size: int, initial: ReadableBuffer | None = None
) -> Segment[memoryview]: ...
@overload
def shared(
    kind: type[A], /, *, initial: A | None = None, **fixed: Unpack[Sized]
) -> Segment[A]: ...
@overload
def shared(
    kind: type[S] | dtype[S],
    /,
    *,
    shape: int | tuple[int, ...],
    initial: ArrayLike | None = None,
) -> Segment[NDArray[S]]: ...
@overload
def shared(kind: type[C], /, *, initial: object = None, **fixed: Unpack[Sized]) -> Segment[C]: ...
@overload
def shared(
    kind: type[CScalar[T]], /, *, initial: T | None = None, **fixed: Unpack[Sized]
) -> Segment[ScalarView[T]]: ...
def shared(
    name: str | Any,
    kind: Any = _NO_KIND,
    *,
    shape: int | tuple[int, ...] | None = None,
    size: int | None = None,
    initial: Any = None,
    create: bool | None = None,
    persist: bool = False,
    mode: int = _MODE,
) -> Segment[Any]:
    """Create or attach the named shared segment ``name`` holding ``kind``;
    without a name, create an anonymous one.

    ```text
    with ps.shared("sum", ps.u64) as total:    # named: any process can open "sum"
        total.value += 1
    with ps.shared(ps.u64) as total:           # anonymous: this process and its children
        total.value += 1
    ```

    An anonymous segment (``ps.shared(kind, shape=..., size=..., initial=...)``)
    is shared with every child forked while it is open and with nobody else:
    it has no name in ``/dev/shm`` or anywhere, and the kernel frees it when
    the last process that has it exits, however it ended. It cannot be
    pickled or opened by name (:class:`~procshare.AnonymousError`).

    Args:
        name: 1-128 characters of ``A-Z a-z 0-9 . _ -``, in the current
            namespace (:func:`procshare.namespace`, ``PROCSHARE_NAMESPACE``)
            of the current user. Leave it out (pass the kind first) for an
            anonymous segment.
        kind: ``int`` (signed 64-bit), ``float`` (64-bit), ``bool``,
            ``ps.i8`` ... ``ps.i64``, ``ps.u8`` ... ``ps.u64``, ``ps.f32``,
            ``ps.f64`` or a ctypes scalar (view with ``.value``); a ctypes
            ``Structure``, ``Union`` or array (attributes / items); an attrs
            class whose fields are number kinds (a shared struct:
            ``view.count += 1``); a numpy dtype with ``shape=`` (a zero-copy
            ``numpy.ndarray``); ``bytes`` with ``size=`` (a writable
            ``memoryview``).
        shape: The shape of a numpy array (an int or a tuple).
        size: The number of bytes of a ``bytes`` segment.
        initial: The value a *new* segment starts with (otherwise zeroed).
            Attaching never resets a segment.
        create: ``None`` creates or attaches; ``True`` must create
            (:class:`~procshare.SegmentExists` if it exists); ``False`` must
            attach (:class:`~procshare.SegmentNotFound` if it does not).
        persist: Keep the segment after its last holder closes it, until
            :func:`procshare.unlink`. Decided by the creator.
        mode: Permission bits of a new segment (default owner only); must
            include owner read and write (``0o600``).

    Returns:
        A :class:`Segment`; ``with`` gives its view and closes it at the end.
        Type checkers know the view's type from the kind (one overload per
        kind family, named and nameless): a :class:`ScalarView` ``[int]``
        for ``int`` and ``ps.i8`` ... ``ps.u64``, ``ScalarView[float]`` for
        ``float``, ``ps.f32``, ``ps.f64``, ``ScalarView[bool]`` for ``bool``;
        the attrs class itself for a struct; ``numpy.ndarray`` of the dtype
        (``NDArray[np.float64]``) for a numpy kind; ``memoryview`` for
        ``bytes``; a ctypes scalar's ``ScalarView`` of its value type, and a
        ctypes ``Structure``, ``Union`` or array as its own class. So
        ``mypy --strict`` reports a misspelt field or a wrong value type.

    Raises:
        InvalidName: ``name`` is not a valid name.
        AnonymousError: ``name`` is an anonymous segment, view or lock.
        TypeError: ``kind`` is not supported (the message lists what is), or
            ``initial`` does not fit it.
        SharedTypeError: the segment exists and holds another kind, shape,
            size or layout.
        SegmentExists: ``create=True`` and a live segment has that name.
        SegmentNotFound: ``create=False`` and no live segment has that name.
        SharedMemoryFull: the new segment does not fit in free shared memory.
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.shared(
            name, kind, shape=shape, size=size, initial=initial, create=create, persist=persist
        )
    if (
        initial is None
        and shape is None
        and size is None
        and create is None
        and persist is False
        and mode is _MODE
    ):
        # A number opened by name before, attached to whole in one C call
        # (_cview.open_planned: the steps below, for a fresh child's by-name
        # open); None for anything else, which the rest of this function does.
        segment = _open_planned(name, kind)
        if segment is not None:
            return segment  # type: ignore[no-any-return]
    # Only a call without initial= whose arguments are of exactly the types
    # validation accepts is planned, so 384.0 cannot pass for 0o600, 1 for
    # True, or (2.0, 3) for (2, 3) as a dict key.
    plannable = (
        initial is None
        and type(name) is str
        and type(mode) is int
        and (persist is False or persist is True)
        and (create is None or create is True or create is False)
        and _kinds.exact_shape_and_size(shape, size)
    )
    key: tuple[object, ...] = ()
    if plannable:
        # The same call again (a by-name open in a loop, or in a forked child
        # that inherited its parent's plans): skip validating, resolving and
        # naming, which in a fresh child would touch dozens of pages.
        namespace = names.current_namespace()
        key = (
            name,
            id(kind),
            shape,
            size,
            create,
            persist,
            mode,
            namespace,
            _geteuid(),
            names.env_raw(),  # the metadata records it (its origin) when it differs
        )
        plan = _plans.get(key)
        if plan is not None and plan[0] is kind:
            part = segments_part()
            resolved = plan[1]
            if not (type(resolved) is _kinds.NativeKindR and resolved.part is not part):
                part.engine.poll()  # every call into procshare reaps dropped children
                rec = part.open(
                    name,
                    namespace,
                    plan[2],
                    plan[3],
                    plan[5],
                    create=create,
                    initial=None,
                    persist=bool(persist),
                    mode=mode,
                )
                fast = plan[4]
                if fast is not None:  # a number: the Segment and its view built in C
                    return _scalar_segment(part, rec, fast)  # type: ignore[no-any-return]
                return Segment(part, rec, resolved)
    if type(name) is not str or kind is _NO_KIND:
        return _nameless(name, kind, shape, size, initial, create, persist, mode)
    if name not in _segments._valid_names:
        _refuse_anonymous_as_name(name, "ps.shared('NAME', kind)")
    _segments.validate_name(name)
    if create is not None and not isinstance(create, bool):
        raise TypeError(f"create= must be None, True or False, not {create!r}")
    _segments.check_mode(mode)
    part = segments_part()
    part.engine.poll()  # every call into procshare reaps dropped children (SPEC 1)
    resolved = _kinds.resolve_cached(name, kind, shape, size, part)
    init = resolved.initial(initial)
    namespace = names.current_namespace()
    os_name = _segments.os_name(names.SEGMENT, name, namespace)
    meta = _segments.encode_meta(name, namespace, resolved.layout, names.env_namespace())
    rec = part.open(
        name,
        namespace,
        os_name,
        meta,
        resolved.layout,
        create=create,
        initial=init,
        persist=bool(persist),
        mode=mode,
    )
    if plannable:
        if len(_plans) >= 1024:
            _plans.clear()
        fast = None
        if type(resolved) is _kinds.ScalarKind:
            fast = (resolved.name, resolved.scalar.name, resolved.scalar.format)
        _plans[key] = (kind, resolved, os_name, meta, fast, resolved.layout)
    return Segment(part, rec, resolved)


def _nameless(  # noqa: PLR0917
    kind: Any,
    second: Any,
    shape: int | tuple[int, ...] | None,
    size: int | None,
    initial: Any,
    create: bool | None,
    persist: bool,
    mode: int,
) -> Segment[Any]:
    """``shared()`` whose first argument is not a name: an anonymous segment,
    or a mistake explained."""
    if isinstance(kind, str):  # a name without a kind (only str subclasses get here too)
        if second is _NO_KIND:
            raise TypeError(
                f"ps.shared({kind!r}) needs a kind: ps.shared({kind!r}, ps.u64) for a named "
                "segment (or ps.shared(ps.u64) for an anonymous one)"
            )
        named: Any = shared  # (any kind: the overloads are for callers)
        return named(  # type: ignore[no-any-return]
            str(kind),
            second,
            shape=shape,
            size=size,
            initial=initial,
            create=create,
            persist=persist,
            mode=mode,
        )
    _refuse_anonymous_as_name(kind, "ps.shared('NAME', kind)")
    if second is not _NO_KIND:
        if isinstance(second, str):
            raise TypeError(
                f"ps.shared(kind, name): the name goes first: ps.shared({second!r}, kind)"
            )
        _segments.validate_name(kind)  # not a name: InvalidName says what a name is
        raise AssertionError("unreachable: a valid name is a str")
    if create is False:
        raise TypeError(
            "ps.shared(kind, create=False) asks to attach, but an anonymous segment has no "
            "name to attach by: a child forked while it is open already has it (use the "
            "view it inherited); for a segment other processes open, give it a name"
        )
    if persist is not False:
        raise TypeError(
            "ps.shared(kind, persist=True): an anonymous segment cannot outlive its last "
            "holder (nothing could ever open it again); give it a name to keep it"
        )
    if mode != 0o600:
        raise TypeError(
            f"ps.shared(kind, mode={mode!r}): an anonymous segment has no name for other "
            "users to open it by, so it has no permission bits; give it a name to set them"
        )
    part = _anonymous.segments_part()
    part.engine.poll()  # every call into procshare reaps dropped children (SPEC 1)
    resolved = _kinds.resolve_cached(_anonymous.LABEL, kind, shape, size, segments_part())
    rec = part.open(resolved.layout, resolved.initial(initial))
    return Segment(part, rec, resolved)


def _refuse_anonymous_as_name(obj: object, named: str) -> None:
    """Raise :class:`AnonymousError` if ``obj`` is an anonymous object (or the
    label an anonymous object has for a name) given as a name."""
    if isinstance(obj, str):
        if obj.startswith(_anonymous.LABEL[:-1]):
            raise AnonymousError(
                f"{obj!r}, what an anonymous object has for a name,",
                "used as a name",
                named=named,
            )
        return
    segment = getattr(obj, "_segment", None) or getattr(obj, "_ps_segment", None)
    if isinstance(obj, Segment):
        segment = obj
    if isinstance(segment, Segment) and segment.anonymous:
        raise AnonymousError(
            f"an anonymous shared segment ({segment.kind})", "used as a name", named=named
        )
    if getattr(obj, "anonymous", False) is True and hasattr(obj, "acquire"):
        what = getattr(obj, "_ps_anonymous_what", None) or "an anonymous lock"
        raise AnonymousError(what, "used as a name", named=named)
    what = getattr(obj, "_ps_anonymous_what", None)  # the other anonymous primitives
    if isinstance(what, str):
        raise AnonymousError(what, "used as a name", named=named)


_geteuid = os.geteuid

# (name, id(kind), shape, size, create, persist, mode, namespace, euid, env) ->
# (kind, resolved, os_name, meta, fast) for every call that succeeded without
# initial=; fast is (name, kind name, struct format) for a number kind, whose
# Segment and view _cview.scalar_segment builds (else None). Module-level, so
# a forked child inherits its parent's plans; the kind is kept so its id
# cannot be reused by another object while planned.
# The effective uid is part of the key because OS names are per user: a
# process that switches user (os.setuid in a child) must look in its new
# user's namespace, not reuse a name of the old one.
_plans: dict[
    tuple[object, ...],
    tuple[Any, _kinds.Resolved, str, bytes, tuple[str, str, str] | None, _segments.Layout],
] = {}
_scalar_segment = _cview.scalar_segment
_open_planned = _cview.open_planned
_cview.setup(Segment, ScalarView, _views_Closed, _segments.record_offsets())
_cview.open_setup(_segments.planned_open_setup(_plans, _MODE))
_cview.close_setup(_segments.SegmentsPart, _core.Engine, vars(_core))


def unlink(name: str) -> bool:
    """Remove the segment ``name`` now; return whether it existed.

    Meant for segments created with ``persist=True``. Processes that hold it
    keep their memory, but the name is free at once: the next
    :func:`shared` of that name creates a new segment.
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.unlink(name)
    if name not in _segments._valid_names:
        _refuse_anonymous_as_name(
            name,
            "ps.unlink removes named segments; an anonymous one "
            "goes when its last holder closes it or exits",
        )
    names.validate_name(name)
    return segments_part().unlink(name)
