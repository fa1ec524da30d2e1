"""The pool's wire format and both ends of a worker's channel.

:func:`worker_main` is the worker's side (it runs in the child);
:class:`Worker` is the parent's side of one worker: its channel's buffers,
the framing of what is sent and received, and its board. What the parent
does with the results and the deaths, the scheduling, is
:mod:`procshare._engine.pool`'s.

Frames, parent to worker: a 4-byte length, then a pickled tuple
``(RUN, task id, function key, star, sequence key, start, count, items)``
(``items`` is ``None`` when the worker inherited the sequence: it indexes its
own copy, nothing is pickled) or ``(FUNCTION, key, pickled function)``. End
of file tells the worker to exit.

Worker to parent: ``RESULT`` (body length, task id, offset of the first item
in the task, number of items) then a pickled ``(values, errors)``: a batch of
results, ``errors`` mapping an offset in the batch to a raised exception as
``children`` encodes it. Task id 0 (no body) says the initializer returned.

Before each item, the worker writes ``[task id, offset]`` to its *board*, an
anonymous shared mapping its parent reads when the worker dies, and ``0``
after it: the parent fails exactly the item that was running.
"""

from __future__ import annotations

import pickle
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from procshare._engine import transport

if TYPE_CHECKING:
    from procshare._engine.jobs import Job, Task
    from procshare._engine.transport import Record

HEAD = struct.Struct("<I")
RESULT = struct.Struct("<IIII")
RUN, FUNCTION = 0, 1
HIGHEST = pickle.HIGHEST_PROTOCOL
# A worker sends its results when this much time or memory has piled up.
_BATCH_SECONDS = 0.0005
_BATCH_BYTES = 1 << 18
_READ = 1 << 16


def worker_main(  # noqa: PLR0917 - built once per worker with functools.partial
    backend: Any,
    fd: int,
    board: memoryview,
    functions: dict[int, Callable[..., Any]],
    sequences: dict[int, Sequence[Any]],
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
) -> None:
    """The worker's whole life (runs in the child; returns when the parent lets go)."""
    backend.channel_keep_private(fd)  # the children ``fn`` forks must not hold it
    write = backend.process_write
    read = backend.channel_read
    if initializer is not None:
        initializer(*initargs)
        write(fd, RESULT.pack(0, 0, 0, 0))  # ready: task id 0
    clock = time.perf_counter
    buf = b""
    while True:
        while len(buf) < HEAD.size:
            data = read(fd, _READ)
            if not data:
                return
            buf += data
        (n,) = HEAD.unpack_from(buf)
        while len(buf) < HEAD.size + n:
            data = read(fd, max(_READ, HEAD.size + n - len(buf)))
            if not data:
                return
            buf += data
        msg = pickle.loads(memoryview(buf)[HEAD.size : HEAD.size + n])
        buf = buf[HEAD.size + n :]
        if msg[0] == FUNCTION:
            functions[msg[1]] = pickle.loads(msg[2])
            continue
        _, tid, fkey, star, skey, start, count, items = msg
        fn = functions[fkey]
        seq = sequences[skey] if items is None else items
        base = start if items is None else 0
        values: list[Any] = []
        errors: dict[int, bytes] = {}
        first = 0
        since = 0.0
        size = 0
        try:
            for off in range(count):
                item = seq[base + off]
                if not values:
                    # The batch's age counts from its first item's start: an
                    # item slower than _BATCH_SECONDS is sent as soon as it
                    # ends, not held until the next one ends too.
                    since = clock()
                # Published before the item runs: if the worker is killed now,
                # the parent fails exactly this item.
                board[0] = tid
                board[1] = off
                try:
                    value = fn(*item) if star else fn(item)
                except Exception as exc:
                    value = None
                    errors[off - first] = transport.raised_payload(exc, skip=1)
                board[0] = 0
                values.append(value)
                size += sys.getsizeof(value)
                del value, item
                # Results travel in batches of at most _BATCH_SECONDS of work:
                # one write and one wake-up of the parent for many tiny items,
                # one per item for slow ones.
                if size >= _BATCH_BYTES or clock() - since >= _BATCH_SECONDS:
                    _send_batch(write, fd, tid, first, values, errors)
                    first = off + 1
                    values, errors, size = [], {}, 0
        finally:
            # Also on the way out of a SystemExit or a cancellation: what ran
            # is reported, so only the item that ended the worker fails.
            if values:
                _send_batch(write, fd, tid, first, values, errors)


def _send_batch(  # noqa: PLR0917
    write: Callable[[int, bytes], None],
    fd: int,
    tid: int,
    first: int,
    values: list[Any],
    errors: dict[int, bytes],
) -> None:
    try:
        body = pickle.dumps((values, errors), protocol=HIGHEST)
    except Exception:
        for i, value in enumerate(values):
            if i in errors:
                continue
            try:
                pickle.dumps(value, protocol=HIGHEST)
            except Exception as exc:
                detail = (
                    f"its result, a {type(value).__qualname__}, could not be pickled to send "
                    "it to the parent; return something picklable (plain data), or put the "
                    "result in shared memory"
                )
                values[i] = None
                errors[i] = transport.raised_payload(exc, detail)
        body = pickle.dumps((values, errors), protocol=HIGHEST)
    head = RESULT.pack(len(body), tid, first, len(values))
    if len(body) < 65536:
        write(fd, head + body)
    else:
        write(fd, head)
        write(fd, body)


# --------------------------------------------------------------- the parent

#: Handles one batch of results: ``(worker, task id, offset of the first item
#: in the task, number of items, pickled body)``.
OnBatch = Callable[["Worker", int, int, int, memoryview], None]


class Worker:
    """The parent's side of one worker: its channel, its board, the tasks it holds."""

    __slots__ = (
        "backend",
        "board",
        "buf",
        "fd",
        "functions",
        "inflight",
        "out",
        "ready",
        "rec",
        "sequences",
    )

    def __init__(  # noqa: PLR0917 - private, built in one place
        self,
        backend: Any,
        rec: Record,
        fd: int,
        board: memoryview,
        functions: set[int],
        sequences: set[int],
    ):
        self.backend = backend
        self.rec = rec
        self.board = board  # [task id, offset] of the item it runs (task id 0: none)
        self.fd: int | None = fd
        self.functions = functions  # keys it knows: inherited, or sent pickled
        self.sequences = sequences
        self.inflight: deque[Task] = deque()
        self.out = bytearray()
        self.buf = bytearray()
        self.ready = False

    def send(self, body: bytes) -> None:
        """Frame ``body`` and send what the channel takes now (the rest waits in
        ``out`` for :meth:`flush`, when the parent's poll says there is room)."""
        self.out += HEAD.pack(len(body))
        self.out += body
        self.flush()

    def flush(self) -> None:
        if self.fd is None or not self.out:
            return
        try:
            n = self.backend.channel_send(self.fd, memoryview(self.out))
        except (BrokenPipeError, ConnectionResetError):
            n = len(self.out)  # it is dying: its pidfd will tell
        del self.out[:n]

    def close(self) -> None:
        """Close the channel: a worker reading it sees the end and exits."""
        if self.fd is not None:
            self.backend.process_close(self.fd)
            self.fd = None

    def receive(self, on_batch: OnBatch) -> None:
        """Read what the worker sent so far and handle every complete frame."""
        if self.fd is None:
            return
        data = self.backend.channel_recv(self.fd)
        if data:  # None: nothing yet; b"": end of file (its pidfd tells when it is gone)
            self.buf += data
            self._parse(on_batch)

    def receive_all(self, on_batch: OnBatch) -> None:
        """Everything the worker wrote before it ended (it is in the socket by now)."""
        while self.fd is not None:
            data = self.backend.channel_recv(self.fd)
            if not data:
                return
            self.buf += data
            self._parse(on_batch)

    def _parse(self, on_batch: OnBatch) -> None:
        buf = self.buf
        pos = 0
        size = RESULT.size
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= size:
                n, tid, first, count = RESULT.unpack_from(buf, pos)
                if end - pos < size + n:
                    break
                start = pos + size
                pos = start + n
                if tid == 0:
                    self.ready = True  # its initializer returned
                    continue
                with view[start:pos] as body:
                    on_batch(self, tid, first, count, body)
        finally:
            view.release()
            del buf[:pos]

    def running(self) -> tuple[Job, int] | None:
        """The job and index of the item it runs (or would run next), from its board."""
        tid, off = self.board[0], self.board[1]
        for task in self.inflight:
            if task.tid == tid and task.done <= off < task.count:
                return task.job, task.start + off
        if tid == 0 and self.inflight:
            task = self.inflight[0]
            return task.job, task.start + task.done
        return None

    def common(self, name: str) -> dict[str, Any]:
        """The fields of an error about its item ``name`` (a ``ChildError``'s)."""
        exit_ = self.rec.exit
        return {
            "pid": self.rec.pid,
            "name": name,
            "exitcode": None if exit_ is None else exit_.exitcode,
            "signal": None if exit_ is None else exit_.signal,
        }
