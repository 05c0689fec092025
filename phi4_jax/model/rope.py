"""Rotary position embeddings: default and LongRoPE tables, partial rotary, the short/long switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.config import Phi4Config


def inverse_frequencies(config: Phi4Config, long: bool = False) -> np.ndarray:
    """`[rotary_dim/2]` float32 inverse frequencies, computed in float32 as transformers does.

    For LongRoPE each frequency is divided by its `short_factor` (or `long_factor` when `long`).
    """
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # base**exponent correctly rounded to float32 (via float64), as torch's CPU pow gives it to
    # within one ulp in at most one entry: a float32 pow is off by an ulp in a quarter of them,
    # and an ulp of the largest frequencies is 0.01 rad of angle at position 128K.
    base = (np.float64(config.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
    if config.rope_type == "longrope":
        factors = config.rope_long_factor if long else config.rope_short_factor
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


def rope_tables(config: Phi4Config, positions: jax.Array,
                lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin, `[batch, seq, rotary_dim]` float32, for integer `positions` `[batch, seq]`.

    LongRoPE picks the long factors for a row iff its sequence length exceeds
    `original_max_position_embeddings`, as transformers does per forward of one sequence; the
    length is `lengths[b]` when given (padding excluded; `lengths` `[batch, seq]`: per token, for
    several sequences packed in one row), else `max(positions[b]) + 1`. cos and sin
    are scaled by the constant attention factor at every length.
    """
    inv_freq = jnp.asarray(inverse_frequencies(config))[None, None]  # [1 or B, 1 or T, rotary_dim/2]
    if config.rope_type == "longrope":
        if lengths is None:
            lengths = jnp.max(positions, axis=-1) + 1
        if lengths.ndim == 1:
            lengths = lengths[:, None]  # one length for every token of the row
        use_long = (lengths > config.original_max_position_embeddings)[..., None]
        inv_freq = jnp.where(use_long, jnp.asarray(inverse_frequencies(config, long=True)), inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rotary_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    factor = config.attention_factor
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first `rotary_dim` channels of `x` `[batch, seq, heads, head_dim]` (rotate-half).

    Channel i pairs with i + rotary_dim/2; channels past rotary_dim pass through unchanged.
    """
    rotary_dim = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)  # broadcast over heads
    sin = sin[:, :, None, :].astype(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
