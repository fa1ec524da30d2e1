"""ps.shared: every kind, initial values, layout checks, views after the block."""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys
import textwrap
from typing import Annotated

import attrs
import numpy as np
import pytest

import procshare as ps
from shared_support import run_in_child

# --------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize(
    ("kind", "size", "lo", "hi"),
    [
        (ps.i8, 1, -(2**7), 2**7 - 1),
        (ps.i16, 2, -(2**15), 2**15 - 1),
        (ps.i32, 4, -(2**31), 2**31 - 1),
        (ps.i64, 8, -(2**63), 2**63 - 1),
        (ps.u8, 1, 0, 2**8 - 1),
        (ps.u16, 2, 0, 2**16 - 1),
        (ps.u32, 4, 0, 2**32 - 1),
        (ps.u64, 8, 0, 2**64 - 1),
        (int, 8, -(2**63), 2**63 - 1),
    ],
)
def test_integer_kinds_hold_their_whole_range_and_refuse_more(
    kind: object, size: int, lo: int, hi: int
) -> None:
    with ps.shared("n", kind) as seg_view:
        assert seg_view.value == 0  # a new segment is zeroed
        seg_view.value = hi
        assert seg_view.value == hi
        seg_view.value = lo
        assert seg_view.value == lo
        with pytest.raises(ValueError, match="cannot hold"):
            seg_view.value = hi + 1
        with pytest.raises(ValueError, match="cannot hold"):
            seg_view.value = lo - 1
        assert seg_view.value == lo  # a refused write changes nothing
    seg = ps.shared("n", kind)
    try:
        assert seg.size == size
    finally:
        seg.close()


def test_float_kinds() -> None:
    with ps.shared("f", float) as f, ps.shared("g", ps.f32) as g, ps.shared("h", ps.f64) as h:
        f.value = 0.1
        g.value = 0.1
        h.value = 1e300
        assert f.value == 0.1
        assert g.value == pytest.approx(0.1, rel=1e-7)
        assert g.value != 0.1  # really stored as 32 bits
        assert h.value == 1e300
        with pytest.raises(TypeError, match="cannot hold"):
            f.value = "x"


def test_f32_refuses_a_finite_value_it_would_store_as_inf() -> None:
    @attrs.define
    class Sample:
        level: ps.f32  # type: ignore[valid-type]

    biggest = float(np.finfo(np.float32).max)
    with ps.shared("f", ps.f32) as f, ps.shared("c", ctypes.c_float) as c:
        with ps.shared("s", Sample) as s:
            for seg_view, attr in ((f, "value"), (c, "value"), (s, "level")):
                setattr(seg_view, attr, 1.5)
                for too_big in (1e39, -1e39, 10**400):
                    with pytest.raises(ValueError, match="cannot hold"):
                        setattr(seg_view, attr, too_big)
                assert getattr(seg_view, attr) == 1.5  # a refused write changes nothing
                setattr(seg_view, attr, biggest)
                assert getattr(seg_view, attr) == biggest
                setattr(seg_view, attr, float("-inf"))  # inf and nan are f32 values
                assert getattr(seg_view, attr) == float("-inf")
                setattr(seg_view, attr, float("nan"))
                assert math.isnan(getattr(seg_view, attr))
                with pytest.raises(TypeError, match="cannot hold"):
                    setattr(seg_view, attr, "x")


def test_bool_kind() -> None:
    with ps.shared("b", bool) as b:
        assert b.value is False
        b.value = True
        assert b.value is True


def test_scalar_written_in_a_child_is_seen_by_the_parent() -> None:
    with ps.shared("sum", ps.u64) as total:

        def child() -> int:
            with ps.shared("sum", ps.u64) as mine:
                mine.value += 41
                return int(mine.value)

        assert run_in_child(child) == 41
        total.value += 1
        assert total.value == 42


def test_int_and_i64_and_c_int64_are_one_layout() -> None:
    with ps.shared("x", int, initial=7) as a:
        with ps.shared("x", ps.i64) as b, ps.shared("x", ctypes.c_int64) as c:
            assert b.value == c.value == 7
            c.value = 8
        assert a.value == 8


def test_repr_of_kinds_and_views() -> None:
    assert repr(ps.u64) == "procshare.u64"
    with ps.shared("r", ps.u8, initial=3) as r:
        assert "u8" in repr(r)
        assert "value=3" in repr(r)
    assert "closed" in repr(r)


# --------------------------------------------------------------------------
# ctypes


class Point(ctypes.Structure):
    _fields_ = (("x", ctypes.c_int32), ("y", ctypes.c_double), ("tags", ctypes.c_uint8 * 4))


def test_ctypes_scalars_are_served_like_numbers() -> None:
    with ps.shared("c", ctypes.c_uint16, initial=65535) as c:
        assert c.value == 65535
        with pytest.raises(ValueError, match="cannot hold"):
            c.value = 65536
        with ps.shared("c", ps.u16) as same:
            assert same.value == 65535


def test_ctypes_structure_attributes_live_in_shared_memory() -> None:
    with ps.shared("p", Point, initial=Point(1, 2.5)) as p:
        assert (p.x, p.y) == (1, 2.5)

        def child() -> None:
            with ps.shared("p", Point) as q:
                q.x += 10
                q.tags[2] = 9

        run_in_child(child)
        assert p.x == 11
        assert list(p.tags) == [0, 0, 9, 0]
        assert "Point" in repr(p)


def test_ctypes_array_items() -> None:
    kind = ctypes.c_int16 * 5
    with ps.shared("a", kind, initial=[1, 2, 3]) as a:
        assert len(a) == 5
        assert list(a) == [1, 2, 3, 0, 0]
        a[4] = -7
        assert a[4] == -7
        assert a[1:3] == [2, 3]


def test_ctypes_union_and_long_double() -> None:
    class U(ctypes.Union):
        _fields_ = (("i", ctypes.c_uint32), ("f", ctypes.c_float))

    with ps.shared("u", U) as u:
        u.f = 1.0
        assert u.i == 0x3F800000
    with ps.shared("ld", ctypes.c_longdouble, initial=1.5) as ld:
        assert ld.value == 1.5


@pytest.mark.parametrize(
    "kind",
    [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.py_object],
)
def test_ctypes_pointers_are_refused(kind: object) -> None:
    with pytest.raises(TypeError, match="pointer"):
        ps.shared("ptr", kind)


def test_a_structure_holding_a_pointer_is_refused() -> None:
    class Node(ctypes.Structure):
        _fields_ = (("value", ctypes.c_int), ("next", ctypes.c_void_p))

    with pytest.raises(TypeError, match="pointer"):
        ps.shared("node", Node)


# --------------------------------------------------------------------------
# attrs structs


@attrs.define
class Counter:
    count: int
    hits: ps.u32  # type: ignore[valid-type]
    ratio: Annotated[float, ps.f32]
    done: bool = False
    small: ctypes.c_int8 = 0  # type: ignore[valid-type, assignment]


def test_attrs_class_is_a_shared_struct() -> None:
    with ps.shared("c", Counter, initial=Counter(3, 4, 0.5, True, -2)) as c:
        assert (c.count, c.hits, c.ratio, c.done, c.small) == (3, 4, 0.5, True, -2)
        c.count += 1

        def child() -> None:
            with ps.shared("c", Counter) as mine:
                mine.count += 10
                mine.hits = 2**32 - 1

        run_in_child(child)
        assert c.count == 14
        assert c.hits == 2**32 - 1
        with pytest.raises(ValueError, match=r"field 'hits'"):
            c.hits = -1
        with pytest.raises(AttributeError):
            c.nonexistent = 1
        assert "count=14" in repr(c)


def test_attrs_struct_has_c_layout_and_matches_an_equal_ctypes_structure() -> None:
    class CCounter(ctypes.Structure):
        _fields_ = (
            ("count", ctypes.c_int64),
            ("hits", ctypes.c_uint32),
            ("ratio", ctypes.c_float),
            ("done", ctypes.c_bool),
            ("small", ctypes.c_int8),
        )

    seg = ps.shared("c", Counter)
    try:
        assert seg.size == ctypes.sizeof(CCounter)
        seg.view.count = 5
        seg.view.small = 3
        with ps.shared("c", CCounter) as same:
            assert (same.count, same.small) == (5, 3)
    finally:
        seg.close()


def test_attrs_field_of_another_kind_is_a_type_error() -> None:
    @attrs.define
    class Bad:
        name: str

    with pytest.raises(TypeError, match=r"field 'name'.*Supported kinds"):
        ps.shared("bad", Bad)


def test_attrs_initial_must_be_an_instance() -> None:
    with pytest.raises(TypeError, match="Counter instance"):
        ps.shared("c", Counter, initial={"count": 1})


# --------------------------------------------------------------------------
# numpy and bytes


def test_numpy_array_is_zero_copy_and_a_child_write_is_seen() -> None:
    with ps.shared("arr", np.float64, shape=(4, 3)) as arr:
        assert isinstance(arr, np.ndarray)
        assert arr.shape == (4, 3)
        assert arr.dtype == np.float64
        assert not arr.any()

        def child() -> None:
            with ps.shared("arr", np.dtype("float64"), shape=(4, 3)) as mine:
                mine[2, 1] = 7.5
                mine[0] += 1

        run_in_child(child)
        assert arr[2, 1] == 7.5
        assert arr[0].tolist() == [1.0, 1.0, 1.0]
        # zero-copy: a second view in this process sees writes at once
        with ps.shared("arr", np.float64, shape=(4, 3)) as again:
            again[3, 2] = -1
            assert arr[3, 2] == -1
            assert np.shares_memory(arr, arr)
            assert arr.base is not None


def test_numpy_initial_broadcasts_and_structured_dtypes_work() -> None:
    dt = np.dtype([("x", "<i4"), ("y", "<f8")])
    with ps.shared("s", dt, shape=3, initial=np.array((1, 2.0), dtype=dt)) as s:
        assert s["x"].tolist() == [1, 1, 1]
    with ps.shared("i", np.int32, shape=(2, 2), initial=[[1, 2], [3, 4]]) as i:
        assert i.sum() == 10
    with pytest.raises(TypeError, match="broadcasts"):
        ps.shared("j", np.int32, shape=(2, 2), initial=[1, 2, 3])


def test_numpy_kind_needs_a_shape_and_refuses_objects() -> None:
    with pytest.raises(TypeError, match="shape="):
        ps.shared("n", np.float64)
    with pytest.raises(TypeError, match="pointers"):
        ps.shared("n", np.dtype(object), shape=2)
    with pytest.raises(TypeError, match="shape="):
        ps.shared("n", np.float64, shape=(2, -1))


def test_bytes_with_size_is_a_writable_memoryview() -> None:
    with ps.shared("blob", bytes, size=64, initial=b"hello") as blob:
        assert isinstance(blob, memoryview)
        assert len(blob) == 64
        assert not blob.readonly
        assert bytes(blob[:6]) == b"hello\0"

        def child() -> None:
            with ps.shared("blob", bytes, size=64) as mine:
                mine[0:5] = b"HELLO"

        run_in_child(child)
        assert bytes(blob[:5]) == b"HELLO"
    with pytest.raises(TypeError, match="size="):
        ps.shared("blob", bytes)
    with pytest.raises(ValueError, match="at most"):
        ps.shared("blob", bytes, size=2, initial=b"abc")


# --------------------------------------------------------------------------
# unsupported kinds and options


@pytest.mark.parametrize("kind", [object, str, list, "u64", 3, None, complex])
def test_unsupported_kinds_list_what_is_supported(kind: object) -> None:
    with pytest.raises(TypeError, match=r"Supported kinds: int, float, bool.*numpy.*bytes"):
        ps.shared("x", kind)


def test_shape_and_size_only_with_their_kinds() -> None:
    with pytest.raises(TypeError, match="shape= goes with a numpy dtype"):
        ps.shared("x", int, shape=3)
    with pytest.raises(TypeError, match="size= goes with kind bytes"):
        ps.shared("x", int, size=3)


def test_bad_initial_is_refused_before_anything_is_created() -> None:
    with pytest.raises(TypeError, match="does not fit"):
        ps.shared("x", ps.u8, initial=300)
    with pytest.raises(TypeError, match="cannot be stored"):
        ps.shared("p", Point, initial="nope")
    with pytest.raises(ps.SegmentNotFound):
        ps.shared("x", ps.u8, create=False)


class Small(ctypes.Structure):
    _fields_ = (("x", ctypes.c_uint8), ("y", ctypes.c_int16), ("bits", ctypes.c_uint32, 3))


class Tagged(Small):
    _fields_ = (("tags", ctypes.c_uint8 * 2),)


_PAIR = np.dtype([("x", "u1"), ("y", "<f4")])


@pytest.mark.parametrize(
    ("kind", "shape", "initial"),
    [
        (np.uint8, 3, [300, 1, 2]),
        (np.uint8, 3, [-1, 0, 0]),
        (np.int64, 3, [1.5, 2.7, 3.9]),
        (np.int64, 2, [2**63, 0]),
        (np.int64, 2, [2**70, 1]),  # a numpy object array
        (np.uint64, 1, [2.0**64]),
        (np.int16, 2, np.array([1.0, float("nan")])),
        (np.int32, 2, np.array([2**40, 1])),
        (np.int32, 2, ["1", "2"]),
        (np.float32, 2, [1e39, 0.0]),
        (np.float16, 1, np.array([1e5])),
        (np.float64, 1, [1 + 2j]),
        (_PAIR, 2, [(300, 1.0), (1, 1.0)]),
        (_PAIR, 1, np.array([(1, 1e39)], dtype=[("x", "<i8"), ("y", "<f8")])),
        (np.int32, (2, 2), [1, 2, 3]),
    ],
)
def test_numpy_initial_that_does_not_fit_is_a_type_error(
    kind: object, shape: object, initial: object
) -> None:
    with pytest.raises(
        TypeError, match=r"initial=.* does not fit shared segment 'a' of kind numpy"
    ):
        ps.shared("a", kind, shape=shape, initial=initial).close()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "initial"),
    [
        (ctypes.c_uint8 * 3, [300, -1, 2]),
        (ctypes.c_uint8 * 3, [1, -1, 2]),
        (ctypes.c_int * 3, [1, 2, 3, 4]),
        (ctypes.c_int64 * 1, [2**70]),
        (ctypes.c_float * 2, [1e39, 0.0]),
        (ctypes.c_int32.__ctype_be__, 2**40),  # served by ctypes, not as a ps.i32
        (Small, (256, 1)),
        (Small, (1, 70000)),
        (Small, (1, 1, 8)),  # a 3-bit field
        (Tagged, (1, 2, 3, (4, 256))),  # base class fields first, then a nested array
        ((ctypes.c_int8 * 2) * 2, [(1, 2), (3, 128)]),
    ],
)
def test_ctypes_initial_that_does_not_fit_is_a_type_error(kind: object, initial: object) -> None:
    with pytest.raises(TypeError, match=r"shared segment 'a'.*initial=.* cannot be stored as"):
        ps.shared("a", kind, initial=initial).close()


def test_initial_values_that_fit_are_stored_as_given() -> None:
    with ps.shared("a", np.uint8, shape=3, initial=[255, 0, 7]) as a:
        assert a.tolist() == [255, 0, 7]
    with ps.shared("b", np.int64, shape=2, initial=[2.0, -(2.0**63)]) as b:
        assert b.tolist() == [2, -(2**63)]
    with ps.shared("c", np.float32, shape=3, initial=[0.1, float("inf"), float("nan")]) as c:
        assert c[0] == np.float32(0.1)  # rounding to f32 is not a misfit
        assert c[1] == float("inf")
        assert np.isnan(c[2])
    with ps.shared("d", _PAIR, shape=1, initial=[(255, 0.1)]) as d:
        assert d["x"].tolist() == [255]
    with ps.shared("e", ctypes.c_uint8 * 3, initial=[255, 0]) as e:
        assert list(e) == [255, 0, 0]
    with ps.shared("f", Tagged, initial=(255, -(2**15), 7, (1, 2))) as f:
        assert (f.x, f.y, f.bits, list(f.tags)) == (255, -(2**15), 7, [1, 2])
    with ps.shared("g", ctypes.c_float * 2, initial=[float("inf"), 0.1]) as g:
        assert g[0] == float("inf")


# --------------------------------------------------------------------------
# the segment records what it holds


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"kind": ps.u64}, {"kind": ps.i64}),
        ({"kind": int}, {"kind": float}),
        ({"kind": np.float64, "shape": (3,)}, {"kind": np.float64, "shape": (4,)}),
        ({"kind": np.float64, "shape": (3,)}, {"kind": np.float32, "shape": (3,)}),
        ({"kind": bytes, "size": 16}, {"kind": bytes, "size": 32}),
        ({"kind": Point}, {"kind": ctypes.c_int32 * 6}),
        ({"kind": Counter}, {"kind": ps.u64}),
    ],
)
def test_attaching_with_another_kind_raises_shared_type_error(
    first: dict[str, object], second: dict[str, object]
) -> None:
    with ps.shared("t", **first) as _:  # type: ignore[arg-type]
        with pytest.raises(ps.SharedTypeError) as info:
            ps.shared("t", **second)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, TypeError)
    assert err.expected
    assert err.found
    assert err.expected != err.found
    assert err.found in str(err)
    assert err.expected in str(err)


def test_shared_type_error_names_both_layouts_of_structs() -> None:
    @attrs.define
    class Other:
        count: ps.u32  # type: ignore[valid-type]

    with ps.shared("c", Counter):
        with pytest.raises(ps.SharedTypeError, match=r"struct Counter.*struct Other") as info:
            ps.shared("c", Other)
    assert "count:i64@0" in info.value.found


# --------------------------------------------------------------------------
# views after the block


def test_scalar_struct_and_ctypes_views_raise_segment_closed_after_the_block() -> None:
    with ps.shared("a", int) as a, ps.shared("b", Counter) as b, ps.shared("p", Point) as p:
        pass
    with pytest.raises(ps.SegmentClosed):
        _ = a.value
    with pytest.raises(ps.SegmentClosed):
        a.value = 1
    with pytest.raises(ps.SegmentClosed):
        _ = b.count
    with pytest.raises(ps.SegmentClosed):
        b.count = 2
    with pytest.raises(ps.SegmentClosed):
        _ = p.x
    with pytest.raises(ps.SegmentClosed):
        p.x = 3
    seg = ps.shared("a", int)
    seg.close()
    seg.close()  # idempotent
    with pytest.raises(ps.SegmentClosed, match="'a'"):
        _ = seg.view


def test_writing_to_a_closed_view_raises_the_same_segment_closed_as_reading() -> None:
    with ps.shared("a", int) as a, ps.shared("b", Counter) as b:
        pass
    for read, write in (
        (lambda: a.value, lambda: setattr(a, "value", 5)),
        (lambda: b.count, lambda: setattr(b, "count", 5)),
        (lambda: b.ratio, lambda: setattr(b, "ratio", 1.5)),  # an f32 field
    ):
        with pytest.raises(ps.SegmentClosed) as on_read:
            read()
        with pytest.raises(ps.SegmentClosed) as on_write:
            write()
        assert on_write.value.name == on_read.value.name in ("a", "b")
        assert str(on_write.value) == str(on_read.value)


def test_a_closed_ctypes_view_reaches_nothing_through_its_field_names() -> None:
    class Record(ctypes.Structure):
        _fields_ = (("name", ctypes.c_int), ("count", ctypes.c_int), ("_raise", ctypes.c_int))

    with ps.shared("rec", Record) as rec:
        rec.name = 7
        assert rec.name == 7
    for attr in ("name", "count", "_raise", "missing"):
        with pytest.raises(ps.SegmentClosed, match="'rec'"):
            getattr(rec, attr)
        with pytest.raises(ps.SegmentClosed, match="'rec'"):
            setattr(rec, attr, 99)
    with pytest.raises(ps.SegmentClosed):
        _ = rec.name  # the refused write above changed nothing it could reach
    assert "closed" in repr(rec)


def test_numpy_arrays_and_memoryviews_keep_working_after_the_block() -> None:
    # In a subprocess: if this were wrong, the process would die by SIGSEGV.
    code = textwrap.dedent(
        """
        import gc, os, numpy as np, procshare as ps
        with ps.shared("arr", np.int64, shape=1000, initial=1) as arr:
            pass
        with ps.shared("blob", bytes, size=4096) as blob:
            pass
        owner = ps.shared("att", np.int64, shape=10)
        with ps.shared("att", np.int64, shape=10) as att:  # attached, not created
            pass
        owner.close()
        gc.collect()
        att[:] = 5
        assert att.sum() == 50
        arr[:] += 1
        blob[0:3] = b"abc"
        assert arr.sum() == 2000, arr.sum()
        assert bytes(blob[:3]) == b"abc"
        prefix = ps._engine.names.namespace_prefix()
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix[1:])]
        print("alive")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "alive"


def test_a_ctypes_view_refuses_to_be_copied_or_pickled() -> None:
    import copy
    import pickle

    class Point(ctypes.Structure):
        _fields_ = [("x", ctypes.c_int32), ("y", ctypes.c_int32)]

    with ps.shared("pt", Point) as view:
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be copied or pickled"):
                attempt(view)
