"""`load(path)`: a model folder (Hugging Face or converted Orbax) in, a ready model (and tokenizer) out."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from phi4_jax import checkpoint
from phi4_jax.config import Phi4Config
from phi4_jax.errors import ConfigError
from phi4_jax.hub import resolve
from phi4_jax.model import Phi4ForCausalLM, abstract_model, default_dtype
from phi4_jax.tokenizer import Tokenizer
from phi4_jax.weights import load_hf_params


def load(path: str | os.PathLike, dtype=None) -> tuple[Phi4ForCausalLM, Tokenizer | None]:
    """Loads a model folder: Hugging Face (config.json + safetensors) or one written by
    `convert/hf_to_orbax.py`; a repo id (`microsoft/phi-4`) is looked up in the HF cache.

    Args:
      path: the folder or repo id.
      dtype: parameter and compute dtype, a name such as "float32" or a jnp dtype; None picks the
        backend's default (float32 on CPU, bfloat16 on GPU/TPU). Weights are cast as they are read.
    Returns:
      `(model, tokenizer)`; the tokenizer is None when the folder has no tokenizer files.
    Raises:
      ModelNotFoundError, ConfigError, CheckpointError (all `phi4_jax.errors.Phi4Error`), naming
      the file at fault.
    """
    dtype = _float_dtype(dtype)
    folder = resolve(path).folder
    config = Phi4Config.from_json(folder)
    graphdef, abstract = nnx.split(abstract_model(config, param_dtype=dtype))
    if checkpoint.is_orbax_folder(folder):
        params = checkpoint.restore_params(folder, nnx.to_pure_dict(abstract))
    else:
        params = load_hf_params(folder, config, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, params)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))
    return nnx.merge(graphdef, abstract), Tokenizer(folder) if has_tokenizer else None


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
