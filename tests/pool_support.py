"""Item functions and items shared by the pool tests (module-level, so they pickle by name)."""

from __future__ import annotations

import os
import signal
from typing import Any


class Unpicklable:
    """An item that refuses to be pickled: it can only reach a worker by inheritance."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable refuses to be pickled")


def double(x: int) -> int:
    return 2 * x


def len_first(b: bytes) -> tuple[int, int]:
    return len(b), b[0]


def getpid(_: object = None) -> int:
    return os.getpid()


def suicide_at(n: int) -> Any:
    def fn(x: int) -> int:
        if x == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    return fn
