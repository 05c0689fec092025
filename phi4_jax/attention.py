"""Causal grouped-query attention over position-tagged keys (the XLA reference implementation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(q_positions: jax.Array, k_positions: jax.Array, window: int | None) -> jax.Array:
    """`[batch, q, k]` bool: a query sees keys at its own or earlier positions, within `window`.

    `window` counts the query itself: with window w, keys at positions p-w+1 .. p are visible.
    """
    delta = q_positions[:, :, None] - k_positions[:, None, :]
    mask = delta >= 0
    if window is not None:
        mask &= delta < window
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with KV heads shared by groups of query heads, without repeating K/V.

    Args:
      q: `[batch, q_len, heads, head_dim]`, already rotated.
      k, v: `[batch, kv_heads, k_len, head_dim]` (the KV-cache layout).
      mask: `[batch, q_len, k_len]` bool, True where a query may see a key.
    Returns:
      `[batch, q_len, heads, head_dim]` in q's dtype. Query head h reads KV head h // (heads/kv_heads).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)
