"""The engine: requests in (`add_request`, `abort`), one `step()` of the device at a time, outputs out.

The one generation core under the Python API, the command line and the server. It owns what
turns token ids into a client's answer: detokenizing (`StreamDecoder`), stop tokens and stop
strings, log-probabilities, and each request's statistics. The `Scheduler` decides which
requests run (pure policy); the `ModelRunner` runs the programs on the device batch. A step:
  1. ends the rows aborted or stopped since the last step;
  2. either prefills what the scheduler admits (waiting prompts packed end to end in one row, their
     keys and values then put into free rows of the running batch: continuous batching; or one
     piece of a long prompt), or runs up to `steps_per_call` decode steps of every running row
     (one device call): in turns while both have work, so a new request's first token comes back
     right after its prefill and running rows never wait more than one prefill;
  3. returns a `RequestOutput` per request that got tokens or ended; frees finished rows' slots.
Every request gets the tokens it gets alone, whatever runs beside it.

A failed device call fails the requests it touched (finish reason "error") and the engine goes on.
A request whose prompt begins with a sequence a row holds (running or finished, in the running batch
or, once every row left, the last batch: a chat's previous turn, a shared system prompt, a sibling)
prefills only the rest, from a copy of that row (`enable_prefix_caching`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from phi4_jax.engine import stats
from phi4_jax.engine.runner import Generation, ModelRunner, cache_length, common_prefix, mask_width
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.engine.scheduler import Load, Pieces, QueueFullError, Request, Scheduler
from phi4_jax.errors import ConfigError, Phi4Error
from phi4_jax.text.stops import request_stop_ids
from phi4_jax.text.structured import Grammar
from phi4_jax.text.tokenizer import Tokenizer

__all__ = ["Engine", "QueueFullError", "RequestOutput"]

STEPS_PER_CALL = 8  # decode steps per device call: streams get a few tokens at a time
# A held prefix is continued from this many tokens (any, for a prompt admitted alone): a continued
# prompt is prefilled alone, not packed with the others admitted with it.
REUSED_AT_LEAST = 32


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step gave a request: its new tokens and the text that became safe to show (whole
    characters, no part of a stop string), and, on its last output, `finish_reason`: "stop" (a stop
    token or string), "length", "abort" (`Engine.abort`) or "error" (with `error`). `logprobs`
    (when its params ask): per new token, (its log-probability, [(token, log-probability) of the
    most likely ones]). `prompt_logprobs` (when its params ask; on its first output): per prompt
    token, None for the first, then (its log-probability, [(token, log-probability) of the most
    likely ones]). `stats`: the request's counts and rates so far."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: stats.RequestStats
    logprobs: list | None = None
    error: str | None = None
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Running:
    """The engine's record of one request: the request, its detokenizer and statistics."""

    def __init__(self, request: Request, tokenizer: Tokenizer | None, grammar: Grammar | None = None):
        self.request, self.grammar = request, grammar  # (grammar: its structured outputs' matcher)
        self.decoder = tokenizer.stream(stop=request.params.stop, stop_ids=request.stop_ids) if tokenizer else None
        self.stats = stats.RequestStats.arriving(len(request.ids))
        self.ended: str | None = None  # "abort" or "stop": to end at the next step
        self.prompt_logprobs: list | None = None  # (computed at its prefill, sent with its first output)


class Engine:
    """Generates for many requests at once on one model runner.

    Args:
      runner: a `ModelRunner` (or a model, which gets one).
      tokenizer: detokenizes outputs and gives the model's stop tokens; None: token ids only (no
        text, no stop strings, stop tokens only those a request names).
      max_batch: rows decoded together (decode slots, allocated in powers of two as they fill).
      max_queue: requests that may wait for a slot; `add_request` beyond it raises QueueFullError.
      steps_per_call: decode steps per device call (outputs come every that many tokens).
      prefill_tokens: prompt tokens prefilled in one step at most; a longer prompt is read in
        pieces of it between decode calls.
      enable_prefix_caching: prefill only the part of a prompt after the longest leading part a
        row of the running (or the last) batch holds.
      fixed_length: every batch's cache holds this many slots per row (at most the context), so the
        programs a request can need are few and `warm_up` compiles them all; None: caches as long as
        their requests need (powers of two), programs compiled on first use.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None = None, *, max_batch: int = 16,
                 max_queue: int = 256, steps_per_call: int = STEPS_PER_CALL, prefill_tokens: int = 2048,
                 enable_prefix_caching: bool = True, fixed_length: int | None = None):
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be at least 1, got {steps_per_call}")
        self.runner = runner if isinstance(runner, ModelRunner) else ModelRunner(runner)
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(max_batch, max_queue, prefill_tokens)
        self.steps_per_call, self.enable_prefix_caching = steps_per_call, enable_prefix_caching
        if fixed_length is not None and not 1 <= fixed_length <= self.runner.max_context:
            raise ConfigError(f"fixed_length must be in [1, {self.runner.max_context}] (the context), "
                              f"got {fixed_length}")
        self.fixed_length = fixed_length
        self._requests: dict[str, _Running] = {}
        self._gen: Generation | None = None  # the running batch (rows: `scheduler.slots`)
        self._pieces = None  # the staged long prompt's prefill, one piece per next()
        self._idle: Generation | None = None  # the last batch, every row finished: its caches may be reused
        self._finished: list[RequestOutput] = []  # ended between steps (aborted while waiting)
        self._seconds = {"prefill": 0.0, "decode": 0.0}
        self._prefilled = False  # the last step prefilled: the next decodes (if any row runs)
        self._finish_reasons: collections.Counter[str] = collections.Counter()  # requests ended, by reason
        self._prefix = {"queried": 0, "hit": 0}  # prompt tokens looked up in the prefix cache, and found
        self._drafted = np.zeros(3, np.int64)  # speculation: row steps that drafted, draft tokens, accepted ones

    # Requests in.

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    stop_ids: Iterable[int] | None = None) -> None:
        """Queues a request. `stop_ids`: the token ids that end it (default: the model's stop tokens
        unless `params.ignore_eos`, and `params.stop_token_ids`). Raises ConfigError for a prompt that
        cannot run (empty, too long, a request id in use), QueueFullError when the queue is full."""
        self.add_requests([(request_id, prompt_ids, params, stop_ids)])

    def add_requests(self, requests: Sequence[tuple]) -> None:
        """Queues several (request_id, prompt_ids, params[, stop_ids]) at once: all or none."""
        made = [self._request(*r) for r in requests]
        ids = [r.request_id for r in made]
        if len(set(ids)) != len(ids) or any(i in self._requests for i in ids):
            raise ConfigError(f"a request id is in use already: {ids}")
        grammars = [self._grammar(r) for r in made]
        self.scheduler.add(made)
        for r, grammar in zip(made, grammars):
            self._requests[r.request_id] = _Running(r, self.tokenizer, grammar)

    def _request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 stop_ids: Iterable[int] | None = None) -> Request:
        params = params or SamplingParams()
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_context:
            raise ConfigError(f"the prompt has {len(ids)} tokens; the context holds {self.max_context} "
                              "(prompt + generated tokens): shorten the prompt or raise --max-context")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer: give the Engine one, or use stop_token_ids")
        if params.prompt_logprobs is not None and len(ids) > self.scheduler.prefill_tokens:
            raise ConfigError(f"prompt_logprobs needs a prompt of at most {self.scheduler.prefill_tokens} tokens "
                              f"(the engine's prefill_tokens: it is read in one piece), got {len(ids)}")
        if stop_ids is None:
            model_ids = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
            stop_ids = request_stop_ids(model_ids, params.ignore_eos, params.stop_token_ids)
        return Request(request_id, ids, params, frozenset(stop_ids))

    def check(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> None:
        """Raises what `add_request` would for this prompt and params (ConfigError, SamplingError),
        queueing nothing: the server's answer before it submits."""
        self._grammar(self._request("check", prompt_ids, params))

    def _grammar(self, request: Request) -> Grammar | None:
        """The matcher of the request's structured outputs (None: unconstrained); raises
        SamplingError for a constraint that does not compile, ConfigError without a tokenizer."""
        constraint = request.params.structured_outputs
        if constraint is None:
            return None
        if self.tokenizer is None:
            raise ConfigError("structured outputs need a tokenizer: give the Engine one")
        return self.tokenizer.grammars(self.runner.config.vocab_size).matcher(constraint)

    def _masks(self, requests: Sequence[Request | None], rows: int | None = None) -> np.ndarray | None:
        """The next token's mask of each request (`[rows, ceil(V / 32)]` int32, a bit a token, -1:
        any), or None when none is constrained. On the host, between device calls."""
        grammars = [None if r is None or r.request_id not in self._requests else self._requests[r.request_id].grammar
                    for r in requests]
        if all(g is None for g in grammars):
            return None
        masks = np.full((rows or len(requests), mask_width(self.runner.config.vocab_size)), -1, np.int32)
        for i, grammar in enumerate(grammars):
            if grammar is not None:
                grammar.fill(masks, i)
        return masks

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Ends a request (unknown or finished ones are ignored): its last output, finish reason
        `reason` ("abort"; "stop" for a stop the caller found), comes from the next step."""
        running = self._requests.get(request_id)
        if running is None or running.ended is not None:
            return
        running.ended = reason
        for request in self.scheduler.remove_waiting([request_id]):
            self._finished.append(self._final(self._requests.pop(request.request_id), reason))

    # What it holds.

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    def request_ids(self) -> list[str]:
        """The requests not finished yet."""
        return list(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._finished)

    def load(self) -> Load:
        return Load(running=self.scheduler.running, waiting=len(self.scheduler.waiting),
                    slots=len(self.scheduler.slots), max_batch=self.scheduler.max_batch,
                    prefill_seconds=self._seconds["prefill"], decode_seconds=self._seconds["decode"],
                    finished=dict(self._finish_reasons), prefix_queried_tokens=self._prefix["queried"],
                    prefix_hit_tokens=self._prefix["hit"], spec_drafts=int(self._drafted[0]),
                    spec_draft_tokens=int(self._drafted[1]), spec_accepted_tokens=int(self._drafted[2]))

    # The step.

    def step(self) -> list[RequestOutput]:
        """One round: ends what was stopped, then either prefills what is admitted (its first tokens
        come back at once) or runs one decode call of every running row, in turns while both have
        work; returns the outputs (one per request that got tokens or ended)."""
        outputs, self._finished = self._finished, []
        self._end_stopped(outputs)
        seated = self.scheduler.running - (self.scheduler.staged is not None)
        prefilled = False
        if not self._prefilled or not seated:  # a prefill step, then a decode step: neither starves
            if self._pieces is None:
                plan = self.scheduler.admit()
                if isinstance(plan, Pieces):
                    self._idle = None
                    self._pieces = self.runner.start_in_pieces(plan.request.ids, plan.request.params,
                                                               sorted(plan.request.stop_ids), plan.size,
                                                               self._length(), self._masks([plan.request]))
                elif plan:
                    self._prefill(plan, outputs)
                    prefilled = True
            if self._pieces is not None:
                self._feed(outputs)
                prefilled = True
        if not prefilled and self._gen is not None and seated:
            self._decode(outputs)
        self._prefilled = prefilled
        self._shrink(outputs)
        return outputs

    def outputs(self) -> Iterator[RequestOutput]:
        """Steps until the engine holds nothing, yielding every output (offline use)."""
        while self.has_unfinished_requests():
            yield from self.step()

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """Ends every request with `error` and drops the device state (after a failure the engine
        cannot account for); the engine is empty and usable after."""
        outputs, self._finished = self._finished, []
        outputs += [self._final(r, "error", error) for r in self._requests.values()]
        self._requests.clear()
        self.scheduler.waiting.clear()
        self.scheduler.slots, self.scheduler.staged = [], None
        self._gen = self._pieces = self._idle = None
        return outputs

    def _length(self) -> int | None:
        """The running cache's length: new rows' caches are made as long, to join as they are."""
        return None if self._gen is None else self._gen.length

    def _end_stopped(self, outputs: list[RequestOutput]) -> None:
        staged = self.scheduler.staged
        if staged is not None and self._requests[staged.request_id].ended:
            self.scheduler.staged, self._pieces = None, None
            running = self._requests.pop(staged.request_id)
            outputs.append(self._final(running, running.ended))
        slots = [i for i, r in enumerate(self.scheduler.slots)
                 if r is not None and self._requests[r.request_id].ended]
        if not slots:
            return
        try:
            self._gen.stop(slots)
        except Exception as e:  # noqa: BLE001  the batch is lost: its rows fail, the engine goes on
            self._fail_running(outputs, e)
            return
        for i in slots:
            running = self._requests.pop(self.scheduler.slots[i].request_id)
            self.scheduler.slots[i] = None
            outputs.append(self._final(running, running.ended))

    @contextlib.contextmanager
    def _timed(self, kind: str, requests: Sequence[Request] = ()):
        start, compiled = time.perf_counter(), stats.CLOCK.total
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self._seconds[kind] += seconds
            for r in requests:
                self._requests[r.request_id].stats.prefilled(seconds, stats.CLOCK.total - compiled)

    def _prefill(self, requests: list[Request], outputs: list[RequestOutput]) -> None:
        """Prefills the admitted prompts. A prompt whose leading part a row holds (running or
        finished, in the running batch or the idle one; at least REUSED_AT_LEAST tokens unless it is
        admitted alone: a chat's previous turn, a shared system prompt) continues a copy of that row
        (prefix caching); a prompt sharing as much of its start with one admitted with it (`n > 1`
        siblings) waits for that one's row, then continues it; the rest are packed together
        (`_admit`)."""
        previous, self._idle = self._idle, None
        if not self.enable_prefix_caching:
            self._admit(requests, outputs)
            return
        self._prefix["queried"] += sum(len(r.ids) for r in requests)
        alone = len(requests) == 1  # (a lone prompt packs with nothing: any held prefix is worth continuing)
        while requests:
            packed, later = [], []
            for request in requests:
                if request.params.prompt_logprobs is not None:  # (scored from its own prefill: all of it)
                    packed.append(request)
                    continue
                held = [(g, *g.held_prefix(request.ids, request.needed(self.max_context)))
                        for g in (self._gen, previous) if g is not None]
                gen, row, tokens = max(held, key=lambda h: h[2], default=(None, -1, 0))
                if tokens >= (1 if alone else REUSED_AT_LEAST):
                    taken = gen is previous and gen.batch == 1  # (no copy of a lone idle row: its cache is taken)
                    self._continue(request, gen, None if taken else row, outputs)
                    previous = None if taken else previous
                elif any(common_prefix(request.ids[:-1], p.ids) >= REUSED_AT_LEAST for p in packed):
                    later.append(request)
                else:
                    packed.append(request)
            if packed:
                self._admit(packed, outputs)
            requests = later

    def _admit(self, requests: list[Request], outputs: list[RequestOutput]) -> None:
        """Prefills prompts packed in one row, puts them into free rows of the running batch (grown
        as needed) and delivers their first tokens."""
        error = None
        with self._timed("prefill", requests):
            try:
                packed = self.runner.prefill_packed([r.ids for r in requests], [r.params for r in requests],
                                                    [sorted(r.stop_ids) for r in requests],
                                                    self.scheduler.prefill_tokens if self.fixed_length else None,
                                                    self._masks(requests))
                scored = self.runner.prompt_logprobs(packed, [r.params.prompt_logprobs for r in requests])
                for r, entries in zip(requests, scored):
                    self._requests[r.request_id].prompt_logprobs = entries
            except Exception as e:  # noqa: BLE001  prompts that cannot start fail alone
                error, alone = e, True
            else:
                try:
                    size, slots = self.scheduler.seat(requests)
                    if self._gen is None:
                        length = self.fixed_length or cache_length(
                            max(r.needed(self.max_context) for r in requests), self.max_context)
                        self._gen = self.runner.empty(size, length)
                    elif size > self._gen.batch:
                        self._gen.resize(list(range(self._gen.batch)) + [None] * (size - self._gen.batch))
                    first = self._gen.admit(slots, packed)
                except Exception as e:  # noqa: BLE001  the batch they joined is lost with them
                    error, alone = e, False
        if error is not None:
            if alone:
                outputs += [self._final(self._requests.pop(r.request_id), "error", error) for r in requests]
            else:
                self._fail_running(outputs, error)
            return
        gen, reasons, stopped = self._gen, self._gen.finish_reasons(), []
        for request, slot, tokens in zip(requests, slots, first):
            reason = self._emit(request, tokens, gen.new_logprobs[slot], reasons[slot], outputs)
            if reason is not None:
                self.scheduler.slots[slot] = None
                if reasons[slot] is None:
                    stopped.append(slot)  # a stop string in the first token: the row still runs on the device
        self._stop_rows(stopped, outputs)

    def _continue(self, request: Request, source: Generation, row: int | None, outputs: list[RequestOutput]) -> None:
        """Prefills the one prompt after the part of it that `source`'s row `row` holds, from a copy
        of that row (the source runs on unchanged; `row` None: the one-row `source` itself, whose
        cache it takes), then seats it."""
        try:
            with self._timed("prefill", [request]):
                new = self.runner.start([request.ids], [request.params], [sorted(request.stop_ids)],
                                        continuing=source if row is None else source.copy_row(row),
                                        allowed=self._masks([request]))
                first = new.advance(0)  # (waits for the prefill to end)
        except Exception as e:  # noqa: BLE001
            outputs.append(self._final(self._requests.pop(request.request_id), "error", e))
            return
        self._prefix["hit"] += new.reused_tokens
        self._requests[request.request_id].stats.cached_tokens = new.reused_tokens
        self._seat([request], new, first, outputs)

    def _feed(self, outputs: list[RequestOutput]) -> None:
        """The staged long prompt's next piece; seats its row after the last."""
        request = self.scheduler.staged
        try:
            with self._timed("prefill", [request]):
                new = next(self._pieces)
                first = new.advance(0) if new is not None else None
        except Exception as e:  # noqa: BLE001
            self.scheduler.staged, self._pieces = None, None
            outputs.append(self._final(self._requests.pop(request.request_id), "error", e))
            return
        if new is None:
            return  # more pieces, after the running rows' next decode call
        self.scheduler.staged, self._pieces = None, None
        self._seat([request], new, first, outputs)

    def _seat(self, requests: list[Request], new: Generation, first: list[list[int]],
              outputs: list[RequestOutput]) -> None:
        reasons = new.finish_reasons()
        going, stopped = [], []
        for b, r in enumerate(requests):
            reason = self._emit(r, first[b], new.new_logprobs[b], reasons[b], outputs)
            if reason is None:
                going.append(b)
            elif reasons[b] is None:
                stopped.append(b)  # a stop string in the first token: the row still runs on the device
        if not going:
            return
        if stopped:
            try:
                new.stop(stopped)
            except Exception as e:  # noqa: BLE001
                outputs += [self._final(self._requests.pop(requests[b].request_id), "error", e) for b in going]
                return
        if self._gen is None:
            self._gen = new
            self.scheduler.slots = [requests[b] if b in going else None for b in range(new.batch)]
            return
        try:
            size, slots = self.scheduler.seat([requests[b] for b in going])
            if size > self._gen.batch:
                self._gen.resize(list(range(self._gen.batch)) + [None] * (size - self._gen.batch))
            self._gen.join(slots, new, going)
        except Exception as e:  # noqa: BLE001  the joining rows and the batch they touched fail
            self._fail_running(outputs, e)

    def _decode(self, outputs: list[RequestOutput]) -> None:
        gen = self._gen
        try:
            with self._timed("decode"):
                new = gen.advance(self.steps_per_call, self._masks(self.scheduler.slots, gen.batch))
        except Exception as e:  # noqa: BLE001
            self._fail_running(outputs, e)
            return
        self._drafted += gen.drafted.sum(axis=0)
        reasons, stopped = gen.finish_reasons(), []
        for i, request in enumerate(self.scheduler.slots):
            if request is None:
                continue
            self._requests[request.request_id].stats.speculated(*gen.drafted[i])
            reason = self._emit(request, new[i], gen.new_logprobs[i], reasons[i], outputs)
            if reason is not None:
                self.scheduler.slots[i] = None
                if reasons[i] is None:
                    stopped.append(i)  # a stop string: the row still runs on the device
        self._stop_rows(stopped, outputs)

    def _stop_rows(self, rows: list[int], outputs: list[RequestOutput]) -> None:
        """Ends rows of the running batch whose requests the host ended (a stop string)."""
        if not rows:
            return
        try:
            self._gen.stop(rows)
        except Exception as e:  # noqa: BLE001
            self._fail_running(outputs, e)

    def _shrink(self, outputs: list[RequestOutput]) -> None:
        """Drops the batch once every row has left (keeping its cache for reuse until the next
        admission), or shrinks it as the scheduler says; drops its penalty state once no running row
        asks for it."""
        gen = self._gen
        if gen is None:
            return
        if not any(r is not None for r in self.scheduler.slots):
            self._gen, self.scheduler.slots = None, []
            if self.enable_prefix_caching and self.scheduler.staged is None:
                self._idle = gen
            return
        plan = self.scheduler.shrink(gen.batch, gen.length, self.max_context, keep_length=bool(self.fixed_length))
        try:
            if plan is not None:
                gen.resize(*plan)
            if gen.penalties_unused:  # (apart from a change of rows: no program for both at once)
                gen.resize(list(range(gen.batch)), penalties=False)
        except Exception as e:  # noqa: BLE001
            self._fail_running(outputs, e)

    def _fail_running(self, outputs: list[RequestOutput], error: BaseException) -> None:
        """Fails every row of the running batch (its device state is gone) and drops it."""
        for i, request in enumerate(self.scheduler.slots):
            if request is not None and request.request_id in self._requests:
                outputs.append(self._final(self._requests.pop(request.request_id), "error", error))
        self._gen, self.scheduler.slots = None, []

    def _emit(self, request: Request, tokens: list[int], logprobs: list | None, reason: str | None,
              outputs: list[RequestOutput]) -> str | None:
        """Turns a row's new tokens into its output (detokenized, cut at a stop string); returns its
        finish reason (None: it runs on)."""
        running = self._requests[request.request_id]
        kept, text = [], []
        for token in tokens:
            kept.append(token)
            if running.decoder is not None:
                text.append(running.decoder.add(token))
                if running.decoder.stopped:
                    reason = "stop"
                    break
        if logprobs is not None:
            logprobs = logprobs[:len(kept)]
        if running.grammar is not None:
            running.grammar.advance(kept)
        running.stats.generated(len(kept))
        if reason is not None:
            del self._requests[request.request_id]
            self._finish_reasons[reason] += 1
            if running.decoder is not None:
                text.append(running.decoder.finish())
        if kept or reason is not None:
            outputs.append(RequestOutput(request.request_id, kept, "".join(text), reason, running.stats, logprobs,
                                         prompt_logprobs=running.prompt_logprobs))
            running.prompt_logprobs = None
        return reason

    def _final(self, running: _Running, reason: str, error: BaseException | None = None) -> RequestOutput:
        self._finish_reasons[reason] += 1
        text = running.decoder.finish() if running.decoder is not None and reason != "error" else ""
        message = None
        if error is not None:
            message = str(error) if isinstance(error, Phi4Error) else f"{type(error).__name__}: {error}"
        return RequestOutput(running.request.request_id, [], text, reason, running.stats, error=message)

    # Compiling before serving.

    def warm_up(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Compiles before serving. With `fixed_length`: every program a
        request can need (`ModelRunner.compile_all`; not those of a reused prefix, of a prompt longer
        than `prefill_tokens`, or of more than 8 stop ids). Else what serving runs first: waves of 1, 2,
        4 .. `max_batch` requests of `prompt_ids` with `max_tokens`, each ended after one decode call.
        Raises Phi4Error when one fails."""
        if self.fixed_length:
            self.runner.compile_all(self.scheduler.max_batch, self.fixed_length, self.scheduler.prefill_tokens)
            return
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        caching, self.enable_prefix_caching = self.enable_prefix_caching, False  # (each wave prefills afresh)
        try:
            self._waves(prompt_ids, params)
        finally:
            self.enable_prefix_caching, self._idle = caching, None

    def _waves(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        wave = 1
        while True:
            ids = [f"warm-up-{wave}-{i}" for i in range(wave)]
            self.add_requests([(i, prompt_ids, params) for i in ids])
            seen = dict.fromkeys(ids, 0)
            while any(i in self._requests for i in ids):
                for out in self.step():
                    if out.error:
                        raise Phi4Error(f"the warm-up failed: {out.error}")
                    seen[out.request_id] += 1
                    if seen[out.request_id] == 2:  # the prefill's token, then one decode call: enough
                        self.abort(out.request_id)
            while self._finished:
                self.step()
            if wave == self.scheduler.max_batch:
                return
            wave = min(2 * wave, self.scheduler.max_batch)
