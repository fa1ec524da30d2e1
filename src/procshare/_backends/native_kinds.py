"""ctypes kinds for shared segments: layouts and views over segment memory.

The front end accepts ``ctypes`` types as kinds but may not import
``ctypes`` (the layering rule), so everything that inspects a ctypes type or
builds a ctypes object lives here, behind three backend methods:
:meth:`NativeKinds.native_kind`, :meth:`NativeKinds.native_view` and
:meth:`NativeKinds.native_bytes`. Nothing here is POSIX-specific; any backend
can mix this class in.

A layout is described by a *canonical* string that depends only on the
memory layout, never on class names: ``c_int64`` and ``ps.i64`` are both
``"i64"``, and a ``Structure`` is ``"struct{x:i32@0,y:f64@8}:16"``, exactly
what the front end writes for an attrs class with the same fields. So two
programs that declare the same struct separately can share it, and a
different layout is caught on attach.
"""

from __future__ import annotations

import ctypes
import operator
import reprlib
import struct
import sys
from typing import Any, Literal

from procshare._backends.api_segment import NativeKind

# Simple ctypes type codes -> (canonical prefix, memoryview/struct format or None).
_INTEGER_CODES = "bBhHiIlLqQ"
_POINTER_CODES = "PzZO"

_SimpleCData: type = ctypes._SimpleCData
_CData: type = ctypes.c_int.__mro__[-2]  # the common base, not exported before 3.12
_CFuncPtr: type = ctypes._CFuncPtr  # type: ignore[attr-defined]


def _is_native_order(kind: type) -> bool:
    attr = "__ctype_le__" if sys.byteorder == "little" else "__ctype_be__"
    return getattr(kind, attr, kind) is kind


def _pointer_error(kind: type) -> TypeError:
    return TypeError(
        f"{kind.__name__} holds a pointer, which means nothing in another process: "
        "share the data itself (a ctypes array, a Structure of numbers, bytes with size=)"
    )


def _scalar(kind: type) -> NativeKind:
    code = kind._type_  # type: ignore[attr-defined]
    size = ctypes.sizeof(kind)
    if code in _POINTER_CODES:
        raise _pointer_error(kind)
    fmt: str | None
    if code in _INTEGER_CODES:
        canonical = ("u" if code.isupper() else "i") + str(8 * size)
        fmt = {1: "b", 2: "h", 4: "i", 8: "q"}[size]
        fmt = fmt.upper() if code.isupper() else fmt
    elif code in "fd":
        canonical, fmt = f"f{8 * size}", code
    elif code == "?":
        canonical, fmt = "bool", "?"
    elif code == "c":
        canonical, fmt = "char", "c"
    elif code == "g":
        canonical, fmt = f"f{8 * size}x", None  # long double: x87 extended, padded
    elif code == "u":
        canonical, fmt = f"wchar{8 * size}", None
    else:  # pragma: no cover - every ctypes code is listed above
        raise TypeError(f"unsupported ctypes type {kind.__name__}")
    if not _is_native_order(kind):
        canonical, fmt = ("be:" if sys.byteorder == "little" else "le:") + canonical, None
    return NativeKind(
        canonical=canonical,
        describe=kind.__name__,
        size=size,
        align=ctypes.alignment(kind),
        category="scalar",
        format=fmt,
    )


def _canonical(kind: type) -> str:
    if isinstance(kind, type) and issubclass(kind, _SimpleCData):
        return _scalar(kind).canonical
    if isinstance(kind, type) and issubclass(kind, ctypes.Array):
        elem: type = kind._type_  # type: ignore[assignment]
        return f"{_canonical(elem)}[{kind._length_}]"
    if isinstance(kind, type) and issubclass(kind, (ctypes.Structure, ctypes.Union)):
        word = "union" if issubclass(kind, ctypes.Union) else "struct"
        if not _is_native_order(kind):
            word = "be:" + word if sys.byteorder == "little" else "le:" + word
        parts = []
        for spec in getattr(kind, "_fields_", ()):
            fname, ftype = spec[0], spec[1]
            desc = getattr(kind, fname)
            text = f"{fname}:{_canonical(ftype)}@{desc.offset}"
            if len(spec) > 2:  # bit field: the descriptor's size encodes width and shift
                text += f"/{desc.size}"
            parts.append(text)
        return f"{word}{{{','.join(parts)}}}:{ctypes.sizeof(kind)}"
    if isinstance(kind, type) and issubclass(kind, (ctypes._Pointer, _CFuncPtr)):
        raise _pointer_error(kind)
    raise TypeError(f"{kind!r} is not a ctypes type")


_pack_f32 = struct.Struct("=f").pack


def _int_range(bits: int, *, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _scalar_misfit(kind: type, value: object) -> str | None:
    """Why ctypes would store ``value`` as a ``kind`` changed; ``None`` if it would not.

    ctypes wraps integers (300 in a ``c_uint8`` is 44) and makes a finite
    number too large for a ``c_float`` inf, silently; the scalar kinds refuse
    those values (``struct.pack``), so these must too. Values ctypes refuses
    on its own (a float for an int) are left to it.
    """
    code = kind._type_  # type: ignore[attr-defined]
    if code in _INTEGER_CODES:
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            return None
        low, high = _int_range(8 * ctypes.sizeof(kind), signed=not code.isupper())
        if not low <= number <= high:
            return f"{number} is beyond the range of {kind.__name__} ({low} to {high})"
    elif code == "f":
        try:
            _pack_f32(value)
        except OverflowError:
            return f"{value!r} is beyond the range of {kind.__name__} (it would become inf)"
        except struct.error:
            return None
    return None


def _bits_misfit(kind: type, width: int, value: object) -> str | None:
    """Why ``value`` does not fit a ``width``-bit field of ``kind`` (which ctypes cuts short)."""
    code = kind._type_  # type: ignore[attr-defined]
    if code not in _INTEGER_CODES:
        return None
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
    low, high = _int_range(width, signed=not code.isupper())
    if not low <= number <= high:
        return f"{number} is beyond the range of a {width}-bit field ({low} to {high})"
    return None


def _positional_fields(kind: type) -> list[tuple[Any, ...]]:
    """The fields positional initialisers fill, in ctypes' order: base classes' first."""
    fields: list[tuple[Any, ...]] = []
    for cls in reversed(kind.__mro__):
        fields.extend(vars(cls).get("_fields_", ()))
    return fields


def _misfit(kind: type, value: object) -> str | None:
    """:func:`_scalar_misfit` for any ctypes kind (nested arrays and structures too)."""
    if isinstance(value, _CData):
        return None  # a ctypes object already: ctypes checks its type
    if issubclass(kind, _SimpleCData):
        return _scalar_misfit(kind, value)
    if isinstance(value, tuple):  # ctypes unpacks a tuple into a nested array or structure
        return _items_misfit(kind, value)
    return None


def _items_misfit(kind: type, items: tuple[object, ...]) -> str | None:
    """Why ``kind(*items)`` would not hold ``items`` as given; ``None`` if it would."""
    if issubclass(kind, ctypes.Array):
        length: int = kind._length_  # type: ignore[assignment]
        if len(items) > length:
            return f"{len(items)} items, but {kind.__name__} holds {length}"
        for index, item in enumerate(items):
            why = _misfit(kind._type_, item)  # type: ignore[arg-type]
            if why is not None:
                return f"item {index}: {why}"
    elif issubclass(kind, ctypes.Structure | ctypes.Union):
        for spec, item in zip(_positional_fields(kind), items, strict=False):
            why = _misfit(spec[1], item)
            if why is None and len(spec) > 2:
                why = _bits_misfit(spec[1], spec[2], item)
            if why is not None:
                return f"field {spec[0]!r}: {why}"
    return None


def _initial_error(kind: type, initial: object, why: str) -> TypeError:
    shorten = reprlib.Repr()
    shorten.maxother = 60  # an initial= may be a long list
    return TypeError(f"initial={shorten.repr(initial)} cannot be stored as {kind.__name__}: {why}")


class NativeKinds:
    """ctypes support for segment kinds (mixed into a backend)."""

    def native_kind(self, kind: object) -> NativeKind | None:
        """Describe ``kind`` if it is a ctypes type; ``None`` if it is not one.

        Raises ``TypeError`` for ctypes types that cannot be shared (pointers,
        function pointers, structures that contain them).
        """
        if not isinstance(kind, type) or not issubclass(kind, _CData):
            return None
        if issubclass(kind, _SimpleCData):
            return _scalar(kind)
        category: Literal["struct", "array"]
        if issubclass(kind, ctypes.Array):
            category = "array"
        elif issubclass(kind, (ctypes.Structure, ctypes.Union)):
            category = "struct"
        else:
            raise _pointer_error(kind)
        return NativeKind(
            canonical=_canonical(kind),
            describe=kind.__name__,
            size=ctypes.sizeof(kind),
            align=ctypes.alignment(kind),
            category=category,
            format=None,
        )

    def native_view(self, kind: object, buffer: memoryview) -> Any:
        """A ``kind`` object living in ``buffer`` (which it pins while alive)."""
        assert isinstance(kind, type)
        return kind.from_buffer(buffer)  # type: ignore[attr-defined]

    def native_bytes(self, kind: object, initial: object) -> bytes:
        """The bytes of ``initial`` as a ``kind``: an instance, a value, or a sequence.

        ``TypeError`` for a value the kind cannot hold as given: ctypes itself
        wraps integers and makes too-large floats inf.
        """
        assert isinstance(kind, type)
        if isinstance(initial, kind):
            return bytes(initial)  # type: ignore[call-overload, no-any-return]
        aggregate = issubclass(kind, ctypes.Array | ctypes.Structure | ctypes.Union)
        items = tuple(initial) if aggregate and isinstance(initial, list | tuple) else (initial,)
        why = _items_misfit(kind, items) if aggregate else _scalar_misfit(kind, initial)
        if why is not None:
            raise _initial_error(kind, initial, f"{why}; pass values that fit it")
        try:
            return bytes(kind(*items))
        except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
            advice = f"pass a {kind.__name__} instance, or what {kind.__name__}(...) accepts"
            raise _initial_error(kind, initial, f"{exc}; {advice}") from None
