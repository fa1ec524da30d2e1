"""Struct views (attrs classes): what type checkers are told holds at run time.

A slotted attrs class's view derives from the class, so ``isinstance`` and
the class's methods work on the shared fields; equality, hashing, setting and
pickling stay a view's. A class with a ``__dict__`` keeps the plain view,
which refuses a misspelt field.
"""

from __future__ import annotations

import copy
import pickle
from typing import ClassVar

import attrs
import pytest

import procshare as ps
from shared_support import run_in_child


@attrs.define
class Stats:
    count: int
    mean: float

    def bump(self, n: int = 1) -> int:
        self.count += n
        return self.count

    @property
    def doubled(self) -> int:
        return self.count * 2


@attrs.frozen
class Frozen:
    x: int


@attrs.define(slots=False)
class Loose:
    x: int


@attrs.define(weakref_slot=False)
class NoWeakref:
    x: int


def test_the_view_is_an_instance_of_the_class_and_its_methods_use_shared_memory() -> None:
    with ps.shared("stats", Stats) as stats:
        assert isinstance(stats, Stats)
        assert stats.bump(3) == 3
        assert stats.doubled == 6
        assert attrs.asdict(stats) == {"count": 3, "mean": 0.0}

        def child() -> None:
            with ps.shared("stats", Stats) as mine:
                mine.bump(10)

        run_in_child(child)
        assert stats.count == 13  # the child's method call wrote shared memory
    with pytest.raises(ps.SegmentClosed):
        stats.bump()


def test_a_view_stays_a_handle_equal_only_to_itself_and_never_copied() -> None:
    with ps.shared("a", Stats) as a, ps.shared("a", Stats) as b:
        same = a
        assert a == same
        assert a != b  # two views of the same memory: two handles
        assert a != Stats(0, 0.0)
        assert hash(a) == hash(a)  # (an attrs class with eq has no hash)
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            pickle.dumps(a)
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            copy.copy(a)


def test_a_frozen_class_view_is_written_all_the_same() -> None:
    with ps.shared("frozen", Frozen) as frozen:
        assert isinstance(frozen, Frozen)
        frozen.x += 1  # attrs' frozen __setattr__ does not stand in the way
        assert frozen.x == 1


@pytest.mark.parametrize("cls", [Stats, Loose, NoWeakref])
def test_a_misspelt_field_is_refused(cls: type) -> None:
    with ps.shared("typo", cls) as view:
        with pytest.raises(AttributeError, match="cuont"):
            view.cuont = 1


def test_a_class_with_a_dict_keeps_the_plain_view() -> None:
    with ps.shared("loose", Loose) as loose:
        assert not isinstance(loose, Loose)
        loose.x = 4
        assert loose.x == 4


class Sealed:
    """Refuses subclasses of its subclasses (as a `typing.final` enforced at run time)."""

    __slots__ = ()
    _sealed: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if any(vars(base).get("_sealed") for base in cls.__mro__[1:]):
            raise TypeError(f"{cls.__name__}: cannot subclass a sealed class")


@attrs.define
class Refusing(Sealed):
    _sealed: ClassVar[bool] = True
    x: int


def test_a_class_that_refuses_subclasses_keeps_the_plain_view() -> None:
    with ps.shared("refusing", Refusing) as view:
        view.x = 2
        assert view.x == 2
        assert not isinstance(view, Refusing)


def test_a_class_without_a_weakref_slot_gets_one_on_its_view() -> None:
    seg = ps.shared("noweak", NoWeakref)
    view = seg.view
    assert isinstance(view, NoWeakref)
    seg.close()
    with pytest.raises(ps.SegmentClosed):  # the engine reached it through a weakref
        view.x  # noqa: B018


def test_a_closed_struct_refuses_an_f32_field_write_as_closed_whatever_the_value() -> None:
    @attrs.define
    class Sample:
        ratio: ps.f32  # type: ignore[valid-type]

    with ps.shared("sample", Sample) as sample:
        with pytest.raises(ValueError, match="cannot hold"):
            sample.ratio = 1e39  # open: beyond f32
    for value in (0.5, 1e39):
        with pytest.raises(ps.SegmentClosed):
            sample.ratio = value
