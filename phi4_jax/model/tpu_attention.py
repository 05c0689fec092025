"""JAX's TPU attention kernels (Pallas, compiled by Mosaic) behind the attention block interface.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is the "splash"
implementation of `attention.attend_block`:

- It serves calls of at least `MIN_QUERIES` queries: a prompt in one piece, prompt pieces over
  the cache, ring attention's blocks. Fewer queries (decode's one, a short prompt) go to the XLA
  path inside the same implementation: one 128-row query block would mostly compute padding.
- Lengths that are not a multiple of 128 are padded with masked queries and keys (the padding of
  the keys copies the block: only a prompt of odd length in one piece has one).
- The mask comes in either of the interface's forms. An `attention.Causal` (a prompt, a piece
  over the cache, a zig-zag ring block, a split cache's shard: each query's last visible key)
  needs no array: the kernel computes each block's mask from the limits (splash's `q_sequence` and
  a mask function, as its static `CausalMask` does, but with the offset a traced value), and which
  blocks are empty, partial or full comes from each query block's least and greatest limit
  (`splash_causal`). A `[batch, q, k]` array (a windowed ring block, a caller's own mask) goes in
  as splash's dynamic mask: cut into blocks of the whole array at every call, the empty ones
  skipped (`splash_block`).
- `attention.attend` (the dense path: prompts, and training) takes the kernel's form without the
  log-sum-exp, which has a gradient (the form with it has none in JAX); ring and split-cache
  blocks need the log-sum-exp to merge, so they run but do not differentiate.
- GQA without a KV copy: the kernel's multi-head form reads KV head h // groups for query head h
  from keys `[kv_heads, k, head_dim]`, one cache row as it is; the batch is a vmap over rows.
- Any head_dim Mosaic tiles: 128 (phi-4, Phi-4-mini) and 96 (Phi-3.5-mini, compiled as it is, no
  padding); "auto" picks splash only for multiples of 128 (`attention.resolve`).
- The kernel scales nothing: queries are scaled by head_dim**-0.5 in their dtype first (in
  bfloat16 that rounds them, where XLA scales the float32 scores), and its output is in the
  queries' dtype, then float32.
- On a "cpu" backend the kernel runs in Pallas interpret mode: the same program, slowly, for checks.

Ragged paged attention (`...ops.tpu.ragged_paged_attention`) is not wired into the engine: our
cache does not fit it without a copy every step. It reads one array per layer, `[pages,
page_size, 2 * kv_heads, head_dim]`, keys and values interleaved on the head axis (K of KV head j
at 2j, V at 2j + 1), rows located through `page_indices`; ours is two arrays per layer, `[batch,
kv_heads, length, head_dim]`, heads before slots. To decode through it with no copy the engine
would keep, per layer, one array `[batch * length / page_size, page_size, 2 * kv_heads, head_dim]`
with interleaved K/V, i.e. `[batch, length, 2 * kv_heads, head_dim]` cut into pages (row b's slot s
on page b * length / page_size + s // page_size), and write each step's K/V into it. The kernel
also returns no log-sum-exp, so it cannot serve `attend_block` (ring and split-cache merges), and
it tiles `2 * kv_heads` only when kv_heads (per dtype packing) is 1, 2, 4, 8 or a multiple of 8:
phi-4's 10 KV heads are refused ("can not be XLA fully tiled"), Phi-4-mini's 8 and Phi-3.5-mini's
32 pass. `pages_from_cache` makes the copy, and `paged_decode` decodes through the kernel, for
checks: compiled for v5e and v6e by the tests, and its reference run on CPU (jax 0.10.2 cannot
interpret the kernel itself).

On a mesh, XLA does not partition a Mosaic kernel ("wrap the call in a shard_map"): the attention
module runs the kernel under `shard_map`, each device on its own rows and heads
(`attention.per_device`).
"""

from __future__ import annotations

import contextlib
import functools

# Pallas and its TPU kernels are imported where a kernel is built: every CLI start would pay for them.
import jax
import jax.numpy as jnp
import numpy as np

MIN_QUERIES = 128  # one query block: fewer queries go to XLA
KV_BLOCK = 512  # ragged paged attention: cache slots per kernel block
LANES = 128  # the kernel's key blocks are multiples of the lane count; lengths are padded to it


def splash_serves(q_len: int) -> bool:
    """Whether splash attention takes a call of `q_len` queries (else the XLA path does)."""
    return q_len >= MIN_QUERIES


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def splash_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, interpret: bool = False,
                 with_lse: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """`attention.attend_block` by splash attention (arguments and results as there), on one
    device's arrays (on a mesh, `attention.per_device` runs it under `shard_map`), the mask an
    array given to the kernel as a dynamic mask.

    `interpret`: run the kernel in Pallas interpret mode (on CPU). `with_lse` False: the output
    alone (lse None), from the kernel's form without residuals, the one that has a gradient."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    pad_q, pad_k = -q.shape[1] % LANES, -k.shape[2] % LANES
    mask = jnp.pad(mask, ((0, 0), (0, pad_q), (0, pad_k)))  # padding is masked: seen by no one

    def kernel(mask, sizes):
        kernel = splash.make_splash_mha(mask[None], block_sizes=sizes, save_residuals=with_lse, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
        # jax 0.10.2 maps jnp.array over the whole mask info, its `is_dynamic_mask` flag included:
        # a traced bool under jit, which the kernel's call then tests. It is a dynamic mask.
        kernel.fwd_mask_info = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
        return kernel, {}

    return _run(q, k, v, kernel, (mask,), mask[:, :q.shape[1]].any(-1), with_lse)


def splash_causal(q: jax.Array, k: jax.Array, v: jax.Array, last: jax.Array, window: int | None = None,
                  segments: jax.Array | None = None, interpret: bool = False,
                  with_lse: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """`splash_block` for the mask `attention.Causal(last, keys, window, segments)`: no mask array.
    The kernel computes each block's mask from the queries' last keys (its `q_sequence`), and the
    blocks' kinds (empty: skipped and not fetched, partial, full) come from each query block's
    least and greatest last key, a few bytes per block, where a dynamic mask is turned into 512 x
    512 blocks of the whole `[T, S]` array at every call."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info

    pad_q, pad_k = -q.shape[1] % LANES, -k.shape[2] % LANES
    last = jnp.pad(last.astype(jnp.int32), ((0, 0), (0, pad_q)), constant_values=-1)  # padding sees nothing
    segments = None if segments is None else jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, pad_q)))
    keys = k.shape[2] + pad_k

    def kernel(last, segments, sizes):
        bq, bkv = sizes.block_q, sizes.block_kv
        ends = last.reshape(-1, bq)
        lo, hi = ends.min(1)[:, None], ends.max(1)[:, None]  # [q blocks, 1]
        first = jnp.arange(keys // bkv)[None, :] * bkv  # [1, kv blocks]: each block's keys first .. final
        final = first + bkv - 1
        seen, full = hi >= first, lo >= final
        if window is not None:  # some query - key distance below the window / all of them
            seen &= lo - final < window
            full &= hi - first < window
        block_mask = jnp.where(full, 2, seen.astype(jnp.int32))[None].astype(jnp.int8)
        # The next key block to fetch: a skipped block keeps the index of the nearest one fetched (a
        # repeated index is not fetched again).
        index = jnp.broadcast_to(jnp.arange(keys // bkv), seen.shape)
        upcoming = jax.lax.cummin(jnp.where(seen, index, keys), axis=1, reverse=True)
        previous = jax.lax.cummax(jnp.where(seen, index, 0), axis=1)
        data_next = jnp.where(upcoming < keys, upcoming, previous)[None]
        info = mask_info.MaskInfo(data_next=data_next, mask_next=None, block_mask=block_mask,
                                  partial_mask_blocks=None, q_sequence=last, is_dynamic_mask=False)
        # The backward pass (training) walks query blocks for each key block.
        rows = jnp.where(seen, jnp.arange(seen.shape[0])[:, None], 0)[None]
        kernel = splash.SplashAttentionKernel(
            info, None, info._replace(data_next=rows), block_sizes=sizes, is_mqa=False, save_residuals=with_lse,
            mask_value=splash.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None, residual_checkpoint_name=None,
            mask_function=_sees(window), interpret=interpret)
        return kernel, {} if segments is None else dict(segment_ids=splash.SegmentIds(q=segments, kv=segments))

    return _run(q, k, v, kernel, (last, segments), last[:, :q.shape[1]] >= 0, with_lse)


@functools.cache
def _sees(window: int | None):
    """Splash's mask function for `attention.Causal`: query `last` sees key `key` (one function per
    window, so the kernel's static argument is the same one at every call)."""
    if window is None:
        return lambda last, key: key <= last
    return lambda last, key: (key <= last) & (last - key < window)


def _run(q, k, v, kernel, per_row, seen, with_lse):
    """Splash over each row: q `[B, T, H, D]`, k/v `[B, KV, S, D]` padded to multiples of 128,
    `kernel(*row's per_row arrays, block sizes)` -> (the row's kernel, its call's keywords); `seen`
    `[B, T]`: the queries that see some key (the others get zeros and -inf)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    q_len, head_dim, k_len = q.shape[1], q.shape[3], k.shape[2]
    pad_q, pad_k = -q_len % LANES, -k_len % LANES
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, H, T, D]
    if pad_k:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_k), (0, 0))) for x in (k, v))
    bq, bkv = _block(q_len + pad_q), _block(k_len + pad_k)
    # Backward blocks too, so that training through the kernel has its gradient; inference never
    # reads their mask tables and XLA drops them.
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)

    def row(q, k, v, *per_row):
        run, keywords = kernel(*per_row, sizes)
        got = run(q * jnp.asarray(head_dim**-0.5, q.dtype), k, v, **keywords)
        return (got[0], got[1][0]) if with_lse else (got, None)

    out, lse = jax.vmap(row)(q, k, v, *per_row)  # [B, H, T, D], [B, H, T]
    out = out[:, :, :q_len].transpose(0, 2, 1, 3).astype(jnp.float32)
    # A query that sees nothing: the kernel leaves an average of values or 0/0 there (it masks
    # with a large finite value, not -inf); this interface says zeros, -inf.
    seen = seen[..., None]
    out = jnp.where(seen[..., None], out, 0.0)
    return out, None if lse is None else jnp.where(seen, lse[:, :, :q_len].transpose(0, 2, 1), -jnp.inf)


def pages_from_cache(keys: jax.Array, values: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """One layer's cache `[batch, kv_heads, length, head_dim]` (keys, values) copied into ragged
    paged attention's layout: `(kv_pages [batch * length / page_size, page_size, 2 * kv_heads,
    head_dim], page_indices [batch, length / page_size])`, row b on its own pages in order."""
    batch, kv_heads, length, head_dim = keys.shape
    if length % page_size:
        raise ValueError(f"page_size {page_size} does not divide the cache length {length}")
    # [B, L, KV, 2, D]: the K and V of each KV head side by side, as the kernel reads them.
    pairs = jnp.stack([keys, values], axis=2).transpose(0, 3, 1, 2, 4)
    pages = pairs.reshape(batch * length // page_size, page_size, 2 * kv_heads, head_dim)
    return pages, jnp.arange(batch * length // page_size, dtype=jnp.int32).reshape(batch, -1)


def paged_decode(q: jax.Array, kv_pages: jax.Array, page_indices: jax.Array, lengths: jax.Array,
                 window: int | None = None, interpret: bool = False, reference: bool = False) -> jax.Array:
    """One decode step through ragged paged attention: each row's query `q` `[batch, 1, heads,
    head_dim]` over its first `lengths[b]` slots (its own token's last), within `window`.
    Returns `[batch, 1, heads, head_dim]` in q's dtype.

    `interpret`: in TPU interpret mode (CPU; jax 0.10.2's interpreter cannot yet run this kernel:
    it has no reshape of a ref). `reference`: the kernel module's own jnp reference of it, with
    the same arguments (`lengths` concrete: it loops over the rows in Python; not under jit)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    batch, head_dim = q.shape[0], q.shape[3]
    page_size, pages_per_row = kv_pages.shape[1], page_indices.shape[1]
    args = (q[:, 0], kv_pages, lengths.astype(jnp.int32), page_indices,
            jnp.arange(batch + 1, dtype=jnp.int32),  # one query per row
            jnp.array([batch], jnp.int32))
    options = dict(sm_scale=head_dim**-0.5, sliding_window=window)
    if reference:  # its loop over the rows slices by the lengths: those as numpy, the arrays jitted
        lengths, rows = np.asarray(lengths, np.int32), np.array([batch], np.int32)
        starts = np.arange(batch + 1, dtype=np.int32)
        run = jax.jit(lambda q, pages, indices: rpa.ref_ragged_paged_attention(
            q, pages, lengths, indices, starts, rows, **options))
        return run(q[:, 0], kv_pages, page_indices)[:, None]
    mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:  # read when the kernel is traced
        # Block sizes given, not looked up: the kernel's table of tuned sizes asks JAX's default
        # devices, which are not the TPU when compiling for one from a CPU.
        out = rpa.ragged_paged_attention(
            *args, **options, num_kv_pages_per_block=min(pages_per_row, max(1, KV_BLOCK // page_size)),
            num_queries_per_block=min(batch, 32))
    return out[:, None]
