"""Types for type checkers only: what ``shared()``'s overloads are written with.

Nothing here exists at run time (the whole body is ``if TYPE_CHECKING:``):
the overloads name numpy, attrs and typeshed types, and procshare must import
none of them to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Protocol, TypedDict

    import numpy as np
    from attrs import AttrsInstance

    # typing.TypeVar takes default= from 3.13 only; type checkers know
    # typing_extensions, and the program never imports this module.
    from typing_extensions import TypeVar

    T = TypeVar("T")
    #: What a segment's view is. The default keeps a bare `ps.Segment`
    #: annotation (written before views were typed) valid under --strict.
    V = TypeVar("V", default=Any)

    # ctypes kinds, matched by shape (typeshed's classes) without importing
    # ctypes, which only the backend may. A Structure answers any attribute
    # (its __getattr__), so aggregates are told apart first, by _fields_ or
    # _length_, and only then scalars by their value.
    class CData(Protocol):
        _b_base_: int
        _b_needsfree_: bool

    class CStruct(CData, Protocol):
        """A ctypes ``Structure`` or ``Union``."""

        @property
        def _fields_(self) -> Sequence[Any]: ...

    class CArray(CData, Protocol):
        """A ctypes array (``ctypes.c_double * 10``)."""

        @property
        def _length_(self) -> int: ...

    class CScalar(CData, Protocol[T]):
        """A ctypes scalar (``ctypes.c_uint16`` is a ``_SimpleCData[int]``)."""

        value: T

    #: An attrs class (a shared struct), a ctypes aggregate, a numpy scalar type.
    A = TypeVar("A", bound=AttrsInstance)
    C = TypeVar("C", bound=CStruct | CArray)
    S = TypeVar("S", bound=np.generic)

    class NamedOptions(TypedDict, total=False):
        """The options of a named segment (``shared``'s docstring says what they do)."""

        create: bool | None
        persist: bool
        mode: int

    class Sized(TypedDict, total=False):
        """``shape=None`` and ``size=None`` (the defaults), which every kind accepts."""

        shape: None
        size: None

    class SizedNamedOptions(NamedOptions, Sized, total=False):
        pass
