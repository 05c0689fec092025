"""The scheduler: one thread that runs many clients' rows through the engine, batching what waits.

Clients `submit` rows (token ids, SamplingParams, stop ids) from any thread and read each row's
new tokens from the returned `Job` as they come. The thread takes up to `max_batch` waiting rows,
starts them together (`Engine.start`) and advances them `steps_per_call` steps per device call,
delivering tokens between calls; `Job.stop(row)` (a stop string the client's detokenizer found,
or a client gone) ends a row at the next call. Each row gets the tokens it would get alone.

This step batches the rows waiting when a batch starts; rows that arrive meanwhile wait for the
next batch. (Joining a running decode is the next step; the interface stays.)
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence

from phi4_jax.engine.engine import Engine
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.errors import Phi4Error

STEPS_PER_CALL = 8  # decode steps between deliveries: streams get a few tokens at a time


class QueueFullError(Phi4Error):
    """The scheduler already holds `max_queue` waiting rows."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to generate: prompt ids, sampling parameters and the token ids that end it."""

    ids: Sequence[int]
    params: SamplingParams
    stop_ids: frozenset[int]


@dataclasses.dataclass(frozen=True)
class RowOutput:
    """New tokens of one row of a job; `finish_reason` ("stop", "length", or "error" with `error`)
    is set on the row's last output."""

    row: int
    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None


class Job:
    """The rows of one client request. `deliver` is called on the scheduler's thread with each
    RowOutput; `stop(row)` may be called from any thread."""

    def __init__(self, rows: Sequence[Row], deliver: Callable[[RowOutput], None]):
        self.rows, self.deliver = list(rows), deliver
        self._stopped: set[int] = set()
        self._lock = threading.Lock()

    def stop(self, row: int | None = None) -> None:
        """Ends `row` (every row when None) at the scheduler's next device call."""
        with self._lock:
            self._stopped.update(range(len(self.rows)) if row is None else [row])

    def stopped(self) -> set[int]:
        with self._lock:
            return set(self._stopped)


class Scheduler:
    """Runs submitted rows on `engine` in a thread of its own (`start`, `shutdown`)."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 256,
                 steps_per_call: int = STEPS_PER_CALL):
        if max_batch < 1 or max_queue < 1 or steps_per_call < 1:
            raise ValueError("max_batch, max_queue and steps_per_call must be at least 1")
        self.engine, self.max_batch, self.max_queue, self.steps_per_call = engine, max_batch, max_queue, steps_per_call
        self._waiting: collections.deque[tuple[Job, int]] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="phi4_jax-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, rows: Sequence[Row], deliver: Callable[[RowOutput], None]) -> Job:
        """Queues a job's rows; raises QueueFullError (nothing queued) when they do not fit."""
        job = Job(rows, deliver)
        with self._wake:
            if self._closing:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) + len(job.rows) > self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} rows are waiting (at most {self.max_queue})")
            self._waiting.extend((job, r) for r in range(len(job.rows)))
            self._wake.notify()
        return job

    def shutdown(self, timeout: float | None = None) -> None:
        """Takes no more rows, ends the waiting ones ("abort"), lets the running batch finish."""
        with self._wake:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._wake.notify()
        for job, r in waiting:
            job.deliver(RowOutput(r, [], "abort"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting:
                    return
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001  a failed batch fails its rows, not the server
                message = str(e) if isinstance(e, Phi4Error) else f"{type(e).__name__}: {e}"
                for job, r in batch:
                    job.deliver(RowOutput(r, [], "error", message))

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        rows = [job.rows[r] for job, r in batch]
        gen = self.engine.start([row.ids for row in rows], [row.params for row in rows],
                                [sorted(row.stop_ids) for row in rows])
        done = [False] * len(batch)
        new = gen.advance(0)
        while True:
            reasons = gen.finish_reasons()
            for b, ((job, r), tokens) in enumerate(zip(batch, new)):
                if done[b]:
                    continue
                done[b] = reasons[b] is not None
                if tokens or done[b]:
                    job.deliver(RowOutput(r, tokens, reasons[b]))
            if gen.finished:
                return
            ended = [b for b, (job, r) in enumerate(batch) if not done[b] and r in job.stopped()]
            if ended:
                gen.stop(ended)
                new = [[] for _ in batch]
                continue
            new = gen.advance(self.steps_per_call)
