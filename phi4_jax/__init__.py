"""phi4_jax: Microsoft's Phi-4 family (and the Phi-3/3.5-mini models) in JAX/Flax."""

from phi4_jax import compilation_cache
from phi4_jax.config import PRESETS, Phi4Config
from phi4_jax.errors import (CheckpointError, ConfigError, ModelNotFoundError, Phi4Error, SamplingError,
                             TokenizerError, UnsafeCheckpointError)
from phi4_jax.generation import GenerationResponse, generate, stream_generate
from phi4_jax.loading import load
from phi4_jax.model import Phi4ForCausalLM, forward
from phi4_jax.sampling import SamplingParams
from phi4_jax.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["PRESETS", "CheckpointError", "ConfigError", "GenerationResponse", "ModelNotFoundError",
           "Phi4Config", "Phi4Error", "Phi4ForCausalLM", "SamplingError", "SamplingParams", "Tokenizer",
           "TokenizerError", "UnsafeCheckpointError", "forward", "generate", "load", "load_tokenizer",
           "stream_generate"]

compilation_cache.enable()
