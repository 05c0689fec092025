"""The model runner: the weights, the jitted programs that generate token ids, and their batch state.

The programs are prefill, the decode loop and LongRoPE's re-encode; the state is a `Generation`.

`_start` prefills a batch of prompts (bucketed lengths, `prefill.py`) and samples each row's first
token; `_decode` is one jitted `lax.while_loop` with the sampler inside it, running up to k steps
per call, so the host only looks in every k tokens (to stream text and check stop strings). Each
row keeps its own position (cache slot = position), token count, stop tokens, limit and sampling
parameters, so a batch gives the tokens each prompt gives alone, and rows may join a running
batch (`Generation.join`, into free rows) and leave it: the engine's continuous batching
(`engine.py`, its policy in `scheduler.py`) runs this same decode program. `_reencode` is
LongRoPE's step at the original context's end (`longrope.py`).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi4_jax.engine import longrope, speculative
from phi4_jax.engine.prefill import MIN_PIECE, over_cache, piece_for, prefill, prefill_packed, seq_mesh
from phi4_jax.engine.speculative import Speculation
from phi4_jax.engine.sampling import MAX_LOGPROBS, SamplerState, SamplingParams, sample, sampler_state, update_history
from phi4_jax.errors import ConfigError
from phi4_jax.model.cache import KVCache
from phi4_jax.model.phi4 import Phi4ForCausalLM
from phi4_jax.parallel import mesh as meshes
from phi4_jax.parallel import rules

MIN_PROMPT_BUCKET = MIN_PIECE  # the narrowest prompt width (`prompt_bucket`): prompts share compiles
MIN_CACHE_LENGTH = 256  # smallest cache; lengths are powers of two from here, so requests share compiles
# A decode call attends over the cache's first slots that its rows can reach, a power of two from
# here (at most the cache): the products over unused slots cost as much as over used ones.
MIN_ATTENDED = 128
STOP_WIDTH = 8  # stop ids a batch holds per row from the start (more widen it: new programs)
RING = 16  # a row's newest this many tokens (and log-probabilities) stay on device: a call runs at most as many steps


class DecodeState(NamedTuple):
    """Everything the decode loop carries (a pytree; arrays only)."""

    tokens: jax.Array  # [B, RING] int32: the newest generated tokens, token g at index g % RING
    last: jax.Array  # [B] int32: the newest token, input of the next step
    positions: jax.Array  # [B] int32: position of `last`
    done: jax.Array  # [B] bool (also a free row of a scheduler's batch)
    stopped_by_token: jax.Array  # [B] bool: finished on a stop token (else on its limit)
    generated: jax.Array  # [B] int32: tokens the row generated (its sampling step)
    limit: jax.Array  # [B] int32: max new tokens of the row
    stop_ids: jax.Array  # [B, S] int32 stop tokens, padded with -1
    history: jax.Array  # [B, L] int32: every token by position (for re-encoding)
    # Penalty state, [B, V] while a row asks for penalties (SamplingParams.penalised), else [B, 0]:
    seen: jax.Array  # bool: tokens in prompt or output (repetition penalty)
    counts: jax.Array  # int32: tokens in the output (presence/frequency penalties)
    sampler: SamplerState
    # Log-probabilities (R = RING, K = MAX_LOGPROBS), written while a row asks (`sampler.logprobs`):
    logprob_ring: jax.Array  # [B, R] float32: of the newest R tokens, at index (token count % R)
    top_ids: jax.Array  # [B, R, K] int32: the K most likely tokens at those steps
    top_logprobs: jax.Array  # [B, R, K] float32
    # The tokens each row may sample next, a bit each (32 an int32; all set: unconstrained). A row whose
    # grammar sets them (`sampler.constrained`) takes one step a call, its host computing the next mask.
    allowed: jax.Array  # [B, ceil(V / 32)] int32
    # Prompt-lookup speculation (`speculative.backed_off`): failed drafts in a row, steps left to rest.
    misses: jax.Array  # [B] int32
    rest: jax.Array  # [B] int32
    cache: KVCache


class _Rows(NamedTuple):
    """A batch's per-row arrays for `_start` (host NumPy), and the cache it needs."""

    lengths: np.ndarray  # [B] prompt lengths
    limits: np.ndarray  # [B] max new tokens
    stops: np.ndarray  # [B, S] stop ids, padded with -1
    sampler: SamplerState
    needed: int  # slots: the longest prompt + the most new tokens
    length: int  # the cache length for them
    logprobs: list[int | None]  # per row: SamplingParams.logprobs
    penalised: list[bool]  # per row: SamplingParams.penalised
    allowed: np.ndarray  # [B, ceil(V / 32)] int32: each row's first token's mask (-1: any token)


class Packed(NamedTuple):
    """Prompts prefilled packed in one row (`ModelRunner.prefill_packed`), waiting for
    `Generation.admit`: the token in slot t is at `positions[t]` of prompt `segments[t]` (the prompt
    count for padding), prompt b ends at token `lasts[b]`."""

    rows: _Rows
    width: int  # T: the tokens computed (the prompts' `packed_width` or `prompt_bucket`)
    ids: np.ndarray  # [S] (S: the cache's slots, at least T)
    positions: np.ndarray  # [S]
    segments: np.ndarray  # [S]
    lasts: np.ndarray  # [prompts]
    hidden: jax.Array  # [S, E] final hidden states
    cache: KVCache  # [1, KV, S, D] per layer: the tokens' keys and values


def bucket(n: int, smallest: int = MIN_PROMPT_BUCKET) -> int:
    """The power of two >= n (at least `smallest`): prompt lengths that share a compile."""
    size = smallest
    while size < n:
        size *= 2
    return size


def prompt_bucket(n: int) -> int:
    """The width an n-token prompt is padded to: a power of two up to 64 (at least
    MIN_PROMPT_BUCKET), then a multiple of 16 tokens or of a 32nd of the power of two at or above
    n, whichever is more: up to 16 widths per doubling, so a prompt of over 256 tokens pads by at
    most a sixteenth of itself (to a power of two, by up to all of itself), and prompts of about
    the same length share a program."""
    if n <= 64:
        return bucket(n)
    step = max(MIN_PROMPT_BUCKET, 1 << ((n - 1).bit_length() - 5))
    return -(-n // step) * step


def packed_width(tokens: int) -> int:
    """The width `tokens` prompt tokens packed in one row are padded to: a power of two up to 64 (at
    least MIN_PROMPT_BUCKET), then a multiple of 64 up to 512, then of 128: a few programs
    (`packed_widths`) that every admission shares, padding at most a quarter past 64 tokens and an
    eighth past 512 (a 1025-token prompt runs 1152: transformers' rate at 0.9x leaves no more)."""
    if tokens <= 64:
        return bucket(tokens)
    step = 64 if tokens <= 512 else 128
    return -(-tokens // step) * step


def packed_widths(budget: int) -> list[int]:
    """Every width `packed_width` gives for up to `budget` tokens."""
    widths = [packed_width(1)]
    while widths[-1] < packed_width(budget):
        widths.append(packed_width(widths[-1] + 1))
    return widths


def attended_sizes(length: int) -> list[int]:
    """Every number of slots a decode call over a `length`-slot cache may attend (`Generation._attended`)."""
    sizes = [min(MIN_ATTENDED, length)]
    while sizes[-1] < length:
        sizes.append(min(2 * sizes[-1], length))
    return sizes


def mask_width(vocab_size: int) -> int:
    """int32 words of a token mask (`DecodeState.allowed`): a bit a token."""
    return (vocab_size + 31) // 32


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(differ[0]) if differ.size else n


def cache_length(needed: int, max_context: int) -> int:
    """The cache length for `needed` tokens: the next power of two (at least MIN_CACHE_LENGTH), at
    most `max_context`. Raises ConfigError when `needed` does not fit in `max_context`."""
    if needed > max_context:
        raise ConfigError(f"{needed} tokens do not fit in the context of {max_context} tokens")
    return min(bucket(needed, MIN_CACHE_LENGTH), max_context)


class ModelRunner:
    """Runs a model's programs: holds its split state and the compiled steps; `start` makes a
    `Generation` (the device batch state) that `advance` steps.

    Args:
      model: the model (split once here; later changes to it are not seen).
      max_context: the longest sequence (prompt + generation) a request may have; default the
        config's `max_position_embeddings`. Caches are allocated only as long as a request needs.
      prefill_piece: prompts longer than this many tokens are prefilled in pieces of it; default
        `prefill.piece_for(batch)`.
      speculative: prompt-lookup speculation in the decode loop (`speculative.Speculation`; its
        `parse` form, as "ngram:4"), or None; the tokens are those plain decoding gives.
      speculative_rows: speculate in batches of at most this many rows, plain steps in larger ones (where
        a step's products are bound by compute, verifying k drafts a row costs about k times a step);
        default the backend's (`Backend.speculative_rows`: 2 on a CPU, any number elsewhere).
    """

    def __init__(self, model: Phi4ForCausalLM, max_context: int | None = None,
                 prefill_piece: int | None = None, speculative: Speculation | str | None = None,
                 speculative_rows: int | None = None):
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        self.max_context = max_context or self.config.max_position_embeddings
        if prefill_piece is not None and prefill_piece < 1:
            raise ConfigError(f"prefill_piece must be at least 1, got {prefill_piece}")
        self.prefill_piece = prefill_piece
        self.speculative = Speculation.parse(speculative)
        if speculative_rows is not None and speculative_rows < 1:
            raise ConfigError(f"speculative_rows must be at least 1, got {speculative_rows}")
        self.speculative_rows = speculative_rows or model.backend.speculative_rows
        self.dtype = model.model.embed_tokens.dtype
        self._longrope = self.config.rope_type == "longrope"
        # On a mesh (the model was loaded with one): the cache follows the rules table; what the
        # host reads is replicated, so every process of a multi-host run can read it.
        self.mesh = meshes.mesh_of(self.params)
        self._replicated = None if self.mesh is None else meshes.replicated(self.mesh)

    def speculating(self, speculative: Speculation | str | None, rows: int | None = None) -> ModelRunner:
        """A runner of the same weights and settings that speculates so (`rows`: its
        `speculative_rows`; default as this one's)."""
        runner = copy.copy(self)
        runner.speculative = Speculation.parse(speculative)
        runner.speculative_rows = rows or self.speculative_rows
        return runner

    def piece(self, batch: int) -> int:
        """Prompt tokens per row in one prefill piece for a batch of `batch` rows."""
        return self.prefill_piece or piece_for(batch)

    def cache_sharding(self, batch: int, length: int) -> jax.sharding.NamedSharding | None:
        if self.mesh is None:
            return None
        shape = (batch, self.config.num_key_value_heads, length, self.config.head_dim)
        return rules.sharding(self.mesh, rules.CACHE_AXES, shape)

    def put(self, tree):
        """Host values as device arrays; on a mesh, global arrays replicated on every device."""
        if self.mesh is None:  # (jnp.asarray would compile a small program per new shape: 15 ms each)
            return jax.device_put(tree)
        return jax.tree.map(lambda x: meshes.put(x, self._replicated), tree)

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
              stop_ids: Sequence[Sequence[int]], continuing: Generation | None = None,
              length: int | None = None, allowed: np.ndarray | None = None) -> Generation:
        """Prefills `prompts` (token ids) and samples each row's first token.

        `stop_ids[b]`: the token ids that end row b (its EOS set, unless ignored, plus its
        `stop_token_ids`). `continuing`: a finished one-prompt generation whose sequence the one
        prompt extends (a chat's next turn): its KV cache is reused (and consumed) for the common
        prefix, so only the new tokens are prefilled; `reused_tokens` says how many were reused.
        `length`: a fresh cache holds at least this many slots (a running batch's, which the rows
        then join as they are). `allowed` `[B, ceil(V / 32)]` int32: the tokens each row's first
        token may be, a bit each (default any: rows whose params are constrained need theirs).
        """
        rows = self._rows(prompts, params, stop_ids, length, allowed)
        lengths = rows.lengths
        reused = self._reusable(continuing, prompts, rows.needed)
        starts = np.array([reused], np.int32) if reused else np.zeros(len(prompts), np.int32)
        if reused:
            history, cache = continuing.state.history, continuing.state.cache
        else:
            history, cache = self._fresh(len(prompts), rows.length)
        width = min(prompt_bucket(int((lengths - starts).max())), cache.length - int(starts.max()))
        ids = np.zeros((len(prompts), width), np.int32)
        for b, p in enumerate(prompts):
            ids[b, :len(p) - starts[b]] = p[starts[b]:]
        gen = Generation(self, self._prefill(ids, starts, lengths, rows, history, cache, continuing=bool(reused)),
                         rows.logprobs, rows.penalised, prompts)
        gen.reused_tokens = reused
        return gen

    def prefill_packed(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                       stop_ids: Sequence[Sequence[int]], budget: int | None = None,
                       allowed: np.ndarray | None = None) -> Packed:
        """Prefills `prompts` (token ids) packed end to end in one row: no prompt is padded to
        another's length. With a `budget` of tokens (an engine that compiles every program first),
        the row is `packed_width` tokens (few programs) and the keys and values wait in the result
        in `packed_width(budget)` slots (so that `Generation.admit` is one program for every width);
        without, the row is the finer `prompt_bucket` (less padding, more programs) and the slots
        are its own. Raises ConfigError for prompts that cannot run, or of over `budget` tokens
        (nothing was computed then). `allowed`: as `start`'s."""
        info = self._rows(prompts, params, stop_ids, allowed=allowed)
        tokens = int(info.lengths.sum())
        if budget is not None and tokens > budget:
            raise ConfigError(f"{tokens} prompt tokens do not fit in a packed prefill of {budget}")
        width = packed_width(tokens) if budget is not None else prompt_bucket(tokens)
        ids, positions = np.zeros(width, np.int32), np.arange(width, dtype=np.int32)
        segments, rope = np.full(width, len(prompts), np.int32), np.ones(width, np.int32)
        lasts, offset = np.zeros(len(prompts), np.int32), 0
        for b, (prompt, n) in enumerate(zip(prompts, info.lengths)):
            end = offset + n
            ids[offset:end], positions[offset:end], segments[offset:end], rope[offset:end] = prompt, np.arange(n), b, n
            lasts[b], offset = end - 1, end
        slots = packed_width(budget) if budget is not None else width
        hidden, cache = _prefill_packed(self.graphdef, self.params,
                                        *self.put((ids[None], positions[None], segments[None], rope[None])),
                                        slots=slots)
        more = lambda x, fill: np.pad(x, (0, slots - width), constant_values=fill)  # noqa: E731  (the cache's slots)
        return Packed(info, width, more(ids, 0), more(positions, 0), more(segments, len(prompts)), lasts, hidden, cache)

    def prompt_logprobs(self, packed: Packed, wants: Sequence[int | None]) -> list[list | None]:
        """Per packed prompt b, where `wants[b]` is not None: each of its tokens' log-probability after
        the tokens before it (None for the first), as `[None, (log-probability, [(token,
        log-probability) of the wants[b] most likely], its rank there (1: the likeliest)), ...]`; None
        for the others. Computed on the device from the prefill's hidden states: only `[S]` and
        `[S, MAX_LOGPROBS]` reach the host."""
        if all(w is None for w in wants):
            return [None] * len(wants)
        chosen, ranks, top_ids, top_values = jax.device_get(_prompt_logprobs(
            self.graphdef, self.params, packed.hidden, self.put(np.roll(packed.ids, -1))))
        out = []
        for want, last, n in zip(wants, packed.lasts, packed.rows.lengths):
            if want is None:
                out.append(None)
                continue
            slots = range(last + 1 - n, last)  # token j + 1 of the prompt comes after slot first + j
            top = lambda s: list(zip(top_ids[s, :want].tolist(), top_values[s, :want].tolist()))  # noqa: E731
            out.append([None] + [(float(chosen[s]), top(s), int(ranks[s])) for s in slots])
        return out

    def empty(self, batch: int, length: int, stop_width: int = STOP_WIDTH) -> Generation:
        """A generation of `batch` free rows of `length` cache slots, for `Generation.admit`."""
        state = _empty(self.graphdef, self.params, batch=batch, length=length, stop_width=stop_width,
                       layout=self.cache_sharding(batch, length))
        return Generation(self, state)

    def cache_bytes(self, batch: int, length: int) -> int:
        """Bytes of a KV cache of `batch` rows of `length` slots (every device's share together)."""
        c = self.config
        per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * jnp.dtype(self.dtype).itemsize
        return batch * length * per_slot

    def fixed_length(self, max_batch: int, share: float = 0.25) -> int | None:
        """The context as a batch's fixed cache length (`Engine(fixed_length=)`) when `max_batch` rows
        of it take at most `share` of the memory of the devices holding the weights (of the host
        for CPU devices), else None (caches grown to what requests need)."""
        devices = list(jax.tree.leaves(self.params)[0].devices())
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits) and devices[0].platform != "cpu":
            memory = sum(limits)
        else:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return self.max_context if self.cache_bytes(max_batch, self.max_context) <= share * memory else None

    def compile_all(self, max_batch: int, length: int, prefill_tokens: int) -> int:
        """Runs once every program an `Engine` with a fixed cache `length` can need for requests
        prefilled packed (at most 8 stop ids each): for every row count it may hold (powers of two
        up to `max_batch`), with and without penalty state, the empty batch, each admission of a
        packed width up to `prefill_tokens` (and each such width's prefill), each decode call's
        attended size (plain and, up to `speculative_rows`, speculative), stopping rows, each change of
        row count, and adding and dropping penalty state.
        Afterwards such requests compile nothing. Returns the programs run."""
        sizes = [1]
        while sizes[-1] < max_batch:
            sizes.append(min(2 * sizes[-1], max_batch))
        longest = min(length, self.max_context) - 1  # one prompt's tokens, with one token to generate
        cuts = {}
        for width in packed_widths(prefill_tokens):
            tokens = min(width, prefill_tokens)  # (as many as pack to this width)
            if -(-tokens // longest) <= max_batch:
                cuts[width] = [min(longest, tokens - start) for start in range(0, tokens, longest)]

        def pack(cut):
            return self.prefill_packed([[0] * n for n in cut], [SamplingParams(max_tokens=1)] * len(cut),
                                       [[]] * len(cut), prefill_tokens)

        def rows(size, penalties):
            gen, ran = self.empty(size, length), 0
            if penalties:
                gen.resize(list(range(size)), penalties=True)  # (as `admit` grows it)
                ran += 1
            for packed in packs:  # (one placing program per size; the first-token step is another)
                if len(packed.lasts) <= size:
                    gen.admit(range(len(packed.lasts)), packed)  # (each row ends on its first token)
            gen.stop([0])
            for attended in attended_sizes(length):
                for spec in {None, self.speculative if size <= self.speculative_rows else None}:
                    gen.state = _decode(self.graphdef, self.params, gen.state, self.put(np.int32(0)),
                                        attended=attended, layout=gen._layout, ring=gen._ring, spec=spec)[0]
            if crosses:  # (LongRoPE's step at the crossing: no row is there, none changes)
                gen.state = _reencode(self.graphdef, self.params, gen.state, layout=gen._layout, ring=gen._ring,
                                      length=cache_length(self.config.original_max_position_embeddings + 1, length),
                                      piece=self.piece(size))
            for other in sizes:  # (from a state the programs above made: a fresh one compiles apart)
                if other != size:
                    _resize(gen.state, self.put(np.full(other, -1, np.int32)), length=length,
                            stop_width=gen.state.stop_ids.shape[1], penalties=gen.state.seen.shape[1],
                            layout=self.cache_sharding(other, length))
            if penalties:
                gen.resize(list(range(size)), penalties=False)  # (as the engine drops it, rows unchanged)
                ran += 1
            speculating = self.speculative is not None and size <= self.speculative_rows
            return ran + 4 + len(attended_sizes(length)) * (1 + speculating) + crosses + len(sizes) - 1

        # A row crosses LongRoPE's original context only where the cache holds past it.
        crosses = self._longrope and self.config.original_max_position_embeddings < min(length, self.max_context)
        packs = [pack(cut) for cut in cuts.values()]
        return len(packs) + sum(rows(size, penalties) for penalties in (False, True) for size in sizes)

    def start_in_pieces(self, prompt: Sequence[int], params: SamplingParams, stop_ids: Sequence[int],
                        piece: int, length: int | None = None,
                        allowed: np.ndarray | None = None) -> Iterator[Generation | None]:
        """Prefills one prompt `piece` tokens per device call: yields None after each piece but the
        last, then the Generation (its first token sampled), so a scheduler can run other rows'
        decode steps between the pieces. The tokens are those of `start([prompt], ...)`: every
        piece is encoded with the whole prompt's rotary table. `length` as in `start`."""
        if piece < 1:
            raise ConfigError(f"piece must be at least 1, got {piece}")
        rows = self._rows([prompt], [params], [stop_ids], length, allowed)
        history, cache = self._fresh(1, rows.length)
        for offset in range(0, len(prompt), piece):
            end = min(offset + piece, len(prompt))
            ids = np.zeros((1, min(prompt_bucket(end - offset), rows.length - offset)), np.int32)
            ids[0, :end - offset] = prompt[offset:end]
            state = self._prefill(ids, np.array([offset], np.int32), np.array([end], np.int32), rows, history, cache,
                                  continuing=offset > 0, reach=offset + ids.shape[1] if offset else None)
            if end == len(prompt):
                break
            yield None
            history, cache = state.history, state.cache  # (the junk token sampled here is overwritten)
        yield Generation(self, state, rows.logprobs, rows.penalised, [prompt])

    def _rows(self, prompts, params, stop_ids, length: int | None = None, allowed=None) -> _Rows:
        batch = len(prompts)
        params = [params] * batch if isinstance(params, SamplingParams) else list(params)
        if not prompts or len(params) != batch or len(stop_ids) != batch:
            raise ConfigError(f"{batch} prompt(s) need as many SamplingParams and stop-id sets; got "
                              f"{len(params)} and {len(stop_ids)}")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ConfigError("a prompt is empty: give at least one token")
        longest = int(lengths.max())
        if longest >= self.max_context:
            raise ConfigError(f"the prompt has {longest} tokens; the context holds {self.max_context} "
                              "(prompt + generated tokens): shorten the prompt or raise --max-context")
        # Generation stops at the context's end: a row may get fewer than max_tokens ("length").
        max_new = min(max(p.max_tokens for p in params), self.max_context - longest)
        limits = np.array([min(p.max_tokens, self.max_context - n) for p, n in zip(params, lengths)], np.int32)
        # A power-of-two width (at least STOP_WIDTH, as every batch's) for fewer distinct programs.
        stops = np.full((batch, bucket(max(len(s) for s in stop_ids), STOP_WIDTH)), -1, np.int32)
        for b, s in enumerate(stop_ids):
            stops[b, :len(s)] = sorted(s)
        # Rows without a seed differ from call to call, as in vLLM (on every process alike).
        seed = int(np.random.SeedSequence().entropy % 2**63) if self.mesh is None else _shared_seed()
        sampler = jax.tree.map(np.asarray, sampler_state(params, batch, default_seed=seed))
        needed = longest + max_new
        slots = max(cache_length(needed, self.max_context), min(length or 0, self.max_context))
        width = mask_width(self.config.vocab_size)
        allowed = np.full((batch, width), -1, np.int32) if allowed is None else np.asarray(allowed, np.int32)
        if allowed.shape != (batch, width):
            raise ConfigError(f"allowed must be [{batch}, {width}] int32 (a bit a token), got {allowed.shape}")
        return _Rows(lengths, limits, stops, sampler, needed, slots, [p.logprobs for p in params],
                     [p.penalised for p in params], allowed)

    def _fresh(self, batch: int, length: int) -> tuple[jax.Array, KVCache]:
        """An empty history and KV cache of `batch` rows of `length` slots."""
        history = self.put(np.zeros((batch, length), np.int32))
        return history, KVCache.create(self.config, batch, length, self.dtype, self.cache_sharding(batch, length))

    def _prefill(self, ids, starts, ends, rows: _Rows, history, cache, continuing: bool,
                 reach: int | None = None) -> DecodeState:
        """`_start` of `ids` at `starts` on, each row's prompt so far ending at `ends` (`reach`: see
        `prefill.prefill`)."""
        batch, length = ids.shape[0], cache.length
        return _start(self.graphdef, self.params,
                      *self.put((ids, starts, ends, rows.lengths, rows.limits, rows.stops, rows.sampler,
                                 rows.allowed)),
                      history, cache, continuing=continuing, layout=self.cache_sharding(batch, length),
                      piece=self.piece(batch), ring=seq_mesh(self.mesh, length),
                      reach=reach, penalties=self.config.vocab_size if any(rows.penalised) else 0)

    def _reusable(self, previous: Generation | None, prompts, needed: int) -> int:
        """How many leading tokens of the one prompt the one-row `previous`'s cache already holds
        (0: none usable; `Generation.held_prefix`)."""
        if previous is None or len(prompts) != 1 or previous.batch != 1:
            return 0
        return previous.held_prefix(prompts[0], needed)[1]


class Generation:
    """A batch being generated. `advance(steps)` runs up to that many decode steps on device in one
    call and returns the tokens they produced; `stop(rows)` ends rows the host decided to end (stop
    strings, a client gone). A finished row is free: `join` puts another generation's row there,
    and `resize` changes the number of rows and the cache length between calls (continuous
    batching; `scheduler.py`). Rows whose SamplingParams ask for `logprobs` get, after each
    `advance`, `new_logprobs[row]`: per new token, (its log-probability, [(token, log-probability)
    of the most likely ones]); None for the other rows."""

    def __init__(self, runner: ModelRunner, state: DecodeState, wants: Sequence[int | None] | None = None,
                 penalised: Sequence[bool] | None = None, prompts: Sequence[Sequence[int]] | None = None):
        self.runner, self.state = runner, state
        # Per row, its sequence so far (prompt, then every token read): the keys and values of all
        # but the last are in its cache, until another row is placed there.
        self._seq = [list(p) for p in prompts] if prompts is not None else [[] for _ in range(self.batch)]
        self.reused_tokens = 0  # prompt tokens whose keys/values came from a previous generation
        self._wants = list(wants) if wants is not None else [None] * self.batch  # logprobs asked, per row
        self._penalised = list(penalised) if penalised is not None else [False] * self.batch  # per row
        self._harvested = np.zeros(self.batch, np.int32)  # tokens read to the host, per row
        self._new: list[list[int]] = [[] for _ in range(self.batch)]  # tokens read, not yet returned
        self._pending: list[list] = [[] for _ in range(self.batch)]  # their log-probabilities (when asked)
        self.new_logprobs: list[list | None] = [None] * self.batch
        # Speculation in the last `advance`, per row: its steps that drafted, draft tokens, accepted ones.
        self.drafted = np.zeros((self.batch, 3), np.int64)
        self._sync()

    @property
    def batch(self) -> int:
        return self.state.done.shape[0]

    @property
    def length(self) -> int:
        """Cache slots per row: a row's prompt and generated tokens fit in them."""
        return self.state.cache.length

    @property
    def finished(self) -> bool:
        return bool(self._done.all())

    def advance(self, steps: int, allowed: np.ndarray | None = None) -> list[list[int]]:
        """Runs up to `steps` more steps (fewer when every row finishes); returns each row's new
        tokens. `allowed` `[B, ceil(V / 32)]` int32: the tokens each row may sample next, a bit each;
        where rows are constrained (their params' `structured_outputs`) it is their next token's
        mask, and they take that one step while the others take theirs (one device call)."""
        runner = self.runner
        left = steps
        self.drafted = np.zeros((self.batch, 3), np.int64)
        if allowed is not None:
            self.state = self.state._replace(allowed=runner.put(np.ascontiguousarray(allowed, np.int32)))
        while not self._done.all() and left > 0:
            spec = runner.speculative if self.batch <= runner.speculative_rows else None
            attended, run = self._attended(min(left, RING), spec.k if spec else 0)  # (no more than the ring holds)
            if run < 1:  # (no room in the cache for the drafts' slots: plain steps)
                spec, (attended, run) = None, self._attended(min(left, RING))
            self.state, ran, tally = _decode(runner.graphdef, runner.params, self.state, runner.put(np.int32(run)),
                                             attended=attended, layout=self._layout, ring=self._ring, spec=spec)
            ran, tally = self._sync((ran, tally))
            left -= int(ran)
            self.drafted += tally
            if allowed is not None and ran:  # (the masks were for one step: a crossing waits for the next call)
                break
            if left > 0 and self._crossing.any():
                length = cache_length(runner.config.original_max_position_embeddings + 1, self.length)
                self.state = _reencode(runner.graphdef, runner.params, self.state, length=length,
                                       layout=self._layout, ring=self._ring, piece=runner.piece(self.batch))
                left -= 1
                self._sync()
            if allowed is not None:  # (the masks were for one step)
                break
        new, self._new = self._new, [[] for _ in range(self.batch)]
        self.new_logprobs = [None if w is None else p for w, p in zip(self._wants, self._pending)]
        self._pending = [[] for _ in range(self.batch)]
        return new

    def _attended(self, steps: int, spare: int = 0) -> tuple[int, int]:
        """The cache slots the next decode call attends over (the power of two, from MIN_ATTENDED,
        above every running row's position, at most the cache) and the steps it may run within
        them, with `spare` slots past them in the cache (drafts' keys: 0 here means none fit). (A
        finished row's attention is not used.) A cache split over seq attends over all of it: the
        bound would only make more programs (and it drops keys past its end)."""
        if self._ring is not None:
            return self.length, steps
        start = int(self._positions[~self._done].max())
        attended = min(self.length, bucket(start + 1, MIN_ATTENDED))
        run = min(steps, attended - start)
        return attended, (max(1, run) if not spare else min(run, self.length - spare - start))

    def stop(self, rows: Sequence[int]) -> None:
        """Ends these rows now, with finish reason "stop" (a stop string the host found: it wins
        over the row's limit even when both came in the same call)."""
        mask = np.zeros(self._done.shape, bool)
        mask[list(rows)] = True
        s = self.state
        mask = self.runner.put(mask)
        self.state = s._replace(done=s.done | mask, stopped_by_token=s.stopped_by_token | mask)
        self._sync()

    def finish_reasons(self) -> list[str | None]:
        """"stop" (a stop token or string), "length" (its limit), or None while running."""
        return [("stop" if t else "length") if d else None for d, t in zip(self._done, self._by_token)]

    def admit(self, rows: Sequence[int], packed: Packed) -> list[list[int]]:
        """Puts `packed` prompts (`ModelRunner.prefill_packed`) into the finished rows `rows`, one
        each, and samples each one's first token; returns those tokens (their log-probabilities in
        `new_logprobs[row]`). The keys and values go straight into the rows' cache (grown first where
        the rows need more slots, stop ids or log-probabilities): one program per batch shape and
        packed width, whatever the prompts."""
        runner, rows, info = self.runner, [int(r) for r in rows], packed.rows
        if len(rows) != len(info.lengths) or not all(self._done[r] for r in rows):
            raise ConfigError(f"admit takes {len(info.lengths)} prompt(s) into as many finished rows; got rows {rows}")
        s = self.state
        grown = (self.length if info.needed <= self.length else max(info.length, self.length),
                 max(info.stops.shape[1], s.stop_ids.shape[1]), any(info.penalised) or self.penalties)
        if grown != (self.length, s.stop_ids.shape[1], self.penalties):
            self.resize(list(range(self.batch)), *grown)
        batch, count = self.batch, len(rows)
        pad = lambda x, fill: np.concatenate([x, np.full((batch - count, *x.shape[1:]), fill, x.dtype)])  # noqa: E731
        stops = np.full((count, self.state.stop_ids.shape[1]), -1, np.int32)
        stops[:, :info.stops.shape[1]] = info.stops
        row_of = np.array(rows + [batch], np.int32)  # (segment `count`: the padding, dropped)
        entries = runner.put(pad(row_of[:-1], batch))
        self.state, hidden = _place(self.state, packed.hidden, packed.cache,
                                    *runner.put((packed.ids, row_of[packed.segments], packed.positions,
                                                 pad(packed.lasts, 0))), entries)
        self.state = _first(runner.graphdef, runner.params, self.state, hidden, entries,
                            *runner.put((pad(info.lengths, 1), pad(info.limits, 1), pad(stops, -1),
                                         jax.tree.map(lambda x: pad(x, 0), info.sampler), pad(info.allowed, -1))),
                            layout=self._layout)
        for r, want, penalised, last, n in zip(rows, info.logprobs, info.penalised, packed.lasts, info.lengths):
            self._harvested[r], self._penalised[r] = 0, penalised
            self._wants[r], self._new[r], self._pending[r] = want, [], []
            self._seq[r] = packed.ids[last + 1 - n:last + 1].tolist()
        self._sync()
        first = [self._new[r] for r in rows]
        self.new_logprobs = [None] * batch
        for r in rows:
            self.new_logprobs[r] = None if self._wants[r] is None else self._pending[r]
            self._new[r], self._pending[r] = [], []
        return first

    def join(self, rows: Sequence[int], other: Generation, picks: Sequence[int] | None = None) -> None:
        """Puts `other`'s rows `picks` (default all; running, their tokens so far already read) in
        place of this batch's rows `rows`, which must be finished; grows this cache's length (and
        the stop-id and log-probability tables) first where `other`'s are larger."""
        picks = list(range(other.batch)) if picks is None else list(picks)
        rows = list(rows)
        if len(rows) != len(picks) or not all(self._done[r] for r in rows):
            raise ConfigError(f"join takes rows into finished rows of the batch; got {len(picks)} row(s) for rows "
                              f"{rows} (finished: {[bool(self._done[r]) for r in rows]})")
        sizes = lambda g: (g.length, g.state.stop_ids.shape[1], g.penalties)  # noqa: E731
        wanted = tuple(max(a, b) for a, b in zip(sizes(self), sizes(other)))
        if wanted != sizes(self):
            self.resize(list(range(self.batch)), *wanted)
        self.state = _join(self.state, other.state, *self.runner.put((np.array(rows, np.int32),
                                                                      np.array(picks, np.int32))),
                           layout=self._layout)
        for r, p in zip(rows, picks):
            self._harvested[r], self._wants[r] = other._harvested[p], other._wants[p]
            self._penalised[r], self._seq[r] = other._penalised[p], list(other._seq[p])
            self._new[r], self._pending[r] = list(other._new[p]), list(other._pending[p])
        self._sync()

    def held_prefix(self, prompt: Sequence[int], needed: int) -> tuple[int, int]:
        """(row, tokens): the row, running or finished, whose cache holds the longest leading part of
        `prompt` usable for it, and that part's length; (-1, 0) if none. Usable: at most all but the
        prompt's last token (it makes the next logits); the same LongRoPE table on both sides
        (transformers re-encodes across the threshold); `needed` slots, the prompt and its new
        tokens, fit in the cache."""
        best, config = (-1, 0), self.runner.config
        if needed > self.length:
            return best
        for row, seq in enumerate(self._seq):
            n = min(len(seq) - 1, len(prompt) - 1)  # (the last token's keys are not in the cache)
            if n <= best[1] or not longrope.same_table(config, len(seq) - 1, len(prompt)):
                continue
            same = common_prefix(seq[:n], prompt[:n])
            if same > best[1]:
                best = (row, same)
        return best

    def copy_row(self, row: int) -> Generation:
        """A one-row generation holding a copy of row `row` (its cache and sequence), for
        `ModelRunner.start(continuing=)`; this batch is unchanged."""
        s = self.state
        state = _resize(s, self.runner.put(np.array([row], np.int32)), length=self.length,
                        stop_width=s.stop_ids.shape[1], penalties=s.seen.shape[1],
                        layout=self.runner.cache_sharding(1, self.length))
        one = Generation(self.runner, state)
        one._seq, one._new = [list(self._seq[row])], [[]]  # (what its first look read is this row's past)
        return one

    @property
    def penalties(self) -> bool:
        """Whether the batch holds penalty state (while a row asks for penalties)."""
        return self.state.seen.shape[1] > 0

    @property
    def penalties_unused(self) -> bool:
        """The batch holds penalty state that no running row reads (`resize(..., penalties=False)`)."""
        return self.penalties and not any(p and not d for p, d in zip(self._penalised, self._done))

    def resize(self, rows: Sequence[int | None], length: int | None = None, stop_width: int | None = None,
               penalties: bool | None = None) -> None:
        """Row i becomes old row `rows[i]` (None: a free row) and the cache holds `length` slots
        (default: as now; the kept rows must fit in it); `stop_width` widens the stop-id table,
        `penalties` adds or drops the penalty state (default: as now)."""
        s = self.state
        length = length or self.length
        penalties = self.penalties if penalties is None else penalties
        sizes = dict(length=length, stop_width=stop_width or s.stop_ids.shape[1],
                     penalties=self.runner.config.vocab_size if penalties else 0)
        index = np.array([-1 if r is None else r for r in rows], np.int32)
        self.state = _resize(s, self.runner.put(index), **sizes, layout=self.runner.cache_sharding(len(rows), length))
        kept = lambda values, empty: [values[i] if i >= 0 else empty() for i in index]  # noqa: E731
        self._harvested = np.where(index >= 0, self._harvested[np.maximum(index, 0)], 0).astype(np.int32)
        self._wants, self._penalised = kept(self._wants, lambda: None), kept(self._penalised, lambda: False)
        self._new, self._pending, self._seq = kept(self._new, list), kept(self._pending, list), kept(self._seq, list)
        self._sync()

    def _sync(self, extra=None):
        """Copies what the host looks at to host memory, in one transfer: per row a few numbers and
        the ring of its newest tokens (and their log-probabilities, when asked), never the cache's
        length of anything; and `extra` (a call's own results), returned as host values."""
        s = self.state
        self._layout = self.runner.cache_sharding(self.batch, self.length)
        self._ring = seq_mesh(self.runner.mesh, self.length)
        crossing = longrope.crossing(self.runner.config, s.done, s.positions) if self.runner._longrope else None
        logprobs = (s.logprob_ring, s.top_ids, s.top_logprobs) if any(w is not None for w in self._wants) else None
        self._done, self._by_token, self._generated, tokens, self._positions, self._crossing, logprobs, extra = (
            jax.device_get((s.done, s.stopped_by_token, s.generated, s.tokens, s.positions, crossing, logprobs,
                            extra)))
        if self._crossing is None:
            self._crossing = np.zeros_like(self._done)
        self._harvest(tokens, logprobs)
        return extra

    def _harvest(self, tokens, logprobs) -> None:
        """Moves the tokens generated since the last look (at most RING a row) out of the rings,
        with their log-probabilities for the rows that asked."""
        for b, want in enumerate(self._wants):
            for g in range(self._harvested[b], self._generated[b]):
                i = g % RING
                self._new[b].append(int(tokens[b, i]))
                self._seq[b].append(self._new[b][-1])
                if want is not None:
                    chosen, top_ids, top_logprobs = logprobs
                    top = zip(top_ids[b, i, :want].tolist(), top_logprobs[b, i, :want].tolist())
                    self._pending[b].append((float(chosen[b, i]), list(top)))
        self._harvested = self._generated.copy()


def _shared_seed() -> int:
    """A fresh seed that every process of a multi-host run agrees on (process 0's)."""
    from jax.experimental import multihost_utils

    seed = np.random.SeedSequence().entropy % 2**62
    return int(multihost_utils.broadcast_one_to_all(np.int64(seed)))


def _laid_out(state: DecodeState, layout) -> DecodeState:
    """On a mesh (`layout`: the cache's sharding), pins the cache to it and everything else to
    replicated, so the host of every process can read what it needs."""
    if layout is None:
        return state
    replicated = meshes.replicated(layout.mesh)
    rest = {f: jax.lax.with_sharding_constraint(getattr(state, f), replicated)
            for f in DecodeState._fields if f != "cache"}
    return DecodeState(**rest, cache=jax.lax.with_sharding_constraint(state.cache, layout))


def _advance(state: DecodeState, logits: jax.Array, cache: KVCache, layout=None, hold=None) -> DecodeState:
    """Samples the next token of every running row from `logits` [B, V] (among the tokens it is
    `allowed`) and records it; a finished row, or one to `hold` [B], keeps its state."""
    active = ~state.done if hold is None else ~state.done & ~hold
    # Each row's key is folded with its own token count: the draws a row makes alone.
    token = sample(_masked(logits, state), state.sampler, state.generated, state.seen, state.counts)
    rows = jnp.arange(token.shape[0])
    length = state.history.shape[1]
    # A finished row writes past the end, which mode="drop" discards.
    tokens = state.tokens.at[rows, jnp.where(active, state.generated % RING, RING)].set(token, mode="drop")
    positions = jnp.where(active, state.positions + 1, state.positions)
    history = state.history.at[rows, jnp.where(active, positions, length)].set(token, mode="drop")
    seen, counts = update_history(state.seen, state.counts, jnp.where(active, token, -1))
    is_stop = jnp.any(token[:, None] == state.stop_ids, axis=-1)
    generated = jnp.where(active, state.generated + 1, state.generated)
    finished = active & (is_stop | (generated >= state.limit))
    state = _logprobs_recorded(state, logits, token, active)
    return _laid_out(state._replace(
        tokens=tokens, last=jnp.where(active, token, state.last), positions=positions, history=history,
        seen=seen, counts=counts, cache=cache, generated=generated,
        done=state.done | finished, stopped_by_token=state.stopped_by_token | (active & is_stop)), layout)


def _masked(logits: jax.Array, state: DecodeState) -> jax.Array:
    """`logits` [B, V] with the tokens a constrained row is not `allowed` at -inf (computed only
    while such a row runs)."""
    def mask(logits):
        ids = jnp.arange(logits.shape[-1])
        bits = (state.allowed[:, ids // 32] >> (ids % 32)) & 1
        return jnp.where(bits.astype(bool), logits, -jnp.inf)

    return jax.lax.cond(jnp.any(state.sampler.constrained & ~state.done), mask, lambda x: x, logits)


def _logprobs_recorded(state: DecodeState, logits: jax.Array, token: jax.Array, active: jax.Array) -> DecodeState:
    """Writes the chosen tokens' log-probabilities and the most likely ones into the ring, at steps
    where a running row asks for them (the arrays always exist: no program of their own; the
    log-softmax and top-k are computed only then)."""
    rows = jnp.arange(token.shape[0])
    asking = active & state.sampler.logprobs

    def record(rings):
        chosen_ring, ids_ring, values_ring = rings
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        index = jnp.where(asking, state.generated % RING, RING)  # the other rows write nothing (dropped)
        chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
        values, ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
        return (chosen_ring.at[rows, index].set(chosen, mode="drop"), ids_ring.at[rows, index].set(ids, mode="drop"),
                values_ring.at[rows, index].set(values, mode="drop"))

    rings = jax.lax.cond(jnp.any(asking), record, lambda rings: rings,
                         (state.logprob_ring, state.top_ids, state.top_logprobs))
    return state._replace(logprob_ring=rings[0], top_ids=rings[1], top_logprobs=rings[2])


@functools.partial(jax.jit, donate_argnums=(10, 11),
                   static_argnames=("continuing", "layout", "piece", "ring", "reach", "penalties"))
def _start(graphdef, params, ids, starts, lengths, rope_lengths, limits, stop_ids, sampler, allowed, history, cache,
           *, continuing, layout=None, piece=None, ring=None, reach=None,
           penalties=0) -> DecodeState:
    """Prefills `ids` `[B, W]` at positions `starts[b]` on (`continuing`: over the cached prefix;
    else from 0 into a fresh cache) and samples the first token (among those `allowed`).
    `lengths[b]`: row b's sequence through `ids`; `rope_lengths[b]`: its whole prompt's (more when
    `ids` is only a part)."""
    model = nnx.merge(graphdef, params)
    batch, width = ids.shape
    logits, cache = prefill(model, ids, lengths, cache, starts if continuing else None, piece, ring, rope_lengths,
                            reach)
    rows = jnp.arange(batch)[:, None]
    slots = starts[:, None] + jnp.arange(width)
    # Pad columns go to slot L, which mode="drop" discards.
    history = history.at[rows, jnp.where(slots < lengths[:, None], slots, history.shape[1])].set(ids, mode="drop")
    seen = jnp.zeros((batch, penalties), bool)
    if penalties:
        seen = seen.at[rows, history].max(jnp.arange(history.shape[1])[None] < lengths[:, None])
    state = DecodeState(
        tokens=jnp.zeros((batch, RING), jnp.int32), last=jnp.zeros(batch, jnp.int32),
        positions=lengths - 1, done=jnp.zeros(batch, bool), stopped_by_token=jnp.zeros(batch, bool),
        generated=jnp.zeros(batch, jnp.int32), limit=limits, stop_ids=stop_ids, history=history,
        seen=seen, counts=jnp.zeros((batch, penalties), jnp.int32), sampler=sampler,
        logprob_ring=jnp.zeros((batch, RING), jnp.float32), top_ids=jnp.zeros((batch, RING, MAX_LOGPROBS), jnp.int32),
        top_logprobs=jnp.zeros((batch, RING, MAX_LOGPROBS), jnp.float32), allowed=allowed,
        misses=jnp.zeros(batch, jnp.int32), rest=jnp.zeros(batch, jnp.int32), cache=cache)
    return _advance(state, logits, cache, layout)


@functools.partial(jax.jit, static_argnames=("slots",))
def _prefill_packed(graphdef, params, ids, positions, segments, rope_lengths, *, slots) -> tuple[jax.Array, KVCache]:
    """`prefill.prefill_packed` of the model."""
    return prefill_packed(nnx.merge(graphdef, params), ids, positions, segments, rope_lengths, slots)


@jax.jit
def _prompt_logprobs(graphdef, params, hidden, next_ids) -> tuple[jax.Array, ...]:
    """Log-probabilities of `next_ids[t]` `[S]` after each slot's final `hidden` state `[S, E]` and
    their ranks, and the MAX_LOGPROBS most likely tokens' (`[S, K]` ids and values); the
    `[S, vocab]` scores exist a chunk of slots at a time."""
    model = nnx.merge(graphdef, params)
    slots = hidden.shape[0]
    chunk = math.gcd(slots, 256)

    def scored(h_ids):
        h, ids = h_ids
        logprobs = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)
        values, top = jax.lax.top_k(logprobs, MAX_LOGPROBS)
        chosen = jnp.take_along_axis(logprobs, ids[:, None], axis=-1)
        return chosen[:, 0], 1 + jnp.sum(logprobs > chosen, axis=-1), top, values

    out = jax.lax.map(scored, (hidden.reshape(slots // chunk, chunk, -1), next_ids.reshape(slots // chunk, chunk)))
    return tuple(x.reshape(slots, *x.shape[2:]) for x in out)


@functools.partial(jax.jit, static_argnames=("batch", "length", "stop_width", "layout"))
def _empty(graphdef, params, *, batch: int, length: int, stop_width: int, layout=None) -> DecodeState:
    """A state of `batch` finished (free) rows and `length` cache slots."""
    model = nnx.merge(graphdef, params)
    config, dtype = model.config, model.model.embed_tokens.dtype
    zeros = lambda dtype, *shape: jnp.zeros((batch, *shape), dtype)  # noqa: E731
    state = DecodeState(
        tokens=zeros(jnp.int32, RING), last=zeros(jnp.int32), positions=zeros(jnp.int32),
        done=jnp.ones(batch, bool), stopped_by_token=zeros(bool), generated=zeros(jnp.int32),
        limit=zeros(jnp.int32), stop_ids=jnp.full((batch, stop_width), -1, jnp.int32),
        history=zeros(jnp.int32, length), seen=zeros(bool, 0), counts=zeros(jnp.int32, 0),
        sampler=SamplerState(*(zeros(x.dtype, *x.shape[1:]) for x in sampler_state(SamplingParams(), 1))),
        logprob_ring=zeros(jnp.float32, RING), top_ids=zeros(jnp.int32, RING, MAX_LOGPROBS),
        top_logprobs=zeros(jnp.float32, RING, MAX_LOGPROBS),
        allowed=jnp.full((batch, mask_width(config.vocab_size)), -1, jnp.int32),
        misses=zeros(jnp.int32), rest=zeros(jnp.int32), cache=KVCache.create(config, batch, length, dtype))
    return _laid_out(state, layout)


@functools.partial(jax.jit, donate_argnums=(0,))
def _place(state: DecodeState, hidden, packed: KVCache, ids, token_rows, slots, lasts,
           rows) -> tuple[DecodeState, jax.Array]:
    """Moves packed prompts (`_prefill_packed`'s `hidden` `[S, E]` and keys/values) into rows `rows`
    `[B]` of `state` (B: a row index past the batch for unused entries): token t to row
    `token_rows[t]`, slot `slots[t]`, with the rows' history and penalty state started afresh.
    Returns the state and each entry's last hidden state (`lasts` `[B]`), for `_first`. (Apart from
    the sampling step, so that only this program of data movement is made per packed width.)"""
    fresh = (jnp.zeros(state.done.shape[0], bool).at[rows].set(True, mode="drop"))[:, None]
    moved = lambda c, new: c.at[token_rows, :, slots].set(new[0].transpose(1, 0, 2).astype(c.dtype), mode="drop")  # noqa: E731
    cache = KVCache(tuple(map(moved, state.cache.keys, packed.keys)),
                    tuple(map(moved, state.cache.values, packed.values)))
    seen = state.seen
    if seen.shape[1]:
        seen = jnp.where(fresh, False, seen).at[token_rows, ids].set(True, mode="drop")
    return state._replace(
        cache=cache, counts=jnp.where(fresh, 0, state.counts), seen=seen,
        history=jnp.where(fresh, 0, state.history).at[token_rows, slots].set(ids, mode="drop")), hidden[lasts]


@functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("layout",))
def _first(graphdef, params, state: DecodeState, hidden, rows, lengths, limits, stop_ids, sampler, allowed, *,
           layout=None) -> DecodeState:
    """Starts rows `rows` `[B]` (placed by `_place`; B: unused entries) from their last prompt
    token's `hidden` state `[B, E]`: entry b's prompt has `lengths[b]` tokens, `limits[b]`,
    `stop_ids[b]`, `sampler` row b and first-token mask `allowed[b]`. Samples their first tokens;
    the other rows keep their state."""
    model = nnx.merge(graphdef, params)
    batch = state.done.shape[0]
    admitted = jnp.zeros(batch, bool).at[rows].set(True, mode="drop")
    put = lambda x, new: x.at[rows].set(new.astype(x.dtype), mode="drop")  # noqa: E731
    logits = jnp.zeros((batch, model.config.vocab_size), hidden.dtype).at[rows].set(model.logits(hidden), mode="drop")
    rest = state._replace(
        positions=put(state.positions, lengths - 1), done=~admitted,
        stopped_by_token=put(state.stopped_by_token, jnp.zeros_like(rows, bool)),
        generated=put(state.generated, jnp.zeros_like(rows)), limit=put(state.limit, limits),
        stop_ids=put(state.stop_ids, stop_ids), sampler=jax.tree.map(put, state.sampler, sampler),
        allowed=put(state.allowed, allowed), misses=put(state.misses, jnp.zeros_like(rows)),
        rest=put(state.rest, jnp.zeros_like(rows)))
    new = _advance(rest, logits, state.cache)
    return _laid_out(new._replace(done=jnp.where(admitted, new.done, state.done)), layout)


@functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("attended", "layout", "ring", "spec"))
def _decode(graphdef, params, state: DecodeState, steps: jax.Array, *, attended: int | None = None,
            layout=None, ring=None, spec: Speculation | None = None) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Up to `steps` decode steps, fewer when every row is done or a row is at the LongRoPE
    crossing. The queries attend over the cache's first `attended` slots (default all): every row's
    positions in these steps must lie below it. With `spec`, a step also verifies each row's drafts
    (`speculative.py`) and a row makes up to `steps` tokens (the cache must hold `spec.k` slots past
    them). Returns the state, the most tokens a row made, and each row's drafts `[B, 3]`: its steps
    that drafted, draft tokens, accepted ones."""
    model = nnx.merge(graphdef, params)
    config = model.config
    longrope_model = config.rope_type == "longrope"
    # One row, one device, on XLA:CPU: the loop carries the cache layers without their batch axis.
    # With it, XLA:CPU dropped that axis only around the attention's dot and copied every layer
    # several times a step (3x slower decode at 3K tokens than two rows); `cache.write` matches this.
    squeeze = state.done.shape[0] == 1 and layout is None and model.backend.one_row_cache
    slots = attended or state.cache.length
    path = over_cache(slots, ring)

    def carried(cache):
        return jax.tree.map(lambda c: c[0], cache) if squeeze else cache

    def restored(cache):
        return jax.tree.map(lambda c: c[None], cache) if squeeze else cache

    # A constrained row takes one step a call (its host computes the next step's mask): held after it.
    first = state.generated

    def held(s):
        hold = s.sampler.constrained & (s.generated > first)
        return hold | (s.generated - first >= steps) if spec else hold

    def running(carry):
        s, ran, _ = carry
        go = (ran < steps) & ~jnp.all(s.done | held(s))
        return go & ~jnp.any(longrope.crossing(config, s.done, s.positions)) if longrope_model else go

    def plain(s):
        logits, cache = model.decode(s.last, s.positions, restored(s.cache), path)
        return _advance(s, logits, carried(cache), layout, hold=held(s))

    def step(carry):
        s, ran, tally = carry
        if spec is None:
            return plain(s), ran + 1, tally
        drafts, count = speculative.propose(s.history[:, :slots], s.positions, spec)
        room = steps - (s.generated - first) - 1  # drafts a row may keep: its tokens fit in this call ...
        if longrope_model:  # ... and end at LongRoPE's switch (the crossing row stops there)
            before = s.positions < config.original_max_position_embeddings
            room = jnp.where(before, jnp.minimum(room, config.original_max_position_embeddings - 1 - s.positions), room)
        active = ~s.done & ~held(s)
        drafting = active & ~s.sampler.constrained & (s.rest == 0) & (count > 0) & (room > 0)
        count = jnp.where(drafting, jnp.minimum(count, room), 0)
        made = s.generated
        verified = functools.partial(_verified, model, drafts, count, held, layout, carried, restored, path)
        s = _either(jnp.any(drafting), verified, plain, s)
        accepted = jnp.where(drafting, s.generated - made - 1, 0)
        misses, rest = speculative.backed_off(s.misses, s.rest, drafting, accepted, active)
        tally = tally + jnp.stack([drafting, count, accepted], axis=1).astype(jnp.int32)
        return s._replace(misses=misses, rest=rest), ran + 1, tally

    state, ran, tally = jax.lax.while_loop(running, step, (state._replace(cache=carried(state.cache)), jnp.int32(0),
                                                           jnp.zeros((state.done.shape[0], 3), jnp.int32)))
    if spec is not None:
        ran = jnp.max(state.generated - first)
    return _laid_out(state._replace(cache=restored(state.cache)), layout), ran, tally


def _either(pred: jax.Array, true_fn, false_fn, state: DecodeState) -> DecodeState:
    """`lax.cond(pred, true_fn, false_fn, state)` as two loops of at most one turn: XLA:CPU copied
    every cache layer in and out of a conditional's branches, while a loop updates them in place."""
    once = lambda fn: lambda carry: (fn(carry[0]), False)  # noqa: E731
    state = jax.lax.while_loop(lambda carry: carry[1], once(true_fn), (state, pred))[0]
    return jax.lax.while_loop(lambda carry: carry[1], once(false_fn), (state, ~pred))[0]


def _verified(model, drafts, count, held, layout, carried, restored, path, s: DecodeState) -> DecodeState:
    """One step that runs each row's newest token and its `drafts` `[B, k]` (the first `count[b]`
    hold tokens) in one forward, then samples position after position as plain steps would: a row
    goes on while the token it sampled is its next draft."""
    ids = jnp.concatenate([s.last[:, None], drafts], axis=1)
    logits, cache = model.decode(ids, s.positions, restored(s.cache), path)
    s = s._replace(cache=KVCache((), ()))  # (the positions' conditionals without it: XLA copied it in and out)
    going = jnp.ones_like(s.done)
    for i in range(ids.shape[1]):
        hold = held(s) | ~going
        made = s.generated
        sampled = functools.partial(lambda i, hold, s: _advance(s, logits[:, i], s.cache, layout, hold=hold), i, hold)
        s = jax.lax.cond(jnp.any(~s.done & ~hold), sampled, lambda s: s, s)
        if i < drafts.shape[1]:
            going &= (s.generated > made) & (i < count) & (s.last == drafts[:, i])
    return s._replace(cache=carried(cache))


def _fit(x: jax.Array, axis: int, size: int, fill) -> jax.Array:
    """`x` cut or padded (with `fill`) to `size` along `axis`."""
    if x.shape[axis] >= size:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill)


def _fitted(state: DecodeState, length: int, stop_width: int, penalties: int) -> DecodeState:
    """`state` with `length` cache slots (and history columns), `stop_width` stop ids and penalty
    state `penalties` wide (0 or the vocabulary: rows gaining it start with none, which no
    unpenalised row reads)."""
    cache = jax.tree.map(lambda c: _fit(c, 2, length, 0), state.cache)
    return state._replace(history=_fit(state.history, 1, length, 0), seen=_fit(state.seen, 1, penalties, False),
                          counts=_fit(state.counts, 1, penalties, 0),
                          stop_ids=_fit(state.stop_ids, 1, stop_width, -1), cache=cache)


@functools.partial(jax.jit,  # (no donation: new shapes)
                   static_argnames=("length", "stop_width", "penalties", "layout"))
def _resize(state: DecodeState, index: jax.Array, *, length: int, stop_width: int, penalties: int,
            layout=None) -> DecodeState:
    """Row i of the result is row `index[i]` of `state` (-1: a free row, done), fitted to the sizes
    (`_fitted`)."""
    rows = jax.tree.map(lambda x: jnp.take(x, jnp.maximum(index, 0), axis=0), state)
    free = index < 0
    rows = rows._replace(done=rows.done | free, generated=jnp.where(free, 0, rows.generated))
    return _laid_out(_fitted(rows, length, stop_width, penalties), layout)


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("layout",))
def _join(state: DecodeState, other: DecodeState, rows: jax.Array, picks: jax.Array, *, layout=None) -> DecodeState:
    """`state` with rows `rows` replaced by `other`'s rows `picks` (fitted to `state`'s sizes)."""
    other = _fitted(other, state.cache.length, state.stop_ids.shape[1], state.seen.shape[1])
    joined = jax.tree.map(lambda x, y: x.at[rows].set(jnp.take(y, picks, axis=0).astype(x.dtype)), state, other)
    return _laid_out(joined, layout)


@functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("length", "layout", "ring", "piece"))
def _reencode(graphdef, params, state: DecodeState, *, length: int, layout=None, ring=None,
              piece=None) -> DecodeState:
    """LongRoPE's step at the crossing (`longrope.reencode`): crossing rows re-encode their first
    `length` tokens with the long table, the others decode; then every row samples."""
    model = nnx.merge(graphdef, params)
    logits, cache = longrope.reencode(model, state.history, state.last, state.positions, state.done,
                                      state.cache, length, piece, ring)
    return _advance(state, logits, cache, layout)
