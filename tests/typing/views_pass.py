"""A user program that must pass ``mypy --strict`` with the types it asserts.

tests/test_typing.py type-checks it (every ``assert_type`` must hold, and no
other error may appear) and then runs it, so the types claimed here are also
what the program gets at run time.
"""

from __future__ import annotations

import ctypes
from typing import Annotated, Any, assert_type

import attrs
import numpy as np
import numpy.typing as npt

import procshare as ps


@attrs.define
class Stats:
    count: int
    errors: Annotated[int, ps.u32]
    mean: float

    def failure_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int32), ("y", ctypes.c_double)]


def add(total: ps.ScalarView[int], n: int) -> int:
    total.value += n
    return total.value  # an int, not Any: no "Returning Any" under --strict


def fixed_width_kinds() -> None:
    assert_type(ps.u64, ps.Scalar[int])
    assert_type(ps.f32, ps.Scalar[float])
    for kind in (ps.i8, ps.i16, ps.i32, ps.i64, ps.u8, ps.u16, ps.u32, ps.u64):
        assert_type(kind, ps.Scalar[int])
        with ps.shared("n", kind) as n:
            assert_type(n, ps.ScalarView[int])
            assert_type(n.value, int)
            n.value += 1
            assert isinstance(n, ps.ScalarView)
            assert n.value == 1
    for fkind in (ps.f32, ps.f64):
        with ps.shared("x", fkind, initial=1) as x:  # an int is a fine float
            assert_type(x.value, float)
            x.value = x.value / 2
            assert x.value == 0.5


def builtin_kinds() -> None:
    with ps.shared("i", int, initial=3) as i, ps.shared("f", float) as f:
        assert_type(i, ps.ScalarView[int])
        assert_type(f, ps.ScalarView[float])
        f.value = i.value * 1.5
        assert add(i, 2) == 5
    with ps.shared("b", bool) as b:
        assert_type(b.value, bool)
        b.value = not b.value
        assert b.value is True


def unparameterized(seg: ps.Segment) -> None:
    # A bare ps.Segment, as written before views were typed: its view is Any.
    assert_type(seg.view, Any)


def handles() -> None:
    seg = ps.shared("h", ps.u16, create=True, persist=False, mode=0o600)
    assert_type(seg, ps.Segment[ps.ScalarView[int]])
    assert_type(seg.view.value, int)
    unparameterized(seg)
    seg.close()


def nameless_kinds() -> None:
    with ps.shared(ps.u64) as total:
        assert_type(total, ps.ScalarView[int])
        assert add(total, 4) == 4
    with ps.shared(float, initial=2.5) as half, ps.shared(bool) as flag:
        assert_type(half.value, float)
        assert_type(flag.value, bool)
    with ps.shared(Stats) as anon_stats:
        assert_type(anon_stats, Stats)
        anon_stats.count += 1
    with ps.shared(bytes, size=8) as anon_blob:
        assert_type(anon_blob, memoryview)
    with ps.shared(np.int32, shape=4) as anon_arr:
        assert_type(anon_arr, npt.NDArray[np.int32])


def struct_kind() -> None:
    with ps.shared("stats", Stats, initial=Stats(0, 0, 0.0)) as stats:
        assert_type(stats, Stats)
        stats.count += 1
        stats.errors = stats.count * 2
        stats.mean = 2.5
        assert_type(stats.mean, float)
        assert (stats.count, stats.errors, stats.mean) == (1, 2, 2.5)
        assert_type(stats.failure_rate(), float)
        assert stats.failure_rate() == 2.0  # the class's method, on shared memory
        assert isinstance(stats, Stats)


def numpy_kinds() -> None:
    with ps.shared("grid", np.float64, shape=(3, 4)) as grid:
        assert_type(grid, npt.NDArray[np.float64])
        grid[1, :] = 7.0
        assert float(grid.sum()) == 28.0
    with ps.shared("counts", np.dtype(np.uint8), shape=3, initial=[1, 2, 3]) as counts:
        assert_type(counts, npt.NDArray[np.uint8])
    with ps.shared("spelled", "f8", shape=2) as spelled:
        assert_type(spelled, npt.NDArray[Any])
        assert spelled.dtype == np.float64


def bytes_kind() -> None:
    with ps.shared("blob", bytes, size=16, initial=b"hello") as blob:
        assert_type(blob, memoryview)
        blob[0:5] = b"HELLO"
        assert bytes(blob[:5]) == b"HELLO"


def ctypes_kinds() -> None:
    with ps.shared("c16", ctypes.c_uint16, initial=7) as c16:
        assert_type(c16, ps.ScalarView[int])
        assert c16.value == 7
    with ps.shared("cd", ctypes.c_double) as cd:
        assert_type(cd.value, float)
    with ps.shared("cld", ctypes.c_longdouble) as cld:  # (served by ctypes, not the C path)
        assert_type(cld, ps.ScalarView[float])
        assert isinstance(cld, ps.ScalarView)
    with ps.shared("row", ctypes.c_int16 * 4) as row:
        assert_type(row, ctypes.Array[ctypes.c_int16])
        row[3] = 5
        assert list(row) == [0, 0, 0, 5]
    with ps.shared("point", Point) as point:
        assert_type(point, Point)  # its fields are Any in typeshed: checked at run time
        point.x += 1
        assert point.x == 1


def after_the_block() -> None:
    with ps.shared("gone", ps.u64) as gone:
        pass
    try:
        gone.value += 1
    except ps.SegmentClosed:
        pass
    else:
        raise AssertionError("a closed view must raise SegmentClosed")


with ps.namespace():
    fixed_width_kinds()
    builtin_kinds()
    handles()
    nameless_kinds()
    struct_kind()
    numpy_kinds()
    bytes_kind()
    ctypes_kinds()
    after_the_block()
