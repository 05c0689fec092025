"""Model names to local folders: a path, "demo" (the model in the package), or a Hugging Face repo id."""

from __future__ import annotations

import dataclasses
import os
import re

from phi4_jax.errors import ModelNotFoundError

# What a model folder needs; never pickle weights (*.bin, *.pt), never remote code (*.py).
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEMO = "demo"  # a model name: the built-in demo model (made by train/demo.py), shipped in the package
DEMO_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model folder on local disk, and where it came from."""

    folder: str
    repo_id: str | None = None  # set when resolved through the HF cache
    revision: str | None = None  # the snapshot's commit hash


def resolve(model: str | os.PathLike, revision: str | None = None,
            offline: bool | None = None) -> ModelSource:
    """Finds the folder of `model`: an existing path, "demo" (the built-in demo model, see
    train/demo.py), or an HF repo id (`microsoft/phi-4`).

    A repo id is looked up in the local HF cache (`HF_HUB_CACHE`); missing files are downloaded
    unless `offline` (default: the `HF_HUB_OFFLINE` environment variable) is set.
    """
    name = os.fspath(model)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ModelNotFoundError(f"{name} is a file; pass the model's folder (config.json and "
                                     "model*.safetensors)")
        return ModelSource(folder=name)
    if name == DEMO:
        if not os.path.isfile(os.path.join(DEMO_FOLDER, "config.json")):
            raise ModelNotFoundError(f"the demo model is missing from {DEMO_FOLDER}; reinstall phi4_jax, or "
                                     "make it again with `python train/demo.py`")
        return ModelSource(folder=DEMO_FOLDER)
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(f"{name} does not exist: pass a Hugging Face model folder or a "
                                 "repo id such as microsoft/Phi-4-mini-instruct")
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline = constants.is_offline_mode() if offline is None else offline
    try:
        folder = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=offline)
    except errors.LocalEntryNotFoundError as e:  # not cached, or cached in part (it lists what)
        fix = (f"download it (`hf download {name}`) or drop --offline / HF_HUB_OFFLINE"
               if offline else "check the name and your network")
        raise ModelNotFoundError(f"{name}{'@' + revision if revision else ''} is not complete in the "
                                 f"Hugging Face cache ({constants.HF_HUB_CACHE}): {e}; {fix}") from None
    except errors.HfHubHTTPError as e:  # not found, gated, no access
        raise ModelNotFoundError(f"{name}: {e}") from None
    return ModelSource(folder=folder, repo_id=name, revision=os.path.basename(os.path.normpath(folder)))
