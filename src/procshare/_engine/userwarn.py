"""Warnings attributed to the user's line, not to procshare's.

``warnings.warn(..., stacklevel=N)`` needs the depth of the call path, and
procshare reaches the same warning by paths of different depths (a
``children()`` scope's exit, ``join()``, a ``limit=`` wait, a decorated
method, the next call into procshare). :func:`warn` instead walks out of
procshare's own frames and attributes the warning to the first frame that
is not procshare's, so the filter, the ``-W error`` traceback and the
printed ``file:line`` all name the user's code. (Python 3.12 has
``skip_file_prefixes=`` for this; 3.11 does not.)
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

# .../procshare/ as it appears in code objects' co_filename (both come from
# the same import, so no normalisation is needed).
_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep


def outside_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the *caller* of
    this function name the innermost frame outside procshare."""
    frame: FrameType | None = sys._getframe(2)  # the caller's caller: stacklevel 2
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's code."""
    warnings.warn(message, category, stacklevel=outside_stacklevel())
