"""XLA's TPU compiler's own forms: a one-token embedding lookup, and one token's cache write.

`rows`: XLA writes a gather of one row as a dynamic slice, and a TPU's dynamic slice of an int8 table
(tiled 32 x 128) first relays the whole table into another tiling: at every decode step of a
single row (Phi-4-mini int8 on one v5e: 0.61 GB read and written a step, 1.15x what the step must
read). A gather of two rows (the wanted one and row 0, then dropped) reads the table where it lies.

`as_cache_layout`: a decode step's new keys/values `[B, KV, 1, D]` come from the projection
token-major (`[B, 1, KV, D]` transposed), and left so, the compiler gave the decode loop's cache
that layout too, so that a slot of all KV heads is one (8, 128) tile to write: the cache, stored
heads-major, was relaid out into the loop and back at every call wherever a chip holds several KV
heads (phi-4 on `tensor=8` at 16K: 6.7 GB a call on v5e; Phi-4-mini on `seq=8` at 32K: 2.1 GB).
Pinned to the cache's layout, the new token is the one relaid out (a few hundred bytes). Pieces of
prompts are left free: pinned, Phi-4-mini's 32K prefill on `tensor=8` moved 1.9x the bytes.
`write_token_at`: a split cache's scatter of `[KV, D]` windows at rows x slots wanted the cache
token-major too (each window contiguous; 8.6 GB a call at 32K with 4 rows on `seq=8`); it writes one
`[KV, 1, D]` window a row instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint


def rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` (`[..., embed]`), never as a one-row gather."""
    if ids.size != 1:
        return table[ids]
    two = jnp.pad(ids.reshape(1), (0, 1))
    return table[two][:1].reshape(*ids.shape, *table.shape[1:])


def as_cache_layout(new: jax.Array) -> jax.Array:
    """`new` `[B, KV, T, D]` laid out row-major, as the cache it is written into."""
    return with_layout_constraint(new, Layout(tuple(range(new.ndim))))


def write_token_at(cache_layer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """`cache.write_at` of one token a row (`new` `[B, KV, 1, D]` at `slots[b, 0]`, dropped past the
    end), pinned as `as_cache_layout` and scattered as one `[KV, 1, D]` window a row."""
    index = jnp.stack([jnp.arange(new.shape[0]), slots[:, 0]], axis=1)
    numbers = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3), inserted_window_dims=(0,),
                                              scatter_dims_to_operand_dims=(0, 2))
    return jax.lax.scatter(cache_layer, index, as_cache_layout(new).astype(cache_layer.dtype), numbers,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
