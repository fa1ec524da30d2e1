"""``test_forked.py`` again, with the backend's C start and join switched off:
the Python path, which takes every uncommon case, must behave the same in the
common one too (``test_forkfast.py`` checks which calls take which path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import test_forked
from procshare._backends.posix import _forkstep

globals().update({k: v for k, v in vars(test_forked).items() if k.startswith("test_")})


@pytest.fixture(autouse=True)
def _python_path() -> Iterator[None]:
    was = _forkstep.fast_enable(False)
    try:
        yield
    finally:
        _forkstep.fast_enable(was)
