"""Front end for ``ps.interprocess_queue()``: a crash-safe multi-producer,
multi-consumer FIFO in shared memory.

Layout (after the sync object's robust mutex and words)::

    descriptors   nslots x 32 bytes: state, owner (pid, start time), start,
                  pos, len, end of one record
    ring          ``capacity`` bytes of records (a power of two)

Each record goes FREE -> WRITING(owner) -> READY -> READING(owner) -> FREE.
The mutex guards only the bookkeeping: a producer reserves a descriptor and
ring space under it, copies its record *outside* it, then commits with one
word store (READY); a consumer claims the oldest READY record under it,
copies it out outside it, then frees it with one word store. So a process
killed at any instant leaves at most one descriptor in WRITING or READING
with a dead owner, and a waiter that finds no progress checks the owners
once per liveness slice: a dead producer's record becomes padding (it was
never delivered), a dead consumer's record goes back to READY (the next
consumer gets it, once). No other process's item is lost or duplicated.
And a put or get about to give up looks at once at the dead records in its
way (:meth:`InterprocessQueue._wait_for`): room comes back in ring order only,
so a dead producer's record at the head, with freed records behind it, could
otherwise make a queue with no item in it report Full.
A process killed holding the mutex makes the next locker recompute the ring
positions from the descriptors (:meth:`InterprocessQueue._repair`).

Records: ``bytes`` go as they are; anything else is pickled with protocol 5,
its large buffers (numpy arrays) out of band, copied straight into the ring
and out of it: no extra pickle copy.
"""

from __future__ import annotations

import pickle
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, overload

from procshare import _runtime
from procshare._engine import sync as _sync
from procshare._engine.sync import SyncObject, w
from procshare._locks import _check_timeout
from procshare._sync import _Handle, _number_first
from procshare.errors import QueueEmpty, QueueFull

_MASK = 0xFFFFFFFF
# words
_HEAD, _TAIL, _DHEAD, _DTAIL, _NOT_EMPTY, _NOT_FULL, _GETTERS, _PUTTERS = (w(i) for i in range(8))
# (Word 11 once counted the ready records. Nothing can repair a count kept
# beside the records when a producer dies between its commit and the count,
# so qsize() counts the records themselves: Words.ring_ready.)
# descriptor fields and states
_DESC = 32
_STATE, _PID, _SLO, _SHI, _START, _POS, _LEN, _END = range(0, 32, 4)
FREE, WRITING, READY, READING = 0, 1, 2, 3
# record headers
_BYTES_HEAD = struct.Struct("@B7x")
_PICKLE_HEAD = struct.Struct("@B3xIQ")  # tag, buffer count, pickle length
_U64 = struct.Struct("@Q")
_TAG_BYTES, _TAG_PICKLE = 1, 2

#: Descriptors of a queue without ``maxsize``.
DEFAULT_SLOTS = 4096
#: Ring bytes of a queue opened without ``capacity=``.
DEFAULT_CAPACITY = 1 << 20


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_BYTES_TAG = _BYTES_HEAD.pack(_TAG_BYTES)


def _encode(obj: object) -> tuple[Any, ...]:
    """The parts of a record: header, then payload buffers."""
    if type(obj) is bytes:
        return (_BYTES_TAG, obj)
    buffers: list[memoryview] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:
            return True  # not contiguous: pickled in band
        buffers.append(raw)
        return False

    data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    head = _PICKLE_HEAD.pack(_TAG_PICKLE, len(buffers), len(data))
    return (head, *(_U64.pack(b.nbytes) for b in buffers), data, *buffers)


def _decode(view: memoryview) -> object:
    tag = view[0]
    if tag == _TAG_BYTES:
        return bytes(view[_BYTES_HEAD.size :])
    _tag, nbufs, size = _PICKLE_HEAD.unpack_from(view)
    at = _PICKLE_HEAD.size
    lengths = [_U64.unpack_from(view, at + 8 * i)[0] for i in range(nbufs)]
    at += 8 * nbufs
    data = view[at : at + size]
    at += size
    buffers = []
    for length in lengths:
        buffers.append(bytearray(view[at : at + length]))  # the one copy out of the ring
        at += length
    return pickle.loads(data, buffers=buffers)


class InterprocessQueue(_Handle):
    """A FIFO of picklable objects shared between processes (see
    :func:`interprocess_queue`)."""

    _family = "queue"

    def __init__(
        self,
        name: str | None = None,
        maxsize: int = 0,
        *,
        capacity: int = DEFAULT_CAPACITY,
        mode: int = 0o600,
    ) -> None:
        name, maxsize = _number_first("queue", name, maxsize, 0, "maxsize")
        if type(maxsize) is not int or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0 (0: no limit), got {maxsize!r}")
        if type(capacity) is not int or not 4096 <= capacity <= 1 << 30:
            raise ValueError(f"capacity must be an int of 4096 to 2**30 bytes, got {capacity!r}")
        self._maxsize = maxsize
        self._requested = capacity
        self._cap = cap = _pow2(capacity)
        self._nslots = nslots = _pow2(maxsize) if maxsize else DEFAULT_SLOTS
        self._ring = (nslots * _DESC + 63) // 64 * 64
        self._last_sweep = 0.0
        layout = f"queue maxsize={maxsize} capacity={cap}"
        self._open(name, layout, self._ring + cap, _init_queue, mode)
        obj = self._obj
        self._words = obj.words
        self._data = obj.data
        self._base = _sync.TABLES
        # The C fast path (put and get that need not wait); this module does
        # the rest and is its reference.
        self._words.ring_setup(self._base, self._base + self._ring, nslots, cap, maxsize)

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._maxsize,), {"capacity": self._requested}

    @property
    def maxsize(self) -> int:
        """Most items it holds (0: up to 4096, and its ``capacity`` of bytes)."""
        return self._maxsize

    @property
    def capacity(self) -> int:
        """Bytes of records it holds at most (rounded up to a power of two)."""
        return self._cap

    # -- bookkeeping (mutex held) -------------------------------------------

    def _desc(self, seq: int) -> int:
        return self._base + (seq & (self._nslots - 1)) * _DESC

    def _advance(self) -> int:
        """Move the head over freed records; the head."""
        words = self._words
        head = words.load(_HEAD)
        tail = words.load(_TAIL)
        moved = False
        while head != tail:
            d = self._desc(head)
            if words.load(d + _STATE) != FREE:
                break
            words.store(_DHEAD, words.load(d + _END))
            head = (head + 1) & _MASK
            moved = True
        if moved:
            words.store(_HEAD, head)
        return head

    def _repair(self) -> None:
        words = self._words
        head, tail = words.load(_HEAD), words.load(_TAIL)
        if head == tail:
            words.store(_DTAIL, words.load(_DHEAD))
        else:
            words.store(_DHEAD, words.load(self._desc(head) + _START))
            words.store(_DTAIL, words.load(self._desc((tail - 1) & _MASK) + _END))

    def _sweep(self, obj: SyncObject) -> bool:
        """Repair the records of dead producers and consumers; whether any was."""
        self._last_sweep = time.monotonic()
        return self._reclaim_ring(obj, (WRITING, READING))

    def _reclaim_ring(
        self, obj: SyncObject, states: tuple[int, ...], *, quick: bool = False
    ) -> bool:
        """:meth:`_reclaim` every record from head to tail (mutex held), then
        :meth:`_repaired`; whether any was taken back."""
        words = self._words
        tail = words.load(_TAIL)
        changed = False
        seq = words.load(_HEAD)
        while seq != tail:
            changed |= self._reclaim(obj, self._desc(seq), states, quick=quick)
            seq = (seq + 1) & _MASK
        return self._repaired(changed)

    def _reclaim(
        self, obj: SyncObject, d: int, states: tuple[int, ...], *, quick: bool = False
    ) -> bool:
        """Take back record ``d`` if it is in one of ``states`` and its owner
        died (mutex held); whether it was. ``quick``: only if no process has
        the owner's pid any more (one system call; a dead owner not reaped
        yet is left to the next sweep)."""
        words = self._words
        state = words.load(d + _STATE)
        if state not in states:
            return False
        token = (words.load(d + _PID), words.load(d + _SLO) | words.load(d + _SHI) << 32)
        alive = not obj.gone(token) if quick else obj.alive(token)
        if alive:
            return False
        if state == WRITING:
            words.store(d + _STATE, FREE)  # never delivered: padding
        else:
            words.store(d + _STATE, READY)  # delivered to nobody: again
        return True

    def _repaired(self, changed: bool) -> bool:
        """After records were taken back: move the head, wake every waiter."""
        if changed:
            words = self._words
            self._advance()
            for word in (_NOT_EMPTY, _NOT_FULL):
                words.add(word, 1)
                words.wake(word, -1)
        return changed

    def _room_of_dead(self, obj: SyncObject) -> bool:
        """A put's last look before it reports Full (mutex held): the room held
        by dead producers' records at the head, which nothing else frees until
        a waiter's next liveness sweep. Only the head matters (room comes back
        in ring order), so this costs one liveness test, not a sweep of every
        record."""
        words = self._words
        changed = False
        while True:
            head = self._advance() if changed else words.load(_HEAD)
            if head == words.load(_TAIL) or not self._reclaim(obj, self._desc(head), (WRITING,)):
                return self._repaired(changed)
            changed = True

    def _items_of_dead(self, obj: SyncObject) -> bool:
        """A get's last look before it reports Empty (mutex held): the items
        dead consumers were taking (READING), which nothing else gives back
        until a waiter's next liveness sweep. Records being written are not
        looked at (a dead producer's record is never an item). A quick look:
        consumers often hold records being read while others poll with
        ``get_nowait``, so each costs one system call, not a read of ``/proc``;
        a dead consumer its parent has not reaped yet is left to the sweeps."""
        return self._reclaim_ring(obj, (READING,), quick=True)

    def _own(self, obj: SyncObject, d: int, state: int) -> None:
        words = self._words
        pid, start = obj.token()
        words.store(d + _PID, pid)
        words.store(d + _SLO, start & _MASK)
        words.store(d + _SHI, start >> 32)
        words.store(d + _STATE, state)

    def _reserve(self, obj: SyncObject, size: int) -> int:
        """A descriptor in WRITING with ``size`` bytes of ring for this process, or -1."""
        words = self._words
        head = self._advance()
        tail = words.load(_TAIL)
        used = (tail - head) & _MASK
        if used >= self._nslots or (self._maxsize and used >= self._maxsize):
            return -1
        cap = self._cap
        start = words.load(_DTAIL)
        pos = start
        off = pos & (cap - 1)
        if off + size > cap:
            pos = (pos + cap - off) & _MASK  # skip the ring's end: padding
        end = (pos + size) & _MASK
        if (end - words.load(_DHEAD)) & _MASK > cap:
            return -1
        d = self._desc(tail)
        words.store(d + _START, start)
        words.store(d + _POS, pos)
        words.store(d + _LEN, size)
        words.store(d + _END, end)
        self._own(obj, d, WRITING)
        words.store(_DTAIL, end)
        words.store(_TAIL, (tail + 1) & _MASK)
        return d

    def _claim(self, obj: SyncObject) -> int:
        """The oldest READY descriptor, now READING by this process, or -1."""
        words = self._words
        seq = self._advance()
        tail = words.load(_TAIL)
        while seq != tail:
            d = self._desc(seq)
            if words.load(d + _STATE) == READY:
                self._own(obj, d, READING)
                return d
            seq = (seq + 1) & _MASK
        return -1

    # -- put / get ---------------------------------------------------------------

    def put(self, obj: object, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` at the end, waiting for room (``timeout`` seconds at most,
        then :class:`~procshare.QueueFull`, a ``queue.Full``)."""
        parts = _encode(obj)
        if self._obj.closed:
            self._live()
        pid, start = self._me()
        words = self._words
        if words.ring_put(parts, pid, start):
            return
        wait = _check_timeout(timeout) if block else 0.0
        size = sum(memoryview(p).nbytes for p in parts)
        if size > self._cap:
            raise ValueError(
                f"an item of {size} bytes does not fit in queue {self.name!r} of "
                f"{self._cap} bytes; open it with a larger capacity="
            )
        # A full queue: wait for room, then the C put again (one slice).
        if (
            wait is None
            and len(parts) <= 8
            and self._slice_wait(_NOT_FULL, _PUTTERS, lambda: words.ring_put(parts, pid, start))
        ):
            return
        sync = self._live()
        d = self._wait_for(
            sync,
            _NOT_FULL,
            _PUTTERS,
            wait,
            lambda: self._reserve(sync, size),
            last_look=self._room_of_dead,
        )
        if d < 0:
            raise QueueFull(sync.name)
        data = self._data
        at = self._base + self._ring + (words.load(d + _POS) & (self._cap - 1))
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                data[at : at + view.nbytes] = view
                at += view.nbytes
        except BaseException:
            words.store(d + _STATE, FREE)  # interrupted: padding, never delivered
            raise
        words.store(d + _STATE, READY)  # the commit
        words.add(_NOT_EMPTY, 1)
        if words.load(_GETTERS):
            words.wake(_NOT_EMPTY, 1)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take the oldest item, waiting for one (``timeout`` seconds at most, then
        :class:`~procshare.QueueEmpty`, a ``queue.Empty``)."""
        sync = self._live()
        words = self._words
        pid, start = self._me()
        found = words.ring_get(pid, start)
        if found is None and block and timeout is None:
            # An empty queue: wait for an item, then the C get again (one slice).
            found = self._slice_wait(_NOT_EMPTY, _GETTERS, lambda: words.ring_get(pid, start))
        if found is not None:
            d, at, size = found
        else:
            wait = _check_timeout(timeout) if block else 0.0
            d = self._wait_for(
                sync,
                _NOT_EMPTY,
                _GETTERS,
                wait,
                lambda: self._claim(sync),
                last_look=self._items_of_dead,
            )
            if d < 0:
                raise QueueEmpty(sync.name)
            at = self._base + self._ring + (words.load(d + _POS) & (self._cap - 1))
            size = words.load(d + _LEN)
        try:
            item = _decode(self._data[at : at + size])
        except BaseException:
            words.store(d + _STATE, READY)  # not delivered: back for the next one
            words.add(_NOT_EMPTY, 1)
            words.wake(_NOT_EMPTY, 1)
            raise
        words.ring_free(d)
        return item

    def _slice_wait(self, seq_word: int, count_word: int, attempt: Callable[[], Any]) -> Any:
        """A blocking call's common wait: sleep on ``seq_word`` (counted in
        ``count_word``, so the other side wakes us) until ``attempt()`` (a C
        put or get) succeeds, for one liveness slice at most; its result, or
        None for the rest of the wait in :meth:`_wait_for` (the sweeps of
        dead records, the last look). A producer faster than its consumer met
        a full queue on 10-15 % of its puts, and each went through
        :meth:`_wait_for`: ~3x the cost of an item."""
        words = self._words
        until = time.monotonic() + _sync.LIVENESS
        while not words.load(_sync.REPAIR):  # (a repair: the general path does it)
            # The sequence is read before the try: a change after it makes
            # the wait below return at once, so no wake is lost.
            seq = words.load(seq_word)
            done = attempt()
            if done:
                return done
            left = until - time.monotonic()
            if left <= 0:
                break
            self._sleep_on(seq_word, count_word, seq, left)
        return None

    def _sleep_on(self, seq_word: int, count_word: int, seq: int, left: float) -> None:
        """Sleep until ``seq_word`` moves from ``seq``, ``left`` seconds at most,
        counted in ``count_word`` meanwhile (so the other side wakes us)."""
        words = self._words
        words.add(count_word, 1)
        try:
            words.wait(seq_word, seq, left)
        finally:
            words.add(count_word, -1)

    def _wait_for(
        self,
        obj: SyncObject,
        seq_word: int,
        count_word: int,
        wait: float | None,
        attempt: Callable[[], int],
        *,
        last_look: Callable[[SyncObject], bool],
    ) -> int:
        """``attempt()`` (mutex held) until it gives a descriptor or ``wait``
        seconds pass (-1). A waiter sweeps dead owners' records once per
        liveness slice; and before giving up, a call always takes
        ``last_look`` at what dead processes hold in its way, so Full or Empty
        never stands for a dead process's record, however recently this
        handle swept."""
        words = self._words
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            # The sequence is read before looking: a change after the look
            # makes the wait below return at once, so no wake is lost.
            seq = words.load(seq_word)
            final = deadline is not None and time.monotonic() >= deadline
            obj.lock()
            try:
                d = attempt()
                if d < 0:
                    if time.monotonic() - self._last_sweep > _sync.LIVENESS:
                        retry = self._sweep(obj)
                    else:
                        retry = final and last_look(obj)
                    if retry:
                        seq = words.load(seq_word)
                        d = attempt()
            finally:
                obj.unlock()
            if d >= 0 or final:
                return d
            left = _sync.LIVENESS
            if deadline is not None:
                left = max(0.0, min(left, deadline - time.monotonic()))
            self._sleep_on(seq_word, count_word, seq, left)

    def put_nowait(self, obj: object) -> None:
        """``put(obj, block=False)``: :class:`~procshare.QueueFull` if there is no room."""
        self.put(obj, block=False)

    def get_nowait(self) -> Any:
        """``get(block=False)``: :class:`~procshare.QueueEmpty` if there is no item."""
        return self.get(block=False)

    def qsize(self) -> int:
        """Items ready to be taken now (a snapshot)."""
        return self._live().words.ring_ready()

    def empty(self) -> bool:
        """Whether no item is ready now (a snapshot)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether ``maxsize`` items are in it now (a snapshot; never for ``maxsize=0``)."""
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    def __iter__(self) -> Iterator[Any]:
        """The items ready now, taken one by one; ends when none is left (it does
        not wait for more)."""
        while True:
            try:
                yield self.get_nowait()
            except QueueEmpty:
                return


def _init_queue(data: memoryview, words: Any) -> None:
    pass  # a new object is zeroed: empty, every descriptor FREE


@overload
def interprocess_queue(
    name: str | None = None,
    maxsize: int = 0,
    *,
    capacity: int = DEFAULT_CAPACITY,
    mode: int = 0o600,
) -> InterprocessQueue: ...
@overload
def interprocess_queue(
    maxsize: int, /, *, capacity: int = DEFAULT_CAPACITY
) -> InterprocessQueue: ...
def interprocess_queue(
    name: str | int | None = None,
    maxsize: int = 0,
    *,
    capacity: int = DEFAULT_CAPACITY,
    mode: int = 0o600,
) -> InterprocessQueue:
    """Open the named queue ``name``, creating it if needed; without a name,
    create an anonymous one.

    Args:
        name: 1 to 128 characters of ``A-Z a-z 0-9 . _ -``, in the current
            namespace. Leave it out for an anonymous queue
            (``ps.interprocess_queue()``, ``ps.interprocess_queue(10)``):
            shared with every child forked while it is open (``ps.map``
            workers too) and with nobody else, freed by the kernel with the
            last process that has it.
        maxsize: most items it holds (``0``: up to 4096, the queue's own
            limit; ``put`` also waits while ``capacity`` bytes are taken).
        capacity: bytes of shared memory for the items in it (rounded up to
            a power of two, reserved at creation). An item larger than that
            raises ``ValueError``.
        mode: permission bits of the object if this call creates it.

    Every process opening the name must give the same ``maxsize`` and
    ``capacity`` (else :class:`~procshare.SharedTypeError`).
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.queue(name, maxsize)
    return InterprocessQueue(name, maxsize, capacity=capacity, mode=mode)  # type: ignore[arg-type]
