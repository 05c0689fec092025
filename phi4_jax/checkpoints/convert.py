"""Conversion: HF -> Orbax (planned from headers, streamed one tensor at a time, verified), and back.

Everything is written into a hidden sibling folder and renamed onto the output at the very end
(`output.atomic_folder`), so an interrupted run leaves no output (or the previous one intact).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import datetime
import hashlib
import importlib.metadata
import os
import re
import shutil
from collections.abc import Callable

import numpy as np
from flax import nnx, traverse_util

from phi4_jax.checkpoints import orbax
from phi4_jax.checkpoints.hf import (INDEX_FILE, SourceTensor, inspect_hf, int8_scale_key, param_key,
                                     read_hf_params, write_hf_weights)
from phi4_jax.checkpoints.hub import ModelSource
from phi4_jax.checkpoints.output import atomic_folder, check_output, check_space, disk_full_is_typed, gb
from phi4_jax.config import Phi4Config
from phi4_jax.errors import CheckpointError, ConfigError, ModelNotFoundError
from phi4_jax.model import int8
from phi4_jax.model.phi4 import abstract_model
from phi4_jax.parallel.rules import placed_shapes

# Copied as they are: what tokenizers, chat templates and generation need.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "chat_template.jinja", "chat_template.json", "LICENSE")
DTYPES = ("bfloat16", "float16", "float32")


# Planning.
@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will read and write, known from headers alone."""

    source: ModelSource
    config: Phi4Config
    tensors: list[SourceTensor]
    dtype: np.dtype  # of the saved float parameters
    quantize: str | None = None  # "int8": projections and tables int8, with float32 scales per row

    def _output_bytes(self, s: SourceTensor) -> int:
        if self.quantize and len(s.shape) == 2:  # int8 values, a float32 scale per output row
            return int(np.prod(s.shape)) + 4 * s.shape[0]
        return int(np.prod(s.shape)) * self.dtype.itemsize

    @property
    def output_bytes(self) -> int:
        return sum(map(self._output_bytes, self.tensors))

    @property
    def largest_output_bytes(self) -> int:
        return max(map(self._output_bytes, self.tensors))

    @property
    def peak_ram_bytes(self) -> int:
        """The batch being saved and the one being read (each about half the largest tensor), the
        tensor being read and its cast/laid-out copy, plus the runtime (~1 GB); measured 3.13 GB
        against this 4.76 GB converting Phi-4-mini."""
        largest_read = max(s.nbytes for s in self.tensors)
        return largest_read + 2 * self.largest_output_bytes + 2**30

    def describe(self) -> str:
        rows = [f"source: {self.source.folder}" + (f" ({self.source.repo_id}@{self.source.revision})"
                                                   if self.source.repo_id else ""),
                f"{'tensor':58} {'shape':>16} {'from':>8} -> {'to':<8}"]
        for s in self.tensors:
            stored = self.quantize if self.quantize and len(s.shape) == 2 else self.dtype.name
            rows.append(f"{s.name:58} {'x'.join(map(str, s.shape)):>16} {s.dtype.name:>8} -> {stored:<8}")
        kind = f"{self.quantize} (float32 scales; norms {self.dtype.name})" if self.quantize else self.dtype.name
        rows.append(f"{len(self.tensors)} tensors, {gb(sum(s.nbytes for s in self.tensors))} read, "
                    f"{gb(self.output_bytes)} written as {kind}; "
                    f"estimated peak RAM {gb(self.peak_ram_bytes)}")
        return "\n".join(rows)


def plan_conversion(source: ModelSource, dtype: str = "auto", quantize: str | None = None) -> ConversionPlan:
    """Checks the source folder (config and safetensors headers) and decides the output dtype:
    `auto` keeps the checkpoint's own (its tensors' dtype). `quantize="int8"` stores the projections
    and vocabulary tables as int8 with per-channel scales (`model/int8.py`), quantized as they stream."""
    int8.check_kind(quantize)
    if orbax.is_orbax_folder(source.folder):
        kind = orbax.quantization(source.folder)
        raise ConfigError(f"{source.folder} is a phi4_jax Orbax folder"
                          + (f" of {kind} weights, quantized already" if kind else "")
                          + "; convert the Hugging Face folder it came from")
    config = Phi4Config.from_json(source.folder)
    tensors = inspect_hf(source.folder, config)
    if dtype == "auto":
        stored = {s.dtype for s in tensors}
        target = stored.pop() if len(stored) == 1 else np.dtype("float32")
    elif dtype in DTYPES:
        target = np.dtype(dtype)
    else:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return ConversionPlan(source, config, tensors, target, quantize)


# HF -> Orbax.
def convert(plan: ConversionPlan, output: str, overwrite: bool = False, progress: bool = True,
            verify: bool = False, on_tensor: Callable[[str], None] | None = None) -> str:
    """Writes the Orbax folder for `plan` at `output`, one source tensor at a time; returns its path.

    `verify` checks, before the output takes its name, that it gives the source's logits.
    `on_tensor(name)` is called after each source tensor is written (progress reporting).
    """
    check_output(output, overwrite, source=plan.source.folder)
    with atomic_folder(output, overwrite) as tmp, disk_full_is_typed(output):
        check_space(tmp, int(plan.output_bytes * 1.05) + 2**20)
        copied = _copy_side_files(plan.source.folder, tmp)
        params_dir = os.path.join(tmp, orbax.PARAMS)
        files = sorted({s.file for s in plan.tensors} | set(copied))
        index = os.path.join(plan.source.folder, INDEX_FILE)
        if os.path.exists(index):
            files.append(index)
        # Hashed beside the reading, in the order it reads them: each file comes from the disk
        # once (the other reader finds it in the page cache), and the hash costs no wall time.
        hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256")
        try:
            described = [hasher.submit(_describe_file, f) for f in files]
            with orbax.ParamsWriter(params_dir) as writer:
                _write_params(plan, writer, progress, on_tensor)
            source_files = {os.path.basename(f): d.result() for f, d in zip(files, described)}
        finally:
            hasher.shutdown(cancel_futures=True)
        orbax.write_manifest(tmp, {
            "tool": "phi4_jax", "tool_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": os.path.abspath(plan.source.folder), "repo_id": plan.source.repo_id,
                       "revision": plan.source.revision},
            "source_files": source_files,
            "dtype": plan.dtype.name, "quantization": plan.quantize, "params": orbax.PARAMS,
            "num_parameters": plan.config.num_parameters,
        })
        if verify:
            verify_logits(plan.source.folder, tmp, plan.dtype, quantize=plan.quantize)
    return os.path.abspath(output)


def _write_params(plan: ConversionPlan, writer: orbax.ParamsWriter, progress: bool,
                  on_tensor: Callable[[str], None] | None) -> None:
    """Streams the source tensors into `writer`, in batches."""
    # Each partial save costs more than the last (Orbax merges metadata), so tensors are
    # written in batches of about half the largest tensor's bytes: one batch being written
    # and one being read keep peak RAM within ~3 largest tensors.
    budget = plan.largest_output_bytes // 2
    pending: dict[tuple, np.ndarray] = {}
    scales = {k: len(v.shape) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(
        abstract_model(plan.config, quantize=plan.quantize)))).items() if k[-1] == "scale"}
    # Quantized from the checkpoint's own values (as `load(..., quantize=)` does), the rest cast.
    for source, parts in read_hf_params(plan.tensors, None if plan.quantize else plan.dtype, progress):
        for path, array in parts.items():
            key = param_key(path)
            if int8_scale_key(key) in scales:
                pending[key], pending[int8_scale_key(key)] = int8.quantize_rows(array, scales[int8_scale_key(key)])
            else:
                pending[key] = np.ascontiguousarray(array.astype(plan.dtype, copy=False))
        del parts
        if sum(a.nbytes for a in pending.values()) >= budget:
            writer.write(traverse_util.unflatten_dict(pending))
            pending = {}
            _return_freed_memory()
        if on_tensor is not None:
            on_tensor(source.name)
    if pending:
        writer.write(traverse_util.unflatten_dict(pending))
    writer.finish()


def verify_logits(reference: str, folder: str, dtype, seq_len: int = 8, seed: int = 0,
                  quantize: str | None = None) -> None:
    """Raises CheckpointError unless `folder` gives exactly `reference`'s logits on a short random
    prompt (both loaded in `dtype`, one after the other to keep one model in memory; the reference
    quantized as it is read, with `quantize`)."""
    from flax import nnx

    from phi4_jax.checkpoints.load import load_model
    from phi4_jax.model.phi4 import forward

    config = Phi4Config.from_json(reference)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (1, seq_len), dtype=np.int32)
    # The jitted forward, one program for both (op by op, each of a model's ~100 ops compiles alone).
    want = np.asarray(forward(*nnx.split(load_model(reference, dtype=dtype, quantize=quantize)), ids))
    got = np.asarray(forward(*nnx.split(load_model(folder, dtype=dtype)), ids))
    if not np.array_equal(want, got):
        diff = np.abs(got.astype(np.float32) - want.astype(np.float32)).max()
        raise CheckpointError(f"verification failed: the converted logits differ from {reference}'s "
                              f"by up to {diff:g}")


def _return_freed_memory() -> None:
    """Hands freed heap memory back to the OS (glibc only). Without it, glibc keeps the buffers of
    each written batch and RSS grows by about a batch per save (measured: 5.3 GB instead of 4.0 GB
    peak converting Phi-4-mini)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, name))  # follows HF-cache symlinks
            copied.append(path)
    return copied


def _describe_file(path: str) -> dict:
    """Size and sha256; in an HF cache, a blob named by its sha256 must match it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    blob = os.path.basename(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", blob) and blob != sha:
        raise CheckpointError(f"{path} is corrupt: the Hugging Face cache names its content sha256 "
                              f"{blob}, the file hashes to {sha}; download it again")
    return {"size": size, "sha256": sha}


def _version() -> str:
    try:
        return importlib.metadata.version("phi4-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Orbax -> HF.
def export_hf(folder: str, output: str, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False, progress: bool = True, dequantize: bool = False) -> str:
    """Writes an HF folder (fused `qkv_proj`/`gate_up_proj`, safetensors shards of at most
    `max_shard_bytes` with an index when there are several) from an Orbax folder. A quantized folder
    is refused unless `dequantize`: then each weight written is `q * scale`, within half a scale
    step of the original, not the original."""
    if not orbax.is_orbax_folder(folder):
        raise ModelNotFoundError(f"{folder} is not a phi4_jax Orbax folder (no {orbax.MANIFEST} from convert)")
    manifest = orbax.read_manifest(folder)
    quantized = manifest.get("quantization")
    if quantized and not dequantize:
        raise ConfigError(f"{folder} holds {quantized} weights, and a Hugging Face folder holds float ones: "
                          "export the float checkpoint it was converted from, or pass --dequantize "
                          "(dequantize=True) to write q * scale (not the original weights)")
    config = Phi4Config.from_json(folder)
    dtype = np.dtype(dtype or manifest["dtype"])
    abstract = placed_shapes(nnx.state(abstract_model(config, param_dtype=dtype, quantize=quantized)))
    stored = traverse_util.flatten_dict(abstract)

    def read(wanted: set) -> dict:  # only these parameters (and their scales), from the Orbax checkpoint
        scales = {int8_scale_key(k) for k in wanted} & stored.keys()
        params = traverse_util.flatten_dict(orbax.restore_params(folder, abstract, wanted | scales))
        return {k: int8.dequantize(np.asarray(v), np.asarray(params[int8_scale_key(k)]))
                if int8_scale_key(k) in scales else v for k, v in params.items() if k in wanted}

    check_output(output, overwrite, source=folder)
    with atomic_folder(output, overwrite) as tmp, disk_full_is_typed(output):
        check_space(tmp, int(config.num_parameters * dtype.itemsize * 1.05))
        _copy_side_files(folder, tmp)
        write_hf_weights(tmp, config, dtype, max_shard_bytes, read, progress)
    return os.path.abspath(output)
