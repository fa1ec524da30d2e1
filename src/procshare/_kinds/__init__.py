"""Kinds: what a shared segment holds, and how to read it.

``ps.i8`` ... ``ps.f64`` are plain :class:`Scalar` descriptors (a name, a
:mod:`struct` format, a size), defined without ctypes. ``int``, ``float`` and
``bool`` map onto them. Every other kind the user passes is *resolved* here
into a :class:`Resolved` that knows the segment's layout (recorded in its
metadata and checked on attach), how to encode ``initial=`` and how to build
the view. ctypes types are described and instantiated by the backend, through
the engine, because only the backend may import ctypes.

numpy kinds live in :mod:`procshare._kinds.arrays`; the types ``shared()``'s
overloads are written with (for type checkers only) in
:mod:`procshare._kinds.hints`.
"""

from __future__ import annotations

import struct
import typing
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs

from procshare import _views
from procshare._engine.segments import Initialiser, Layout, OpenSegment, SegmentsPart
from procshare._kinds.arrays import NumpyKind as NumpyKind
from procshare._kinds.arrays import numpy_dtype, resolve_numpy

N = TypeVar("N")


@attrs.frozen(repr=False)
class Scalar(Generic[N]):
    """A fixed-width number kind for :func:`procshare.shared`.

    ``ps.i8``, ``ps.i16``, ``ps.i32``, ``ps.i64`` (signed), ``ps.u8`` ...
    ``ps.u64`` (unsigned), ``ps.f32``, ``ps.f64`` (IEEE floats). The view
    has ``.value``; as an attrs field annotation it sets the field's width
    (``count: ps.u32``, or ``Annotated[int, ps.u32]`` to keep type checkers happy).

    The integer kinds are ``Scalar[int]`` and the float kinds ``Scalar[float]``,
    so a type checker knows ``ps.shared(name, ps.u64)`` gives a
    ``ScalarView[int]``.
    """

    #: ``"u64"``: also the layout recorded in the segment.
    name: str
    #: The :mod:`struct` / ``memoryview.cast`` format.
    format: str
    #: Bytes.
    size: int

    def __repr__(self) -> str:
        return f"procshare.{self.name}"


# Typed Final, so that a type checker knows ps.u64 is a Scalar[int] (a bare
# `u64 = Scalar(...)` would leave N unsolved).
i8: Final[Scalar[int]] = Scalar("i8", "b", 1)
"""Signed 8-bit integer (-128 .. 127)."""
i16: Final[Scalar[int]] = Scalar("i16", "h", 2)
"""Signed 16-bit integer."""
i32: Final[Scalar[int]] = Scalar("i32", "i", 4)
"""Signed 32-bit integer."""
i64: Final[Scalar[int]] = Scalar("i64", "q", 8)
"""Signed 64-bit integer (what `int` means)."""
u8: Final[Scalar[int]] = Scalar("u8", "B", 1)
"""Unsigned 8-bit integer (0 .. 255)."""
u16: Final[Scalar[int]] = Scalar("u16", "H", 2)
"""Unsigned 16-bit integer."""
u32: Final[Scalar[int]] = Scalar("u32", "I", 4)
"""Unsigned 32-bit integer."""
u64: Final[Scalar[int]] = Scalar("u64", "Q", 8)
"""Unsigned 64-bit integer."""
f32: Final[Scalar[float]] = Scalar("f32", "f", 4)
"""IEEE 754 single-precision float."""
f64: Final[Scalar[float]] = Scalar("f64", "d", 8)
"""IEEE 754 double-precision float (what `float` means)."""
BOOL: Final[Scalar[bool]] = Scalar("bool", "?", 1)
CHAR: Final[Scalar[bytes]] = Scalar("char", "c", 1)

_BY_NAME = {s.name: s for s in (i8, i16, i32, i64, u8, u16, u32, u64, f32, f64, BOOL, CHAR)}
_BUILTINS: dict[object, Scalar[Any]] = {int: i64, float: f64, bool: BOOL}

SUPPORTED = (
    "int, float, bool; ps.i8, ps.i16, ps.i32, ps.i64, ps.u8, ps.u16, ps.u32, ps.u64, "
    "ps.f32, ps.f64; a ctypes scalar, Structure, Union or array; an attrs class whose "
    "fields are of those number kinds; a numpy dtype with shape=; bytes with size="
)


class Resolved(Protocol):
    """A kind resolved against the options of one ``ps.shared`` call."""

    @property
    def layout(self) -> Layout: ...

    #: Whether the view must be told when the segment closes.
    @property
    def invalidates(self) -> bool: ...

    def initial(self, value: object) -> Initialiser:
        """Check and encode ``initial=`` (before anything is created)."""
        ...

    def view(self, segment: object, rec: OpenSegment) -> Any:
        """The view the ``with`` block gets."""
        ...


def _unsupported(kind: object, why: str = "") -> TypeError:
    shown = getattr(kind, "__qualname__", None) or repr(kind)
    return TypeError(
        f"ps.shared cannot hold {shown}{': ' + why if why else ''}. Supported kinds: {SUPPORTED}."
    )


def _pack(name: str, scalar: Scalar[Any], value: object) -> bytes:
    try:
        return struct.pack("=" + scalar.format, value)
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"initial={value!r} does not fit shared segment {name!r} of kind {scalar.name} "
            f"({exc}); pass a value of that kind and range"
        ) from None


@attrs.frozen
class ScalarKind:
    name: str
    scalar: Scalar[Any]
    layout: Layout
    invalidates: bool = True

    def initial(self, value: object) -> Initialiser:
        return None if value is None else _pack(self.name, self.scalar, value)

    def view(self, segment: object, rec: OpenSegment) -> Any:
        mv = rec.handle.data.cast(self.scalar.format)  # type: ignore[call-overload]
        return _views.ScalarView(segment, self.name, self.scalar.name, mv)


@attrs.frozen
class StructKind:
    name: str
    cls: type
    #: (field name, scalar, offset)
    fields: tuple[tuple[str, Scalar[Any], int], ...]
    layout: Layout
    view_class: type[_views.StructView]
    invalidates: bool = True

    def initial(self, value: object) -> Initialiser:
        if value is None:
            return None
        if not isinstance(value, self.cls):
            raise TypeError(
                f"initial= for shared segment {self.name!r} must be a "
                f"{self.cls.__qualname__} instance, not {type(value).__qualname__}"
            )
        out = bytearray(self.layout.size)
        for field, scalar, offset in self.fields:
            out[offset : offset + scalar.size] = _pack(self.name, scalar, getattr(value, field))
        return bytes(out)

    def view(self, segment: object, rec: OpenSegment) -> Any:
        data = rec.handle.data
        cells = tuple(
            data[offset : offset + scalar.size].cast(scalar.format)  # type: ignore[call-overload]
            for _, scalar, offset in self.fields
        )
        return self.view_class(segment, self.name, cells)


@attrs.frozen
class NativeKindR:
    name: str
    kind: type
    part: SegmentsPart
    layout: Layout
    #: A ctypes scalar (long double, wchar, another byte order): a ScalarView too.
    scalar: bool = False
    invalidates: bool = True

    def initial(self, value: object) -> Initialiser:
        if value is None:
            return None
        try:
            return self.part.native_bytes(self.kind, value)
        except TypeError as exc:  # the backend does not know the segment's name
            raise TypeError(f"shared segment {self.name!r}: {exc}") from None

    def view(self, segment: object, rec: OpenSegment) -> Any:
        obj = self.part.native_view(self.kind, memoryview(rec.handle.data))
        cls = _views.NativeScalarView if self.scalar else _views.NativeView
        return cls(segment, self.name, self.layout.kind, obj)


@attrs.frozen
class BytesKind:
    name: str
    layout: Layout
    invalidates: bool = False

    def initial(self, value: object) -> Initialiser:
        if value is None:
            return None
        try:
            blob = bytes(memoryview(value))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"initial= for shared segment {self.name!r} must be bytes-like, not "
                f"{type(value).__qualname__}"
            ) from None
        if len(blob) > self.layout.size:
            raise ValueError(
                f"initial= for shared segment {self.name!r} is {len(blob)} bytes but the "
                f"segment has size={self.layout.size}; pass at most that many bytes"
            )
        return blob

    def view(self, segment: object, rec: OpenSegment) -> Any:
        # A new view on the same managed buffer: it keeps the mapping alive on
        # its own, so it keeps working after the block ends.
        return memoryview(rec.handle.data)


def _scalar_of(annotation: object, part: SegmentsPart) -> Scalar[Any] | None:  # noqa: PLR0911
    """The scalar kind of an attrs field annotation, if it is one."""
    if isinstance(annotation, Scalar):
        return annotation
    found = _BUILTINS.get(annotation)
    if found is not None:
        return found
    if typing.get_origin(annotation) is typing.Annotated:
        for extra in typing.get_args(annotation)[1:]:
            if isinstance(extra, Scalar):
                return extra
        return _scalar_of(typing.get_args(annotation)[0], part)
    try:
        native = part.native_kind(annotation)
    except TypeError:
        return None
    if native is not None and native.format is not None:
        return _BY_NAME.get(native.canonical)
    return None


def _resolve_attrs(name: str, cls: type, part: SegmentsPart) -> StructKind:
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as exc:  # any failure to resolve is the same problem
        raise _unsupported(cls, f"its field annotations cannot be resolved ({exc})") from None
    fields: list[tuple[str, Scalar[Any], int]] = []
    offset = 0
    align = 1
    for field in attrs.fields(cls):
        annotation = hints.get(field.name, field.type)
        scalar = _scalar_of(annotation, part)
        if scalar is None:
            raise _unsupported(
                cls,
                f"field {field.name!r} is annotated {annotation!r}; attrs fields of a shared "
                "struct must be int, float, bool, ps.i8 ... ps.f64 or a ctypes number type",
            )
        # Natural alignment, as a C compiler (and ctypes.Structure) lays it out.
        offset = (offset + scalar.size - 1) // scalar.size * scalar.size
        fields.append((field.name, scalar, offset))
        offset += scalar.size
        align = max(align, scalar.size)
    if not fields:
        raise _unsupported(cls, "it has no fields")
    size = (offset + align - 1) // align * align
    canonical = "struct{" + ",".join(f"{f}:{s.name}@{o}" for f, s, o in fields) + "}:" + str(size)
    view_class = _views.struct_view_class(cls, tuple((f, s.name) for f, s, _ in fields))
    return StructKind(
        name,
        cls,
        tuple(fields),
        Layout(canonical, f"struct {cls.__name__}", size),
        view_class,
    )


# (name, id(kind), shape, size) -> (kind, resolved): keyed by the kind's
# identity, so a hit hashes and compares no user objects (an attrs kind's
# __hash__ / __eq__ are Python code, and in a forked child every object they
# touch costs a page fault). The kind is kept to check the identity.
_cache: dict[tuple[object, ...], tuple[object, Resolved]] = {}


def exact_shape_and_size(shape: object, size: object) -> bool:
    """Whether ``shape`` and ``size`` are ``None`` or exactly ints (a tuple of
    them for a shape): the only values a cache keyed by them may look up."""
    return (size is None or type(size) is int) and (
        shape is None
        or type(shape) is int
        or (type(shape) is tuple and all(type(n) is int for n in shape))
    )


def resolve_cached(
    name: str, kind: object, shape: object, size: object, part: SegmentsPart
) -> Resolved:
    """:func:`resolve`, remembered per (name, kind, shape, size).

    Resolving is pure, but re-resolving an attrs class or a ctypes type on every
    ``ps.shared`` inside a loop would cost more than the open itself. The cache
    is module-level, so a forked child inherits what its parent resolved; only
    a ctypes kind remembers the engine part it was resolved with, and is
    resolved again for another part (a child's own engine).
    """
    if not exact_shape_and_size(shape, size):
        # 3.0 == 3 and (2.0,) == (2,) as keys: only exact ints may hit the
        # cache, or a shape the full path refuses would pass (an unhashable
        # shape is resolved, and refused, every time too).
        return resolve(name, kind, shape, size, part)
    key = (name, id(kind), shape, size)
    entry = _cache.get(key)
    if entry is not None and entry[0] is kind:
        found = entry[1]
        if not (isinstance(found, NativeKindR) and found.part is not part):
            return found
    found = resolve(name, kind, shape, size, part)
    if len(_cache) >= 1024:
        _cache.clear()
    _cache[key] = (kind, found)
    return found


def resolve(name: str, kind: object, shape: object, size: object, part: SegmentsPart) -> Resolved:
    """Resolve ``kind`` (with ``shape=`` / ``size=``) or raise ``TypeError``."""
    dtype = numpy_dtype(kind, shape)
    if shape is not None and dtype is None:
        raise TypeError(
            f"shape= goes with a numpy dtype (ps.shared({name!r}, numpy.float64, shape=...)), "
            f"not with {getattr(kind, '__qualname__', kind)!r}; for a fixed array without "
            "numpy use a ctypes array such as ctypes.c_double * 10"
        )
    if size is not None and kind is not bytes:
        raise TypeError(
            f"size= goes with kind bytes (ps.shared({name!r}, bytes, size=4096)); the size "
            f"of {getattr(kind, '__qualname__', kind)!r} follows from the kind itself"
        )
    if dtype is not None:
        return resolve_numpy(name, dtype, shape)
    if kind is bytes:
        if size is None or isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(
                f"kind bytes needs size=, a positive int (the number of bytes), got {size!r}"
            )
        if size <= 0:
            raise ValueError(
                f"size= of shared segment {name!r} must be at least 1 (the number of bytes), "
                f"got {size}"
            )
        return BytesKind(name, Layout(f"bytes[{size}]", f"bytes[{size}]", size))
    scalar = kind if isinstance(kind, Scalar) else _BUILTINS.get(kind)
    if scalar is not None:
        return ScalarKind(name, scalar, Layout(scalar.name, scalar.name, scalar.size))
    if isinstance(kind, type) and attrs.has(kind):
        return _resolve_attrs(name, kind, part)
    native = part.native_kind(kind)  # TypeError for pointers
    if native is not None:
        if native.format is not None and native.canonical in _BY_NAME:
            scalar = _BY_NAME[native.canonical]
            return ScalarKind(name, scalar, Layout(scalar.name, scalar.name, scalar.size))
        assert isinstance(kind, type)
        return NativeKindR(
            name,
            kind,
            part,
            Layout(native.canonical, f"ctypes {native.describe}", native.size),
            scalar=native.category == "scalar",
        )
    raise _unsupported(kind)
