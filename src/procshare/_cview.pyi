class ScalarCell:
    """The C fast path of :class:`procshare._views.ScalarView`'s ``.value``.

    Its ``value`` descriptor is declared by the subclass, which knows its type.
    """

    def _ps_attach(self, buffer: memoryview, format: str, /) -> None: ...
    def _ps_detach(self) -> None: ...
