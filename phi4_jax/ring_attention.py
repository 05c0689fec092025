"""Ring attention over the `seq` mesh axis: causal GQA attention when the sequence is split across devices.

Each device holds a block of queries and a block of keys/values. For n steps (n devices on the
axis) it attends its queries to the K/V block it holds, folding the result into an online softmax
(running max, denominator and accumulator, in float32), while the block travels on to the next
device with `ppermute`; the transfer is issued before the block's compute, so the two can overlap.
Masks use the tokens' global positions, so any layout of the sequence works; `zigzag` gives device
i the chunks i and 2n-1-i, so every device does the same causal work (DESIGN §6).

`ring_attention` is the per-device kernel (call it inside `shard_map`); `ring_attend` wraps it for
arrays on a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from phi4_jax.attention import causal_mask

AXIS = "seq"
Q_CHUNK = 2048  # queries per piece within a block: scores take q_chunk x block, not block x block


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                   *, axis_name: str = AXIS, window: int | None = None, q_chunk: int = Q_CHUNK) -> jax.Array:
    """Causal attention of this device's queries over the keys/values of every device on the axis.

    Args:
      q: `[batch, q_len, heads, head_dim]`, already rotated: this device's queries.
      k, v: `[batch, kv_heads, k_len, head_dim]` (the cache layout): this device's block.
      q_positions, k_positions: `[batch, q_len]`, `[batch, k_len]` int: the tokens' global positions.
      axis_name: the mesh axis the sequence is split over.
      window: sliding window (see `attention.causal_mask`), or None.
      q_chunk: fold the queries into each block this many at a time (when that divides q_len), so
        the float32 scores take q_chunk x k_len, not q_len x k_len.
    Returns:
      `[batch, q_len, heads, head_dim]` in q's dtype. Query head h reads KV head h // (heads/kv_heads);
      KV heads are never repeated.
    """
    n = jax.lax.axis_size(axis_name)
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim) * head_dim**-0.5
    shape = (batch, kv_heads, heads // kv_heads, q_len)
    # Running max, denominator and accumulator; marked as varying over the axis like the blocks.
    stats = jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), (
        jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32)))
    ring = [(i, (i + 1) % n) for i in range(n)]

    pieces = q_len // q_chunk if q_len > q_chunk and q_len % q_chunk == 0 else 1

    def fold(block, q, q_positions, m, l, acc):
        k, v, k_positions = block
        return _fold(q, k, v, causal_mask(q_positions, k_positions, window), m, l, acc)

    def step(carry, _):
        block, stats = carry
        # The next block leaves first: the transfer is in flight while this block is computed.
        following = jax.lax.ppermute(block, axis_name, ring)
        if pieces == 1:
            return (following, fold(block, q, q_positions, *stats)), None
        # Query pieces one after another (queries are independent; each keeps its own statistics).
        split = lambda x, axis: jnp.moveaxis(  # noqa: E731
            x.reshape(*x.shape[:axis], pieces, q_chunk, *x.shape[axis + 1:]), axis, 0)
        merge = lambda x, axis: jnp.moveaxis(x, 0, axis).reshape(*x.shape[1:axis + 1], q_len,  # noqa: E731
                                                                 *x.shape[axis + 2:])
        m, l, acc = jax.lax.map(lambda a: fold(block, *a), (split(q, 1), split(q_positions, 1),
                                                            *(split(x, 3) for x in stats)))
        return (following, (merge(m, 3), merge(l, 3), merge(acc, 3))), None

    (_, (m, l, acc)), _ = jax.lax.scan(step, ((k, v, k_positions), stats), length=n)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # a query that sees no key (padding) gets zeros
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(v.dtype)


def _fold(q, k, v, mask, m, l, acc):
    """One K/V block into the online softmax. q `[B, q, KV, G, D]` (scaled), k/v `[B, KV, k, D]`,
    mask `[B, q, k]`; m, l `[B, KV, G, q]` and acc `[B, KV, G, q, D]` float32."""
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    new_m = jnp.maximum(m, scores.max(-1))
    # Where nothing has been visible yet the max is -inf: shift by 0 instead (exp(-inf) = 0, no NaN).
    shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    p = jnp.exp(scores - shift[..., None])
    scale = jnp.exp(m - shift)
    l = l * scale + p.sum(-1)
    acc = acc * scale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return new_m, l, acc


def zigzag(x: jax.Array, n: int, axis: int) -> jax.Array:
    """Reorders `axis` (length divisible by 2n) into n device blocks, block i = chunks (i, 2n-1-i)."""
    chunks = jnp.split(x, 2 * n, axis=axis)
    return jnp.concatenate([c for i in range(n) for c in (chunks[i], chunks[2 * n - 1 - i])], axis=axis)


def unzigzag(x: jax.Array, n: int, axis: int) -> jax.Array:
    """The inverse of `zigzag`."""
    chunks = jnp.split(x, 2 * n, axis=axis)
    order = [0] * (2 * n)
    for i in range(n):
        order[i], order[2 * n - 1 - i] = chunks[2 * i], chunks[2 * i + 1]
    return jnp.concatenate(order, axis=axis)


def ring_attend(mesh: Mesh, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                k_positions: jax.Array, window: int | None = None, q_chunk: int = Q_CHUNK) -> jax.Array:
    """`ring_attention` over `mesh`'s seq axis for whole arrays (shapes as there, sequence axes of
    the same length divisible by the seq size): each device gets its contiguous block of the
    sequence as laid out (`zigzag` it first for balanced causal work)."""
    seq = PartitionSpec(None, AXIS)
    kv = PartitionSpec(None, None, AXIS)
    kernel = functools.partial(ring_attention, axis_name=AXIS, window=window, q_chunk=q_chunk)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(seq, kv, kv, seq, seq), out_specs=seq,
                         check_vma=True)(q, k, v, q_positions, k_positions)
