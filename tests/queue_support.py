"""A queue's reader or writer killed at the worst moment, for the queue tests.

Both run in a forked child and never return: they take the queue's own lock,
make the step the test is about (a claim of the next item, a reservation of
room for a record), check the slot's state, let go of the lock and kill the
child with SIGKILL, leaving that slot to the others' liveness checks.
"""

from __future__ import annotations

import os
import signal
from typing import Any, NoReturn

from procshare._queue import READING, WRITING


def die_reading(q: Any) -> NoReturn:
    """Claim the next item (READING), then die holding it."""
    obj = q._obj
    obj.lock()
    d = q._claim(obj)
    obj.unlock()
    assert obj.words.load(d) == READING
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not end the child")


def die_writing(q: Any, size: int = 64) -> NoReturn:
    """Reserve room for a record (WRITING), then die before writing it."""
    obj = q._obj
    obj.lock()
    d = q._reserve(obj, size)
    obj.unlock()
    assert d >= 0
    assert obj.words.load(d) == WRITING
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not end the child")
