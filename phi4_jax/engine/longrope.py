"""LongRoPE's re-encode: past the original context, a sequence is encoded again with the long table.

Where a sequence crosses `original_max_position_embeddings`, transformers drops its KV cache and
encodes the whole sequence again with the long table, once; so does this.

A LongRoPE model's rotary table depends on the whole sequence's length (short factors up to the
original context, long ones past it), so keys cached under the short table are stale once a row
grows past it. The decode loop stops before a row would process that position
(`crossing`); the engine then runs one step (`reencode`) in which the crossing rows prefill their
whole sequence afresh into their cache slots and the other rows decode as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from phi4_jax.config import Phi4Config
from phi4_jax.engine.prefill import over_cache, prefill, seq_mesh
from phi4_jax.model.cache import KVCache
from phi4_jax.model.phi4 import Phi4ForCausalLM


def crossing(config: Phi4Config, done: jax.Array, positions: jax.Array) -> jax.Array:
    """[B] bool: running rows whose next step processes position `original_max_position_embeddings`
    (the sequence grows past the original context there)."""
    return (~done) & (positions == config.original_max_position_embeddings)


def same_table(config: Phi4Config, cached: int, length: int) -> bool:
    """Whether a sequence of `cached` tokens and its extension to `length` tokens use the same
    rotary table (always, unless LongRoPE's threshold lies between them): only then can the
    extension reuse the cached keys."""
    if config.rope_type != "longrope":
        return True
    original = config.original_max_position_embeddings
    return (cached > original) == (length > original)


def reencode(model: Phi4ForCausalLM, history: jax.Array, last: jax.Array, positions: jax.Array, done: jax.Array,
             cache: KVCache, length: int, piece: int | None, ring: Mesh | None) -> tuple[jax.Array, KVCache]:
    """One step of every row: rows at the crossing re-encode their first `length` tokens (`history`
    `[B, L]`, every token by position) with the long table into fresh keys/values for those slots;
    the others decode `last` `[B]` at `positions` `[B]` as usual. Returns the logits `[B, vocab]`
    of the next token and the cache."""
    crosses = crossing(model.config, done, positions)
    logits, cache = model.decode(last, positions, cache, over_cache(cache.length, ring))
    ids = history[:, :length]
    fresh = KVCache.create(model.config, ids.shape[0], length, cache.keys[0].dtype)
    re_logits, fresh = prefill(model, ids, positions + 1, fresh, piece=piece, ring=seq_mesh(ring, length))
    pick = lambda new, old: jnp.where(crosses[:, None, None, None], new, old)  # noqa: E731
    cache = KVCache(*(tuple(old.at[:, :, :length].set(pick(new, old[:, :, :length]))
                            for new, old in zip(fresh_part, cache_part))
                      for fresh_part, cache_part in zip(fresh, cache)))
    return jnp.where(crosses[:, None], re_logits, logits), cache
