"""Views over segment memory: what ``with ps.shared(...) as view`` gives.

* :class:`ScalarView` (``int``, ``float``, ``bool``, ``ps.i8`` ... ``ps.f64``,
  ctypes scalars): ``.value`` is a C descriptor (``_cview.c``) that reads and
  writes the number in place, as fast as a ctypes value's; whatever it does
  not handle itself (a closed view, a value out of range or of another type)
  goes to the Python reference path, a cached ``memoryview.cast``.
* struct views (attrs classes): one property per field, generated once per
  class, each reading its own one-element ``memoryview.cast``; a subclass of
  the attrs class itself when it is slotted.
* :class:`NativeView` (ctypes ``Structure``, ``Union``, arrays) forwards
  attributes and items to a ctypes object living in the segment (built by
  the backend: the front end never imports ctypes); :class:`NativeScalarView`
  is the ScalarView of a ctypes scalar no number kind describes.

When the segment closes these views drop their memory and every later use
raises :class:`~procshare.SegmentClosed`: the closed sentinel takes the place
of the memoryview, so the Python paths carry no "is it closed?" test (the C
one tests its pointer, which closing sets to NULL).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

from procshare._cview import ScalarCell
from procshare.errors import SegmentClosed

T = TypeVar("T")


def not_picklable(what: str, name: str) -> TypeError:
    """The error for pickling (or copying) a view or a segment handle."""
    return TypeError(
        f"{what} of shared segment {name!r} cannot be copied or pickled: it is this "
        "process's mapping of the shared memory, and a copy would no longer be shared. "
        f"Pass the name instead (the receiver opens it with ps.shared({name!r}, kind)), "
        "open it before forking (@ps.forked children inherit open views), or send a copy "
        "of the values (view.value)"
    )


class _Closed:
    """Stands in for a closed view's memory; every use raises SegmentClosed.

    Reading, writing or deleting *any* attribute raises too, its own slot
    included: a NativeView forwards every attribute name of the user's ctypes
    type here, so nothing of this object may be reachable by name (a field
    called ``name`` must not read the segment's name). Its own code reads the
    slot with ``object.__getattribute__``.
    """

    __slots__ = ("_ps_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_ps_name", name)

    def _raise(self, *args: object) -> NoReturn:
        raise SegmentClosed(object.__getattribute__(self, "_ps_name"))

    __getitem__ = __setitem__ = __len__ = __iter__ = _raise
    __getattribute__ = __setattr__ = __delattr__ = _raise


def _release(mv: Any) -> None:
    if type(mv) is memoryview:  # (isinstance would ask a closed stand-in, which raises)
        try:  # noqa: SIM105 - every close: contextlib costs page faults in a forked child
            mv.release()
        except BufferError:
            pass


def _value_error(name: str, kind: str, value: object, exc: Exception) -> Exception:
    # A value of the wrong type stays a TypeError; out of range (memoryview's
    # ValueError, struct's OverflowError for f32) is a ValueError.
    cls = TypeError if isinstance(exc, TypeError) else ValueError
    return cls(
        f"shared segment {name!r} holds a {kind}, which cannot hold {value!r} ({exc}); "
        "store a value in the kind's range, or create the segment with a wider kind"
    )


_pack_f32 = struct.Struct("=f").pack


def _check_f32(name: str, kind: str, value: object) -> None:
    """Refuse a finite number too large for an f32 (``ValueError``).

    A ``memoryview.cast("f")`` store turns it into inf without a word;
    struct's packer refuses exactly those values (those the cast to C
    ``float`` makes infinite) and lets inf and nan through.
    """
    try:
        _pack_f32(value)
    except OverflowError as exc:
        raise _value_error(name, kind, value, exc) from None
    except struct.error:
        pass  # not a number: the store itself raises TypeError (or SegmentClosed)


def _refuse_pickle(segment: object, name: str) -> NoReturn:
    """A view is the shared memory itself: it cannot be copied or pickled.

    The segment says why first when it is anonymous (it has no name another
    process could open).
    """
    refuse = getattr(segment, "_ps_refuse_pickle", None)
    if refuse is not None:
        refuse()
    raise not_picklable("a view", name)


class ScalarView(ScalarCell, Generic[T]):
    """A number in shared memory: read and write it as ``.value``.

    What ``ps.shared(name, kind)`` gives for a number kind: a
    ``ScalarView[int]`` for ``int`` and ``ps.i8`` ... ``ps.u64``, a
    ``ScalarView[float]`` for ``float``, ``ps.f32`` and ``ps.f64``, a
    ``ScalarView[bool]`` for ``bool``. Type checkers know ``.value``'s type, so
    annotate a function that takes one as ``def add(total: ps.ScalarView[int])``.

    ``view.value += 1`` is a read then a write, not an atomic increment: guard
    it with ``ps.interprocess_lock`` when several processes update it.
    Storing a value the kind cannot hold (``-1`` in a ``ps.u8``, ``2**64`` in
    an ``int``, ``1e39`` in a ``ps.f32``) raises ``ValueError`` or ``TypeError``;
    nothing wraps around or becomes inf. Once the segment is closed, reading or
    writing raises :class:`~procshare.SegmentClosed`.
    """

    # ``value`` is the C descriptor of ScalarCell (procshare/_cview.c): a read
    # or a write is one C call, as on a ctypes value, instead of two Python
    # calls through a property. It handles the common cases itself and calls
    # _ps_get_slow / _ps_set_slow below for everything else.
    # (_segment, _name, _kind and _mv are ScalarCell's, in C: _cview.scalar_segment
    # builds the by-name open's view there without running __init__.)
    __slots__ = ("__weakref__",)

    value: T  # (an annotation only: the slots class has no attribute to hide the C one)
    """The number, read from shared memory now; assigning stores it there."""

    def __init__(self, segment: object, name: str, kind: str, mv: memoryview) -> None:
        self._segment = segment  # the handle stays open while its view is alive
        self._name = name
        self._kind = kind
        self._mv: Any = mv
        self._ps_attach(mv, mv.format)

    def _ps_get_slow(self) -> Any:
        return self._mv[0]  # a closed view's stand-in raises SegmentClosed

    def _ps_set_slow(self, value: Any) -> None:
        if self._kind == "f32" and type(self._mv) is memoryview:  # (closed: SegmentClosed below)
            _check_f32(self._name, self._kind, value)
        try:
            self._mv[0] = value
        except SegmentClosed:
            raise  # a ValueError too, but about the view, not the value
        except (ValueError, TypeError) as exc:
            raise _value_error(self._name, self._kind, value, exc) from None

    # _ps_invalidate() is ScalarCell's, in C: it drops the buffer, puts a
    # _Closed in place of _mv and releases the memoryview (closing is often a
    # freshly forked child's last step, where each Python call copies pages).

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        _refuse_pickle(self._segment, self._name)

    def __repr__(self) -> str:
        if isinstance(self._mv, _Closed):
            return f"<shared {self._kind} {self._name!r} (closed)>"
        return f"<shared {self._kind} {self._name!r} value={self._mv[0]!r}>"


class NativeScalarView(ScalarView[Any]):
    """A ctypes scalar that no number kind describes (``c_longdouble``,
    ``c_wchar``, a type of the other byte order): ``.value`` is the ctypes
    object's, living in the segment.

    A ScalarView all the same (what type checkers are told a ctypes scalar
    gives): never attached to the C fast path, so every access takes the slow
    path, which here asks the ctypes object. Its values follow ctypes' rules.
    """

    __slots__ = ()

    def __init__(self, segment: object, name: str, kind: str, obj: Any) -> None:
        self._segment = segment
        self._name = name
        self._kind = kind
        self._mv = obj  # the ctypes object (pins the memory while open)

    def _ps_get_slow(self) -> Any:
        return self._mv.value  # a closed view's stand-in raises SegmentClosed

    def _ps_set_slow(self, value: Any) -> None:
        self._mv.value = value

    def _ps_invalidate(self) -> None:
        self._mv = _Closed(self._name)

    def __repr__(self) -> str:
        if isinstance(self._mv, _Closed):
            return f"<shared {self._kind} {self._name!r} (closed)>"
        return f"<shared {self._kind} {self._name!r} value={self._mv.value!r}>"


class StructView:
    """Base of the generated views of attrs classes: one property per field.

    A generated view also derives from the attrs class itself when that class
    is slotted (``attrs.define``'s default): ``isinstance(view, Stats)`` holds
    and the class's methods work on the shared fields, as type checkers are
    told. Equality, hashing and attribute setting stay those of a plain
    object: a view is a handle on memory, and an attrs ``__setattr__``
    (frozen classes, validators on set) must not stand in the way.
    """

    # The slots are the generated class's: two bases with slots of their own
    # (this one and a slotted attrs class) cannot be combined.
    __slots__ = ()
    _ps_fields: ClassVar[tuple[str, ...]] = ()
    _ps_kind: ClassVar[str] = ""
    _ps_segment: object
    _ps_name: str
    _ps_cells: Any

    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    def __init__(self, segment: object, name: str, cells: tuple[memoryview, ...]) -> None:
        self._ps_segment = segment
        self._ps_name = name
        self._ps_cells = cells

    def _ps_invalidate(self) -> None:
        cells, self._ps_cells = self._ps_cells, _Closed(self._ps_name)
        for mv in cells:
            _release(mv)

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        _refuse_pickle(self._ps_segment, self._ps_name)

    def __repr__(self) -> str:
        if isinstance(self._ps_cells, _Closed):
            return f"<shared {self._ps_kind} {self._ps_name!r} (closed)>"
        fields = ", ".join(
            f"{f}={c[0]!r}" for f, c in zip(self._ps_fields, self._ps_cells, strict=True)
        )
        return f"<shared {self._ps_kind} {self._ps_name!r} {fields}>"


def _field_property(index: int, field: str, kind: str) -> property:
    def get(self: StructView) -> Any:
        return self._ps_cells[index][0]

    # Two setters rather than one testing the kind: only f32 fields pay for the check.
    def set(self: StructView, value: Any) -> None:
        try:
            self._ps_cells[index][0] = value
        except SegmentClosed:
            raise  # a ValueError too, but about the view, not the value
        except (ValueError, TypeError) as exc:
            raise _value_error(self._ps_name, f"{kind} field {field!r}", value, exc) from None

    def set_f32(self: StructView, value: Any) -> None:
        if type(self._ps_cells) is tuple:  # (closed: set raises SegmentClosed)
            _check_f32(self._ps_name, f"{kind} field {field!r}", value)
        set(self, value)

    return property(
        get,
        set_f32 if kind == "f32" else set,
        doc=f"Field {field!r} ({kind}), read and written in place.",
    )


def struct_view_class(cls: type, fields: tuple[tuple[str, str], ...]) -> type[StructView]:
    """A StructView subclass with one property per ``(field, kind)`` of attrs class
    ``cls``, and a subclass of ``cls`` too if it is slotted."""
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "_ps_fields": tuple(f for f, _ in fields),
        "_ps_kind": f"struct {cls.__name__}",
        "__doc__": f"Shared view of attrs class {cls.__qualname__}: its fields live in "
        "shared memory.",
    }
    for index, (field, kind) in enumerate(fields):
        namespace[field] = _field_property(index, field, kind)
    name = f"Shared{cls.__name__}"
    slots = ("_ps_cells", "_ps_name", "_ps_segment")
    # A class with a __dict__ would give its views one too, where a misspelt
    # field would be stored without a word: those views stay plain StructViews.
    if not cls.__dictoffset__:
        # (the engine holds views weakly: a weakref slot if the class has none)
        own = slots if cls.__weakrefoffset__ else (*slots, "__weakref__")
        try:
            return type(name, (StructView, cls), {**namespace, "__slots__": own})
        except TypeError:  # the class refuses subclasses (its __init_subclass__)
            pass
    return type(name, (StructView,), {**namespace, "__slots__": (*slots, "__weakref__")})


class NativeView:
    """A ctypes object in shared memory: attributes and items are forwarded.

    Sub-objects read from it (a nested ``Structure`` or array field) are ctypes
    objects sharing the segment's memory: like numpy arrays, they keep the
    memory mapped and keep working after the block ends.
    """

    __slots__ = ("__weakref__", "_ps_kind", "_ps_name", "_ps_obj", "_ps_segment")

    def __init__(self, segment: object, name: str, kind: str, obj: Any) -> None:
        object.__setattr__(self, "_ps_segment", segment)
        object.__setattr__(self, "_ps_name", name)
        object.__setattr__(self, "_ps_kind", kind)
        object.__setattr__(self, "_ps_obj", obj)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_ps_"):  # a slot not set yet: never recurse
            raise AttributeError(attr)
        return getattr(self._ps_obj, attr)

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        _refuse_pickle(self._ps_segment, self._ps_name)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._ps_obj, attr, value)

    def __getitem__(self, index: Any) -> Any:
        return self._ps_obj[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._ps_obj[index] = value

    def __len__(self) -> int:
        return len(self._ps_obj)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._ps_obj)

    def _ps_invalidate(self) -> None:
        object.__setattr__(self, "_ps_obj", _Closed(self._ps_name))

    def __repr__(self) -> str:
        closed = " (closed)" if isinstance(self._ps_obj, _Closed) else ""
        return f"<shared {self._ps_kind} {self._ps_name!r}{closed}>"
