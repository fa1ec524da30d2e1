"""numpy kinds: a dtype with ``shape=``, viewed as a zero-copy ``numpy.ndarray``.

numpy is optional: nothing here imports it until a numpy kind is used (a
dtype object means the caller imported numpy already).
"""

from __future__ import annotations

import math
import numbers
import operator
import reprlib
import sys
from typing import Any

import attrs

from procshare._engine.segments import Initialiser, Layout, OpenSegment


@attrs.frozen
class NumpyKind:
    name: str
    dtype: Any
    shape: tuple[int, ...]
    layout: Layout
    invalidates: bool = False

    def initial(self, value: object) -> Initialiser:
        if value is None:
            return None
        import numpy as np

        arr = self._checked(np, value)

        def fill(data: memoryview) -> None:
            target = np.frombuffer(data, dtype=self.dtype, count=math.prod(self.shape))
            target.reshape(self.shape)[...] = arr

        return fill

    def _checked(self, np: Any, value: object) -> Any:
        """``value`` as an array of the segment's dtype and shape, or ``TypeError``."""
        dtype = self.dtype
        try:
            if dtype.names is None:
                src = np.asarray(value)
            elif isinstance(value, np.ndarray) and value.dtype == dtype:
                src = value
            else:  # every field as Python objects, to check them before numpy casts them
                src = np.asarray(value, dtype=_numpy_objects(np, dtype))
            why = _numpy_misfit(np, src, dtype)
            if why is None:
                converted = np.asarray(src if dtype.names is None else value, dtype=dtype)
                return np.broadcast_to(converted, self.shape)
        except (ValueError, TypeError, OverflowError) as exc:
            why = f"pass an array-like that broadcasts to shape {self.shape} ({exc})"
        else:
            why += "; pass values the kind can hold, or create the segment with a wider dtype"
        raise TypeError(
            f"initial={_shown(value)} does not fit shared segment {self.name!r} of kind "
            f"{self.layout.kind}: {why}"
        )

    def view(self, segment: object, rec: OpenSegment) -> Any:
        import numpy as np

        # frombuffer takes a buffer export of the memoryview, which keeps the
        # mmap open for as long as the array lives (numpy.ndarray(buffer=...)
        # would not: closing the mapping under it would make the next access
        # a segfault). So arrays keep working after the block ends.
        flat = np.frombuffer(
            memoryview(rec.handle.data), dtype=self.dtype, count=math.prod(self.shape)
        )
        return flat.reshape(self.shape)


def _shown(value: object) -> str:
    """``repr(value)``, shortened: an ``initial=`` may be a large array or list."""
    shorten = reprlib.Repr()
    shorten.maxother = 60
    return shorten.repr(value)


def _numpy_objects(np: Any, dtype: Any) -> Any:
    """``dtype`` with every leaf field made ``object`` (same names and sub-array shapes)."""
    if dtype.names is not None:
        return np.dtype([(f, _numpy_objects(np, dtype.fields[f][0])) for f in dtype.names])
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((_numpy_objects(np, base), shape))
    return np.dtype(object)


def _numpy_misfit(np: Any, src: Any, dtype: Any) -> str | None:  # noqa: PLR0911
    """Why array ``src`` would change when cast to ``dtype``; ``None`` if it fits.

    numpy casts without a word (300 into a uint8 is 44, 2.7 into an int is 2,
    1e39 into a float32 is inf); a segment refuses those values as
    ``struct.pack`` does for the scalar kinds. Rounding to a narrower float is
    fine. Kinds other than numbers (bool, text, dates) keep numpy's rules.
    """
    if src.dtype == dtype or src.size == 0:
        return None
    if dtype.names is not None:
        for field in dtype.names:
            why = _numpy_misfit(np, src[field], dtype.fields[field][0].base)
            if why is not None:
                return f"field {field!r}: {why}"
        return None
    kind = dtype.kind
    if kind not in "iufc":
        return None
    if src.dtype.kind == "O":  # ints beyond 64 bits, mixed lists: item by item
        return _numpy_objects_misfit(np, src, dtype)
    if np.can_cast(src.dtype, dtype, casting="safe"):
        return None
    if src.dtype.kind not in ("iufc" if kind == "c" else "iuf"):
        return f"it holds {src.dtype} values, not numbers {dtype} can hold"
    if kind in "iu":
        if src.dtype.kind == "f":
            if not np.isfinite(src).all():
                return "it holds inf or nan, which no integer type can hold"
            if (np.trunc(src) != src).any():
                return "it holds numbers with a fraction, which an integer type would cut off"
        info = np.iinfo(dtype)
        low, high = int(src.min()), int(src.max())
        if low < info.min or high > info.max:
            return (
                f"its values run from {low} to {high}, but {dtype} holds {info.min} to {info.max}"
            )
        return None
    with np.errstate(over="ignore"):
        cast = src.astype(dtype)
    if (np.isinf(cast) & np.isfinite(src)).any():
        return f"it holds numbers beyond the range of {dtype} (they would become inf)"
    return None


def _numpy_objects_misfit(np: Any, src: Any, dtype: Any) -> str | None:
    if dtype.kind not in "iu":
        number_type = numbers.Complex if dtype.kind == "c" else numbers.Real
        for item in src.flat:
            if not isinstance(item, number_type):
                return f"it holds {item!r}, which is not a number {dtype} can hold"
        try:
            wide = src.astype(np.complex128 if dtype.kind == "c" else np.float64)
        except (TypeError, ValueError, OverflowError) as exc:
            return f"it holds a value that is no {dtype} ({exc})"
        return _numpy_misfit(np, wide, dtype)
    info = np.iinfo(dtype)
    for item in src.flat:
        number = item
        if isinstance(item, float | np.floating) and float(item).is_integer():
            number = int(item)
        elif isinstance(item, np.bool_):
            number = bool(item)
        try:
            number = operator.index(number)
        except TypeError:
            return f"it holds {item!r}, which is not an integer"
        if not info.min <= number <= info.max:
            return f"it holds {number}, but {dtype} holds {info.min} to {info.max}"
    return None


def numpy_dtype(kind: object, shape: object = None) -> Any:
    """``numpy.dtype(kind)`` if ``kind`` is a numpy dtype or scalar type, or
    (with ``shape=``) anything else ``numpy.dtype()`` accepts (``"f8"``,
    ``"<i4"``, a list of fields); else ``None``."""
    np: Any = sys.modules.get("numpy")
    spelled = shape is not None and isinstance(kind, str | list)
    if np is None:
        if not spelled:
            return None  # a numpy kind implies numpy was imported by the caller
        try:
            import numpy

            np = numpy
        except ImportError:
            raise TypeError(
                f"a dtype given as {kind!r} with shape= needs numpy, which is not "
                "installed: pip install numpy (or procshare[numpy])"
            ) from None
    if isinstance(kind, np.dtype):
        return kind
    if isinstance(kind, type) and issubclass(kind, np.generic):
        return np.dtype(kind)
    if spelled:
        try:
            return np.dtype(kind)
        except (TypeError, ValueError):
            return None  # not a dtype either: the caller says what is supported
    return None


def _shape(name: str, shape: object) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise TypeError(
            f"shape= for shared segment {name!r} must be an int or a tuple of ints >= 0, "
            f"not {shape!r}"
        )
    return shape


def resolve_numpy(name: str, dtype: Any, shape: object) -> NumpyKind:
    if shape is None:
        raise TypeError(
            f"a numpy kind needs shape= (ps.shared({name!r}, numpy.{dtype.name}, shape=(10,))); "
            "use shape=() for a single element"
        )
    dims = _shape(name, shape)
    if dtype.hasobject:
        from procshare._kinds import _unsupported  # (the package imports this module)

        raise _unsupported(dtype, "numpy object arrays hold pointers into one process")
    if dtype.subdtype is not None:  # ("f8", (3,)): fold the sub-array into the shape
        dtype, sub = dtype.subdtype
        dims = dims + tuple(sub)
    descr = dtype.str if dtype.fields is None else repr(dtype.descr)
    size = dtype.itemsize * math.prod(dims)
    shown = "x".join(map(str, dims)) or "scalar"
    return NumpyKind(
        name,
        dtype,
        dims,
        Layout(f"ndarray[{descr}]{dims}", f"numpy {dtype.name}[{shown}]", size),
    )
