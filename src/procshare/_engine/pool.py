"""The pool's scheduler: the parent's side of a pool.

A worker is a child of :class:`~procshare._engine.children.ChildrenPart`
like any ``@forked`` call (so its death is reported, and it is cancelled and
reaped, exactly as ``children()`` does), running
:func:`~procshare._engine.workers.worker_main`: it reads *tasks* from its
own channel (a socket pair, see ``_backends/api_channel.py``) and writes its
results back in batches. The wire format and both ends of a channel are
``_engine/workers.py``'s; the jobs and their tasks ``_engine/jobs.py``'s.
There is no lock shared between workers, so a worker killed at any instant
strands nobody (``multiprocessing.Pool`` hangs for good there, CPython
gh-96062).

The parent keeps at most two tasks (chunks of items) in flight per worker,
and knows which items of them have come back: when a worker dies, the item
it was running (published on its board) fails with the worker's outcome
(``ChildKilled``, ...); the rest of its chunks go back to their jobs and a
fresh worker is forked. The parent waits on every channel and every
worker's pidfd in one poll.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

from procshare._engine import transport
from procshare._engine.children import CANCEL_GRACE, ChildrenPart
from procshare._engine.jobs import ErrorFactory, Job, Task
from procshare._engine.workers import FUNCTION, HIGHEST, RUN, Worker, worker_main
from procshare.errors import ChildError, ChildTimeout

# Workers in a row that may die between items, by a signal, before the next
# death fails the item it would have run (see Core._died).
_SILENT_DEATHS = 3
_NO_PIDFD_SLICE = 0.005


class Core:
    """The parent's scheduler: workers, their channels, and the jobs they run."""

    def __init__(
        self,
        part: ChildrenPart,
        *,
        workers: int,
        name: str,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.part = part
        self.backend = part.backend
        self.n_workers = workers
        self.name = name
        self.initializer = initializer
        self.initargs = initargs
        self.workers: list[Worker] = []
        self.retiring: list[Worker] = []  # closed, not reaped yet
        self.jobs: list[Job] = []
        self.functions: dict[int, Callable[..., Any]] = {}
        self.by_id: dict[int, tuple[int, bytes | None]] = {}  # id(fn) -> key, pickle
        self.sequences: dict[int, Sequence[Any]] = {}
        self._keys = itertools.count(1)
        self._tids = itertools.count(1)
        self.forked = 0
        self.broken: ErrorFactory | None = None
        self.closed = False
        self.silent_deaths = 0  # workers in a row that died between items

    # ---------------------------------------------------------- functions

    def new_tid(self) -> int:
        """A task id: 32 bits on the wire, never 0 (0 marks a worker's "ready")."""
        return next(self._tids) & 0xFFFFFFFF or next(self._tids) & 0xFFFFFFFF

    def register_function(self, fn: Callable[..., Any]) -> int:
        """A key the workers can run ``fn`` by. Workers forked after this call
        inherit it; running ones get it pickled (a module-level function
        pickles as its name), or, when it does not pickle (a lambda, a
        closure), are replaced by fresh forks once idle."""
        known = self.by_id.get(id(fn))
        if known is not None and self.functions.get(known[0]) is fn:
            return known[0]
        key = next(self._keys)
        self.functions[key] = fn
        data: bytes | None = None
        if self.workers:
            try:
                data = pickle.dumps(fn, protocol=HIGHEST)
            except Exception:
                data = None
        self.by_id[id(fn)] = (key, data)
        return key

    def register_sequence(self, seq: Sequence[Any]) -> int:
        key = next(self._keys)
        self.sequences[key] = seq
        return key

    # --------------------------------------------------------------- jobs

    def add(self, job: Job) -> Job:
        if self.closed:
            raise RuntimeError("this pool is closed")
        self.jobs.append(job)
        return job

    def finish(self, job: Job) -> None:
        """The job is done with: forget its sequence (workers forked later need not
        inherit it)."""
        if job in self.jobs:
            self.jobs.remove(job)
        if job.skey is not None:
            self.sequences.pop(job.skey, None)

    # ------------------------------------------------------------ workers

    def _fork(self) -> Worker:
        near, far = self.backend.channel_pair()
        board = self.backend.channel_board(2)
        self.forked += 1
        main = functools.partial(
            worker_main,
            self.backend,
            far,
            board,
            dict(self.functions),
            dict(self.sequences),
            self.initializer,
            self.initargs,
        )
        # A worker belongs to no user scope (a map inside `with ps.children()`
        # does not add its workers to that block), and is a daemon: a pool
        # left open is terminated at interpreter exit rather than waited for.
        stack = self.part.scope_stack()
        saved = stack[:]
        stack.clear()
        rec = None
        w = None
        try:
            try:
                name = f"{self.name} worker {self.forked}"
                rec = self.part.start(main, (), {}, name, None, True)
            finally:
                stack[:] = saved
                self.backend.process_close(far)
            w = Worker(self.backend, rec, near, board, set(self.functions), set(self.sequences))
            w.ready = self.initializer is None
            self.workers.append(w)
        except BaseException:
            # Ctrl-C can land after the fork and before the worker is listed
            # (the child already shows in /proc): stop that child here, since
            # shutdown() only knows the listed workers.
            if w is None or w not in self.workers:
                self.backend.process_close(near)
                if rec is not None:
                    self.part.terminate_all(
                        [rec], cancel="its pool was left early", grace=CANCEL_GRACE
                    )
            raise
        return w

    def _can_run(self, w: Worker, job: Job) -> bool:
        """Whether ``w`` knows ``job``'s function or can be sent it (pickled)."""
        if job.fkey in w.functions:
            return True
        data = self.by_id.get(id(self.functions[job.fkey]), (0, None))[1]
        if data is None:
            return False
        w.send(pickle.dumps((FUNCTION, job.fkey, data), protocol=HIGHEST))
        w.functions.add(job.fkey)
        return True

    def _dispatch(self, w: Worker, task: Task) -> None:
        job = task.job
        items = task.items
        if items is not None and not isinstance(items, list):
            items = list(items)
        try:
            body = pickle.dumps(
                (RUN, task.tid, job.fkey, job.star, job.skey, task.start, task.count, items),
                protocol=HIGHEST,
            )
        except Exception:
            task = self._unpicklable(task)
            if task.count == 0:
                return
            body = pickle.dumps(
                (RUN, task.tid, job.fkey, job.star, None, 0, task.count, task.items),
                protocol=HIGHEST,
            )
        job.outstanding += 1
        w.inflight.append(task)
        w.send(body)

    def _unpicklable(self, task: Task) -> Task:
        """Fail the items of ``task`` that do not pickle; a task of the others."""
        job = task.job
        keep: list[Any] = []
        indices: list[int] = []
        assert task.items is not None
        for off, item in enumerate(task.items):
            try:
                pickle.dumps(item, protocol=HIGHEST)
            except Exception as exc:
                detail = (
                    f"item {task.start + off}, a {type(item).__qualname__}, could not be "
                    "pickled to send it to a worker; pass picklable items, or a sequence "
                    "(list, tuple, range, array) the workers inherit when they are forked"
                )
                payload = transport.raised_payload(exc, detail)
                common = {"pid": None, "name": job.item_name(task.start + off)}
                common |= {"exitcode": None, "signal": None}
                job.record(task.start + off, False, transport.raised_error(payload[1:], common))
            else:
                keep.append(item)
                indices.append(task.start + off)
        if not keep:
            return Task(job, task.tid, task.start, 0, [])
        # Requeue the picklable ones one by one (their indices are not contiguous).
        for i, item in zip(indices[1:], keep[1:], strict=True):
            job.requeued.appendleft(Task(job, self.new_tid(), i, 1, [item]))
        return Task(job, task.tid, indices[0], 1, [keep[0]])

    def fill(self) -> None:
        """Give workers work, as much as ``Job.wants_more`` lets them hold; fork workers (lazily,
        so they inherit what exists at their first use) and replacements."""
        if self.broken is not None:
            return
        for job in self.jobs:
            if not job.has_work():
                continue
            for w in list(self.workers):
                if not self._can_run(w, job):
                    # Forked before a function that does not pickle: replace it
                    # with a fork that inherits it, once it is idle.
                    if not w.inflight:
                        self._retire(w)
                    continue
                while job.wants_more(w, self.n_workers) and self._fill_one(w, job):
                    pass
            # Fork only for work that exists (an iterator may be empty).
            while len(self.workers) < self.n_workers and job.prefetch(self.n_workers):
                w = self._fork()
                while job.wants_more(w, self.n_workers) and self._fill_one(w, job):
                    pass

    def _fill_one(self, w: Worker, job: Job) -> bool:
        task = job.next_task(w, self.n_workers)
        if task is None:
            return False
        self._dispatch(w, task)
        return True

    def _retire(self, w: Worker) -> None:
        """Let go of an idle worker: closing its channel makes it exit."""
        self.workers.remove(w)
        w.close()
        self.retiring.append(w)

    # ------------------------------------------------------------- events

    def step(self, deadline: float | None, until: Job | None = None) -> None:
        """Wait once for results, deaths or room to send (at most until
        ``deadline``), then handle what happened and refill the workers.
        Returns at once if ``until`` is finished (filling may finish a job
        whose source turned out empty)."""
        self.fill()
        if until is not None and until.finished:
            return
        self._reap_retired()
        now = time.monotonic()
        for job in list(self.jobs):
            if job.deadline is not None and job.deadline <= now and not job.finished:
                self.expire(job)
        readable: list[int] = []
        writable: list[int] = []
        by_fd: dict[int, Worker] = {}
        deaths: dict[int, Worker] = {}
        blind = False
        for w in self.workers:
            if w.fd is not None:
                readable.append(w.fd)
                by_fd[w.fd] = w
                if w.out:
                    writable.append(w.fd)
            if w.rec.wait_fd is not None:
                readable.append(w.rec.wait_fd)
                deaths[w.rec.wait_fd] = w
            else:
                blind = True
        limit = deadline
        for job in self.jobs:
            if job.deadline is not None and (limit is None or job.deadline < limit):
                limit = job.deadline
        wait = None if limit is None else max(0.0, limit - now)
        if blind or self.retiring:
            wait = _NO_PIDFD_SLICE if wait is None else min(wait, _NO_PIDFD_SLICE)
        if not readable:
            if wait:
                time.sleep(wait)
            return
        ins, outs = self.backend.channel_wait(readable, writable, wait)
        for fd in outs:
            by_fd[fd].flush()
        dead: list[Worker] = []
        for fd in ins:
            if fd in by_fd:
                by_fd[fd].receive(self._batch)
            else:
                dead.append(deaths[fd])
        if blind:
            dead += [w for w in self.workers if w.rec.wait_fd is None and w not in dead]
        for w in dead:
            if self.part.advance(w.rec):
                self._died(w)
        self.fill()

    def _batch(self, w: Worker, tid: int, first: int, count: int, body: memoryview) -> None:
        """Results of ``count`` items of task ``tid`` from offset ``first`` on."""
        self.silent_deaths = 0  # results: workers are not dying in a loop
        task = w.inflight[0]
        assert task.tid == tid, (task.tid, tid)
        assert task.done == first, (task.done, first)
        job = task.job
        start = task.start + first
        try:
            values, errors = pickle.loads(body)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            for i in range(count):
                common = w.common(job.item_name(start + i))
                job.record(start + i, False, transport.not_unpickled("its result", exc, common))
        else:
            if not errors and job.on_item is None:  # the common case, in bulk
                if job.ordered:
                    job.results.update(zip(range(start, start + count), values, strict=True))
                else:
                    job.arrived.extend(zip(range(start, start + count), values, strict=True))
                job.n_done += count
                values = ()
            for i, value in enumerate(values):
                if errors and i in errors:
                    common = w.common(job.item_name(start + i))
                    job.record(start + i, False, transport.raised_error(errors[i][1:], common))
                else:
                    job.record(start + i, True, value)
        task.done += count
        if task.done == task.count:
            w.inflight.popleft()
            task.job.outstanding -= 1

    def _died(self, w: Worker) -> None:
        """A worker ended: what it sent is in; the item it was running fails with
        its outcome, the rest of its tasks go back to their jobs."""
        w.receive_all(self._batch)
        if w in self.workers:
            self.workers.remove(w)
        w.close()
        inflight = list(w.inflight)
        w.inflight.clear()
        if not w.ready and not any(t.job.timed_out or t.job.cancelled for t in inflight):
            # The initializer failed (or the worker died in it): every worker
            # would do the same. The pool is broken; its jobs end with this error.
            self._break(w)
            return
        running_tid, running_off = w.board[0], w.board[1]
        # Between items: a worker killed by a signal (waiting for its next
        # task, say) fails nothing, its tasks just move. One that ended on its
        # own (it could not unpickle a function it was sent), or a run of
        # such deaths, fails the first item it had not reported: something
        # must fail, or workers dying the same way would be replaced forever.
        exit_ = w.rec.exit
        killed = exit_ is not None and exit_.signal is not None
        self.silent_deaths = self.silent_deaths + 1 if running_tid == 0 and inflight else 0
        blame_next = running_tid == 0 and (not killed or self.silent_deaths > _SILENT_DEATHS)
        blamed = False
        for task in inflight:
            job = task.job
            job.outstanding -= 1
            stopped = job.timed_out or job.cancelled
            culprit: int | None = None
            if not blamed:
                if task.tid == running_tid and task.done <= running_off < task.count:
                    culprit = running_off  # the item it was running, as it published
                elif blame_next and task.done < task.count:
                    culprit = task.done
            pieces = [(task.done, task.count)]
            if culprit is not None:
                blamed = True
                pieces = [(task.done, culprit), (culprit + 1, task.count)]
                if not stopped:
                    index = task.start + culprit
                    w.rec.name = job.item_name(index)  # read by its error, decoded once
                    if self.part.outcome(w.rec)[0]:  # exited 0 without a result
                        job.record(index, False, self._exited_silently(w, job, index))
                    else:
                        rec = w.rec
                        job.record(index, False, lambda rec=rec: self.part.outcome(rec)[1])
                else:
                    job.not_run += 1
            # Items it finished but could not report yet run again (at most
            # _BATCH_SECONDS of them); the ones it had not reached run later.
            for lo, hi in reversed(pieces):
                if hi <= lo:
                    continue
                if stopped:
                    job.not_run += hi - lo
                    continue
                items = None if task.items is None else task.items[lo:hi]
                job.requeued.appendleft(Task(job, self.new_tid(), task.start + lo, hi - lo, items))

    def _exited_silently(self, w: Worker, job: Job, index: int) -> ErrorFactory:
        common = w.common(job.item_name(index))
        return lambda: ChildError(
            "its worker exited (status 0) while running it, without a result", **common
        )

    def _break(self, w: Worker) -> None:
        rec = w.rec
        if self.part.outcome(rec)[0]:
            common = w.common(w.rec.name)

            def factory() -> ChildError:
                return ChildError("the pool's worker exited during its initializer", **common)
        else:

            def factory() -> ChildError:
                err = self.part.outcome(rec)[1]
                assert isinstance(err, ChildError)
                return err

        self.broken = factory
        for job in self.jobs:
            job.drop_rest()
            job.outstanding = 0
        self.shutdown(cancel=True)

    def _reap_retired(self) -> None:
        if self.retiring:
            self.retiring = [w for w in self.retiring if not self.part.advance(w.rec)]

    # ------------------------------------------------- timeouts, cancelling

    def expire(self, job: Job) -> None:
        """``job``'s timeout ran out: its running items fail with ``ChildTimeout``,
        their workers are cancelled (the engine's terminate path) and replaced;
        its other items are not run."""
        job.timed_out = True
        job.drop_rest()
        self._stop_running(job, timed_out=True)

    def cancel(self, job: Job) -> None:
        """Nobody wants ``job``'s results any more (an ``imap`` left early)."""
        job.cancelled = True
        job.drop_rest()
        self._stop_running(job, timed_out=False)

    def _stop_running(self, job: Job, *, timed_out: bool) -> None:
        busy = [w for w in self.workers if any(t.job is job for t in w.inflight)]
        if not busy:
            return
        for w in busy:
            w.receive_all(self._batch)
        busy = [w for w in busy if any(t.job is job for t in w.inflight)]
        reason = "the map's timeout ran out" if timed_out else "its imap was left early"
        self.part.terminate_all([w.rec for w in busy], cancel=reason, grace=CANCEL_GRACE)
        for w in busy:
            running = w.running()
            self._died(w)
            if timed_out and running is not None and running[0] is job:
                index = running[1]
                common = w.common(job.item_name(index))
                job.record(
                    index,
                    False,
                    lambda common=common: ChildTimeout(
                        "the timeout= of the whole map ran out while it ran; the items "
                        "not started were not run",
                        timeout=job.timeout,
                        **common,
                    ),
                )
                job.not_run = max(0, job.not_run - 1)

    def shutdown(self, *, cancel: bool) -> None:
        """Let every worker go and reap it. ``cancel``: terminate those still
        running (the engine's terminate path), else let them finish what they
        run and exit when their channel closes."""
        self.closed = True
        workers, self.workers = self.workers, []
        for w in workers:
            w.close()
        recs = [w.rec for w in workers + self.retiring]
        self.retiring = []
        try:
            if cancel:
                self.part.terminate_all(recs, cancel="its pool was left early", grace=CANCEL_GRACE)
                return
            while True:
                recs = [r for r in recs if not self.part.advance(r)]
                if not recs:
                    return
                self.part.wait_any(recs, None)
        except BaseException:
            self.part.terminate_all(recs, cancel="its pool was left early", grace=CANCEL_GRACE)
            raise
