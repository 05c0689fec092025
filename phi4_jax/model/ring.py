"""Attention with the sequence split over the `seq` mesh axis: ring attention, and a split KV cache.

Ring attention serves prompts; attention over a KV cache split across devices serves decoding.

Ring attention: each device holds a block of queries and a block of keys/values. For n steps (n
devices on the axis) it attends its queries to the K/V block it holds (`attention.attend_block`,
any implementation) and merges the result into what it has so far by the log-sum-exps (online
softmax, float32), while the block travels on to the next device with `ppermute`; the transfer is
issued before the block's compute, so the two can overlap. Masks use the tokens' global
positions, so any layout of the sequence works; `zigzag` gives device i the chunks i and 2n-1-i,
so every device does the same causal work (DESIGN §6).
Every block passes every device, so each device also keeps the keys/values its shard of the cache
owns as they go by: the cache is filled with no communication of its own.

The cache is split over `seq` in contiguous shards (slot = position, as everywhere). New tokens
(a decode step, a chat's next turn) are on every device alike: each writes the ones whose slots it
owns, attends over its shard, and the partial results are combined with a log-sum-exp reduction
across the axis (`cache_attention`).

`ring_attention` and `cache_attention` are the per-device kernels (call them inside `shard_map`);
`ring_attend` and `cache_attend` wrap them for arrays on a mesh. Only `seq` is manual in the maps:
batch and heads stay split over data/fsdp/tensor as the rest of the model has them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from phi4_jax.model.attention import Causal, attend_block, causal_mask, merge, reads_limits
from phi4_jax.model.backend import ACCELERATOR, Backend
from phi4_jax.model.cache import write_at

AXIS = "seq"
QUERY_BLOCK = 1024  # queries folded into a key block at a time: scores take QUERY_BLOCK x block, not block x block


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                   cache=None, *, axis_name: str = AXIS, window: int | None = None, query_block: int = QUERY_BLOCK,
                   ordered: bool = False, implementation: str = "xla", backend: Backend = ACCELERATOR,
                   mesh: Mesh | None = None):
    """Causal attention of this device's queries over the keys/values of every device on the axis.

    Args:
      q: `[batch, q_len, heads, head_dim]`, already rotated: this device's queries.
      k, v: `[batch, kv_heads, k_len, head_dim]` (the cache layout): this device's block.
      q_positions, k_positions: `[batch, q_len]`, `[batch, k_len]` int: the tokens' global positions.
      cache: None, or this device's shard `(keys, values)` `[batch, kv_heads, slots, head_dim]` of a
        cache split contiguously over the axis: the keys/values of every block whose positions
        fall in the shard are written into it as the blocks pass.
      axis_name: the mesh axis the sequence is split over.
      window: sliding window (see `attention.causal_mask`), or None.
      query_block: fold the queries into each block this many at a time (when that divides q_len), so
        the float32 scores (XLA) or the mask take query_block x k_len, not q_len x k_len.
      ordered: every block's positions ascend (zig-zag's do): without a window, each query's keys in
        a block are a prefix of it, given to a kernel that reads them so as its last
        (`attention.Causal`: no mask array, no folding).
      implementation, backend, mesh: of each block's attention (`attention.attend_block`).
    Returns:
      `(out, cache)`: `[batch, q_len, heads, head_dim]` in v's dtype, and the cache shard (None
      without one). Query head h reads KV head h // (heads/kv_heads); KV heads are never repeated.
    """
    n = jax.lax.axis_size(axis_name)
    q_len = q.shape[1]
    # The output and log-sum-exp so far (nothing seen yet). Computed from q, not as constants: XLA
    # schedules a constant's broadcast at the start, so every layer's would be alive at once.
    zero = q.astype(jnp.float32) * 0.0
    seen = (zero, zero[..., 0] - jnp.inf)
    ring = [(i, (i + 1) % n) for i in range(n)]
    limits = ordered and window is None and reads_limits(implementation)
    # A kernel given limits takes all the queries at once: its scores stay in VMEM, and no mask.
    folded = not limits and q_len > query_block and q_len % query_block == 0
    query_blocks = q_len // query_block if folded else 1

    def fold(block, q, q_positions, seen):
        k, v, k_positions = block
        if limits:
            # The last key at or before each query (a count: searchsorted fails inside this map).
            before = (k_positions[:, None, :] <= q_positions[:, :, None]).sum(-1, dtype=jnp.int32)
            mask = Causal(before - 1, k_positions.shape[1])
        else:
            mask = causal_mask(q_positions, k_positions, window)
        return merge(seen, attend_block(q, k, v, mask, implementation, backend, mesh))

    def step(carry, _):
        block, seen, cache = carry
        # The next block leaves first: the transfer is in flight while this block is computed.
        following = jax.lax.ppermute(block, axis_name, ring)
        if query_blocks == 1:
            seen = fold(block, q, q_positions, seen)
        else:  # query blocks one after another (queries are independent; each keeps its own results),
            # updated in place: no split or stacked copies of the queries and results.
            def one_block(i, seen):
                take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * query_block, query_block, axis=1)  # noqa: E731
                new = fold(block, take(q), take(q_positions), jax.tree.map(take, seen))
                return jax.tree.map(lambda x, part: jax.lax.dynamic_update_slice_in_dim(x, part, i * query_block, 1),
                                    seen, new)
            seen = jax.lax.fori_loop(0, query_blocks, one_block, seen)
        if cache is not None:
            cache = _keep(cache, *block, axis_name, backend)
        return (following, seen, cache), None

    # Two steps a loop iteration: with one, XLA copied each step's block out of the loop's carry
    # (it is sent on while attended over), every block's keys and values at every step; with two,
    # at every other step (Phi-4-mini's 128K prefill on v5e-8, seq=8: 554 -> 447 GB per chip).
    # Unrolled whole, XLA's TPU scheduler kept every step's results alive there (16.5 GB).
    (_, (out, _), cache), _ = jax.lax.scan(step, ((k, v, k_positions), seen, cache), length=n, unroll=2)
    return out.astype(v.dtype), cache


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache, *,
                    axis_name: str = AXIS, window: int | None = None, implementation: str = "xla",
                    backend: Backend = ACCELERATOR, mesh: Mesh | None = None):
    """New tokens (the same on every device) over a cache split contiguously over the axis.

    Args:
      q: `[batch, q_len, heads, head_dim]`, rotated; k, v: `[batch, kv_heads, q_len, head_dim]`:
        the new tokens' queries, keys and values.
      positions: `[batch, q_len]` int: their positions (= cache slots).
      cache: this device's shard `(keys, values)` `[batch, kv_heads, slots, head_dim]`; shard i holds
        slots i*slots .. (i+1)*slots - 1.
      implementation, backend, mesh: of the attention over the shard (`attention.attend_block`).
    Returns:
      `([batch, q_len, heads, head_dim]` in v's dtype, the cache shard with the new keys/values
      written where it owns their slots). Each device attends over its own shard; the partial
      results are combined across the axis by their log-sum-exp.
    """
    keys, values = _keep(cache, k, v, positions, axis_name, backend)
    batch, slots = keys.shape[0], keys.shape[2]
    start = jax.lax.axis_index(axis_name) * slots
    if reads_limits(implementation):  # the shard's slots in order: a query sees those up to its position
        mask = Causal(positions - start, slots, window)
    else:
        mask = causal_mask(positions, jnp.broadcast_to(start + jnp.arange(slots), (batch, slots)), window)
    out, lse = attend_block(q, keys, values, mask, implementation, backend, mesh)
    top = jax.lax.pmax(lse, axis_name)
    weight = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # a shard that sees nothing: 0
    out, total = jax.lax.psum((out * weight[..., None], weight), axis_name)
    return (out / jnp.where(total > 0, total, 1.0)[..., None]).astype(v.dtype), (keys, values)


def _keep(cache, k, v, positions, axis_name, backend: Backend):
    """Writes the keys/values `[B, KV, T, D]` whose positions `[B, T]` fall in this device's shard
    of the cache into it (`backend`: `cache.write_at`'s); the rest are dropped."""
    keys, values = cache
    slots = keys.shape[2]
    local = positions - jax.lax.axis_index(axis_name) * slots
    local = jnp.where((local >= 0) & (local < slots), local, slots)  # out of range: dropped
    return write_at(keys, k, local, backend), write_at(values, v, local, backend)


def zigzag_order(length: int, n: int) -> np.ndarray:
    """The positions in zig-zag order: `length` (divisible by 2n) in 2n chunks, block i of n holding
    chunks i and 2n-1-i. A constant, so reordering with it is a local gather on every device."""
    chunks = np.arange(length).reshape(2 * n, -1)
    return np.concatenate([chunks[c] for i in range(n) for c in (i, 2 * n - 1 - i)])


def zigzag(x: jax.Array, n: int, axis: int) -> jax.Array:
    """Reorders `axis` (length divisible by 2n) into n device blocks, block i = chunks (i, 2n-1-i)."""
    return jnp.take(x, zigzag_order(x.shape[axis], n), axis=axis)


def unzigzag(x: jax.Array, n: int, axis: int) -> jax.Array:
    """The inverse of `zigzag`."""
    return jnp.take(x, np.argsort(zigzag_order(x.shape[axis], n)), axis=axis)


def ring_attend(mesh: Mesh, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                k_positions: jax.Array, window: int | None = None, query_block: int = QUERY_BLOCK, cache=None,
                ordered: bool = False, implementation: str = "xla", backend: Backend = ACCELERATOR):
    """`ring_attention` over `mesh`'s seq axis for whole arrays (shapes as there, sequence axes of
    the same length divisible by the seq size; `cache` a `(keys, values)` pair of whole cache
    layers): each device gets its contiguous block of the sequence as laid out (`zigzag` it first
    for balanced causal work) and its contiguous shard of the cache. Returns `(out, cache)`."""
    kernel = functools.partial(ring_attention, axis_name=AXIS, window=window, query_block=query_block,
                               ordered=ordered, implementation=implementation, backend=backend, mesh=mesh)
    if cache is None:
        out = _on_seq(mesh, lambda *a: kernel(*a)[0], (_SEQ, _KV, _KV, _SEQ, _SEQ), _SEQ)(
            q, k, v, q_positions, k_positions)
        return out, None
    return _on_seq(mesh, kernel, (_SEQ, _KV, _KV, _SEQ, _SEQ, _KV), (_SEQ, _KV))(
        q, k, v, q_positions, k_positions, cache)


def cache_attend(mesh: Mesh, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache,
                 window: int | None = None, implementation: str = "xla", backend: Backend = ACCELERATOR):
    """`cache_attention` over `mesh`'s seq axis for whole arrays: the new tokens on every device,
    the cache layers `(keys, values)` split over seq. Returns `(out, cache)`."""
    kernel = functools.partial(cache_attention, axis_name=AXIS, window=window, implementation=implementation,
                               backend=backend, mesh=mesh)
    whole = PartitionSpec()
    return _on_seq(mesh, kernel, (whole, whole, whole, whole, _KV), (whole, _KV))(q, k, v, positions, cache)


_SEQ = PartitionSpec(None, AXIS)  # [batch, sequence, ...]
_KV = PartitionSpec(None, None, AXIS)  # [batch, kv_heads, sequence, head_dim]


def _on_seq(mesh, kernel, in_specs, out_specs):
    # Manual over seq only: data/fsdp/tensor shardings of batch and heads are left to the compiler.
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={AXIS},
                         check_vma=True)
