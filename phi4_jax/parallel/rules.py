"""The ONE table of logical-axis rules that every sharding comes from, and the specs it gives.

Parameters carry the logical names of their axes (`axes=` in `model/phi4.py`); the KV cache names
its own here. `RULES` maps each logical name to mesh axes; `spec` turns a tuple of logical names
into a `PartitionSpec`. A dimension that the mesh axes do not divide (a batch of 1 on data=2) stays
whole on every device instead. This module is data and the arithmetic over it: it imports nothing
of phi4_jax.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "seq")

# Logical axis -> mesh axes (DESIGN §5). Weights shard `embed` over fsdp and the head, MLP and
# vocabulary axes over tensor; a batch splits over data and fsdp; a sequence over seq.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "sequence": ("seq",),
}
CACHE_AXES = ("batch", "kv_heads", "sequence", "head_dim")  # KVCache: [B, KV, L, D] per layer


def spec(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...], over=None) -> PartitionSpec:
    """The `PartitionSpec` of an array with these logical axes: each dimension over the mesh axes
    `RULES` gives it (those larger than 1), unless they do not divide it; a mesh axis serves once.
    `over`: the mesh axes that may split it (default: all; a map's own axes inside another's)."""
    used, out = set(), []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used
                          and (over is None or a in over))
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def sharding(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(mesh, axes, shape))


def logical_axes(state) -> dict:
    """The `axes` metadata of every parameter of an `nnx.State`, as a pure dict of tuples."""
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata()["axes"]), state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(mesh: Mesh, state) -> dict:
    """The `NamedSharding` of each parameter of an `nnx.State` (of arrays or shapes), as a pure dict."""
    return jax.tree.map(lambda a, names: sharding(mesh, names, a.shape), nnx.to_pure_dict(state),
                        logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))


def placed_shapes(state, mesh: Mesh | None = None) -> dict:
    """The parameters of an `nnx.State` as `ShapeDtypeStruct`s with their shardings on `mesh` (None:
    the first device), as a pure dict: the target of a restore, or the input of an AOT compile."""
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        param_shardings(mesh, state))
