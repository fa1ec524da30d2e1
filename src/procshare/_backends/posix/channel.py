"""Socket pairs between a pool's parent and its workers (see ``api_channel``).

Unix stream sockets, not pipes: one descriptor carries both directions, so a
worker costs the parent two descriptors (its channel and its pidfd) and one
entry in the poll set for its data. The send buffer is raised (best effort,
up to ``net.core.wmem_max``) so a large result crosses in fewer wake-ups.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
from collections.abc import Sequence

from procshare._backends.posix import _forkstep

_READ_CHUNK = 1 << 20
_BUFFER = 1 << 20
_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


class PosixChannels:
    """The channel half of the POSIX backend."""

    def channel_pair(self) -> tuple[int, int]:
        near_sock, far_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (near_sock, far_sock):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
        near, far = near_sock.detach(), far_sock.detach()
        os.set_blocking(near, False)
        _forkstep.adopt(near)
        return near, far

    def channel_board(self, slots: int) -> memoryview:
        # mmap(-1, ...) is MAP_SHARED | MAP_ANONYMOUS: a fork shares it, nobody
        # else can see it, and it is gone with the last process that maps it.
        return memoryview(mmap.mmap(-1, max(8 * slots, mmap.PAGESIZE))).cast("q")

    def channel_keep_private(self, fd: int) -> None:
        _forkstep.adopt(fd)

    def channel_send(self, fd: int, data: memoryview) -> int:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    def channel_recv(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            return b""

    def channel_read(self, fd: int, size: int) -> bytes:
        try:
            return os.read(fd, size)
        except ConnectionResetError:
            return b""

    def channel_wait(
        self, readable: Sequence[int], writable: Sequence[int], timeout: float | None
    ) -> tuple[list[int], list[int]]:
        poller = select.poll()
        want: dict[int, int] = {}
        for fd in readable:
            want[fd] = want.get(fd, 0) | _IN
        for fd in writable:
            want[fd] = want.get(fd, 0) | _OUT
        if not want:
            return [], []
        for fd, mask in want.items():
            poller.register(fd, mask)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        got = poller.poll(ms)  # PEP 475: EINTR retried; a raising handler propagates
        ins = [fd for fd, ev in got if ev & _IN and want[fd] & select.POLLIN]
        outs = [fd for fd, ev in got if ev & _OUT and want[fd] & select.POLLOUT]
        return ins, outs
