"""JAX's TPU attention kernels (Pallas, compiled by Mosaic) behind the attention block interface.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is the "splash"
implementation of `attention.attend_block`:

- It serves calls of at least `MIN_QUERIES` queries: a prompt in one piece, prompt pieces over
  the cache, ring attention's blocks. Fewer queries (decode's one, a short prompt) go to the XLA
  path inside the same implementation: one 128-row query block would mostly compute padding.
- Lengths that are not a multiple of 128 are padded with masked queries and keys (the padding of
  the keys copies the block: only a prompt of odd length in one piece has one).
- The mask is the call's own `[batch, q, k]` array, given to the kernel as a dynamic mask, so one
  kernel serves every path (causal, windowed, over the cache, ring blocks) and skips the blocks
  the mask hides. A static `CausalMask` would save reading the mask, but the interface knows no
  positions.
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
    device's arrays (on a mesh, `attention.per_device` runs it under `shard_map`).

    `interpret`: run the kernel in Pallas interpret mode (on CPU). `with_lse` False: the output
    alone (lse None), from the kernel's form without residuals, the one that has a gradient."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    q_len, head_dim = q.shape[1], q.shape[3]
    k_len = k.shape[2]
    pad_q, pad_k = -q_len % LANES, -k_len % LANES
    mask = jnp.pad(mask, ((0, 0), (0, pad_q), (0, pad_k)))  # padding is masked: seen by no one
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, H, T, D]
    if pad_k:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_k), (0, 0))) for x in (k, v))
    bq, bkv = _block(q_len + pad_q), _block(k_len + pad_k)
    # Backward blocks too, so that training through the kernel has its gradient; inference never
    # reads their mask tables and XLA drops them.
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)

    def row(q, k, v, mask):
        kernel = splash.make_splash_mha(mask[None], block_sizes=sizes, save_residuals=with_lse, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
        # jax 0.10.2 maps jnp.array over the whole mask info, its `is_dynamic_mask` flag included:
        # a traced bool under jit, which the kernel's call then tests. It is a dynamic mask.
        kernel.fwd_mask_info = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
        got = kernel(q * jnp.asarray(head_dim**-0.5, q.dtype), k, v)
        return (got[0], got[1][0]) if with_lse else (got, None)

    out, lse = jax.vmap(row)(q, k, v, mask)  # [B, H, T, D], [B, H, T]
    out = out[:, :, :q_len].transpose(0, 2, 1, 3).astype(jnp.float32)
    # A query that sees nothing: the kernel leaves an average of values or 0/0 there (it masks
    # with a large finite value, not -inf); this interface says zeros, -inf.
    seen = mask[:, :q_len].any(-1)[..., None]
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
