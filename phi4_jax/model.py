"""The Phi-3/Phi-4 causal LM in Flax NNX: RMSNorm, GQA attention, MLP, decoder layer, LM head.

Parameter names and layouts follow Hugging Face's `Phi3ForCausalLM`: a projection's `weight` is
`(outputs..., inputs...)` as in HF, with heads as their own axis (`q_proj.weight` is `[heads,
head_dim, embed]`), and the fused `qkv_proj` / `gate_up_proj` are split into separate projections.
weights.py maps one onto the other. Every parameter carries the logical axis names of its
dimensions in `axes`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from phi4_jax import cpu_forms
from phi4_jax.attention import attend, causal_mask
from phi4_jax.attention import check as check_attention
from phi4_jax.cache import KVCache
from phi4_jax.cache import write as cache_write
from phi4_jax.config import Phi4Config
from phi4_jax.ring_attention import cache_attend, ring_attend, zigzag_order
from phi4_jax.rope import apply_rope, rope_tables


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA:CPU runs bf16 matmuls far slower), bfloat16 on GPU and TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


# On XLA:CPU, products of 2 to this many rows put the weight first (see `project`).
CPU_WEIGHT_FIRST_ROWS = 64


def project(x: jax.Array, weight: jax.Array) -> jax.Array:
    """`x` `[..., in]` times `weight` `[out, in]` transposed: `[..., out]`.

    With 2 to `CPU_WEIGHT_FIRST_ROWS` rows in all (decode at batch > 1), XLA:CPU's small-M GEMM runs
    about twice as fast with the weight as the left operand (`[out, rows]`, then transposed); the
    barrier stops XLA from folding the transpose back into the slow form. Elsewhere the plain
    product, with the leading axes kept (merging a `seq`-sharded axis would reshard it).
    """
    rows = math.prod(x.shape[:-1])
    if cpu_forms.enabled() and 1 < rows <= CPU_WEIGHT_FIRST_ROWS:
        y = jax.lax.optimization_barrier(jnp.einsum("nk,bk->nb", weight, x.reshape(rows, -1))).T
        return y.reshape(*x.shape[:-1], -1)
    return jnp.einsum("...k,nk->...n", x, weight)


class Linear(nnx.Module):
    """A bias-free projection with HF's layout: the weight `out_shape + in_shape` (axes named in
    `axes`) contracts the input's last `len(in_shape)` axes."""

    def __init__(self, in_shape, out_shape, axes, *, rngs: nnx.Rngs, stddev: float, param_dtype, dtype):
        # Drawn as (inputs, outputs) and moved: a seed gives the weights it gave in that layout.
        init = stddev * jax.random.normal(rngs.params(), (*in_shape, *out_shape), jnp.float32)
        init = jnp.moveaxis(init, tuple(range(len(in_shape))), tuple(range(-len(in_shape), 0)))
        self.weight = nnx.Param(init.astype(param_dtype), axes=axes)
        self.inputs = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.weight[...].astype(self.dtype)
        outputs = weight.shape[:weight.ndim - self.inputs]
        lead = x.shape[:x.ndim - self.inputs]
        # One product over flattened head axes (reshapes of row-major arrays are free): given an einsum
        # over several head axes at batch 1, XLA:CPU copied the whole weight transposed every step.
        y = project(x.reshape(*lead, -1), weight.reshape(math.prod(outputs), -1))
        return y.reshape(*lead, *outputs)


class VocabTable(nnx.Module):
    """A `[vocab, embed]` table (HF layout): looks up token embeddings, or scores hidden states."""

    def __init__(self, vocab: int, embed: int, *, rngs: nnx.Rngs, stddev: float, param_dtype, dtype):
        init = stddev * jax.random.normal(rngs.params(), (vocab, embed), jnp.float32)
        self.weight = nnx.Param(init.astype(param_dtype), axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.weight[...][input_ids].astype(self.dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """`[B, T, vocab]` scores of hidden states `[B, T, embed]` against the table."""
        return project(h, self.weight[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32, back to the input dtype, *then* scale by w (not 1 + w).
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs, **kw):
        e, n, kv, d = (config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
        kw.update(rngs=rngs, stddev=config.initializer_range)
        self.q_proj = Linear((e,), (n, d), ("q_heads", "head_dim", "embed"), **kw)
        self.k_proj = Linear((e,), (kv, d), ("kv_heads", "head_dim", "embed"), **kw)
        self.v_proj = Linear((e,), (kv, d), ("kv_heads", "head_dim", "embed"), **kw)
        self.o_proj = Linear((n, d), (e,), ("embed", "q_heads", "head_dim"), **kw)

    def __call__(self, x, cos, sin, attention, kv_cache=None):
        """`attention(q, k, v, kv_cache) -> (out, kv_cache)` attends (masks included) and writes the
        new keys/values into `kv_cache` (a `(keys, values)` pair of `[B, KV, L, D]`, or None)."""
        q = apply_rope(self.q_proj(x), cos, sin)
        k = apply_rope(self.k_proj(x), cos, sin).transpose(0, 2, 1, 3)  # [B, KV, T, D]: cache layout
        v = self.v_proj(x).transpose(0, 2, 1, 3)
        out, kv_cache = attention(q, k, v, kv_cache)
        return self.o_proj(out), kv_cache


class MLP(nnx.Module):
    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs, **kw):
        e, i = config.hidden_size, config.intermediate_size
        kw.update(rngs=rngs, stddev=config.initializer_range)
        self.gate_proj = Linear((e,), (i,), ("mlp", "embed"), **kw)
        self.up_proj = Linear((e,), (i,), ("mlp", "embed"), **kw)
        self.down_proj = Linear((i,), (e,), ("embed", "mlp"), **kw)

    def __call__(self, x):
        return self.down_proj(self.up_proj(x) * jax.nn.silu(self.gate_proj(x)))


class DecoderLayer(nnx.Module):
    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs, **kw):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, h, cos, sin, attention, kv_cache=None):
        attn, kv_cache = self.self_attn(self.input_layernorm(h), cos, sin, attention, kv_cache)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv_cache


class Phi4Model(nnx.Module):
    """The decoder stack: embeddings, layers, final norm (HF's `model.` prefix)."""

    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs, attention: str = "auto", **kw):
        self.embed_tokens = VocabTable(config.vocab_size, config.hidden_size, rngs=rngs,
                                       stddev=config.initializer_range, **kw)
        # One module (own arrays) per layer, looped in Python so jit unrolls it: slicing stacked
        # (layers, ...) weights in a scan copies every layer every step on XLA.
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, **kw)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.config = config
        self.attention = attention  # the implementation (`attention.IMPLEMENTATIONS`)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, lengths: jax.Array | None = None,
                 cache: KVCache | None = None, attend_slots: int | None = None, ring: Mesh | None = None):
        """Final hidden states `[B, T, E]` of tokens at `positions` `[B, T]`; with a `cache`, also
        the cache with their keys/values written at slots = positions (`(h, cache)`).

        `lengths` `[B]`: each row's sequence length so far (for LongRoPE's switch; default from
        positions). `attend_slots`: attend over the cache's first `attend_slots` slots (decoding,
        continuing a sequence, a prefill piece) rather than over the new tokens only (None: a
        prefill from position 0 in one piece). `ring`: a mesh whose seq axis splits the sequence
        (and the cache, in contiguous shards): new sequences (no `attend_slots`) are attended with
        ring attention (`ring_attention.zigzag` them first), other tokens over the split cache.
        """
        h = self.embed_tokens(input_ids)
        cos, sin = rope_tables(self.config, positions, lengths)
        attention = self._attention(positions, attend_slots, ring)
        layer_caches = [None] * len(self.layers) if cache is None else zip(cache.keys, cache.values)
        written = []
        for layer, kv_cache in zip(self.layers, layer_caches):
            h, kv_cache = layer(h, cos, sin, attention, kv_cache)
            written.append(kv_cache)
        if cache is None:
            return self.norm(h)
        return self.norm(h), KVCache(*(tuple(part) for part in zip(*written)))

    def _attention(self, positions, attend_slots, ring):
        """`attention(q, k, v, kv_cache) -> (out, kv_cache)` for the tokens at `positions`."""
        window, implementation = self.config.window, self.attention
        if ring is not None and attend_slots is None:
            def ring_attention(q, k, v, kv_cache):
                out = ring_attend(ring, q, k, v, positions, positions, window, cache=kv_cache,
                                  implementation=implementation)
                return (out, None) if kv_cache is None else out
            return ring_attention
        if ring is not None:
            return lambda q, k, v, kv_cache: cache_attend(ring, q, k, v, positions, kv_cache, window, implementation)
        key_positions = positions if attend_slots is None else jnp.broadcast_to(
            jnp.arange(attend_slots), (positions.shape[0], attend_slots))
        mask = causal_mask(positions, key_positions, window)

        def dense_attention(q, k, v, kv_cache):
            if kv_cache is not None:  # the tokens are contiguous: row b from slot positions[b, 0]
                kv_cache = tuple(cache_write(c, x, positions[:, 0]) for c, x in zip(kv_cache, (k, v)))
                if attend_slots is not None:
                    k, v = (c[:, :, :attend_slots] for c in kv_cache)
            return attend(q, k, v, mask, implementation), kv_cache
        return dense_attention


class Phi4ForCausalLM(nnx.Module):
    """Phi-3/Phi-4 causal LM; `model(input_ids)` gives `[batch, seq, vocab]` logits.

    Args:
      config: the hyper-parameters.
      rngs: initialises the (random) parameters; loading replaces them.
      param_dtype: storage dtype of the parameters (default: the backend's, see `default_dtype`).
      dtype: compute dtype of activations (default: `param_dtype`). Norm statistics, rotary
        angles and softmax are float32 whatever it is.
      attention: the attention implementation, "auto", "xla" or "cudnn" (see `attention.py`;
        ConfigError when it cannot run here).
    """

    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs, param_dtype=None, dtype=None,
                 attention: str = "auto"):
        param_dtype = jnp.dtype(param_dtype or default_dtype())
        kw = dict(param_dtype=param_dtype, dtype=jnp.dtype(dtype or param_dtype))
        check_attention(attention, kw["dtype"])
        self.model = Phi4Model(config, rngs=rngs, attention=attention, **kw)
        if not config.tie_word_embeddings:
            self.lm_head = VocabTable(config.vocab_size, config.hidden_size, rngs=rngs,
                                      stddev=config.initializer_range, **kw)
        self.config = config

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 ring: Mesh | None = None) -> jax.Array:
        """Logits `[batch, seq, vocab]` (compute dtype) for int `input_ids` `[batch, seq]`.

        `positions` `[batch, seq]` default to 0..seq-1 in every row. `ring`: split the sequence over
        this mesh's seq axis and use ring attention (lay the sequence and its positions out with
        `ring_attention.zigzag` first, for balanced work, and undo it on the logits).
        """
        input_ids = jnp.asarray(input_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self._head(self.model(input_ids, positions, ring=ring))

    def prefill(self, input_ids: jax.Array, lengths: jax.Array, cache: KVCache,
                starts: jax.Array | None = None, chunk: int | None = None,
                ring: Mesh | None = None) -> tuple[jax.Array, KVCache]:
        """Runs right-padded prompts `[B, T]` into the cache; returns the logits `[B, vocab]` at each
        row's last prompt token (position `lengths[b] - 1`), and the cache.

        Without `starts` the prompts start at position 0 and attend among themselves; with
        `starts` `[B]` they continue sequences whose first `starts[b]` positions are cached (a
        chat's next turn) and attend over the cache. `chunk`: prompts longer than this run in
        pieces of `chunk` tokens, each attending over the cache slots the prompt may reach (its
        first T from position 0, else all), so attention's temporaries grow with `chunk * T`
        rather than `T * T`. `ring`: a mesh whose seq axis splits the cache (in contiguous shards)
        and the work: a prompt from position 0 whose T divides into 2·seq chunks runs with ring
        attention; other prompts and pieces attend over the split cache.
        """
        batch, width = input_ids.shape
        fresh = starts is None
        if ring is not None and fresh and width % (2 * ring.shape["seq"]) == 0:
            order = zigzag_order(width, ring.shape["seq"])
            positions = jnp.broadcast_to(order, input_ids.shape)
            h, cache = self.model(jnp.take(input_ids, order, axis=1), positions, lengths, cache, ring=ring)
            last = jnp.asarray(np.argsort(order))[lengths - 1]  # where each row's last token went
            h = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, E]
            return self._head(h)[:, 0], cache
        # The cache slots a piece may attend over: the prompt's own (from position 0), else all.
        slots = width if fresh else cache.length
        starts = jnp.zeros(batch, jnp.int32) if fresh else starts
        if chunk is None or width <= chunk:  # one piece: a fresh one attends among its own tokens
            return self._prefill_block(input_ids, lengths, cache, starts,
                                       None if fresh and ring is None else slots, ring)

        def piece(offset, size, logits, cache):
            ids = jax.lax.dynamic_slice_in_dim(input_ids, offset, size, axis=1)
            new, cache = self._prefill_block(ids, lengths, cache, starts + offset, slots, ring)
            holds_last = (lengths - 1 >= starts + offset) & (lengths - 1 < starts + offset + size)
            return jnp.where(holds_last[:, None], new, logits), cache

        logits = jnp.zeros((batch, self.config.vocab_size), self.model.embed_tokens.dtype)
        logits, cache = jax.lax.fori_loop(0, width // chunk, lambda i, c: piece(i * chunk, chunk, *c),
                                          (logits, cache))
        if width % chunk:  # a last, shorter piece (a cache shorter than the power-of-two bucket)
            logits, cache = piece(width - width % chunk, width % chunk, logits, cache)
        return logits, cache

    def _prefill_block(self, input_ids, lengths, cache, starts, attend_slots, ring):
        """Tokens `[B, W]` at positions `starts[b]` on; logits at each row's last prompt token
        (clipped to the block: only meaningful for rows whose last token lies in it)."""
        positions = starts[:, None] + jnp.arange(input_ids.shape[1])
        h, cache = self.model(input_ids, positions, lengths, cache, attend_slots=attend_slots, ring=ring)
        last = jnp.clip(lengths - starts - 1, 0, input_ids.shape[1] - 1)
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, E]
        return self._head(h)[:, 0], cache

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               ring: Mesh | None = None) -> tuple[jax.Array, KVCache]:
        """One step: `tokens` `[B]` at `positions` `[B]` against the cache; logits `[B, vocab]`.
        `ring`: the mesh whose seq axis splits the cache (see `prefill`)."""
        h, cache = self.model(tokens[:, None], positions[:, None], positions + 1, cache,
                              attend_slots=cache.length, ring=ring)
        return self._head(h)[:, 0], cache

    def _head(self, h: jax.Array) -> jax.Array:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.logits(h)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("ring",))
def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
            positions: jax.Array | None = None, ring: Mesh | None = None) -> jax.Array:
    """The jitted forward as a pure function of split model state: `nnx.split(model)` once, then
    call this as often as needed (far less dispatch overhead than `nnx.jit` per call)."""
    return nnx.merge(graphdef, state)(input_ids, positions, ring)


def abstract_model(config: Phi4Config, param_dtype=None, dtype=None, attention: str = "auto") -> Phi4ForCausalLM:
    """The model with `ShapeDtypeStruct`s for parameters: shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: Phi4ForCausalLM(
        config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype, attention=attention))
