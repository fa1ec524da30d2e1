"""The scalar view's C fast path (procshare/_cview.c) against its Python reference.

``view.value`` is a C descriptor that stores the common values itself and
hands everything else to the Python slow path. Whatever the path, the result
must be what the reference gives: a ``memoryview.cast`` of the kind's format,
plus the f32 range check. Closed views raise ``ps.SegmentClosed`` on both
paths, and closing drops the C side's hold on the mapping.
"""

from __future__ import annotations

import ctypes
import enum
import math
import struct
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import procshare as ps
from procshare import _cview

KINDS: list[tuple[object, str]] = [
    (ps.i8, "b"),
    (ps.i16, "h"),
    (ps.i32, "i"),
    (ps.i64, "q"),
    (ps.u8, "B"),
    (ps.u16, "H"),
    (ps.u32, "I"),
    (ps.u64, "Q"),
    (ps.f32, "f"),
    (ps.f64, "d"),
    (bool, "?"),
    (ctypes.c_char, "c"),  # a kind the C path leaves to the slow path entirely
]


class Small(enum.IntEnum):
    ONE = 1


def _edges() -> list[object]:
    out: list[object] = []
    for bits in (8, 16, 32, 64):
        for base in (2 ** (bits - 1), 2**bits):
            out += [base - 1, base, -base, -base - 1]
    return out


VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(_edges()),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([3.4e38, 3.5e38, -3.5e38, 1e39, 2.0**128, 1e-50, -0.0]),
    st.booleans(),
    st.sampled_from(
        [
            None,
            "text",
            b"x",
            b"xy",
            Small.ONE,  # an int subclass: the slow path
            np.int8(-3),
            np.uint64(2**64 - 1),
            np.float32(1.5),
            Decimal("2.5"),
            Fraction(1, 3),
            10**30,
            -(10**30),
        ]
    ),
)


def _reference(fmt: str, value: object) -> tuple[str, object]:
    """What the view must do: ("ok", stored value) or ("err", exception type)."""
    mv = memoryview(bytearray(struct.calcsize(fmt))).cast(fmt)
    if fmt == "f":
        try:
            struct.pack("=f", value)
        except OverflowError:
            return "err", ValueError
        except struct.error:
            pass
    try:
        mv[0] = value
    except (ValueError, TypeError) as exc:
        return "err", type(exc)
    return "ok", mv[0]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def _raw(seg: ps.Segment[Any], fmt: str) -> object:
    """The number as the memory holds it, read beside the view."""
    return seg._rec.handle.data.cast(fmt)[0]  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(KINDS) - 1), value=VALUES)
def test_every_store_is_what_the_reference_stores_or_refuses(which: int, value: object) -> None:
    kind, fmt = KINDS[which]
    seg: ps.Segment[Any] = ps.shared(kind)  # type: ignore[call-overload]
    try:
        view = seg.view
        before = view.value
        expected = _reference(fmt, value)
        refused: Exception | None = None
        try:
            view.value = value
        except (ValueError, TypeError) as exc:
            refused = exc
        if refused is not None:
            assert expected == ("err", type(refused)), (value, refused)
            assert "cannot hold" in str(refused)  # the slow path's message, whoever refused
            assert _same(view.value, before)  # a refused store changes nothing
        else:
            assert expected[0] == "ok", (value, expected)
            assert _same(view.value, expected[1]), (value, view.value, expected[1])
            assert _same(_raw(seg, fmt), expected[1])  # in the memory, at its width
    finally:
        seg.close()


@pytest.mark.parametrize(("kind", "fmt"), KINDS)
def test_reads_see_writes_made_through_the_memory(kind: object, fmt: str) -> None:
    seg: ps.Segment[Any] = ps.shared(kind)  # type: ignore[call-overload]
    try:
        raw = seg._rec.handle.data.cast(fmt)  # type: ignore[attr-defined]
        sample = {"c": b"z", "?": True, "f": 0.5, "d": -2.25}.get(
            fmt, 17 if fmt.isupper() else -17
        )
        raw[0] = sample
        assert _same(seg.view.value, sample)
        raw.release()
    finally:
        seg.close()


@pytest.mark.parametrize(("kind", "fmt"), KINDS)
def test_a_closed_view_raises_segment_closed_on_both_paths(kind: object, fmt: str) -> None:
    fast = {"c": b"a", "?": True, "f": 1.0, "d": 1.0}.get(fmt, 1)
    with ps.shared("closing", kind) as view:  # type: ignore[call-overload]
        view.value = fast
    for value in (fast, "not a number", 10**30, 1e39):  # the C path's value, then slow ones
        with pytest.raises(ps.SegmentClosed):
            view.value = value
    with pytest.raises(ps.SegmentClosed):
        view.value  # noqa: B018
    with pytest.raises(ps.SegmentClosed):
        view.value += 1
    assert "(closed)" in repr(view)


def test_closing_lets_the_mapping_go_while_the_view_lives() -> None:
    # The C side holds a buffer export of the segment's memory while open; if
    # closing did not drop it, the mapping would stay exported (pinned) for as
    # long as the user keeps the view.
    seg = ps.shared("pinned", ps.u64)
    view = seg.view
    view.value = 5
    mapping = seg._rec.handle.mm  # type: ignore[attr-defined]
    seg.close()
    assert mapping.closed, "the closed view still pins the segment's mapping"
    with pytest.raises(ps.SegmentClosed):
        view.value  # noqa: B018


def test_value_cannot_be_deleted() -> None:
    with ps.shared(ps.u8) as view:
        with pytest.raises(AttributeError, match="cannot delete"):
            del view.value
        assert view.value == 0


def test_the_cell_checks_what_it_attaches_to() -> None:
    cell = _cview.ScalarCell()
    with pytest.raises(ValueError, match="cannot hold"):
        cell._ps_attach(memoryview(bytearray(4)), "Q")
    with pytest.raises(ValueError, match="unsupported"):
        cell._ps_attach(memoryview(bytearray(8)), "x")
    with pytest.raises(ValueError, match="unsupported"):
        cell._ps_attach(memoryview(bytearray(8)), "QQ")
    with pytest.raises(BufferError):
        cell._ps_attach(memoryview(b"readonly"), "Q")
    held = memoryview(bytearray(8))
    cell._ps_attach(held, "Q")
    with pytest.raises(BufferError):
        held.release()  # the cell holds an export while attached
    cell._ps_detach()
    held.release()


@pytest.mark.parametrize(
    ("kind", "initial", "after"),
    [
        (ctypes.c_longdouble, 1.5, 2.5),
        (ctypes.c_uint32.__ctype_be__, 7, 8),  # the other byte order
        (ctypes.c_wchar, "x", "y"),
    ],
)
def test_ctypes_scalars_without_a_number_kind_are_scalar_views_too(
    kind: object, initial: object, after: object
) -> None:
    # What type checkers are told (a ctypes scalar gives a ScalarView) holds
    # for the ctypes scalars the C path cannot read: they go through ctypes.
    with ps.shared("odd", kind, initial=initial) as view:  # type: ignore[call-overload]
        assert isinstance(view, ps.ScalarView)
        assert view.value == initial
        view.value = after
        assert view.value == after
        with ps.shared("odd", kind) as again:  # type: ignore[call-overload]
            assert again.value == after
    with pytest.raises(ps.SegmentClosed):
        view.value  # noqa: B018
    with pytest.raises(ps.SegmentClosed):
        view.value = initial
    assert "(closed)" in repr(view)


def test_a_view_in_a_garbage_cycle_is_collected_while_it_holds_its_buffer() -> None:
    # The view's C part holds an export of its memoryview. The collector must
    # never clear that memoryview first (a memoryview refuses to be released
    # while exported: gc.collect() raised BufferError when the export was
    # visited), whatever holds the view in a cycle without a finalizer.
    import gc

    class Holder:
        view: object = None

    for _ in range(50):
        holder = Holder()
        mv = memoryview(bytearray(8)).cast("Q")
        holder.view = ps.ScalarView(holder, "cycle", "u64", mv)
        del holder, mv
    gc.collect()
