"""A pool's jobs (one per ``map`` / ``imap`` / ``submit``) and their tasks.

A job hands out *tasks*, chunks of its items, and collects what comes back:
values, failures (as error factories: a fresh exception per raise), and the
count of items a timeout or a cancel left unrun. Chunks shrink as the work
runs out (guided scheduling); the scheduler is :mod:`procshare._engine.pool`.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from procshare.errors import ChildError

if TYPE_CHECKING:
    from procshare._engine.pool import Core
    from procshare._engine.workers import Worker

ErrorFactory = Callable[[], ChildError]

#: Tasks a worker may have queued: one running, one waiting, so it never idles
#: for a round trip.
IN_FLIGHT = 2
# Without a chunksize and without a length: aim for chunks of about this many
# seconds of work, once the first results tell how long an item takes.
_CHUNK_SECONDS = 0.005
# A task whose items are pickled carries about this many bytes at most.
_TASK_BYTES = 1 << 22
# Items slower than this (seconds, on average) get one task in flight per worker,
# and the next one once the worker runs the last item of it (Job.wants_more).
_SLOW_ITEM = 0.001


class Task:
    """A chunk of one job's items, sent to one worker."""

    __slots__ = ("count", "done", "items", "job", "start", "tid")

    def __init__(self, job: Job, tid: int, start: int, count: int, items: list[Any] | None):
        self.job = job
        self.tid = tid
        self.start = start  # index of the first item in the job
        self.count = count
        self.done = 0  # results received (in order: a worker runs its items in order)
        self.items = items  # None: the worker indexes the sequence it inherited


class Job:
    """One ``map`` / ``imap`` / ``submit``: its items, results and failures."""

    def __init__(
        self,
        core: Core,
        fkey: int,
        name: str,
        items: Iterable[Any],
        *,
        star: bool,
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        on_item: Callable[[bool], None] | None,
    ) -> None:
        self.core = core
        self.fkey = fkey
        self.name = name
        self.star = star
        self.chunksize = chunksize
        self.ordered = ordered
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_item = on_item
        self.started = time.monotonic()
        self.skey: int | None = None
        self.seq: Sequence[Any] | None = None
        self.source: Iterator[Any] | None = None
        self.total: int | None = None
        if _is_sequence(items):
            self.seq = items  # type: ignore[assignment]
            self.total = len(self.seq)  # type: ignore[arg-type]
            self.skey = core.register_sequence(self.seq)  # type: ignore[arg-type]
        else:
            self.source = iter(items)
            length = getattr(items, "__len__", None)
            if callable(length):
                try:
                    self.total = int(length())
                except Exception:
                    self.total = None
        self.next_index = 0  # the next item not yet taken from the source
        self.exhausted = False
        self.requeued: deque[Task] = deque()
        self.outstanding = 0  # tasks sent and not finished
        self.results: dict[int, Any] = {}
        self.arrived: deque[tuple[int, Any]] = deque()
        self.errors: list[tuple[int, ErrorFactory]] = []
        self.n_done = 0
        self.n_failed = 0
        self.not_run = 0  # items dropped by a timeout or a cancel
        self.timed_out = False
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.requeued and self.outstanding == 0

    def item_name(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def has_work(self) -> bool:
        return bool(self.requeued) or not self.exhausted

    def next_task(self, worker: Worker, n_workers: int) -> Task | None:
        task = self.requeued.popleft() if self.requeued else self._new_task(n_workers)
        if task is None:
            return None
        if task.items is None and (self.skey is None or self.skey not in worker.sequences):
            seq = self.seq
            assert seq is not None
            items, size = [], 0
            for i in range(task.start, task.start + task.count):
                items.append(seq[i])
                size += sys.getsizeof(items[-1])
                if size >= _TASK_BYTES:
                    break
            if len(items) < task.count:  # big items: the rest is another task
                rest = Task(self, self.core.new_tid(), task.start + len(items), 0, None)
                rest.count = task.count - len(items)
                self.requeued.appendleft(rest)
                task.count = len(items)
            task.items = items
        return task

    def wants_more(self, worker: Worker, n_workers: int) -> bool:
        """Whether ``worker`` may take another task of this job.

        While items are quick: up to ``IN_FLIGHT`` tasks, so a worker never
        waits for a round trip. Once they are slow, one task, and the next only
        when the worker starts the last item of it (the parent learns that from
        the result of the item before): a round trip is then hidden behind that
        item, and no chunk is handed out more than one item before it is needed
        (two queued chunks could keep a worker busy while another one is idle
        at the end)."""
        held = worker.inflight
        if not held:
            return True
        if len(held) >= IN_FLIGHT:
            return False
        done = self.n_done + self.n_failed
        if done < n_workers:
            return True
        per_item = (time.monotonic() - self.started) * n_workers / done
        if per_item <= _SLOW_ITEM:
            return True
        task = held[0]
        return 0 < task.done == task.count - 1

    def prefetch(self, n_workers: int) -> bool:
        """Whether there is work, taking the next chunk from the source to know."""
        if not self.requeued and not self.exhausted:
            task = self._new_task(n_workers)
            if task is not None:
                self.requeued.append(task)
        return self.has_work()

    def _chunk(self, n_workers: int) -> int:
        if self.chunksize is not None:
            return self.chunksize
        if self.total is not None:
            # Guided: a quarter of a fair share of what is left, so chunks shrink
            # towards the end and every worker finishes at about the same time.
            left = self.total - self.next_index
            return max(1, math.ceil(left / (4 * n_workers)))
        done = self.n_done + self.n_failed
        if not done:
            return 1
        per_item = (time.monotonic() - self.started) * n_workers / done
        return max(1, min(1024, int(_CHUNK_SECONDS / max(per_item, 1e-7))))

    def _new_task(self, n_workers: int) -> Task | None:
        if self.exhausted:
            return None
        size = self._chunk(n_workers)
        start = self.next_index
        items: list[Any] | None = None
        if self.seq is not None:
            count = min(size, self.total - start)  # type: ignore[operator]
        else:
            assert self.source is not None
            # Pickled and sent: at most _TASK_BYTES of items (roughly), however
            # many the chunk size allows.
            items, nbytes = [], 0
            for item in itertools.islice(self.source, size):
                items.append(item)
                nbytes += sys.getsizeof(item)
                if nbytes >= _TASK_BYTES:
                    break
            count = len(items)
        if count <= 0:
            self.exhausted = True
            return None
        self.next_index = start + count
        if self.seq is not None and self.next_index >= self.total:  # type: ignore[operator]
            self.exhausted = True
        return Task(self, self.core.new_tid(), start, count, items)

    def record(self, index: int, ok: bool, value: Any) -> None:
        if ok:
            self.n_done += 1
            if self.ordered:
                self.results[index] = value
            else:
                self.arrived.append((index, value))
        else:
            self.n_failed += 1
            self.errors.append((index, value))
        if self.on_item is not None:
            self.on_item(ok)

    def drop_rest(self) -> None:
        """Nothing more of this job will run (a timeout or a cancel)."""
        dropped = sum(t.count - t.done for t in self.requeued)
        self.requeued.clear()
        if not self.exhausted:
            if self.total is not None:
                dropped += self.total - self.next_index
            self.exhausted = True
        self.not_run += dropped


def _is_sequence(items: object) -> bool:
    if isinstance(items, Sequence):
        return True
    # numpy arrays are indexable and sized but not registered as Sequence.
    return hasattr(items, "__array_interface__") and hasattr(items, "__len__")
