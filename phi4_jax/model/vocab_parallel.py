"""The embedding lookup of a table whose rows are split over a mesh's `tensor` axis.

Each device looks up only the ids its rows hold, zeroes the others, and one all-reduce over
`tensor` sums the looked-up rows (`[..., embed]`): what a step moves is the rows, never the table.
Left to itself, XLA's GPU partitioner answers a gather from a row-split table with an all-gather of
the whole table at every decode step (Phi-4-mini on `tensor=8`: 1.97x the bytes the step must
read); its TPU and CPU partitioners mask as this does. Written once, it is the same on all three.
An int8 table's per-row scales are split and looked up alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

AXIS = "tensor"


def lookup(mesh: Mesh, weight: jax.Array, scale: jax.Array | None, ids: jax.Array, dtype,
           take=lambda table, ids: table[ids]) -> jax.Array:
    """Rows `[..., embed]` (in `dtype`) of `weight` `[vocab, embed]` (times `scale` `[vocab]`, when
    quantized) for `ids`, with the vocabulary split evenly over `mesh`'s tensor axis. Only `tensor` is
    manual here: the embed axis's and the batch's shardings are left to the compiler. `take(table,
    ids)`: the backend's form of the local lookup (`table[ids]`)."""
    def local(ids, weight, *scale):
        shard = weight.shape[0]
        index = ids - jax.lax.axis_index(AXIS) * shard
        held = (index >= 0) & (index < shard)
        index = jnp.where(held, index, 0)
        found = take(weight, index)
        if scale:  # (as the plain lookup: the int8 row times its scale in float32, then the dtype)
            found = found * scale[0][index][..., None]
        return jax.lax.psum(jnp.where(held[..., None], found.astype(dtype), 0), AXIS)  # (one term is not 0)

    tables = (weight,) if scale is None else (weight, scale)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(),) + (PartitionSpec(AXIS),) * len(tables),
                         out_specs=PartitionSpec(), axis_names={AXIS}, check_vma=True)(ids, *tables)
