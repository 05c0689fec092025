"""The scheduler: which requests run when. Pure policy over the engine's rows: no thread, no device.

It holds the waiting requests (first come, first served), the decode slots (one running request
or None each) and at most one long prompt being prefilled in pieces. Each engine step asks it:
  - `admit()`: what to prefill now: waiting prompts of at most `prefill_tokens` tokens together,
    as many as free slots allow (the engine packs them end to end in one row); or, when a prompt
    longer than that budget heads the queue, that prompt alone, to be read `prefill_tokens` at a time
    between decode calls (`Pieces`), so running streams wait about one budget between their steps;
  - `seat(requests)`: free slots for admitted rows, and how many slots the batch needs for them
    (grown in powers of two up to `max_batch`);
  - `shrink(...)`: fewer slots or a shorter cache once rows have left (a quarter's hysteresis).
Which prompt continues which held row (prefix caching) the engine decides, from what the runner's
rows hold. The engine carries out these choices on the model runner; the cache layout is the runner's.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence

from phi4_jax.engine.runner import bucket, cache_length
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.errors import Phi4Error


class QueueFullError(Phi4Error):
    """The engine already holds `max_queue` waiting requests (nothing of the new ones was queued)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate: its id, prompt ids, sampling parameters and the token ids that end it."""

    request_id: str
    ids: Sequence[int]
    params: SamplingParams
    stop_ids: frozenset[int]

    def needed(self, max_context: int) -> int:
        """Cache slots it may reach: its prompt and every token it may generate (within the context)."""
        return min(len(self.ids) + self.params.max_tokens, max_context)


@dataclasses.dataclass(frozen=True)
class Pieces:
    """One long prompt to prefill `size` tokens per device call."""

    request: Request
    size: int


@dataclasses.dataclass(frozen=True)
class Load:
    """What the engine holds now: requests decoding, waiting, and decode slots allocated; the wall
    seconds of its prefill and decode calls so far, the requests ended so far by finish reason, and
    the prefix cache's lookups and speculative decoding's drafts."""

    running: int
    waiting: int
    slots: int
    max_batch: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finished: dict[str, int] = dataclasses.field(default_factory=dict)
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache ...
    prefix_hit_tokens: int = 0  # ... and those whose keys and values were reused
    spec_drafts: int = 0  # speculative decoding: row steps that verified drafts ...
    spec_draft_tokens: int = 0  # ... the draft tokens verified ...
    spec_accepted_tokens: int = 0  # ... and those accepted


class Scheduler:
    """First come, first served admission into at most `max_batch` decode slots; at most `max_queue`
    requests wait; a step's prefill holds at most `prefill_tokens` prompt tokens."""

    def __init__(self, max_batch: int = 16, max_queue: int = 256, prefill_tokens: int = 2048):
        if min(max_batch, max_queue, prefill_tokens) < 1:
            raise ValueError("max_batch, max_queue and prefill_tokens must be at least 1")
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = []  # the running batch's rows
        self.staged: Request | None = None  # a long prompt being prefilled in pieces

    def add(self, requests: Sequence[Request]) -> None:
        """Queues requests in order; raises QueueFullError (nothing queued) when they do not all fit."""
        if len(self.waiting) + len(requests) > self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (at most {self.max_queue})")
        self.waiting.extend(requests)

    def remove_waiting(self, request_ids: Iterable[str]) -> list[Request]:
        """Takes these requests out of the queue (those that are there)."""
        ids = set(request_ids)
        gone = [r for r in self.waiting if r.request_id in ids]
        if gone:
            self.waiting = collections.deque(r for r in self.waiting if r.request_id not in ids)
        return gone

    @property
    def running(self) -> int:
        """Requests holding a slot: decoding, or being prefilled in pieces."""
        return sum(r is not None for r in self.slots) + (self.staged is not None)

    def admit(self) -> list[Request] | Pieces:
        """What to prefill now (taken out of the queue): prompts to prefill together (maybe none), or
        one long prompt to read in pieces. Nothing while a long prompt is being read: this step's
        budget is its next piece."""
        if self.staged is not None:
            return []
        free = self.max_batch - self.running
        taken, tokens = [], 0
        for request in self.waiting:
            if len(taken) == free:
                break
            size = len(request.ids)
            if size > self.prefill_tokens:
                if not taken:
                    self.waiting.popleft()
                    self.staged = request
                    return Pieces(request, self.prefill_tokens)
                break
            if taken and tokens + size > self.prefill_tokens:
                break
            taken.append(request)
            tokens += size
        for _ in taken:
            self.waiting.popleft()
        return taken

    def seat(self, requests: Sequence[Request]) -> tuple[int, list[int]]:
        """Slots for `requests` joining the running batch: (the batch's slot count for them, grown in
        powers of two up to `max_batch` when the free slots are too few; their slot indices)."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        size = len(self.slots)
        while len(free) < len(requests):
            grown = min(max(2 * size, 1), self.max_batch)
            if grown == size:
                raise ValueError(f"{len(requests)} rows do not fit in {self.max_batch} slots")
            free += range(size, grown)
            self.slots += [None] * (grown - size)
            size = grown
        for i, request in zip(free, requests):
            self.slots[i] = request
        return size, free[:len(requests)]

    def shrink(self, batch: int, length: int, max_context: int,
               keep_length: bool = False) -> tuple[list[int | None], int] | None:
        """For a running batch of `batch` rows and `length` cache slots: (the old row of each new row,
        None for an empty one; the new length) when the running rows need at most a quarter of the rows
        or of the length (hysteresis against thrashing; `keep_length`: rows only), else None. Free old
        rows fill what room the running ones leave (their caches may hold a prefix to reuse). The
        slots follow."""
        seated = [i for i, r in enumerate(self.slots) if r is not None]
        if not seated:
            return None
        rows = min(bucket(len(seated), 1), self.max_batch)
        needed = cache_length(max(self.slots[i].needed(max_context) for i in seated), max_context)
        rows = rows if 4 * rows <= batch else batch
        needed = needed if 4 * needed <= length and not keep_length else length
        if (rows, needed) == (batch, length):
            return None
        # Free rows where there is room: a finished row's cache may still hold a prefix to reuse.
        free = [i for i, r in enumerate(self.slots) if r is None][:rows - len(seated)]
        order = seated + free + [None] * (rows - len(seated) - len(free))
        self.slots = [self.slots[i] if i is not None else None for i in order]
        return order, needed
