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
        """The bytes of ``initial`` as a ``kind``: an instance, a value, or a sequence."""
        assert isinstance(kind, type)
        if isinstance(initial, kind):
            return bytes(initial)  # type: ignore[call-overload, no-any-return]
        try:
            if issubclass(kind, ctypes.Array | ctypes.Structure | ctypes.Union) and isinstance(
                initial, list | tuple
            ):
                obj = kind(*initial)
            else:
                obj = kind(initial)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"initial={initial!r} cannot be stored as {kind.__name__}: {exc}; pass a "
                f"{kind.__name__} instance, or what {kind.__name__}(...) accepts"
            ) from None
        return bytes(obj)
