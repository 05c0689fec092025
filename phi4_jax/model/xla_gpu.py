"""XLA's GPU compiler's own form of the decode step's attention product, values first.

`attention.attend_block` takes it for at most DECODE_ROWS query rows per KV head on a GPU or TPU
(TPU programs, traced alike, take it too and were measured no worse): a decode step, and one that
verifies speculative drafts.

Written probabilities-first (`bkgts,bksd`), that compiler made the values the matmul's left operand
and wanted their slots minor: where a GPU holds several KV heads, every cache layer's values were
transposed and copied out and back at each step. Values-first (`bksd,bkgts`) reads the cache where
it lies. One query per KV head (Phi-3.5-mini; phi-4 on tensor=8) gets a second, zero row: as a
vector-matrix product the compiler wrote the values times the probabilities out whole (a cache
layer each step) before summing them. Prompts keep the plain form (values-first made GPU's ring
prefill move 3-4% more).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Query rows per KV head (groups x queries) up to which a call takes this form: a decode step, and a
# step verifying drafts (groups x (k + 1): 21 for Phi-4-mini at k = 6, where the plain form transposed
# every cache layer's keys and values at each step, 5.4 GB of a 14.3 GB step on an H100).
DECODE_ROWS = 64


def decode_weighted_values(p: jax.Array, v: jax.Array, divisor: jax.Array) -> jax.Array:
    """Probabilities `[B, KV, G, T, S]` (in v's dtype) times values `[B, KV, S, D]`, divided by
    `divisor` `[B, KV, G, T, 1]`: float32 `[B, T, KV, G, D]`."""
    groups, q_len = p.shape[2], p.shape[3]
    wide = p if groups * q_len > 1 else jnp.concatenate([p, jnp.zeros_like(p)], axis=2)
    out = jnp.einsum("bksd,bkgts->btkgd", v, wide)[:, :, :, :groups]
    return out.astype(jnp.float32) / divisor.transpose(0, 3, 1, 2, 4)
