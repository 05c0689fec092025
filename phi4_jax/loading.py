"""`load(path)`: a model folder (Hugging Face or converted Orbax) in, a ready model (and tokenizer) out."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from phi4_jax import checkpoint, sharding
from phi4_jax.config import Phi4Config
from phi4_jax.errors import ConfigError
from phi4_jax.hub import resolve
from phi4_jax.model import Phi4ForCausalLM, abstract_model, default_dtype
from phi4_jax.tokenizer import Tokenizer
from phi4_jax.weights import load_hf_params


def load(path: str | os.PathLike, dtype=None, mesh: str | Mesh | None = None, progress: bool = True,
         attention: str = "auto") -> tuple[Phi4ForCausalLM, Tokenizer | None]:
    """Loads a model folder: Hugging Face (config.json + safetensors) or one written by
    `convert/hf_to_orbax.py`; a repo id (`microsoft/phi-4`) is looked up in the HF cache.

    Args:
      path: the folder or repo id.
      dtype: parameter and compute dtype, a name such as "float32" or a jnp dtype; None picks the
        backend's default (float32 on CPU, bfloat16 on GPU/TPU). Weights are cast as they are read.
      mesh: shard the model over a device mesh: a spec such as "data=2,tensor=4" (see
        `sharding.make_mesh`) or a `jax.sharding.Mesh` with the axes data, fsdp, tensor, seq.
        Each device reads only its own block of each weight. When `tensor` does not divide the KV
        heads they are repeated (`sharding.kv_repeat`), and `model.config` says how many there are.
        None: everything on the first device.
      progress: show a progress bar while reading HF weights.
      attention: the attention implementation: "auto" (cuDNN on a GPU in 16 bits, else XLA),
        "xla" or "cudnn" (see `phi4_jax.attention`).
    Returns:
      `(model, tokenizer)`; the tokenizer is None when the folder has no tokenizer files.
    Raises:
      ModelNotFoundError, ConfigError (`sharding.MeshError` for a mesh that does not fit the
      devices or the model), CheckpointError (all `phi4_jax.errors.Phi4Error`), naming the file at
      fault.
    """
    dtype = _float_dtype(dtype)
    folder = resolve(path).folder
    config = Phi4Config.from_json(folder)
    if mesh is None and jax.process_count() > 1:
        raise sharding.MeshError(f"this is one of {jax.process_count()} processes of a multi-host run: give a "
                                 "mesh over all their devices (--mesh, or load(..., mesh=)), e.g. "
                                 f"'data={jax.process_count()},tensor={jax.local_device_count()}'")
    mesh = None if mesh is None else sharding.make_mesh(mesh)
    model_config = config if mesh is None else sharding.config_for_mesh(config, mesh)
    repeat = model_config.num_key_value_heads // config.num_key_value_heads
    graphdef, abstract = nnx.split(abstract_model(model_config, param_dtype=dtype, attention=attention))
    placed = None if mesh is None else sharding.param_shardings(mesh, abstract)
    if checkpoint.is_orbax_folder(folder):
        params = _restore(folder, config, dtype, mesh, repeat, placed)
    else:
        params = load_hf_params(folder, config, nnx.to_pure_dict(abstract), placed, repeat, progress)
    nnx.replace_by_pure_dict(abstract, params)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))
    return nnx.merge(graphdef, abstract), Tokenizer(folder) if has_tokenizer else None


def _restore(folder: str, config: Phi4Config, dtype, mesh: Mesh | None, repeat: int, placed: dict | None) -> dict:
    """Orbax parameters, restored straight onto their shardings; the checkpoint holds the model's
    own KV heads, so with `repeat` > 1 they are restored unsplit and repeated on the devices."""
    stored = nnx.state(abstract_model(config, param_dtype=dtype))
    abstract = nnx.to_pure_dict(stored)
    if mesh is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                sharding.param_shardings(mesh, stored))
    params = checkpoint.restore_params(folder, abstract)
    if repeat > 1:
        params = sharding.repeat_kv_heads(params, repeat, placed)
    return params


def _float_dtype(dtype) -> jnp.dtype:
    if dtype is None:
        return jnp.dtype(default_dtype())
    given = dtype
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"dtype={given!r} is not a floating-point type; use e.g. 'float32' or 'bfloat16'")
    return dtype
