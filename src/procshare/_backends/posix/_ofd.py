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

import fcntl
import struct

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (must be 0 for OFD locks), padded to 32 bytes.
FLOCK = struct.Struct("@hhqqi4x")

READ = fcntl.F_RDLCK
WRITE = fcntl.F_WRLCK
UNLOCK = fcntl.F_UNLCK

# Byte 0 counts holders: every holder keeps a READ lock on it, so a WRITE lock
# there is granted only when no other description holds the object. (The
# segment code packs its hot-path requests once from FLOCK; see segment.py.)
HOLD = 0


def lock(fd: int, kind: int, start: int) -> None:
    """Set ``kind`` on byte ``start``, waiting as long as it takes."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, FLOCK.pack(kind, 0, start, 1, 0))
