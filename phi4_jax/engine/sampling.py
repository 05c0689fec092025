"""Token sampling: per-request parameters (vLLM names), their per-row arrays, and a pure jittable sampler.

The sampler applies HF's logits processors in HF's order (repetition penalty, presence/frequency
penalties, temperature, top-k, top-p, min-p) and then draws, with every parameter a per-row array so
one compiled step serves any mix of requests.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.errors import SamplingError
from phi4_jax.text.structured import StructuredOutputs

# Keys are pinned to threefry so their raw data is always [2] uint32, whatever jax's default impl is.
_PRNG_IMPL = "threefry2x32"
# torch.manual_seed's range (what vLLM seeds with); a seed is taken modulo 2**64.
_SEED_RANGE = (-(2**63), 2**64)
_INT32_END = 2**31  # top_k and token ids become int32 arrays
MAX_LOGPROBS = 20  # most likely tokens a row may ask the log-probabilities of (OpenAI's bound)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request; field names and meanings follow vLLM.

    `repetition_penalty` follows HF (tokens seen in the prompt or output: a positive logit is divided
    by it, any other multiplied); `presence_penalty` and `frequency_penalty` follow vLLM/OpenAI (output
    tokens only: `logit -= presence * (count > 0) + frequency * count`). `stop` is for the
    detokenizer; the sampler never reads it. `logprobs` (vLLM): None, or return each generated
    token's log-probability and those of the `logprobs` most likely tokens (0 to MAX_LOGPROBS),
    under the model's own distribution (log-softmax of its logits, before any penalty or filter).
    `prompt_logprobs` (vLLM): None, or return each prompt token's log-probability after the tokens
    before it (None for the first) and those of the `prompt_logprobs` most likely tokens there.
    `structured_outputs` (vLLM): the text must match a JSON schema, a regex, one of some choices
    or a grammar (`text.structured.StructuredOutputs`, or a dict of its fields); the sampler then
    draws only tokens that keep it matching (log-probabilities stay the model's own).
    """

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self):
        def check_number(name, ok, allowed):
            value = getattr(self, name)
            # (finite as the float32 the sampler holds it in)
            if not _is_number(value) or not abs(value) <= _FLOAT32_MAX or not ok(value):
                raise SamplingError(f"{name} must be a number {allowed}, got {value!r}", name)

        check_number("temperature", lambda t: t >= 0, ">= 0 (0 = greedy)")
        check_number("top_p", lambda p: 0 < p <= 1, "in (0, 1] (1 = off)")
        check_number("min_p", lambda p: 0 <= p <= 1, "in [0, 1] (0 = off)")
        check_number("repetition_penalty", lambda p: p > 0, "> 0 (1 = off)")
        check_number("presence_penalty", lambda p: -2 <= p <= 2, "in [-2, 2] (0 = off)")
        check_number("frequency_penalty", lambda p: -2 <= p <= 2, "in [-2, 2] (0 = off)")
        if not _is_int(self.top_k) or not -1 <= self.top_k < _INT32_END:
            raise SamplingError(f"top_k must be an integer in [-1, 2**31) (0 or -1 = off), got {self.top_k!r}",
                                "top_k")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.seed is not None and (not _is_int(self.seed)
                                      or not _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1]):
            raise SamplingError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}",
                                "seed")
        for name in ("top_k", "max_tokens", "seed"):  # NumPy integers become ints (seed math needs it)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}", name)
        if isinstance(self.structured_outputs, dict):
            try:
                object.__setattr__(self, "structured_outputs", StructuredOutputs(**self.structured_outputs))
            except TypeError as e:
                raise SamplingError(f"structured_outputs: {e}", "structured_outputs") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise SamplingError(f"structured_outputs must be None, a StructuredOutputs or a dict of its fields, got "
                                f"{self.structured_outputs!r}", "structured_outputs")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be True or False, got {self.ignore_eos!r}", "ignore_eos")

        # Lists (from JSON) and a lone stop string are normalised so the params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(i) and 0 <= i < _INT32_END for i in ids):
            raise SamplingError(f"stop_token_ids must be a list of integers in [0, 2**31), got {ids!r}",
                                "stop_token_ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    @property
    def penalised(self) -> bool:
        """Whether a penalty is on (the row needs the tokens it has seen and their counts)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class SamplerState(NamedTuple):
    """The sampling parameters of a batch as per-row arrays (a pytree jit takes as an argument)."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32 (0 = off)
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    keys: jax.Array  # [B, 2] uint32 raw threefry keys
    logprobs: jax.Array  # [B] bool: the row asks for log-probabilities (the sampler does not read it)
    constrained: jax.Array  # [B] bool: the row's tokens are masked by its grammar (one decode step a call)


def _seed_key_data(seed: int) -> np.ndarray:
    """Raw key of `jax.random.PRNGKey(seed)` as 64-bit jax builds it ([hi, lo] of seed mod 2**64).

    With x64 off jax keeps only the low 32 bits, so seeds 5 and 2**32 + 5 would collide.
    """
    seed %= 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def _mix64(seed: int, row: int) -> int:
    """A 64-bit seed for an unseeded row (splitmix64 of the default seed and the row): computed on
    the host, so a new batch size compiles nothing."""
    mask = 2**64 - 1
    z = (seed + (row + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def sampler_state(params: list[SamplingParams] | SamplingParams, batch: int,
                  default_seed: int = 0) -> SamplerState:
    """Per-row arrays for a batch: one SamplingParams for every row, or a list of `batch` of them.

    A row with a seed gets `PRNGKey(seed)`; a row without one gets a key mixed from `default_seed`
    and its row index, so pass a fresh `default_seed` per call for unseeded rows to vary.
    """
    if isinstance(params, SamplingParams):
        params = [params] * batch
    params = list(params)
    if len(params) != batch or not all(isinstance(p, SamplingParams) for p in params):
        raise SamplingError(f"params must be one SamplingParams or a list of batch={batch} of them, "
                            f"got {len(params)} items")
    if not _is_int(default_seed) or not _SEED_RANGE[0] <= default_seed < _SEED_RANGE[1]:
        raise SamplingError(f"default_seed must be an integer in [-2**63, 2**64), got {default_seed!r}")

    keys = np.stack([_seed_key_data(_mix64(int(default_seed), row) if p.seed is None else p.seed)
                     for row, p in enumerate(params)])

    def column(name, dtype):  # NumPy, not JAX: no op to dispatch (or compile) before the first token
        return np.array([getattr(p, name) for p in params], dtype=dtype)

    return SamplerState(
        temperature=column("temperature", np.float32),
        top_k=np.maximum(column("top_k", np.int32), 0),  # -1 and 0 both mean off
        top_p=column("top_p", np.float32),
        min_p=column("min_p", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        keys=keys,
        logprobs=np.array([p.logprobs is not None for p in params], bool),
        constrained=np.array([p.structured_outputs is not None for p in params], bool),
    )


def _penalise(logits, state, seen, counts):
    """Repetition penalty (HF), then presence and frequency penalties (vLLM), in float32. Penalty
    state of width 0 (no row penalised): the logits as they are."""
    x = logits.astype(jnp.float32)
    if not seen.shape[-1]:
        return x
    rep = state.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    return (x - state.frequency_penalty[:, None] * counts.astype(jnp.float32)
            - state.presence_penalty[:, None] * (counts > 0))


def _cut_index(remove):
    """How many leading sorted entries to drop; the last (the max) is always kept."""
    return jnp.minimum(jnp.sum(remove, axis=-1), remove.shape[-1] - 1)[:, None]


def _filter(x, state):
    """Temperature, top-k, top-p and min-p on [B, V] penalised logits; removed tokens become -inf.

    Every filter keeps the tokens at or above a value threshold per row, so one ascending sort and
    one softmax serve all three and nothing is scattered back. (Where top-p's cut falls inside a
    run of tied values, HF keeps an arbitrary part of the run and this keeps all of it; top-k and
    min-p treat ties as HF does.)
    """
    vocab = x.shape[-1]
    t = state.temperature[:, None]
    x = x / jnp.where(t > 0, t, 1.0)  # greedy rows are picked before this matters
    s = jnp.sort(x, axis=-1)  # [B, V] ascending

    def at(index):
        return jnp.take_along_axis(s, index, axis=-1)

    # Top-k (TopKLogitsWarper): keep values >= the k-th largest.
    k = jnp.clip(state.top_k, 0, vocab)[:, None]
    threshold = jnp.where(k > 0, at(vocab - jnp.maximum(k, 1)), -jnp.inf)
    probs = jax.nn.softmax(jnp.where(s >= threshold, s, -jnp.inf), axis=-1)  # ascending, like s
    # Top-p (TopPLogitsWarper): drop the ascending prefix whose cumulative probability <= 1 - top_p;
    # top_p = 1 is skipped, as HF adds no warper for it.
    top_p = state.top_p[:, None]
    cut_p = at(_cut_index(jnp.cumsum(probs, axis=-1) <= 1 - top_p))
    # Min-p (MinPLogitsWarper) runs on top-p's survivors, but it compares each probability with the
    # largest, a ratio that renormalising does not change: the top-k probabilities serve.
    cut_m = at(_cut_index(probs < state.min_p[:, None] * probs[:, -1:]))
    threshold = jnp.maximum(jnp.maximum(threshold, cut_m), jnp.where(top_p < 1, cut_p, -jnp.inf))
    return jnp.where(x >= threshold, x, -jnp.inf)


def process_logits(logits: jax.Array, state: SamplerState, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """The float32 [B, V] logits `sample` draws from: penalised, and for rows with temperature > 0
    also scaled and filtered (removed tokens at -inf). Greedy rows are only penalised, as in HF."""
    x = _penalise(logits, state, seen, counts)
    return jnp.where(state.temperature[:, None] > 0, _filter(x, state), x)


def sample(logits: jax.Array, state: SamplerState, step: jax.Array, seen: jax.Array,
           counts: jax.Array) -> jax.Array:
    """Picks one token per row. Pure and jittable.

    Args:
      logits: [B, V] any float dtype (computed in float32).
      state: the batch's `sampler_state`.
      step: int32, a scalar or [B] per row: the tokens the row generated so far, folded into its key
        (a seed reproduces, steps differ; a row draws the same whatever batch it runs in).
      seen: [B, V] bool, token occurs in the prompt or output (repetition penalty); [B, 0] when
        no row is penalised (then no penalty is computed).
      counts: [B, V] int32 occurrences in the output (presence and frequency penalties); [B, 0] so.
    Returns:
      [B] int32 tokens; rows with temperature 0 get the argmax of the penalised logits.
    """
    x = _penalise(logits, state, seen, counts)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(raw_key, row, row_step):
        key = jax.random.fold_in(jax.random.wrap_key_data(raw_key, impl=_PRNG_IMPL), row_step)
        return jax.random.categorical(key, row)

    def sampled(_):
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), greedy.shape)
        drawn = jax.vmap(draw)(state.keys, _filter(x, state), steps).astype(jnp.int32)
        return jnp.where(state.temperature > 0, drawn, greedy)

    # An all-greedy batch skips the filters' sort over the vocabulary (most of a CPU decode step
    # at batch 8 and vocab 32K).
    return jax.lax.cond(jnp.any(state.temperature > 0), sampled, lambda _: greedy, None)


def update_history(seen: jax.Array, counts: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Marks each row's new token in `seen` [B, V] and `counts` [B, V]. Jittable.

    A token outside [0, V) (such as a -1 pad for a finished row) changes nothing; nor does any
    token to penalty state of width 0.
    """
    vocab = seen.shape[-1]
    if not vocab:
        return seen, counts
    rows = jnp.arange(tokens.shape[0])
    # Out-of-range ids go to index V, which mode="drop" discards (a -1 would otherwise wrap to V-1).
    cols = jnp.where((tokens >= 0) & (tokens < vocab), tokens, vocab)
    seen = seen.at[rows, cols].set(True, mode="drop")
    counts = counts.at[rows, cols].add(1, mode="drop")
    return seen, counts
