from types import TracebackType
from typing import Any

class ScalarCell:
    """The C fast path of :class:`procshare._views.ScalarView`'s ``.value``.

    Its ``value`` descriptor is declared by the subclass, which knows its type.
    """

    _segment: object
    _name: str
    _kind: str
    _mv: Any
    def _ps_attach(self, buffer: memoryview, format: str, /) -> None: ...
    def _ps_detach(self) -> None: ...
    def _ps_invalidate(self) -> None: ...

class SegmentCore:
    """The fields and ``with`` entry of :class:`procshare.Segment`."""

    _part: Any
    _rec: Any
    _view: Any
    def __enter__(self) -> Any: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

def setup(
    segment: type[SegmentCore],
    view: type[ScalarCell],
    closed: type,
    record: tuple[type, int, int, int, int],
    /,
) -> None: ...
def scalar_segment(part: object, rec: object, fast: tuple[str, str, str], /) -> Any: ...
def open_setup(conf: dict[str, object], /) -> None: ...
def open_planned(name: object, kind: object, /) -> Any: ...
def close_setup(part_type: type, engine_type: type, core_globals: dict[str, Any], /) -> None: ...
