"""Device meshes from "data=2,tensor=4" (over all the devices or some of them), and arrays on them.

A mesh has the axes data, fsdp, tensor and seq, in that order. It spans the first devices it needs,
or those named by `parse_devices` ("4-7"); where each array goes on it comes from `rules.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi4_jax.errors import MeshError
from phi4_jax.parallel.heads import config_for_mesh
from phi4_jax.parallel.rules import MESH_AXES, param_shardings, spec


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


def parse_devices(spec: str, count: int) -> list[int]:
    """"4-7" or "0,2,4,6" (or both, "0-1,6-7") -> device indices into `jax.devices()`, of `count`."""
    indices = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise MeshError(f"devices {spec!r}: {part!r} is not an index or a range such as 4-7")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise MeshError(f"devices {spec!r}: the range {part!r} runs backwards")
        indices.extend(range(first, last + 1))
    if not indices:
        raise MeshError(f"devices {spec!r} names no device; give indices such as 4-7 or 0,2,4,6")
    if len(set(indices)) != len(indices):
        raise MeshError(f"devices {spec!r} names a device twice")
    if max(indices) >= count:
        raise MeshError(f"devices {spec!r}: there are {count} devices, indices 0-{count - 1}")
    return indices


def make_mesh(spec: str | Mapping[str, int] | Mesh, devices: Sequence | None = None) -> Mesh:
    """A `Mesh` with the axes data, fsdp, tensor, seq (in that order) over the first devices of
    `devices` that it needs (default: all devices of all processes; a multi-host mesh must span
    them all). A `Mesh` passes through."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != MESH_AXES:
            raise MeshError(f"the mesh has axes {tuple(spec.axis_names)}; phi4_jax's rules need exactly "
                            f"{MESH_AXES} (sizes of 1 are fine): build it with parallel.mesh.make_mesh")
        return spec
    sizes = parse_mesh(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
    devices = jax.devices() if devices is None else list(devices)
    size = math.prod(sizes.values())
    shown = ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1 device"
    if size > len(devices):
        raise MeshError(f"mesh {shown} has {size} devices but there are {len(devices)} "
                        f"({devices[0].platform}); make the axis sizes multiply to at most {len(devices)}, "
                        f"e.g. 'tensor={len(devices)}'")
    if size < len(devices) and jax.process_count() > 1:
        raise MeshError(f"mesh {shown} has {size} devices, but a run of {jax.process_count()} processes has "
                        f"{len(devices)}: a multi-host mesh spans every process's devices")
    # jax.make_mesh orders the devices by the physical topology (ICI rings on TPU, NVLink on GPU).
    # Auto axes: jit's sharding propagation decides what the rules table leaves open.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices[:size],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are laid out on (None when they are not on a mesh)."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def place(model, mesh: Mesh):
    """A model in memory (random weights, say) moved onto `mesh` by the rules table. Its config must
    already suit the mesh (build it from `heads.config_for_mesh`): heads are not repeated here."""
    if config_for_mesh(model.config, mesh) != model.config:
        raise MeshError(f"tensor={mesh.shape['tensor']} needs the KV heads repeated; build the model from "
                        "parallel.heads.config_for_mesh(config, mesh), or load it with phi4_jax.load(..., mesh=)")
    graphdef, state = nnx.split(mark_mesh(model, mesh))
    placed = param_shardings(mesh, state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, nnx.to_pure_dict(state), placed))
    return nnx.merge(graphdef, state)


def mark_mesh(model, mesh: Mesh | None):
    """Gives the parts of `model` that are partitioned by hand the mesh they run over: the embedding
    table when the rules table splits its rows over `tensor` (its lookups then move looked-up rows,
    not the table: `model/vocab_parallel.py`), and each attention layer with a kernel (splash or
    cuDNN, run per device under `shard_map`: `attention.per_device`). Call it on the model
    (abstract or real) before splitting it into graphdef and state; it returns the model."""
    table = model.model.embed_tokens
    shape = (model.config.vocab_size, model.config.hidden_size)
    split = mesh is not None and spec(mesh, ("vocab", "embed"), shape)[0] == "tensor"
    table.split = mesh if split else None
    several = mesh is not None and mesh.devices.size > 1
    for layer in model.model.layers:
        layer.self_attn.mesh = mesh if several and layer.self_attn.implementation != "xla" else None
    return model


def put(array, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array with this sharding; each
    process places only its own devices' pieces, so it also works across hosts."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def describe(params: dict) -> str:
    """The layout of a parameter tree on a mesh, one line per kind of parameter (layers folded)."""
    from flax import traverse_util

    mesh = mesh_of(params)
    everything = jax.devices()
    used = [everything.index(d) for d in mesh.devices.flat]
    which = "all" if len(used) == len(everything) else f"{_ranges(used)} of {len(everything)}"
    lines = [f"mesh: {', '.join(f'{a}={n}' for a, n in mesh.shape.items())} "
             f"({mesh.devices.size} {mesh.devices.flat[0].platform} devices: {which}; "
             f"{jax.process_count()} process(es))"]
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


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> "devices 0-3, 6"."""
    parts, start = [], None
    for i, n in enumerate(sorted(indices)):
        if start is None:
            start = n
        if i + 1 == len(indices) or sorted(indices)[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return "devices " + ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def device_bytes(tree) -> int:
    """The bytes of `tree`'s arrays held by the device holding the most of them."""
    per_device: dict = {}
    for array in jax.tree.leaves(tree):
        for shard in array.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
