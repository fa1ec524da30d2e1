"""Open-file-description (OFD) byte-range locks, the kernel's holder count.

Why OFD locks and not ``flock`` or classic ``lockf``:

* classic POSIX record locks belong to the *process* and are all dropped when
  the process closes *any* descriptor of the file: one stray ``close()`` and
  every holder count in the process is gone;
* ``flock`` conversions are not atomic: on Linux a failed ``LOCK_EX|LOCK_NB``
  upgrade drops the shared lock already held;
* OFD locks belong to the open file description, convert atomically, and are
  released by the kernel when the last descriptor of the description closes,
  which includes the death of the process by any signal.

A fork shares open file descriptions, so a child that unlocked an inherited
descriptor would release the parent's lock: callers never unlock a
description opened by another pid.
"""

from __future__ import annotations

import errno
import fcntl
import struct

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (must be 0 for OFD locks), padded to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")

READ = fcntl.F_RDLCK
WRITE = fcntl.F_WRLCK
UNLOCK = fcntl.F_UNLCK

# Byte 0: every holder keeps a READ lock on it; a WRITE lock there succeeds only
# when no other description holds the object. Byte 1: a short WRITE "guard"
# serialising open/close decisions, so "am I the last holder?" and the unlink
# that follows are one atomic step with respect to other openers and closers.
HOLD = 0
GUARD = 1


def _lock(fd: int, kind: int, start: int, wait: bool) -> bool:
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, 0, start, 1, 0))
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def try_lock(fd: int, kind: int, start: int) -> bool:
    """Set ``kind`` on byte ``start`` without waiting; ``False`` if it conflicts."""
    return _lock(fd, kind, start, wait=False)


def lock(fd: int, kind: int, start: int) -> None:
    """Set ``kind`` on byte ``start``, waiting as long as it takes."""
    _lock(fd, kind, start, wait=True)


def unlock(fd: int, start: int) -> None:
    _lock(fd, UNLOCK, start, wait=False)
