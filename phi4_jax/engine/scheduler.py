"""The scheduler: continuous batching of many clients' rows over one set of decode rows and one KV cache.

Clients `submit` rows (token ids, SamplingParams, stop ids) from any thread and read each row's
new tokens from the returned `Job` as they come. One thread owns a `Generation` whose rows are
the decode slots. Between device calls it admits waiting rows into free slots (each prompt
prefilled on its own, `Engine.start`, then joined into the running batch), runs `steps_per_call`
decode steps for every running row, and delivers the tokens; a row that finishes, or that
`Job.stop` ended (a stop string the client's detokenizer found, or a client gone), frees its slot
at once. The slots grow in powers of two up to `max_batch` as rows arrive and shrink as they
leave, and the cache is as long as the longest running row needs, so a lone request decodes at
batch 1. Each row gets the tokens it would get alone: its own positions, token count (its
sampling step), stop ids, limit and sampling parameters.

Prompts admitted in one round hold at most `prefill_tokens` tokens together; a longer prompt is
prefilled `prefill_tokens` at a time, one piece per round (`Engine.start_in_pieces`), so running
streams wait at most about one such budget between their steps while it is read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from phi4_jax.engine.engine import Engine, Generation, bucket, cache_length
from phi4_jax.engine.prefill import PREFILL_TOKENS
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
    """New tokens of one row of a job; `finish_reason` ("stop", "length", "abort", or "error" with
    `error`) is set on the row's last output. `logprobs` (when the row's params ask): per token,
    (its log-probability, [(token, log-probability) of the most likely ones])."""

    row: int
    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list | None = None


@dataclasses.dataclass(frozen=True)
class Load:
    """What the scheduler holds now: rows decoding, rows waiting, and decode slots allocated; and the
    wall seconds its thread has spent in prefill and in decode calls so far."""

    running: int
    waiting: int
    slots: int
    max_batch: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class Job:
    """The rows of one client request. `deliver` is called on the scheduler's thread with each
    RowOutput; `stop(row)` and `cancel()` may be called from any thread."""

    def __init__(self, rows: Sequence[Row], deliver: Callable[[RowOutput], None]):
        self.rows, self.deliver = list(rows), deliver
        self._stopped: set[int] = set()
        self.cancelled = False
        self._lock = threading.Lock()

    def stop(self, row: int | None = None) -> None:
        """Ends `row` (every row when None) at the scheduler's next device call, finish reason
        "stop" (a stop string found)."""
        with self._lock:
            self._stopped.update(range(len(self.rows)) if row is None else [row])

    def cancel(self) -> None:
        """Ends every unfinished row at the next device call, finish reason "abort" (the client went)."""
        with self._lock:
            self.cancelled = True
            self._stopped.update(range(len(self.rows)))

    def stopped(self) -> set[int]:
        with self._lock:
            return set(self._stopped)


@dataclasses.dataclass
class _Seat:
    """A running row in a slot: its job, its index there, and the cache slots it may reach."""

    job: Job
    row: int
    needed: int


class Scheduler:
    """Runs submitted rows on `engine` in a thread of its own (`start`, `shutdown`)."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 256,
                 steps_per_call: int = STEPS_PER_CALL, prefill_tokens: int = PREFILL_TOKENS):
        if min(max_batch, max_queue, steps_per_call, prefill_tokens) < 1:
            raise ValueError("max_batch, max_queue, steps_per_call and prefill_tokens must be at least 1")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.steps_per_call, self.prefill_tokens = steps_per_call, prefill_tokens
        self._waiting: collections.deque[tuple[Job, int]] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._gen: Generation | None = None  # the decode slots (None while every one is free)
        self._seats: list[_Seat | None] = []  # per slot
        self._staged: tuple[Job, int, Iterator] | None = None  # a long prompt being prefilled in pieces
        self._seconds = {"prefill": 0.0, "decode": 0.0}  # wall time of the device calls, by kind
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

    def load(self) -> Load:
        with self._wake:
            return Load(running=self._occupied(), waiting=len(self._waiting), slots=len(self._seats),
                        max_batch=self.max_batch, prefill_seconds=self._seconds["prefill"],
                        decode_seconds=self._seconds["decode"])

    def warm_up(self, ids: Sequence[int], max_tokens: int, timeout: float | None = None) -> None:
        """Compiles what serving runs first: waves of 1, 2, 4 .. `max_batch` rows of prompt `ids`
        with `max_tokens` (the cache length of a typical request), each ended after its first
        decode call. Raises Phi4Error when a row fails."""
        row = Row(list(ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True), frozenset())
        wave = 1
        while True:
            finished, errors, jobs, outputs = threading.Semaphore(0), [], [], collections.Counter()

            def deliver(out: RowOutput):
                outputs[out.row] += 1
                if out.finish_reason is None and outputs[out.row] > 1:
                    jobs[0].stop(out.row)  # the prefill's token, then one decode call: enough
                elif out.finish_reason is not None:
                    errors.extend([out.error] if out.finish_reason == "error" else [])
                    finished.release()

            with self._wake:  # (the thread delivers nothing of this job before `jobs` holds it)
                jobs.append(self.submit([row] * wave, deliver))
            for _ in range(wave):
                if not finished.acquire(timeout=timeout):
                    raise Phi4Error(f"the warm-up did not finish within {timeout} s")
            if errors:
                raise Phi4Error(f"the warm-up failed: {errors[0]}")
            if wave == self.max_batch:
                return
            wave = min(2 * wave, self.max_batch)

    def shutdown(self, timeout: float | None = None) -> None:
        """Takes no more rows, ends the waiting ones ("abort"), lets the running ones finish."""
        with self._wake:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._wake.notify()
        for job, r in waiting:
            job.deliver(RowOutput(r, [], "abort"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # The scheduler's thread.

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._occupied() and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting and not self._occupied():
                    return
                admitted = self._admissible()
            if self._staged is not None:
                self._feed()
            for job, r in admitted:
                self._admit(job, r)
            if self._running():
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001  a failed call fails its rows, not the server
                    self._fail([s for s in self._seats if s is not None], e)
                    with self._wake:
                        self._gen, self._seats = None, []
            self._shrink()

    def _length(self) -> int | None:
        """The running cache's length: a new row's cache is made as long, to join as it is."""
        return None if self._gen is None else self._gen.length

    def _running(self) -> bool:
        return any(s is not None for s in self._seats)

    def _occupied(self) -> int:
        """Rows holding a slot: decoding, or being prefilled in pieces."""
        return sum(s is not None for s in self._seats) + (self._staged is not None)

    def _admissible(self) -> list[tuple[Job, int]]:
        """Waiting rows to admit now (called holding the lock): while slots are free and no long
        prompt is being read, prompts of at most `prefill_tokens` tokens together; a longer one at
        the head of the queue starts its pieces (`_staged`) when it comes alone."""
        if self._staged is not None:
            return []  # this round's budget is the staged prompt's next piece
        free = self.max_batch - self._occupied()
        taken, tokens = [], 0
        while self._waiting and len(taken) < free:
            job, r = self._waiting[0]
            size = len(job.rows[r].ids)
            if size > self.prefill_tokens:
                if not taken:
                    self._waiting.popleft()
                    row = job.rows[r]
                    pieces = self.engine.start_in_pieces(row.ids, row.params, sorted(row.stop_ids),
                                                         self.prefill_tokens, self._length())
                    self._staged = (job, r, pieces)
                break
            if taken and tokens + size > self.prefill_tokens:
                break
            self._waiting.popleft()
            taken.append((job, r))
            tokens += size
        return taken

    def _feed(self) -> None:
        """The staged prompt's next piece; seats the row once its last piece is in."""
        job, r, pieces = self._staged
        if r in job.stopped():
            self._staged = None
            job.deliver(RowOutput(r, [], "abort" if job.cancelled else "stop"))
            return
        try:
            with self._timed("prefill"):
                one = next(pieces)
        except Exception as e:  # noqa: BLE001  a row that cannot start fails alone
            with self._wake:
                self._staged = None
            self._fail([_Seat(job, r, 0)], e)
            return
        if one is None:
            return  # more pieces to come, after the running rows' next call
        with self._wake:
            self._staged = None
        self._seat(job, r, one)

    def _admit(self, job: Job, r: int) -> None:
        """Prefills row `r` of `job` alone, then `_seat`s it."""
        if r in job.stopped():
            job.deliver(RowOutput(r, [], "abort" if job.cancelled else "stop"))
            return
        row = job.rows[r]
        try:
            with self._timed("prefill"):
                one = self.engine.start([row.ids], [row.params], [sorted(row.stop_ids)], length=self._length())
        except Exception as e:  # noqa: BLE001  a row that cannot start fails alone
            self._fail([_Seat(job, r, 0)], e)
            return
        self._seat(job, r, one)

    def _seat(self, job: Job, r: int, one: Generation) -> None:
        """Delivers a prefilled row's first token and joins it to the running rows if it runs on."""
        row = job.rows[r]
        try:
            with self._timed("prefill"):  # (the prefill's token: waits for the prefill to end)
                first, reason = one.advance(0)[0], one.finish_reasons()[0]
        except Exception as e:  # noqa: BLE001
            self._fail([_Seat(job, r, 0)], e)
            return
        job.deliver(RowOutput(r, first, reason, logprobs=one.new_logprobs[0]))
        if reason is not None:
            return
        needed = min(len(row.ids) + row.params.max_tokens, self.engine.max_context)
        seat = _Seat(job, r, needed)
        with self._wake:
            if self._gen is None:
                self._gen, self._seats = one, [seat]
                return
        try:
            self._join(one, seat)
        except Exception as e:  # noqa: BLE001
            self._fail([seat], e)

    def _join(self, one: Generation, seat: _Seat) -> None:
        gen = self._gen
        if None not in self._seats:  # every slot taken: twice the slots (at most max_batch)
            grown = min(2 * gen.batch, self.max_batch)
            gen.resize(list(range(gen.batch)) + [None] * (grown - gen.batch))
            with self._wake:
                self._seats += [None] * (grown - len(self._seats))
        slot = self._seats.index(None)
        gen.join(slot, one)
        with self._wake:
            self._seats[slot] = seat

    def _step(self) -> None:
        """One device call of every running row; delivers their tokens and frees finished slots."""
        gen = self._gen
        ended = [i for i, s in enumerate(self._seats) if s is not None and s.row in s.job.stopped()]
        if ended:
            gen.stop(ended)
        with self._timed("decode"):
            new = gen.advance(self.steps_per_call)
        reasons = gen.finish_reasons()
        for i, seat in enumerate(self._seats):
            if seat is None:
                continue
            reason = "abort" if reasons[i] is not None and i in ended and seat.job.cancelled else reasons[i]
            if new[i] or reason is not None:
                seat.job.deliver(RowOutput(seat.row, new[i], reason, logprobs=gen.new_logprobs[i]))
            if reasons[i] is not None:
                with self._wake:
                    self._seats[i] = None

    def _shrink(self) -> None:
        """Fewer slots or a shorter cache once rows have left: to the power of two the running rows
        need when that is at most a quarter of what is allocated (hysteresis against thrashing)."""
        seated = [i for i, s in enumerate(self._seats) if s is not None]
        if not seated:
            with self._wake:
                self._gen, self._seats = None, []
            return
        gen = self._gen
        batch = min(bucket(len(seated), 1), self.max_batch)
        length = cache_length(max(self._seats[i].needed for i in seated), self.engine.max_context)
        batch = batch if 4 * batch <= gen.batch else gen.batch
        length = length if 4 * length <= gen.length else gen.length
        if (batch, length) == (gen.batch, gen.length):
            return
        rows = seated + [None] * (batch - len(seated))
        gen.resize(rows, length)
        with self._wake:
            self._seats = [self._seats[i] if i is not None else None for i in rows]

    @contextlib.contextmanager
    def _timed(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._wake:
                self._seconds[kind] += time.perf_counter() - start

    def _fail(self, seats: list[_Seat], error: Exception) -> None:
        message = str(error) if isinstance(error, Phi4Error) else f"{type(error).__name__}: {error}"
        for seat in seats:
            seat.job.deliver(RowOutput(seat.row, [], "error", message))
