"""What a request cost: seconds JAX spent making programs, and a request's prefill and decode rates.

Compile time is read from JAX's monitoring events, so rates can leave it out: a first request's
rate would otherwise show its compile, not its speed.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax


class CompileClock:
    """Seconds JAX spends making programs (tracing, lowering, compiling or loading them from the
    persistent cache), summed from its monitoring events: `total`, and `cached` of it loading."""

    EVENTS = ("/jax/core/compile/backend_compile_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/jaxpr_trace_duration")
    CACHE_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"

    def __init__(self):
        self.total = self.cached = 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        # A cache load is also inside its backend-compile event: it counts in `total` once.
        with self._lock:
            if event in self.EVENTS:
                self.total += duration
            elif event == self.CACHE_EVENT:
                self.cached += duration


CLOCK = CompileClock()  # one per process: JAX's listeners cannot be removed


@dataclasses.dataclass
class RequestStats:
    """A request's counts and times so far (perf_counter seconds; compiling left out of the rates)."""

    prompt_tokens: int
    generation_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not prefilled
    prefill_seconds: float = 0.0  # its prefill calls, compiling left out
    compile_seconds: float = 0.0  # tracing, lowering and compiling since it arrived (0 once compiled) ...
    compile_cache_seconds: float = 0.0  # ... of it, loading programs from the persistent compilation cache
    first_token_at: float | None = None
    spec_drafts: int = 0  # speculative decoding: its steps that verified drafts ...
    spec_draft_tokens: int = 0  # ... the draft tokens verified ...
    spec_accepted_tokens: int = 0  # ... and those accepted (tokens made without a step of their own)
    _compile_at_add: tuple[float, float] = (0.0, 0.0)
    _compile_at_first: float = 0.0

    @classmethod
    def arriving(cls, prompt_tokens: int) -> RequestStats:
        return cls(prompt_tokens, _compile_at_add=(CLOCK.total, CLOCK.cached))

    def prefilled(self, seconds: float, compile_seconds: float) -> None:
        self.prefill_seconds += max(seconds - compile_seconds, 0.0)

    def generated(self, count: int) -> None:
        if count and self.first_token_at is None:
            self.first_token_at, self._compile_at_first = time.perf_counter(), CLOCK.total
        self.generation_tokens += count
        self.compile_seconds = CLOCK.total - self._compile_at_add[0]
        self.compile_cache_seconds = CLOCK.cached - self._compile_at_add[1]

    def speculated(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        self.spec_drafts += int(drafts)
        self.spec_draft_tokens += int(draft_tokens)
        self.spec_accepted_tokens += int(accepted)

    @property
    def acceptance_rate(self) -> float | None:
        """Draft tokens accepted / verified (None: none verified)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def tokens_per_step(self) -> float:
        """Tokens made per decode step after the first token (1 without speculation)."""
        decoded = max(self.generation_tokens - 1, 0)
        return decoded / max(decoded - self.spec_accepted_tokens, 1) if decoded else 1.0

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens prefilled per second (cached ones are not prefilled)."""
        return (self.prompt_tokens - self.cached_tokens) / max(self.prefill_seconds, 1e-9)

    @property
    def generation_tps(self) -> float:
        """Tokens per second after the first (which came with the prefill)."""
        if self.first_token_at is None:
            return 0.0
        seconds = time.perf_counter() - self.first_token_at - (CLOCK.total - self._compile_at_first)
        return max(self.generation_tokens - 1, 0) / max(seconds, 1e-9)
