"""phi4_jax: Microsoft's Phi-4 family (and the Phi-3/3.5-mini models) in JAX/Flax."""

from phi4_jax import compilation_cache
from phi4_jax.config import PRESETS, Phi4Config
from phi4_jax.errors import (CheckpointError, ConfigError, ModelNotFoundError, Phi4Error,
                             UnsafeCheckpointError)
from phi4_jax.loading import load
from phi4_jax.model import Phi4ForCausalLM, forward

__version__ = "0.1.0"
__all__ = ["PRESETS", "CheckpointError", "ConfigError", "ModelNotFoundError", "Phi4Config",
           "Phi4Error", "Phi4ForCausalLM", "UnsafeCheckpointError", "forward", "load"]

compilation_cache.enable()
