"""Repeated ``ps.shared`` calls: the remembered plan must never change what a call does.

A call that succeeded without ``initial=`` is remembered (module-level, so a
forked child inherits it) and the same call again skips validation, kind
resolution and naming. These tests prove the shortcut answers exactly as the
full path would: same errors, same namespace rules, same checks on attach.
"""

from __future__ import annotations

import pytest

import procshare as ps
from procshare import _shared
from shared_support import another_namespace


def _planned(name: str) -> list[tuple[object, ...]]:
    return [key for key in _shared._plans if key[0] == name]


def test_a_repeated_call_is_planned_and_behaves_the_same() -> None:
    with ps.shared("rep", ps.u64) as first:
        first.value = 7
        assert _planned("rep")
        with ps.shared("rep", ps.u64) as again:  # the planned path
            assert again.value == 7
            again.value += 1
        assert first.value == 8
    seg = ps.shared("rep", ps.u64)  # planned, and the name is free again: creates
    try:
        assert seg.created
        assert seg.view.value == 0
    finally:
        seg.close()


@pytest.mark.parametrize(
    ("good", "bad", "error"),
    [
        ({"mode": 0o600}, {"mode": 384.0}, ValueError),
        ({"create": True}, {"create": 1}, TypeError),
        ({"size": 16}, {"size": 16.0}, TypeError),
    ],
)
def test_a_plan_never_lets_a_lookalike_argument_skip_validation(
    good: dict[str, object], bad: dict[str, object], error: type[Exception]
) -> None:
    kind: object = bytes if "size" in good else ps.u8
    with ps.shared("look", kind, **good):  # type: ignore[arg-type]
        pass
    # 384.0 == 0o600, 1 == True, 16.0 == 16: equal keys, but the wrong types.
    with pytest.raises(error):
        ps.shared("look", kind, **bad)  # type: ignore[arg-type]


def test_a_numpy_shape_of_floats_is_refused_after_the_same_shape_in_ints() -> None:
    np = pytest.importorskip("numpy")
    with ps.shared("shp", np.float64, shape=(2, 3)):
        pass
    with pytest.raises(TypeError, match="shape="):
        ps.shared("shp", np.float64, shape=(2.0, 3))


def test_a_plan_is_per_namespace() -> None:
    with ps.shared("ns-rep", ps.u8, initial=1) as outer:
        with ps.namespace(another_namespace("other-rep")), ps.shared("ns-rep", ps.u8) as inner:
            assert inner.value == 0  # another namespace: another segment
            inner.value = 2
        with ps.shared("ns-rep", ps.u8) as again:
            assert again.value == 1
        assert outer.value == 1


def test_a_planned_call_still_refuses_a_segment_of_another_kind() -> None:
    with ps.shared("kind-rep", ps.u64):
        pass
    assert _planned("kind-rep")
    with ps.shared("kind-rep", ps.f64, initial=1.5):  # recreated, holding a float
        with pytest.raises(ps.SharedTypeError, match="f64"):
            ps.shared("kind-rep", ps.u64)  # planned, but the segment says otherwise


@pytest.mark.timeout(60)
def test_a_forked_child_uses_its_parents_plan() -> None:
    @ps.forked
    def add(n: int) -> int:
        # Three children add at once: a read-modify-write of shared data holds
        # the lock, as the docs tell users (without it an update can be lost).
        with ps.shared("child-rep", ps.u64) as total, ps.interprocess_lock("child-rep"):
            total.value += n
            return int(total.value)

    with ps.shared("child-rep", ps.u64) as total:
        assert _planned("child-rep")
        with ps.children() as kids:
            for n in (1, 2, 3):
                add(n)
        assert total.value == 6
        assert sorted(kids.results)[-1] == 6


def test_unhashable_arguments_get_the_full_paths_errors() -> None:
    with pytest.raises(ps.InvalidName):
        ps.shared(["not", "a", "name"], ps.u8)  # type: ignore[arg-type]
    with ps.shared("hash", ps.u8, persist=[]) as view:  # type: ignore[arg-type]
        view.value = 1  # any truthiness is accepted, as before; no plan is kept
    assert not _planned("hash")


def test_a_planned_number_is_built_in_c_as_the_python_path_builds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ps.shared("rep-c", ps.u32) as first:  # the Python path (and the plan)
        seg = ps.shared("rep-c", ps.u32)
        first.value = 5
    # The planned open runs no Python constructor: Segment, ScalarView and the
    # engine's record come from C (_cview.scalar_segment, _cengine.OpenSegment).
    monkeypatch.setattr(_shared.Segment, "__init__", _refuse)
    monkeypatch.setattr(ps.ScalarView, "__init__", _refuse)
    again = ps.shared("rep-c", ps.u32)
    try:
        view = again.view
        assert type(again) is _shared.Segment
        assert type(view) is ps.ScalarView
        assert view.value == 5
        view.value += 1
        assert seg.view.value == 6
        assert repr(view) == "<shared u32 'rep-c' value=6>"
        assert view._segment is again
        assert again._rec.view is not None
        assert again._rec.view() is view
        with pytest.raises(ValueError):
            view.value = -1  # the slow path, as for a view the Python path built
        with again as entered:
            assert entered is view
        assert again.closed
        with pytest.raises(ps.SegmentClosed):
            view.value  # noqa: B018
        with pytest.raises(ps.SegmentClosed), again:
            pass
    finally:
        again.close()
        seg.close()


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the planned open of a number runs no Python constructor")


def test_a_planned_reopen_of_a_held_number_is_one_c_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procshare._engine.segments import SegmentsPart

    with ps.shared("rep-open", ps.i64) as held:  # plans it; this handle holds it
        held.value = -3
        # (This process created it last: its next open tries creating first,
        # in Python, and attaches. From then on it attaches first.)
        ps.shared("rep-open", ps.i64).close()
        # The engine's Python open is the reference; the planned reopen of a
        # held number does the same steps in C (_cview.open_planned).
        monkeypatch.setattr(SegmentsPart, "open", _refuse)
        monkeypatch.setattr(SegmentsPart, "_register", _refuse)
        with ps.shared("rep-open", ps.i64) as again:
            assert again.value == -3
            again.value = 4
            third = ps.shared("rep-open", ps.i64)
            assert not third.created
            third.close()
        assert held.value == 4
        # Anything else still takes the Python path: another kind's plan, options.
        with pytest.raises(AssertionError, match="no Python constructor"):
            ps.shared("rep-open", ps.i64, create=False)


@pytest.mark.parametrize("table", ["the part's", "none"])
def test_the_c_planned_open_calls_the_backend_through_the_parts_open_fast(
    monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    # SegmentsPart.open_fast: the backend's one-call open, found once when the
    # part is built (a fresh child adopts a part its parent built, and looks
    # nothing up). None: the backend has none, and its segment_open attaches.
    from procshare._engine.segments import SegmentsPart, segments_part

    part = segments_part()
    assert part.open_fast is not None
    real = part.open_fast
    opened: list[str] = []

    def counting(os_name: str, meta: bytes) -> object:
        opened.append(os_name)
        return real(os_name, meta)

    with ps.shared("rep-table", ps.u64) as held:  # plans it; this handle holds it
        ps.shared("rep-table", ps.u64).close()  # (from now on it attaches first)
        monkeypatch.setattr(part, "open_fast", counting if table == "the part's" else None)
        monkeypatch.setattr(SegmentsPart, "open", _refuse)
        with ps.shared("rep-table", ps.u64) as again:  # the C planned open
            again.value = 5
        assert held.value == 5
    assert len(opened) == (1 if table == "the part's" else 0)


def test_the_c_planned_open_runs_pending_housekeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    from procshare._engine import core
    from procshare._engine.segments import SegmentsPart

    polled: list[bool] = []
    poll = core.Engine.poll

    def counting_poll(engine: core.Engine) -> None:
        polled.append(engine.pending)
        poll(engine)

    with ps.shared("rep-poll", ps.u8) as held:
        ps.shared("rep-poll", ps.u8).close()  # (attaches first from now on: see above)
        monkeypatch.setattr(core.Engine, "poll", counting_poll)
        monkeypatch.setattr(SegmentsPart, "open", _refuse)  # (the C path, only)
        engine = core.get_engine()
        with ps.shared("rep-poll", ps.u8):  # nothing pending: no call
            pass
        assert polled == []
        engine.pending = True  # (what a dropped child's reap asks for)
        with ps.shared("rep-poll", ps.u8) as again:
            assert again.value == held.value
        assert polled == [True]
        assert not engine.pending


def test_the_c_planned_open_reads_the_swept_namespaces_of_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procshare._engine import get_engine, names
    from procshare._engine import segments as ps_segments

    with ps.shared("rep-swept", ps.u16) as held:
        ps.shared("rep-swept", ps.u16).close()  # (attaches first from now on)
        backend = get_engine().backend
        calls: list[str] = []
        real = backend.segment_collect

        def counting(prefix: str, **kw: object) -> list[str]:
            calls.append(prefix)
            return real(prefix, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(backend, "segment_collect", counting)
        # A new set (as tests do): the namespace counts as not swept yet, so the
        # next open takes the Python path, which sweeps it, whatever C kept.
        monkeypatch.setattr(ps_segments, "swept_namespaces", set())
        with ps.shared("rep-swept", ps.u16) as again:
            assert again.value == held.value
        assert calls == [names.namespace_prefix()]
