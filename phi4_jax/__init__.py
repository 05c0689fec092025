"""phi4_jax: Microsoft's Phi-4 family (and the Phi-3/3.5-mini models) in JAX/Flax.

Importing it changes no JAX setting; `load()` and the command lines turn the persistent
compilation cache on (`phi4_jax.compilation_cache`).
"""

from phi4_jax.api import GenerationResponse, PromptCache, generate, load, load_tokenizer, stream_generate
from phi4_jax.config import PRESETS, Phi4Config
from phi4_jax.engine.engine import Engine, RequestOutput
from phi4_jax.engine.runner import ModelRunner
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.errors import (CheckpointError, ConfigError, GenerationError, MeshError, ModelNotFoundError, Phi4Error,
                             SamplingError, TokenizerError, UnsafeCheckpointError)
from phi4_jax.model.phi4 import Phi4ForCausalLM, forward
from phi4_jax.text.tokenizer import Tokenizer

__version__ = "0.3.0"
__all__ = ["PRESETS", "CheckpointError", "ConfigError", "Engine", "GenerationError", "GenerationResponse",
           "MeshError", "ModelNotFoundError", "ModelRunner", "Phi4Config", "Phi4Error", "Phi4ForCausalLM",
           "PromptCache", "RequestOutput", "SamplingError", "SamplingParams", "Tokenizer", "TokenizerError",
           "UnsafeCheckpointError", "forward", "generate", "load", "load_tokenizer", "stream_generate"]
