"""phi4_jax's Orbax folders: their format and manifest, writing parameters, restoring them onto devices.

A folder is self-describing:

  DIR/params/          the Orbax checkpoint of the parameter tree (`nnx.to_pure_dict` layout)
  DIR/config.json ...  config, generation config, tokenizer files and chat template, as they were
  DIR/manifest.json    source, per-file size and sha256, dtype, tool version; written last
"""

from __future__ import annotations

import json
import os
import shlex

import jax
import jax.numpy as jnp
from flax import traverse_util

from phi4_jax.errors import CheckpointError, ModelNotFoundError

FORMAT = "phi4_jax.orbax"
# 2: projection weights in HF's (out..., in...) layout; 1 had them (in..., out...) as `kernel`s.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARAMS = "params"


def ocp():
    """Orbax's v1 API (partial saves: a few tensors per call)."""
    import orbax.checkpoint.experimental.v1 as v1

    return v1


class ParamsWriter:
    """Writes a parameter tree into an Orbax checkpoint a batch of tensors at a time: each batch is
    saved in the background (one Orbax partial save at a time) while the caller reads the next, and
    `finish` waits for the last and finalizes the checkpoint. As a context manager it waits for the
    save in flight when the block raises, so nothing writes into a folder being removed.

    Uncompressed: zstd cost 12.7 of 28.5 save seconds converting Phi-4-mini on 2 cores and saved
    14% of the bytes (bench/RESULTS.md, "Converting and loading"); loading skips decompressing too.
    """

    def __init__(self, params_dir: str):
        v1 = ocp()
        self._dir = params_dir
        self._context = v1.Context()
        self._context.array.saving.use_compression = False
        self._saving = None  # the save in flight, and the batch it holds

    def __enter__(self) -> ParamsWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._saving is not None:
            try:
                self._wait()
            except Exception:  # noqa: BLE001  (the error that got here is the one to report)
                pass

    def write(self, batch: dict) -> None:
        """Starts saving `batch` (a nested dict of host arrays) once the previous save is done."""
        self._wait()
        with self._context:
            self._saving = ocp().partial.save_async(self._dir, batch), batch

    def finish(self) -> None:
        self._wait()
        with self._context:
            ocp().partial.finalize(self._dir)

    def _wait(self) -> None:
        if self._saving is not None:
            self._saving[0].result()
            self._saving = None


def is_orbax_folder(folder: str) -> bool:
    """True for a folder phi4_jax wrote (it has our manifest)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def quantization(folder: str) -> str | None:
    """The kind of quantized weights a phi4_jax Orbax folder holds ("int8"), or None for float weights."""
    return read_manifest(folder).get("quantization")


def write_manifest(folder: str, fields: dict) -> None:
    """Writes the manifest (our format and version, then `fields`); last, once the rest is written."""
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, **fields}, f, indent=2)
        f.write("\n")


def read_manifest(folder: str) -> dict:
    """The manifest of a phi4_jax Orbax folder; CheckpointError when its format version is not the
    one this phi4_jax reads (its parameter tree is laid out differently)."""
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        source = manifest.get("source") or {}
        model = source.get("repo_id") or source.get("path") or "HF_FOLDER"
        revision = (f" --revision {shlex.quote(source['revision'])}"
                    if source.get("repo_id") and source.get("revision") else "")
        raise CheckpointError(
            f"{folder} holds format version {version} of phi4_jax's Orbax checkpoints (written by "
            f"phi4_jax {manifest.get('tool_version', 'unknown')}); this phi4_jax reads version "
            f"{FORMAT_VERSION}. Convert the Hugging Face model again: phi4-jax convert "
            f"--model {shlex.quote(model)}{revision} --output {shlex.quote(folder)} --overwrite")
    return manifest


def _on_devices(abstract: dict) -> dict:
    """`abstract` with a sharding on every leaf (the first device where it has none)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding or device), abstract)


def _check_stored(params_dir: str, abstract: dict) -> None:
    """CheckpointError naming the first tensor the checkpoint lacks or holds in another shape or
    kind than `abstract` (an int8 weight's scales included), before anything is read."""
    try:
        stored = ocp().metadata(params_dir).metadata
    except (ValueError, KeyError, OSError, AttributeError) as e:
        raise CheckpointError(f"cannot read the metadata of {params_dir}: {e}") from None
    if not isinstance(stored, dict):  # Orbax logs why and gives None
        raise CheckpointError(f"cannot read the metadata of {params_dir}: it holds no parameter tree")
    stored = traverse_util.flatten_dict(stored)
    stored = {tuple(map(str, k)): v for k, v in stored.items()}
    for key, want in traverse_util.flatten_dict(abstract).items():
        name = ".".join(map(str, key))
        have = stored.get(tuple(map(str, key)))
        if have is None:
            raise CheckpointError(f"{params_dir} has no tensor {name}" + (
                " (the int8 scales of its weight)" if key[-1] == "scale" else "") + "; convert the model again")
        if tuple(have.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {name} in {params_dir} has shape {tuple(have.shape)}; the model's "
                                  f"config.json implies {tuple(want.shape)}")
        if (jnp.dtype(have.dtype) == jnp.int8) != (jnp.dtype(want.dtype) == jnp.int8):
            raise CheckpointError(f"tensor {name} in {params_dir} is {jnp.dtype(have.dtype).name}; the manifest's "
                                  f"quantization implies {jnp.dtype(want.dtype).name}")


def restore_params(folder: str, abstract: dict, wanted: set | None = None) -> dict:
    """The parameter tree of an Orbax folder, restored into `abstract`'s shapes and dtypes (a pure
    dict of `ShapeDtypeStruct`s), onto its shardings when it has them (each device reads its own
    block; default: the first device). `wanted`: only these keys of the flattened tree."""
    read_manifest(folder)
    params_dir = os.path.abspath(os.path.join(folder, PARAMS))  # Orbax reads absolute paths only
    if not os.path.isdir(params_dir):
        raise ModelNotFoundError(f"{params_dir} is missing; the folder is not a complete phi4_jax checkpoint")
    abstract = _on_devices(abstract)
    _check_stored(params_dir, abstract)
    if wanted is not None:
        v1 = ocp()
        flat = traverse_util.flatten_dict(abstract)
        abstract = traverse_util.unflatten_dict({k: (v if k in wanted else v1.PLACEHOLDER) for k, v in flat.items()})
    try:
        params = ocp().load(params_dir, abstract)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot restore {params_dir}: {e}") from None
    if wanted is None:
        return params
    return traverse_util.unflatten_dict({k: v for k, v in traverse_util.flatten_dict(params).items() if k in wanted})
