"""What the engine needs from a backend to talk to long-lived workers.

A pool (``ps.map``, ``ps.pool``) keeps one *channel* per worker: a connected
pair of stream sockets, made just before the worker is forked. The parent's
end (*near*) is non-blocking and private to the parent: children forked
later close it first thing, as they close result pipes, so a worker never
holds a sibling's channel open. The worker's end (*far*) is blocking; the
parent closes its copy right after the fork.

Frames and their meaning are the engine's business (``_engine/pool.py``);
a backend only moves bytes and says which descriptors are ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ChannelBackend(Protocol):
    """Socket pairs between a parent and its workers."""

    def channel_pair(self) -> tuple[int, int]:
        """``(near, far)``: a connected pair of stream sockets, both close-on-exec.

        ``near`` is non-blocking and private: every child forked after this
        call closes it (until :meth:`ProcessBackend.process_close` closes it
        here). ``far`` is blocking and *not* private, so the next fork hands
        it to the worker; close it in the parent once the worker is forked.
        """
        ...

    def channel_board(self, slots: int) -> memoryview:
        """``slots`` signed 64-bit integers in memory shared with every child forked
        after this call (anonymous, freed with the last mapping): a worker
        publishes there which item it is running, so the parent knows it
        even when the worker is killed before it could say anything."""
        ...

    def channel_keep_private(self, fd: int) -> None:
        """Make ``fd`` private to this process: children forked from now on close
        it first thing. A worker calls it on its own end, so the children its
        function forks do not keep the channel open."""
        ...

    def channel_send(self, fd: int, data: memoryview) -> int:
        """Write what fits now to the non-blocking ``fd``: the number of bytes
        written, ``0`` if none fit. ``BrokenPipeError`` if the peer is gone."""
        ...

    def channel_recv(self, fd: int) -> bytes | None:
        """Read what is available on the non-blocking ``fd``: ``None`` if nothing
        yet, ``b""`` at end of file (the peer closed its end, or died)."""
        ...

    def channel_read(self, fd: int, size: int) -> bytes:
        """Blocking read of at most ``size`` bytes (``b""`` at end of file): the
        worker's side."""
        ...

    def channel_wait(
        self, readable: Sequence[int], writable: Sequence[int], timeout: float | None
    ) -> tuple[list[int], list[int]]:
        """Wait until one of ``readable`` can be read (or is at end of file) or one
        of ``writable`` can take data (or its peer is gone), at most ``timeout``
        seconds (``None``: no limit). Returns the ready ones of each list.
        Signal handlers run while it waits; one that raises interrupts it."""
        ...
