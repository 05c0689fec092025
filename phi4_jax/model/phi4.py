"""The Phi-3/Phi-4 causal LM in Flax NNX: RMSNorm, GQA attention, MLP, decoder layer, LM head.

Parameter names and layouts follow Hugging Face's `Phi3ForCausalLM`: a projection's `weight` is
`(outputs..., inputs...)` as in HF, with heads as their own axis (`q_proj.weight` is `[heads,
head_dim, embed]`), and the fused `qkv_proj` / `gate_up_proj` are split into separate projections
(`checkpoints/hf.py` maps one onto the other). Every parameter carries the logical axis names of
its dimensions in `axes`. Quantized (`quantize="int8"`), a projection's or table's `weight` is int8
beside a float32 `scale` per output channel (`model/int8.py`). Each attention layer writes its own
slice of the KV cache; which attention it runs (`attention.Dense`, `Ring`, `SplitCache`) is a
static choice per call.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from phi4_jax.config import Phi4Config
from phi4_jax.model import attention as attn
from phi4_jax.model import int8, vocab_parallel, xla_cpu, xla_tpu
from phi4_jax.model.backend import Backend
from phi4_jax.model.cache import KVCache, write
from phi4_jax.model.ring import cache_attend, ring_attend
from phi4_jax.model.rope import apply_rope, rope_tables


def default_dtype(platform: str | None = None) -> jnp.dtype:
    """float32 on CPU (XLA:CPU runs bf16 matmuls far slower), bfloat16 on GPU and TPU."""
    return jnp.dtype(jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16)


def project(x: jax.Array, weight: jax.Array, weight_first_rows: int = 0) -> jax.Array:
    """`x` `[..., in]` times `weight` `[out, in]` transposed: `[..., out]`, with the leading axes kept
    (merging a `seq`-sharded axis would reshard it). With 2 to `weight_first_rows` rows in all
    (`Backend.weight_first_rows`: XLA:CPU decoding at batch > 1), `xla_cpu.weight_first`'s form."""
    if 1 < math.prod(x.shape[:-1]) <= weight_first_rows:
        return xla_cpu.weight_first(x, weight)
    return jnp.einsum("...k,nk->...n", x, weight)


class Linear(nnx.Module):
    """A bias-free projection with HF's layout: the weight `out_shape + in_shape` (axes named in
    `axes`) contracts the input's last `len(in_shape)` axes. With `quantize="int8"` the weight is int8
    and `scale` holds one float32 per output channel (`model/int8.py`)."""

    def __init__(self, in_shape, out_shape, axes, *, rngs: nnx.Rngs, stddev: float, param_dtype, dtype,
                 backend: Backend, quantize: str | None = None):
        # Drawn as (inputs, outputs) and moved: a seed gives the weights it gave in that layout.
        init = stddev * jax.random.normal(rngs.params(), (*in_shape, *out_shape), jnp.float32)
        init = jnp.moveaxis(init, tuple(range(len(in_shape))), tuple(range(-len(in_shape), 0)))
        _init_weight(self, init, axes, len(out_shape), param_dtype, quantize)
        self.inputs, self.dtype, self.backend = len(in_shape), dtype, backend

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.weight[...]
        outputs = weight.shape[:weight.ndim - self.inputs]
        lead = x.shape[:x.ndim - self.inputs]
        # One product over flattened head axes (reshapes of row-major arrays are free): given an einsum
        # over several head axes at batch 1, XLA:CPU copied the whole weight transposed every step.
        y = _product(self, x.reshape(*lead, -1), weight.reshape(math.prod(outputs), -1))
        return y.reshape(*lead, *outputs)


def _init_weight(module: nnx.Module, init: jax.Array, axes, outputs: int, param_dtype, quantize: str | None):
    """`module.weight` from the float32 `init` `[out..., in...]`: in `param_dtype`, or int8 with
    `module.scale` (its first `outputs` axes' channels) when quantized."""
    if quantize is None:
        module.weight = nnx.Param(init.astype(param_dtype), axes=axes)
        return
    q, scale = int8.quantize(init, outputs, xp=jnp)
    module.weight = nnx.Param(q, axes=axes)
    module.scale = nnx.Param(scale, axes=axes[:outputs])


def _product(module: nnx.Module, x: jax.Array, weight: jax.Array) -> jax.Array:
    """`x` `[..., in]` times a module's weight as `[out, in]` (`project`), int8 dequantized inside."""
    dense = functools.partial(project, weight_first_rows=module.backend.weight_first_rows)
    if not hasattr(module, "scale"):
        return dense(x, weight.astype(module.dtype))
    return int8.product(x, weight, module.scale[...].reshape(-1), module.dtype, dense,
                        module.backend.chunked_dequantize)


class VocabTable(nnx.Module):
    """A `[vocab, embed]` table (HF layout): looks up token embeddings, or scores hidden states.
    Quantized, it is int8 with one scale per token row (for its lookup and its scores alike).
    `split`: the mesh whose `tensor` axis splits its rows (set by `parallel.mesh.mark_mesh`), for
    a lookup that moves rows, not the table (`model/vocab_parallel.py`); None: the plain gather."""

    def __init__(self, vocab: int, embed: int, *, rngs: nnx.Rngs, stddev: float, param_dtype, dtype,
                 backend: Backend, quantize: str | None = None):
        init = stddev * jax.random.normal(rngs.params(), (vocab, embed), jnp.float32)
        _init_weight(self, init, ("vocab", "embed"), 1, param_dtype, quantize)
        self.dtype, self.backend, self.split = dtype, backend, None

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        scale = self.scale[...] if hasattr(self, "scale") else None
        take = xla_tpu.rows if self.backend.two_row_lookup else lambda table, ids: table[ids]
        if self.split is not None:
            return vocab_parallel.lookup(self.split, self.weight[...], scale, input_ids, self.dtype, take)
        rows = take(self.weight[...], input_ids)
        if scale is not None:
            return (rows * scale[input_ids][..., None]).astype(self.dtype)
        return rows.astype(self.dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """`[B, T, vocab]` scores of hidden states `[B, T, embed]` against the table."""
        return _product(self, h, self.weight[...])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, **_):  # (**_: the projections' options)
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32, back to the input dtype, *then* scale by w (not 1 + w).
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention that writes its layer's keys/values into the cache."""

    def __init__(self, config: Phi4Config, implementation: str, *, rngs: nnx.Rngs, **kw):
        e, n, kv, d = (config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
        kw.update(rngs=rngs, stddev=config.initializer_range)
        self.q_proj = Linear((e,), (n, d), ("q_heads", "head_dim", "embed"), **kw)
        self.k_proj = Linear((e,), (kv, d), ("kv_heads", "head_dim", "embed"), **kw)
        self.v_proj = Linear((e,), (kv, d), ("kv_heads", "head_dim", "embed"), **kw)
        self.o_proj = Linear((n, d), (e,), ("embed", "q_heads", "head_dim"), **kw)
        self.window, self.implementation, self.backend = config.window, implementation, kw["backend"]
        self.mesh = None  # the mesh its kernel runs per device over (`parallel.mesh.mark_mesh`)

    def __call__(self, x, cos, sin, positions, mask, path: attn.Path, kv_cache=None):
        """`x` `[B, T, E]` at `positions` `[B, T]`; `mask` `[B, T, S]` (for `Dense` only);
        `kv_cache`: this layer's `(keys, values)` `[B, KV, L, D]`, or None. -> `(out, kv_cache)`."""
        q = apply_rope(self.q_proj(x), cos, sin)
        k = apply_rope(self.k_proj(x), cos, sin).transpose(0, 2, 1, 3)  # [B, KV, T, D]: cache layout
        v = self.v_proj(x).transpose(0, 2, 1, 3)
        kernel = dict(implementation=self.implementation, backend=self.backend)
        if isinstance(path, attn.Ring):
            out, kv_cache = ring_attend(path.mesh, q, k, v, positions, positions, self.window, cache=kv_cache,
                                        ordered=path.ordered, **kernel)
        elif isinstance(path, attn.SplitCache):
            out, kv_cache = cache_attend(path.mesh, q, k, v, positions, kv_cache, self.window, **kernel)
        else:
            if kv_cache is not None:  # the tokens are contiguous: row b from slot positions[b, 0]
                kv_cache = tuple(write(c, x, positions[:, 0], self.backend) for c, x in zip(kv_cache, (k, v)))
                if path.slots is not None:
                    k, v = (c[:, :, :path.slots] for c in kv_cache)
            out = (attn.attend_causal if path.ordered else attn.attend)(q, k, v, mask, **kernel, mesh=self.mesh)
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
    def __init__(self, config: Phi4Config, implementation: str, *, rngs: nnx.Rngs, **kw):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, implementation, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, h, cos, sin, positions, mask, path, kv_cache=None):
        attended, kv_cache = self.self_attn(self.input_layernorm(h), cos, sin, positions, mask, path, kv_cache)
        h = h + attended
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv_cache


class Phi4Model(nnx.Module):
    """The decoder stack: embeddings, layers, final norm (HF's `model.` prefix)."""

    def __init__(self, config: Phi4Config, implementation: str, *, rngs: nnx.Rngs, **kw):
        self.embed_tokens = VocabTable(config.vocab_size, config.hidden_size, rngs=rngs,
                                       stddev=config.initializer_range, **kw)
        # One module (own arrays) per layer, looped in Python so jit unrolls it: slicing stacked
        # (layers, ...) weights in a scan copies every layer every step on XLA.
        self.layers = nnx.List([DecoderLayer(config, implementation, rngs=rngs, **kw)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.config, self.implementation = config, implementation

    def __call__(self, input_ids, positions, lengths, path: attn.Path, cache: KVCache | None = None,
                 segments: jax.Array | None = None):
        """Final hidden states `[B, T, E]` of tokens at `positions` `[B, T]`, and the cache with their
        keys/values written (None without one). `lengths` `[B]` (or `[B, T]`): each row's (token's)
        sequence length so far, for LongRoPE's switch (None: from the positions). `segments` `[B, T]`
        (with `Dense(None)` only): several sequences packed in a row, a token seeing only its own
        segment's tokens."""
        h = self.embed_tokens(input_ids)
        cos, sin = rope_tables(self.config, positions, lengths)
        mask = None
        if isinstance(path, attn.Dense):  # one mask for every layer
            width, window = positions.shape[1], self.config.window
            if path.slots is not None:  # over the cache: slot = position
                mask = attn.Causal(positions, path.slots, window)
            elif path.ordered:  # the tokens themselves, at consecutive positions (in each segment)
                mask = attn.Causal(jnp.broadcast_to(jnp.arange(width), positions.shape), width, window, segments)
            else:
                mask = attn.causal_mask(positions, positions, window)
                if segments is not None:
                    mask &= segments[:, :, None] == segments[:, None, :]
            if not attn.reads_limits(self.implementation):  # the others read the array: made once here
                mask = attn.dense(mask)
        layer_caches = [None] * len(self.layers) if cache is None else zip(cache.keys, cache.values)
        written = []
        for layer, kv_cache in zip(self.layers, layer_caches):
            h, kv_cache = layer(h, cos, sin, positions, mask, path, kv_cache)
            # Each layer's hidden states as they are: else a compiler may rewrite the residual stream
            # as one sum of every layer's outputs at the end, holding all of them to the last layer.
            h = jax.lax.optimization_barrier(h)
            written.append(kv_cache)
        return self.norm(h), None if cache is None else KVCache(*(tuple(part) for part in zip(*written)))


class Phi4ForCausalLM(nnx.Module):
    """Phi-3/Phi-4 causal LM; `model(input_ids)` gives `[batch, seq, vocab]` logits.

    Args:
      config: the hyper-parameters.
      rngs: initialises the (random) parameters; loading replaces them.
      param_dtype: storage dtype of the parameters (default: the backend's, see `default_dtype`).
      dtype: compute dtype of activations (default: `param_dtype`). Norm statistics, rotary
        angles and softmax are float32 whatever it is.
      attention: the attention implementation, "auto", "xla", "cudnn" or "splash"
        (`model/attention.py`; ConfigError when it cannot run on the backend). `self.attention`
        holds the resolved one.
      backend: the backend the programs are traced for (default: that of JAX's default devices),
        which picks the forms of a few products (`model/backend.py`).
      quantize: "int8" for int8 projections and vocabulary tables with per-channel scales
        (`model/int8.py`; the norms stay in `param_dtype`), or None. `self.quantize` says which.
    """

    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs, param_dtype=None, dtype=None,
                 attention: str = "auto", backend: Backend | None = None, quantize: str | None = None):
        backend = backend or Backend.of()
        param_dtype = jnp.dtype(param_dtype or default_dtype(backend.platform))
        self.quantize = int8.check_kind(quantize)
        kw = dict(param_dtype=param_dtype, dtype=jnp.dtype(dtype or param_dtype), backend=backend,
                  quantize=quantize)
        attn.check(attention, kw["dtype"], backend.platform)
        self.attention = attn.resolve(attention, kw["dtype"], backend.platform, config.head_dim)
        self.model = Phi4Model(config, self.attention, rngs=rngs, **kw)
        if not config.tie_word_embeddings:
            self.lm_head = VocabTable(config.vocab_size, config.hidden_size, rngs=rngs,
                                      stddev=config.initializer_range, **kw)
        self.config, self.backend = config, backend

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 ring: Mesh | None = None) -> jax.Array:
        """Logits `[batch, seq, vocab]` (compute dtype) for int `input_ids` `[batch, seq]`, no cache.

        `positions` `[batch, seq]` default to 0..seq-1 in every row. `ring`: split the sequence over
        this mesh's seq axis and use ring attention (lay the sequence and its positions out with
        `ring.zigzag` first, for balanced work, and undo it on the logits).
        """
        input_ids = jnp.asarray(input_ids)
        ordered = positions is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        path = attn.Dense(ordered=ordered) if ring is None else attn.Ring(ring)
        return self.logits(self.model(input_ids, positions, None, path)[0])

    def prefill(self, input_ids: jax.Array, positions: jax.Array, lengths: jax.Array, last: jax.Array,
                cache: KVCache, path: attn.Path) -> tuple[jax.Array, KVCache]:
        """Runs tokens `[B, W]` at `positions` `[B, W]` into the cache; returns the logits `[B, vocab]`
        at column `last[b]` of each row, and the cache. `lengths` `[B]`: each row's whole sequence
        length (for LongRoPE's switch). The engine lays prompts out and cuts them into pieces."""
        h, cache = self.model(input_ids, positions, lengths, path, cache)
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, E]
        return self.logits(h)[:, 0], cache

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               path: attn.Path) -> tuple[jax.Array, KVCache]:
        """One step: `tokens` `[B]` at `positions` `[B]` against the cache; logits `[B, vocab]`. Or
        `tokens` `[B, T]`, row b's at `positions[b]` on (a step verifying drafts): logits `[B, T,
        vocab]`; every token of a row takes its first's rotary table (LongRoPE's switch: the caller
        keeps only tokens before it)."""
        wide = tokens.ndim == 2
        ids = tokens if wide else tokens[:, None]
        at = positions[:, None] + jnp.arange(ids.shape[1], dtype=positions.dtype)
        h, cache = self.model(ids, at, positions + 1, path, cache)
        logits = self.logits(h)
        return (logits if wide else logits[:, 0]), cache

    def logits(self, h: jax.Array) -> jax.Array:
        """Scores `[..., vocab]` of final hidden states `[..., embed]` (the tied table or `lm_head`)."""
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.logits(h)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("ring",))
def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
            positions: jax.Array | None = None, ring: Mesh | None = None) -> jax.Array:
    """The jitted forward as a pure function of split model state: `nnx.split(model)` once, then
    call this as often as needed (far less dispatch overhead than `nnx.jit` per call)."""
    return nnx.merge(graphdef, state)(input_ids, positions, ring)


class _Keys:
    """The keys `nnx.Rngs(seed).params()` draws, counted in Python. Under `eval_shape` the count of
    an `nnx.Rngs` is a traced variable, and each update of one cost about 3 ms (JAX builds an error
    message for its `sharding` attribute): a second of a 30-layer model's load."""

    def __init__(self, seed: int):
        self.key, self.count = jax.random.key(seed), 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count - 1)


def abstract_model(config: Phi4Config, param_dtype=None, dtype=None, attention: str = "auto",
                   backend: Backend | None = None, quantize: str | None = None) -> Phi4ForCausalLM:
    """The model with `ShapeDtypeStruct`s for parameters: shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: Phi4ForCausalLM(config, rngs=_Keys(0), param_dtype=param_dtype, dtype=dtype,
                                                  attention=attention, backend=backend, quantize=quantize))
