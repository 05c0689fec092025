"""A model folder (Hugging Face or phi4_jax's Orbax) in, the model on its devices out.

The abstract model (shapes, no memory) is built for the target mesh, and every parameter is read
straight into its shards: from safetensors block by block, from Orbax by restoring onto the
target shardings. No host ever holds a replicated full model.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from phi4_jax.checkpoints import orbax
from phi4_jax.checkpoints.hf import load_hf_params
from phi4_jax.checkpoints.hub import resolve
from phi4_jax.config import Phi4Config
from phi4_jax.errors import ConfigError, MeshError
from phi4_jax.model import attention as attn
from phi4_jax.model import int8
from phi4_jax.model.backend import Backend
from phi4_jax.model.phi4 import Phi4ForCausalLM, abstract_model, default_dtype
from phi4_jax.parallel.heads import config_for_mesh, repeat_kv_heads
from phi4_jax.parallel.mesh import make_mesh, mark_mesh
from phi4_jax.parallel.rules import param_shardings, placed_shapes


def load_model(path: str | os.PathLike, dtype=None, mesh: str | Mesh | None = None, progress: bool = True,
               attention: str = "auto", quantize: str | None = None) -> Phi4ForCausalLM:
    """The model of a folder or repo id, on one device or sharded over `mesh` (see `phi4_jax.load`)."""
    dtype = None if dtype is None else float_dtype(dtype)
    int8.check_kind(quantize)
    folder = resolve(path).folder
    config = Phi4Config.from_json(folder)
    stored = orbax.quantization(folder) if orbax.is_orbax_folder(folder) else None
    if stored is not None and quantize not in (None, stored):
        raise ConfigError(f"{folder} holds {stored} weights already; load it without quantize={quantize!r}")
    quantize = quantize or stored
    if mesh is None and jax.process_count() > 1:
        raise MeshError(f"this is one of {jax.process_count()} processes of a multi-host run: give a "
                        "mesh over all their devices (--mesh, or load(..., mesh=)), e.g. "
                        f"'data={jax.process_count()},tensor={jax.local_device_count()}'")
    mesh = None if mesh is None else make_mesh(mesh)
    backend = Backend.of(jax.devices()[:1] if mesh is None else mesh.devices.flat)
    dtype = dtype or default_dtype(backend.platform)
    model_config = config if mesh is None else config_for_mesh(config, mesh)
    repeat = model_config.num_key_value_heads // config.num_key_value_heads
    attn.check(attention, dtype, backend.platform)
    attention = attn.resolve(attention, dtype, backend.platform, config.head_dim)
    graphdef, abstract = nnx.split(mark_mesh(abstract_model(model_config, param_dtype=dtype, attention=attention,
                                                            backend=backend, quantize=quantize), mesh))
    placed = None if mesh is None else param_shardings(mesh, abstract)
    if orbax.is_orbax_folder(folder):
        params = _restore(folder, config, dtype, mesh, repeat, placed, quantize)
    else:
        params = load_hf_params(folder, config, nnx.to_pure_dict(abstract), placed, repeat, progress)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def _restore(folder: str, config: Phi4Config, dtype, mesh: Mesh | None, repeat: int, placed: dict | None,
             quantize: str | None) -> dict:
    """Orbax parameters, restored straight onto their shardings; the checkpoint holds the model's
    own KV heads, so with `repeat` > 1 they are restored unsplit and repeated on the devices."""
    stored = placed_shapes(nnx.state(abstract_model(config, param_dtype=dtype, quantize=quantize)), mesh)
    params = orbax.restore_params(folder, stored)
    if repeat == 1:
        return params

    def one(path, x):
        if path[-2].key not in ("k_proj", "v_proj"):
            return x
        target = placed
        for key in path:
            target = target[key.key]
        return jax.jit(lambda k: repeat_kv_heads(k, repeat), out_shardings=target)(x)

    return jax.tree_util.tree_map_with_path(one, params)


def float_dtype(dtype) -> jnp.dtype:
    """`dtype` (a name such as "float32", or a dtype), checked to be floating point."""
    given = dtype
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"dtype={given!r} is not a floating-point type; use e.g. 'float32' or 'bfloat16'")
    return dtype
