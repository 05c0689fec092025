"""`load(path)`: a model folder in, a ready model (and tokenizer) out."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from phi4_jax.config import Phi4Config
from phi4_jax.errors import ModelNotFoundError
from phi4_jax.model import Phi4ForCausalLM, abstract_model, default_dtype
from phi4_jax.weights import load_hf_params


def load(path: str | os.PathLike, dtype=None) -> tuple[Phi4ForCausalLM, None]:
    """Loads a Hugging Face model folder (config.json + safetensors weights).

    Args:
      path: the folder.
      dtype: parameter and compute dtype, a name such as "float32" or a jnp dtype; None picks the
        backend's default (float32 on CPU, bfloat16 on GPU/TPU). Weights are cast as they are read.
    Returns:
      `(model, tokenizer)`; the tokenizer is None until phi4_jax ships one.
    Raises:
      ModelNotFoundError, ConfigError, CheckpointError (all `phi4_jax.errors.Phi4Error`), naming
      the file at fault.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ModelNotFoundError(f"{folder} is not a folder; pass a Hugging Face model folder "
                                 "(config.json and model*.safetensors)")
    config = Phi4Config.from_json(folder)
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    graphdef, abstract = nnx.split(abstract_model(config, param_dtype=dtype))
    params = load_hf_params(folder, config, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract), None
