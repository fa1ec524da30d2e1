"""The :class:`Segment` handle: what :func:`procshare.shared` returns.

Its fields and its ``with`` entry are C (``_cview.SegmentCore``), which also
builds a number's handle and view together without running ``__init__``
(``_cview.scalar_segment``); the Python here is the reference for every
other kind.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar
from weakref import ref as _weakref

from procshare import _cview, _kinds
from procshare._engine import anonymous as _anonymous
from procshare._engine.segments import OpenSegment, SegmentsPart
from procshare._views import not_picklable
from procshare.errors import AnonymousError, SegmentClosed

if TYPE_CHECKING:
    from procshare._kinds.hints import V
else:
    V = TypeVar("V")  # what a segment's view is: Segment[ScalarView[int]]


class Segment(_cview.SegmentCore, Generic[V]):
    """An open shared segment: what :func:`shared` returns.

    Use it as a context manager (``with ps.shared(...) as view:`` gives the
    view and closes the segment at the end of the block) or keep it as an
    explicit handle: ``seg.view`` is the view and ``seg.close()`` closes it.
    A handle that is garbage collected is closed, and the engine closes what
    is still open at interpreter exit. A number's or struct's view keeps its
    handle open while the view is alive, and the handle refers to its view:
    dropped together without ``close()``, they are closed when Python's cycle
    collector finds them (soon, while the program allocates; never with
    ``gc.disable()``), not at once: close it, or use ``with``, to release it
    at a known moment.

    A type checker knows the view's type: ``ps.shared("n", ps.u64)`` is a
    ``Segment[ScalarView[int]]`` (see :func:`shared`).
    """

    # _part, _rec, _view, `with` (__enter__, __exit__, whose close of a by-name
    # segment is C too: _cview_close.h) and the close of a dropped handle (its
    # finalizer) are SegmentCore's, in C (_cview.c), which also builds the
    # by-name open of a number (_cview.scalar_segment) without running
    # __init__: the reference below.
    __slots__ = ("__weakref__",)

    if TYPE_CHECKING:
        _part: SegmentsPart | _anonymous.AnonymousPart
        _rec: OpenSegment
        _view: V

        def __enter__(self) -> V: ...
        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
            /,
        ) -> None: ...

    def __init__(
        self,
        part: SegmentsPart | _anonymous.AnonymousPart,
        rec: OpenSegment,
        resolved: _kinds.Resolved,
    ) -> None:
        self._part = part
        self._rec = rec
        self._view: V = None  # type: ignore[assignment]  # (set at once, or closed)
        try:
            self._view = resolved.view(self, rec)
            if resolved.invalidates:
                # Not numpy arrays and memoryviews: they pin the mapping
                # themselves and keep working after close (see the docs).
                # (Held weakly: the registry must not keep a dropped handle alive.)
                rec.view = _weakref(self._view)
        except BaseException:
            part.close(rec)
            raise

    @property
    def name(self) -> str:
        """The name given to :func:`shared`; ``"(anonymous)"`` for an anonymous
        segment (not a valid name: nothing can open it by name)."""
        return self._rec.name

    @property
    def namespace(self) -> str:
        """The namespace the name lives in (``""`` for an anonymous segment)."""
        return self._rec.namespace

    @property
    def anonymous(self) -> bool:
        """Whether the segment has no name (``ps.shared(kind)``): shared only with
        the children forked while it is open."""
        return self._rec.name is _anonymous.LABEL

    @property
    def created(self) -> bool:
        """Whether this call created the segment (and set it to ``initial``)."""
        return self._rec.created

    @property
    def kind(self) -> str:
        """What the segment holds, as recorded in it (``"u64"``, ``"numpy float64[10]"``)."""
        return self._rec.layout.kind

    @property
    def size(self) -> int:
        """Bytes of data."""
        return self._rec.layout.size

    @property
    def persist(self) -> bool:
        """Whether the segment outlives its last holder (set at creation)."""
        return self._rec.handle.persist

    @property
    def closed(self) -> bool:
        return self._rec.closed

    @property
    def view(self) -> V:
        """The view: ``.value`` for a number, attributes for a struct, a numpy
        array, or a memoryview. Raises :class:`~procshare.SegmentClosed` once closed.
        """
        if self._rec.closed:
            raise SegmentClosed(self._rec.name)
        return self._view

    def close(self) -> None:
        """Stop holding the segment; the last holder to close it removes it
        (unless it was created with ``persist=True``). Idempotent."""
        if not self._rec.closed:
            # Drop our own reference first: a memoryview or array nobody else
            # holds then dies now, and the mapping can be unmapped right away
            # instead of when this handle is collected.
            self._view = None  # type: ignore[assignment]
            self._part.close(self._rec)

    def __repr__(self) -> str:
        state = "closed" if self._rec.closed else "open"
        shown = "anonymous" if self.anonymous else repr(self.name)
        return f"<procshare.Segment {shown} {self.kind} ({state})>"

    def _ps_refuse_pickle(self) -> None:
        """Raise :class:`AnonymousError` if anonymous (its views ask this too)."""
        if self.anonymous:
            raise AnonymousError(
                f"an anonymous shared segment ({self.kind})",
                "pickled",
                named="ps.shared('NAME', kind), opened by that name in the other process",
            )

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        self._ps_refuse_pickle()
        raise not_picklable("the Segment handle", self._rec.name)

    # Not a __getattr__ (it would slow every attribute read of every handle):
    # the one name people reach for when they hold the handle instead of the view.
    # Hidden from type checkers, which then report `segment.value` as the mistake.
    if not TYPE_CHECKING:

        @property
        def value(self) -> NoReturn:
            """Not here: ``.value`` belongs to the view (``segment.view.value``)."""
            raise _not_the_view("value")

        @value.setter
        def value(self, _value: object) -> NoReturn:
            raise _not_the_view("value")


def _not_the_view(attr: str) -> AttributeError:
    return AttributeError(
        f"'Segment' object has no attribute {attr!r}: ps.shared() returns the Segment "
        f"handle; use the view from `with ps.shared(...) as view:` (view.{attr}), or "
        f"segment.view.{attr} when you keep the handle"
    )
