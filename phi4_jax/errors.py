"""The typed errors phi4_jax raises, so callers (and command lines) can tell bad input apart."""


class Phi4Error(Exception):
    """Base class of every error phi4_jax raises on purpose."""


class ConfigError(Phi4Error, ValueError):
    """A config.json (or config dict) that phi4_jax cannot honour; names the field."""


class MeshError(ConfigError):
    """A mesh spec that is malformed, does not match the devices, or cannot shard the model."""


class CheckpointError(Phi4Error):
    """A model folder whose weights are missing, corrupt, or do not fit its config; names the file."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """The model path (or a file it needs, such as config.json or a shard) does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The folder only holds pickle weights (`pytorch_model.bin`), which phi4_jax never unpickles."""


class OutputExistsError(Phi4Error, FileExistsError):
    """The output folder exists and overwriting it was not asked for."""


class OutOfResourcesError(Phi4Error):
    """Not enough disk space or memory to finish; nothing partial is left behind."""


class SamplingError(Phi4Error, ValueError):
    """An invalid sampling parameter; names it, and says which in `field`."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class TokenizerError(Phi4Error, ValueError):
    """Tokenizer files that are missing or unreadable, or a chat template that fails; names the file."""


class GenerationError(Phi4Error):
    """A request failed inside the engine (a device call raised); the engine went on without it."""
