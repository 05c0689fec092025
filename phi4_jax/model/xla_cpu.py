"""XLA:CPU's own forms of a few products, the plain forms' math written as that compiler runs it fastest.

`Backend` chooses them (its properties name where each is used); GPU and TPU programs never hold them.

- `weight_first`: a product of 2-64 rows with the weight as the left operand (decoding at batch > 1).
- `scores`, `weighted_values`: attention with each KV head's queries as the rows of plain batched
  matmuls, outputs in that `[B, KV, rows, ...]` order, transposed to `[B, T, ...]` at the end:
  products straight into a `[B, T, ...]` order ran 2-3x slower there (prefills of 512-2048
  tokens). (Elsewhere the 5-D forms: the planner's compile of this form held 2-3x the decode
  temporaries, Phi-4-mini 128K on one device: 42-57 GB against 17.7.)
- `write_one_row`: a one-row cache written as a plain update, as the engine's one-row decode loop
  carries it (without its batch axis).
- `chunked_product`: an int8 weight converted a block of output rows at a time (XLA:CPU writes a
  converted operand to memory before its matmul; GPU and TPU compilers fuse the conversion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_BYTES = 8 * 2**20  # `chunked_product` converts at most this much of a weight at a time


def weight_first(x: jax.Array, weight: jax.Array) -> jax.Array:
    """`x` `[..., in]` times `weight` `[out, in]` transposed, computed as `[out, rows]` and then
    transposed: that compiler's small-M GEMM runs about twice as fast so, and the barrier stops it
    folding the transpose back."""
    rows = x.reshape(-1, x.shape[-1])
    y = jax.lax.optimization_barrier(jnp.einsum("nk,bk->nb", weight, rows)).T
    return y.reshape(*x.shape[:-1], -1)


def scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Queries `[B, T, KV, G, D]` against keys `[B, KV, S, D]`: float32 `[B, KV, G, T, S]`."""
    batch, q_len, kv_heads, groups, head_dim = q.shape
    rows = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * q_len, head_dim)
    out = jnp.einsum("bkrd,bksd->bkrs", rows, k, preferred_element_type=jnp.float32)
    return out.reshape(batch, kv_heads, groups, q_len, -1)


def weighted_values(p: jax.Array, v: jax.Array, divisor: jax.Array) -> jax.Array:
    """Probabilities `[B, KV, G, T, S]` (in v's dtype) times values `[B, KV, S, D]`, divided by
    `divisor` `[B, KV, G, T, 1]`: float32 `[B, T, KV, G, D]`."""
    batch, kv_heads, groups, q_len, _ = p.shape
    out = jnp.einsum("bkrs,bksd->bkrd", p.reshape(batch, kv_heads, groups * q_len, -1), v)
    out = out.astype(jnp.float32).reshape(batch, kv_heads, groups, q_len, -1) / divisor
    return out.transpose(0, 3, 1, 2, 4)


def write_one_row(cache_layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """`new` `[1, KV, T, D]` into the one-row cache layer `[1, KV, L, D]` at slot `start`."""
    row = jax.lax.dynamic_update_slice(cache_layer[0], new[0].astype(cache_layer.dtype), (0, start, 0))
    return row[None]


def chunked_product(x: jax.Array, q: jax.Array, dtype, dense) -> jax.Array:
    """`dense(x, q converted to dtype)` (`x` `[..., in]`, int8 `q` `[out, in]`), converting at most
    `CHUNK_BYTES` of output rows, and at most half of them, at a time in a loop, into a buffer that
    stays small: never a full-precision copy of the weight."""
    out = q.shape[0]
    # At least two blocks: a weight converted whole is a loop-invariant value that XLA:CPU converts
    # once per decode call (a float copy of it held for the call) or all at once each step.
    rows = min(max(1, CHUNK_BYTES // (q.shape[1] * jnp.dtype(dtype).itemsize)), out // 2)
    if rows == 0:
        return dense(x, q.astype(dtype))
    whole = out // rows * rows
    blocks = jax.lax.map(lambda block: dense(x, block.astype(dtype)), q[:whole].reshape(-1, rows, q.shape[1]))
    parts = [jnp.moveaxis(blocks, 0, -2).reshape(*x.shape[:-1], whole)]
    if whole < out:
        parts.append(dense(x, q[whole:].astype(dtype)))
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
