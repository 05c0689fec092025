"""Device meshes from "data=2,tensor=4", and ONE table of logical-axis rules every sharding comes from.

Parameters carry the logical names of their axes (`axes=` in model.py); the KV cache, tokens and
logits name theirs here. `RULES` maps each logical name to mesh axes; `spec` turns a tuple of
logical names into a `PartitionSpec`. A dimension that the mesh axes do not divide (a batch of 1 on
data=2) stays whole on every device instead.

Grouped-query attention: the KV heads are split over `tensor`. When `tensor` does not divide them
(phi-4: 10 KV heads on tensor=4), each KV head is repeated r times at load time, r the smallest
value for which `n_kv * r` is divisible by `tensor` and divides the query heads (`kv_repeat`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi4_jax.config import Phi4Config
from phi4_jax.errors import ConfigError
from phi4_jax.model import abstract_model

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


class MeshError(ConfigError):
    """A mesh spec that is malformed, does not match the devices, or cannot shard the model."""


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,tensor=4" -> {"data": 2, "fsdp": 1, "tensor": 4, "seq": 1} (missing axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not match:
            raise MeshError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE (e.g. 'data=2,tensor=4')")
        axis, size = match[1], int(match[2])
        if axis not in sizes:
            raise MeshError(f"mesh {spec!r}: unknown axis {axis!r}; the axes are {', '.join(MESH_AXES)}")
        if axis in seen:
            raise MeshError(f"mesh {spec!r}: axis {axis!r} is given twice")
        if size < 1:
            raise MeshError(f"mesh {spec!r}: axis {axis!r} has size {size}; sizes are at least 1")
        seen.add(axis)
        sizes[axis] = size
    return sizes


def make_mesh(spec: str | Mapping[str, int] | Mesh, devices=None) -> Mesh:
    """A `Mesh` with the axes data, fsdp, tensor, seq (in that order) over `devices` (default: all
    devices of all processes). Its size must be the device count; a `Mesh` passes through."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != MESH_AXES:
            raise MeshError(f"the mesh has axes {tuple(spec.axis_names)}; phi4_jax's rules need exactly "
                            f"{MESH_AXES} (sizes of 1 are fine): build it with sharding.make_mesh")
        return spec
    sizes = parse_mesh(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
    devices = jax.devices() if devices is None else list(devices)
    if math.prod(sizes.values()) != len(devices):
        shown = ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1 device"
        raise MeshError(f"mesh {shown} has {math.prod(sizes.values())} devices but there are "
                        f"{len(devices)} ({devices[0].platform}); make the axis sizes multiply to "
                        f"{len(devices)}, e.g. 'tensor={len(devices)}'")
    # jax.make_mesh orders the devices by the physical topology (ICI rings on TPU, NVLink on GPU).
    # Auto axes: jit's sharding propagation decides what the rules table leaves open.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def spec(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    """The `PartitionSpec` of an array with these logical axes: each dimension over the mesh axes
    `RULES` gives it (those larger than 1), unless they do not divide it; a mesh axis serves once."""
    used, out = set(), []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def sharding(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(mesh, axes, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_axes(state) -> dict:
    """The `axes` metadata of every parameter of an `nnx.State`, as a pure dict of tuples."""
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata()["axes"]), state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(mesh: Mesh, state) -> dict:
    """The `NamedSharding` of each parameter of an `nnx.State` (of arrays or shapes), as a pure dict."""
    return jax.tree.map(lambda a, names: sharding(mesh, names, a.shape), nnx.to_pure_dict(state),
                        logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))


def abstract_on_mesh(config: Phi4Config, mesh: Mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The model split into its graphdef and a state of `ShapeDtypeStruct`s laid out on `mesh` (the
    KV heads repeated as needed): what `jit(...).lower` takes to compile for a mesh without weights."""
    graphdef, state = nnx.split(abstract_model(config_for_mesh(config, mesh), param_dtype=dtype))
    placed = param_shardings(mesh, state)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(state), placed))
    return graphdef, state


def place(model, mesh: Mesh):
    """A model in memory (random weights, say) moved onto `mesh` by the rules table. Its config must
    already suit the mesh (build it from `config_for_mesh`): heads are not repeated here."""
    if config_for_mesh(model.config, mesh) != model.config:
        raise MeshError(f"tensor={mesh.shape['tensor']} needs the KV heads repeated; build the model from "
                        "sharding.config_for_mesh(config, mesh), or load it with phi4_jax.load(..., mesh=)")
    graphdef, state = nnx.split(model)
    placed = param_shardings(mesh, state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, nnx.to_pure_dict(state), placed))
    return nnx.merge(graphdef, state)


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are laid out on (None when they are not on a mesh)."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


# Grouped-query attention on `tensor`.
def kv_repeat(config: Phi4Config, tensor: int) -> int:
    """How many times each KV head is repeated so that `tensor` splits the heads evenly (1: no
    repeat). Raises MeshError, listing the tensor sizes that work, when no repeat does."""
    n, kv = config.num_attention_heads, config.num_key_value_heads
    r = _repeat_or_none(n, kv, tensor)
    if r is not None:
        return r
    works = [t for t in range(1, n + 1) if _repeat_or_none(n, kv, t) is not None]
    raise MeshError(f"tensor={tensor} cannot split this model's {n} query / {kv} KV heads (even with "
                    f"KV heads repeated); tensor sizes that work: {', '.join(map(str, works))}. Put the "
                    "other devices on data or fsdp")


def _repeat_or_none(n: int, kv: int, tensor: int) -> int | None:
    return next((r for r in range(1, n // kv + 1) if (kv * r) % tensor == 0 and n % (kv * r) == 0), None)


def config_for_mesh(config: Phi4Config, mesh: Mesh) -> Phi4Config:
    """The config the model has on `mesh`: the KV heads repeated as `kv_repeat` says."""
    r = kv_repeat(config, mesh.shape["tensor"])
    return config if r == 1 else config.replace(num_key_value_heads=config.num_key_value_heads * r)


def repeat_kv_heads(params: dict, repeat: int, shardings: dict) -> dict:
    """Repeats each KV head of the k/v weights (`[kv_heads, head_dim, embed]`) on the devices,
    onto the shardings the repeated model has (a pure-dict tree and its shardings)."""
    def one(path, x):
        if path[-2].key not in ("k_proj", "v_proj"):
            return x
        target = functools.reduce(lambda t, k: t[k.key], path, shardings)
        return jax.jit(lambda k: jnp.repeat(k, repeat, axis=0), out_shardings=target)(x)

    return jax.tree_util.tree_map_with_path(one, params)


# Arrays for the mesh.
def put(array, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array with this sharding; each
    process places only its own devices' pieces, so it also works across hosts."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def describe(params: dict) -> str:
    """The layout of a parameter tree on a mesh, one line per kind of parameter (layers folded)."""
    from flax import traverse_util

    mesh = mesh_of(params)
    lines = [f"mesh: {', '.join(f'{a}={n}' for a, n in mesh.shape.items())} "
             f"({mesh.devices.size} {mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es))"]
    kinds: dict[str, tuple] = {}
    for key, array in traverse_util.flatten_dict(params).items():
        name = ".".join("*" if isinstance(k, int) else str(k) for k in key)
        if name not in kinds:
            shard = array.sharding.shard_shape(array.shape)
            kinds[name] = (array.shape, array.sharding.spec, shard)
    width = max(map(len, kinds))
    for name, (shape, pspec, shard) in kinds.items():
        lines.append(f"  {name:<{width}}  {str(shape):<18} {str(tuple(pspec)):<34} per device {shard}")
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    lines.append(f"  parameters: {_size(total)} in all, {_size(device_bytes(params))} on the fullest device")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def device_bytes(tree) -> int:
    """The bytes of `tree`'s arrays held by the device holding the most of them."""
    per_device: dict = {}
    for array in jax.tree.leaves(tree):
        for shard in array.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
