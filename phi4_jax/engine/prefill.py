"""Prompts into the KV cache: laid out zig-zag for the ring, in one piece, or in pieces over the cache.

The model runs whatever tokens it is given at whatever positions; this module decides how a batch of
right-padded prompts goes through it. A fresh prompt on a `seq` mesh is reordered zig-zag and runs
with ring attention; a long prompt runs in pieces of `piece` tokens per row (each piece attending
over the cache slots the prompt may reach), so attention's temporaries grow with piece x context
rather than prompt x prompt; anything else runs in one piece.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from phi4_jax.model import attention as attn
from phi4_jax.model.cache import KVCache
from phi4_jax.model.phi4 import Phi4ForCausalLM
from phi4_jax.model.ring import zigzag_order

MIN_PIECE = 16  # also the smallest prompt bucket, so prompt buckets split into whole pieces
# Long prompts prefill in pieces of about this many tokens over all rows (vLLM's chunked prefill
# budget): attention temporaries grow with rows x piece x context rather than rows x prompt^2.
PREFILL_TOKENS = 2048


def piece_for(batch: int) -> int:
    """Prompt tokens per row in one prefill piece: `PREFILL_TOKENS` shared by the rows, rounded
    down to a power of two (so prompt buckets split evenly), at least `MIN_PIECE`."""
    piece = MIN_PIECE
    while piece * 2 * batch <= PREFILL_TOKENS:
        piece *= 2
    return piece


def seq_mesh(mesh: Mesh | None, length: int) -> Mesh | None:
    """The mesh whose seq axis splits a `length`-slot cache and the attention over it (ring prefill,
    split-cache decode), or None (dense): one with seq > 1 that divides `length` (powers of two do)."""
    if mesh is None or mesh.shape["seq"] == 1 or length % mesh.shape["seq"]:
        return None
    return mesh


def over_cache(slots: int, ring: Mesh | None) -> attn.Path:
    """Attention over the cache's first `slots` slots: dense, or over its shards on a seq mesh."""
    return attn.Dense(slots) if ring is None else attn.SplitCache(ring)


def prefill(model: Phi4ForCausalLM, ids: jax.Array, lengths: jax.Array, cache: KVCache,
            starts: jax.Array | None = None, piece: int | None = None,
            ring: Mesh | None = None, rope_lengths: jax.Array | None = None,
            reach: int | None = None) -> tuple[jax.Array, KVCache]:
    """Runs right-padded prompts `ids` `[B, W]` into the cache; returns the logits `[B, vocab]` at
    each row's last prompt token (position `lengths[b] - 1`), and the cache.

    Without `starts` the prompts start at position 0 and attend among themselves; with `starts`
    `[B]` they continue sequences whose first `starts[b]` positions are cached (a chat's next
    turn) and attend over the cache. `piece`: prompts longer than this run in pieces of it, each
    attending over the slots it may reach (from position 0: up to its group's end, `reach_groups`;
    else all).
    `ring`: a mesh whose seq axis splits the cache (in contiguous shards) and the work: a prompt
    from position 0 whose W divides into 2·seq chunks runs with ring attention; other prompts and
    pieces attend over the split cache. `rope_lengths` `[B]`: the whole prompt's length where `ids`
    is only a part of it (for LongRoPE's table; default `lengths`). `reach` (static): continuing
    rows all start at slot `reach - W` (a long prompt's next piece), so one piece attends over the
    cache's first `reach` slots in order (causal blocks skip what it cannot see).
    """
    batch, width = ids.shape
    fresh = starts is None
    rope = lengths if rope_lengths is None else rope_lengths
    if ring is not None and fresh and width % (2 * ring.shape["seq"]) == 0:
        order = zigzag_order(width, ring.shape["seq"])
        last = jnp.asarray(np.argsort(order))[lengths - 1]  # where each row's last token went
        return model.prefill(jnp.take(ids, order, axis=1), jnp.broadcast_to(order, ids.shape), rope, last,
                             cache, attn.Ring(ring, ordered=True))
    slots = width if fresh else cache.length
    starts = jnp.zeros(batch, jnp.int32) if fresh else starts
    if piece is None or width <= piece:  # one piece: a fresh one attends among its own tokens
        if ring is None and (fresh or reach is not None):
            path = attn.Dense(None if fresh else reach, ordered=True)
        else:
            path = over_cache(slots, ring)
        return _block(model, ids, lengths, rope, cache, starts, path)

    def one_piece(offset, size, logits, cache, reach=slots):
        block = jax.lax.dynamic_slice_in_dim(ids, offset, size, axis=1)
        new, cache = _block(model, block, lengths, rope, cache, starts + offset, over_cache(reach, ring))
        holds_last = (lengths - 1 >= starts + offset) & (lengths - 1 < starts + offset + size)
        return jnp.where(holds_last[:, None], new, logits), cache

    logits = jnp.zeros((batch, model.config.vocab_size), model.model.embed_tokens.dtype)
    # A fresh prompt's pieces see only the slots up to their own end: the pieces run in groups, each
    # attending up to its last piece's end (a static bound, a loop each). Continuing rows start apart.
    pieces = width // piece
    groups = reach_groups(pieces) if fresh and ring is None else [(0, pieces)]
    for first, end in groups:
        reach = end * piece if end < pieces else slots
        logits, cache = jax.lax.fori_loop(first, end, lambda i, c: one_piece(i * piece, piece, *c, reach=reach),
                                          (logits, cache))
        # The next group writes the cache only once this group's logits (so all its reads of the
        # cache) are done: else a compiler may schedule a write first and copy the cache layer to
        # keep the version the read wants (a one-trip loop is inlined, and its order with it).
        logits, cache = jax.lax.optimization_barrier((logits, cache))
    if width % piece:  # a last, shorter piece (a cache shorter than the power-of-two bucket)
        logits, cache = one_piece(width - width % piece, width % piece, logits, cache)
    return logits, cache


def reach_groups(pieces: int) -> list[tuple[int, int]]:
    """`pieces` prompt pieces in groups `(first, end)` (piece indices) that end at about two bounds per
    doubling (1, 2, 3, 4, 6, 8, 12, 16, 23, 32, ...): each group attends up to its end, so the pieces'
    attention does at most 1.25x the causal work (1.17x from 16 pieces on), where attending the whole
    prompt from every piece did 2x; one loop per group (12 at 64 pieces)."""
    bounds, step = [], 0
    while not bounds or bounds[-1] < pieces:
        bound = min(pieces, math.ceil(2 ** (step / 2)))  # (even steps: exact powers of two)
        if not bounds or bound > bounds[-1]:
            bounds.append(bound)
        step += 1
    return list(zip([0] + bounds[:-1], bounds))


def _block(model, ids, lengths, rope_lengths, cache, starts, path):
    """Tokens `[B, W]` at positions `starts[b]` on; logits at each row's last prompt token
    (clipped to the block: only meaningful for rows whose last token lies in it)."""
    positions = starts[:, None] + jnp.arange(ids.shape[1])
    last = jnp.clip(lengths - starts - 1, 0, ids.shape[1] - 1)
    return model.prefill(ids, positions, rope_lengths, last, cache, path)


def prefill_packed(model: Phi4ForCausalLM, ids: jax.Array, positions: jax.Array, segments: jax.Array,
                   rope_lengths: jax.Array, slots: int | None = None) -> tuple[jax.Array, KVCache]:
    """Several fresh prompts packed end to end in one row `ids` `[1, T]` (vLLM's flattened batch):
    each token at its own prompt's `positions`, seeing only its own `segments` entry's tokens, with
    its prompt's length in `rope_lengths` (all `[1, T]`; the first token is a prompt's first). No
    prompt pads another to its width. Returns the final hidden states and a one-row cache of the
    tokens' keys/values, slot t holding token t, both of `slots` slots (at least T; default T), so
    that what moves them into rows (`runner._place`) is one program for every T."""
    cache = KVCache.create(model.config, 1, slots or ids.shape[1], model.model.embed_tokens.dtype)
    h, cache = model.model(ids, positions, rope_lengths, attn.Dense(None, ordered=True), cache, segments)
    return jnp.pad(h[0], ((0, cache.length - ids.shape[1]), (0, 0))), cache
