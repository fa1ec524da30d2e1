"""Front end for ``ps.interprocess_barrier()``: a barrier that breaks instead of hanging.

Every process that waits on the barrier records itself in a party slot
(``(pid, start time)``) until it stops using the barrier (its last close, or
its exit through procshare's engine). A waiter that is not woken checks, once
per liveness slice, whether a recorded party died; if one did, it breaks the
barrier for everyone (:class:`~procshare.BrokenBarrier`) rather than let
them wait for a party that will never come.
"""

from __future__ import annotations

import time
from typing import Any, overload

from procshare import _runtime
from procshare._engine import sync as _sync
from procshare._engine.sync import A, SyncObject, w
from procshare._locks import _check_timeout
from procshare._sync import _MASK, _deadline, _Handle, _Holding, _number_first, _slice
from procshare.errors import BrokenBarrier

# -- barrier -------------------------------------------------------------------

# words: 0 arrived, 1 generation, 2 broken, 3 (last generation broken) + 1,
# 4 parties, 5 waiters, 6 why (see _WHY). Slots: A = 1 while the process takes
# part (from its first wait until it stops using the barrier).
_B_COUNT, _B_GEN, _B_BROKEN, _B_BGEN, _B_PARTIES, _B_WAITERS, _B_WHY = (w(i) for i in range(7))
_WHY = {
    1: "a wait timed out",
    2: "a party died",
    3: "reset() was called",
    4: "abort() was called",
    5: "a waiting party was interrupted",
}


class InterprocessBarrier(_Handle):
    """A barrier shared between processes (see :func:`interprocess_barrier`)."""

    _family = "barrier"

    def __init__(
        self,
        name: str | None = None,
        parties: int | None = None,
        timeout: float | None = None,
        *,
        mode: int = 0o600,
    ) -> None:
        name, parties = _number_first("barrier", name, parties, None, "parties")
        if parties is None:
            raise TypeError(
                "a barrier needs its number of parties: ps.interprocess_barrier('NAME', 3) "
                "for a named one, ps.interprocess_barrier(3) for an anonymous one"
            )
        if type(parties) is not int or parties < 1:
            raise ValueError(f"parties must be an int >= 1, got {parties!r}")
        self._parties = parties
        self._timeout = _check_timeout(timeout)
        self._holding = _Holding()
        self._nslots = min(4 * parties + 16, 1024)

        def init(data: memoryview, words: Any) -> None:
            words.store(_B_PARTIES, parties)

        self._open(name, f"barrier parties={parties}", self._nslots * _sync.SLOT_SIZE, init, mode)
        self._slots = _sync.Slots(self._obj.words, _sync.TABLES, self._nslots)
        #: the pid that registered this object's leave action (per process)
        self._joined = 0

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._parties, self._timeout), {}

    @property
    def parties(self) -> int:
        """Parties needed to pass the barrier."""
        return self._parties

    @property
    def n_waiting(self) -> int:
        """Parties waiting now."""
        return self._live().words.load(_B_COUNT)

    @property
    def broken(self) -> bool:
        """Whether the barrier is broken."""
        return bool(self._live().words.load(_B_BROKEN))

    def _break(self, why: int) -> None:
        """Break it for everyone waiting (mutex held)."""
        words = self._obj.words
        if not words.load(_B_BROKEN):
            words.store(_B_WHY, why)
        words.store(_B_BROKEN, 1)
        words.store(_B_BGEN, (words.load(_B_GEN) + 1) & _MASK)
        words.store(_B_COUNT, 0)
        words.add(_B_GEN, 1)
        words.wake(_B_GEN, -1)

    def _broken_error(self) -> BrokenBarrier:
        return BrokenBarrier(self.name, _WHY.get(self._obj.words.load(_B_WHY), ""))

    def _join(self, obj: SyncObject) -> None:
        """Record this process as a party, so its death breaks the barrier (mutex held)."""
        i = self._holding.find(obj, self._slots, True)
        if self._slots.get(i, A) == 0:
            self._slots.add(i, A, 1)
        token = obj.token()
        if self._joined != token[0]:
            self._joined = token[0]
            _sync.sync_part().on_leave(obj, self._leave)

    def _leave(self) -> None:
        obj = self._obj
        obj.lock()
        try:
            i = self._slots.find(obj.token())
            if i >= 0:
                self._slots.free(i)
        finally:
            obj.unlock()

    def _check_parties(self, obj: SyncObject) -> bool:
        dead = [d for d in self._slots.sweep(obj.alive) if d[1]]
        if dead:
            self._break(2)
        return bool(dead)

    def wait(self, timeout: float | None = None) -> int:
        """Wait until ``parties`` parties wait; return this party's index (0 to
        ``parties - 1``, different for each). Raises
        :class:`~procshare.BrokenBarrier` (a ``threading.BrokenBarrierError``)
        if the barrier is or gets broken: a wait timed out, a party died, or
        :meth:`reset` ran."""
        wait = self._timeout if timeout is None else _check_timeout(timeout)
        obj = self._live()
        words = obj.words
        obj.lock()
        try:
            self._join(obj)
            if words.load(_B_BROKEN):
                raise self._broken_error()
            gen = words.load(_B_GEN)
            index = words.add(_B_COUNT, 1)
            if index + 1 >= self._parties:
                words.store(_B_COUNT, 0)
                words.add(_B_GEN, 1)
                words.wake(_B_GEN, -1)
                return index
        finally:
            obj.unlock()
        deadline = _deadline(wait)
        words.add(_B_WAITERS, 1)
        try:
            self._sleep(obj, gen, deadline)
        except BaseException:
            # Interrupted (Ctrl-C): this party counted as arrived and now
            # leaves, so the others could never pass: break it, as
            # threading.Barrier does.
            obj.lock()
            try:
                if words.load(_B_GEN) == gen:
                    self._break(5)
            finally:
                obj.unlock()
            raise
        finally:
            words.add(_B_WAITERS, -1)
        if words.load(_B_BGEN) == (gen + 1) & _MASK:
            raise self._broken_error()
        return index

    def _sleep(self, obj: SyncObject, gen: int, deadline: float | None) -> None:
        """Sleep until the generation ``gen`` is over (passed or broken)."""
        words = obj.words
        while words.load(_B_GEN) == gen:
            if not words.wait(_B_GEN, gen, _slice(deadline)):
                obj.lock()
                try:
                    if words.load(_B_GEN) != gen:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        self._break(1)
                    else:
                        self._check_parties(obj)
                finally:
                    obj.unlock()

    def reset(self) -> None:
        """Return the barrier to its empty, unbroken state; parties waiting now
        get :class:`~procshare.BrokenBarrier`."""
        obj = self._live()
        words = obj.words
        obj.lock()
        try:
            if words.load(_B_COUNT):
                words.store(_B_BROKEN, 0)
                self._break(3)
            words.store(_B_BROKEN, 0)
        finally:
            obj.unlock()

    def abort(self) -> None:
        """Break the barrier: parties waiting now and later get
        :class:`~procshare.BrokenBarrier` until :meth:`reset`."""
        obj = self._live()
        obj.lock()
        try:
            self._break(4)
        finally:
            obj.unlock()


@overload
def interprocess_barrier(
    name: str | None, parties: int, timeout: float | None = None, *, mode: int = 0o600
) -> InterprocessBarrier: ...
@overload
def interprocess_barrier(
    parties: int, /, *, timeout: float | None = None
) -> InterprocessBarrier: ...
@overload
def interprocess_barrier(*, parties: int, timeout: float | None = None) -> InterprocessBarrier: ...
def interprocess_barrier(
    name: str | int | None = None,
    parties: int | None = None,
    timeout: float | None = None,
    *,
    mode: int = 0o600,
) -> InterprocessBarrier:
    """Open the named barrier ``name`` for ``parties`` parties, creating it if
    needed; without a name (``ps.interprocess_barrier(3)``), create an
    anonymous one, shared with the children forked while it is open.

    ``wait()`` returns each party's index, as :class:`threading.Barrier`
    does. A wait that times out (``timeout``: the default of ``wait``), a
    party that dies, :meth:`InterprocessBarrier.reset` and
    :meth:`InterprocessBarrier.abort` break it for all
    (:class:`~procshare.BrokenBarrier`, a ``threading.BrokenBarrierError``).
    Every process must give the same ``parties``. A party of an anonymous
    barrier that dies breaks it just the same.
    """
    if _runtime.entered and (rt := _runtime.current.get()) is not None:  # ps.cluster()
        return rt.unsupported("barrier")  # type: ignore[no-any-return]
    return InterprocessBarrier(name, parties, timeout, mode=mode)  # type: ignore[arg-type]
