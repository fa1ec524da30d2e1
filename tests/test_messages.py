"""Messages that say the fix, for the mistakes people make with segments and locks."""

from __future__ import annotations

import copy
import pickle

import attrs
import numpy as np
import pytest

import procshare as ps


def test_a_bare_lock_decorator_says_to_give_the_name() -> None:
    with pytest.raises(ps.InvalidName) as info:

        @ps.interprocess_lock  # type: ignore[arg-type]
        def job() -> None:
            pass

    assert '@ps.interprocess_lock("name")' in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("spelled", ["f8", "float64", "<f8", np.dtype("f8").str])
def test_a_numpy_dtype_given_as_a_string_is_that_dtype(spelled: str) -> None:
    with ps.shared("arr", spelled, shape=(2, 3)) as arr:
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.float64
        arr[1, 2] = 4.5
        # ... the same segment as the dtype object opens
        with ps.shared("arr", np.float64, shape=(2, 3)) as same:
            assert same[1, 2] == 4.5


def test_a_structured_dtype_given_as_a_list_of_fields() -> None:
    with ps.shared("rec", [("x", "i4"), ("y", "f8")], shape=4) as rec:
        rec["x"][0] = 3
        assert rec.dtype.names == ("x", "y")


def test_a_string_that_is_no_dtype_still_lists_what_is_supported() -> None:
    with pytest.raises(TypeError, match="shape= goes with a numpy dtype"):
        ps.shared("arr", "not-a-dtype", shape=3)


def test_a_segment_used_where_its_view_was_meant_says_so() -> None:
    seg = ps.shared("n", ps.u64)
    try:
        with pytest.raises(AttributeError, match=r"with ps.shared\(\.\.\.\) as view") as info:
            seg.value += 1  # type: ignore[attr-defined]
        assert "segment.view.value" in str(info.value)
        with pytest.raises(AttributeError, match=r"as view"):
            seg.value = 3  # type: ignore[misc]
        assert not hasattr(seg, "value")
        assert getattr(seg, "value", None) is None
        seg.view.value += 1
        assert seg.view.value == 1
    finally:
        seg.close()


@attrs.define
class Pair:
    a: int
    b: float


@pytest.mark.parametrize("kind", [ps.u64, float, Pair], ids=["u64", "float", "attrs struct"])
def test_a_segment_or_view_refuses_to_be_pickled_and_says_what_to_pass(kind: object) -> None:
    seg = ps.shared("p", kind)
    try:
        for obj in (seg, seg.view):
            for attempt in (pickle.dumps, copy.copy):
                with pytest.raises(TypeError) as info:
                    attempt(obj)
                message = str(info.value)
                assert "cannot be copied or pickled" in message
                assert "ps.shared('p', kind)" in message  # pass the name instead
                assert "@ps.forked" in message
    finally:
        seg.close()


@pytest.mark.parametrize("mode", [0o400, 0o200, 0o044, True, 0o7777, 384.0, -1])
def test_lock_and_segment_modes_are_checked_alike(mode: object) -> None:
    with pytest.raises(ValueError) as seg_err:
        ps.shared("m", ps.u8, mode=mode)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as lock_err:
        ps.interprocess_lock("m", mode=mode)  # type: ignore[arg-type]
    assert str(lock_err.value) == str(seg_err.value)


def test_a_group_readable_lock_mode_is_accepted() -> None:
    ps.interprocess_lock("m", mode=0o660).close()


@pytest.mark.parametrize("size", [0, -1, -4096])
def test_a_size_below_one_is_a_value_error(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ps.shared("b", bytes, size=size)


def test_a_size_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="positive int"):
        ps.shared("b", bytes, size="8")  # type: ignore[arg-type]
