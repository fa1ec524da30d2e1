"""A user program with mistakes that ``mypy --strict`` must report.

Every line marked ``# E: code`` must get an error with that code (one of
``a|b``: which one mypy names for a call no overload accepts depends on the
overload it found closest), and no other line may get one
(tests/test_typing.py). It is never run.
"""

from __future__ import annotations

import ctypes

import attrs
import numpy as np

import procshare as ps


@attrs.define
class Stats:
    count: int
    mean: float


def total_of(name: str) -> str:
    with ps.shared(name, ps.u64) as total:
        return total.value  # E: return-value


def scalars() -> None:
    with ps.shared("n", ps.u64) as n:
        n.valeu = 3  # E: attr-defined
        n.value = "text"  # E: assignment
        n.value = 1.5  # E: assignment
        n.value += 0.5  # E: assignment
        print(n.value.upper())  # E: attr-defined
    with ps.shared("x", float) as x:
        x.value = "1.0"  # E: assignment
    with ps.shared("flag", bool) as flag:
        flag.value = 2  # E: assignment
    ps.shared("i", int, initial="zero")  # E: call-overload|arg-type|type-var
    ps.shared("u", ps.u8, initial=1.5)  # E: call-overload|arg-type|misc


def nameless() -> None:
    with ps.shared(ps.i32) as anon:
        anon.value = None  # E: assignment
    ps.shared(ps.u64, persist=True)  # E: call-overload
    ps.shared(int, mode=0o640)  # E: call-overload


def structs() -> None:
    with ps.shared("stats", Stats) as stats:
        stats.cuont += 1  # E: attr-defined
        stats.mean = "high"  # E: assignment
        stats.value = 1  # E: attr-defined
    ps.shared("stats", Stats, initial=3)  # E: call-overload|arg-type


def other_kinds() -> None:
    with ps.shared("blob", bytes, size=8) as blob:
        blob.value = b"x"  # E: attr-defined
    with ps.shared("grid", np.float64, shape=3) as grid:
        grid.value = 1.0  # E: attr-defined
    with ps.shared("c", ctypes.c_int16) as c:
        c.value = "x"  # E: assignment
    ps.shared("blob", bytes)  # E: call-overload|arg-type
    ps.shared("s", str)  # E: call-overload|arg-type
    ps.shared("d", dict)  # E: call-overload|arg-type


def handles() -> None:
    seg = ps.shared("h", ps.f64)
    seg.view.value = "no"  # E: assignment
    seg.value = 1.0  # E: attr-defined
