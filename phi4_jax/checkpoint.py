"""Orbax checkpoints of our parameter tree: HF -> Orbax conversion, restore, export back to HF.

An output folder is self-describing:

  DIR/params/          the Orbax checkpoint of the parameter tree (`nnx.to_pure_dict` layout)
  DIR/config.json ...  config, generation config, tokenizer files and chat template, as they were
  DIR/manifest.json    source, per-file size and sha256, dtype, tool version; written last

Everything is written into a hidden sibling folder and renamed onto DIR at the very end, so an
interrupted run leaves DIR absent (or the previous DIR intact); the next run removes its leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from phi4_jax.config import Phi4Config
from phi4_jax.errors import (CheckpointError, ConfigError, ModelNotFoundError, OutOfResourcesError,
                             OutputExistsError)
from phi4_jax.hub import ModelSource
from phi4_jax.weights import (INDEX_FILE, SINGLE_FILE, SourceTensor, fuse_hf_tensor, hf_tensors,
                              inspect_hf, param_key, read_hf_params)

FORMAT = "phi4_jax.orbax"
# 2: projection weights in HF's (out..., in...) layout; 1 had them (in..., out...) as `kernel`s.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARAMS = "params"
# Copied as they are: what tokenizers, chat templates and generation need.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "chat_template.jinja", "chat_template.json", "LICENSE")
DTYPES = ("bfloat16", "float16", "float32")


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp  # partial saves: one tensor per call

    return ocp


def is_orbax_folder(folder: str) -> bool:
    """True for a folder this module wrote (it has our manifest)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# Planning.
@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will read and write, known from headers alone."""

    source: ModelSource
    config: Phi4Config
    tensors: list[SourceTensor]
    dtype: np.dtype  # of the saved parameters

    @property
    def output_bytes(self) -> int:
        return sum(int(np.prod(s.shape)) for s in self.tensors) * self.dtype.itemsize

    @property
    def largest_output_bytes(self) -> int:
        return max(int(np.prod(s.shape)) for s in self.tensors) * self.dtype.itemsize

    @property
    def peak_ram_bytes(self) -> int:
        """A batch of tensors waiting to be written (up to the largest tensor's size), the tensor
        being read and its cast/laid-out copy, plus the runtime (~1 GB)."""
        largest_read = max(s.nbytes for s in self.tensors)
        return largest_read + 2 * self.largest_output_bytes + 2**30

    def describe(self) -> str:
        rows = [f"source: {self.source.folder}" + (f" ({self.source.repo_id}@{self.source.revision})"
                                                   if self.source.repo_id else ""),
                f"{'tensor':58} {'shape':>16} {'from':>8} -> {'to':<8}"]
        for s in self.tensors:
            rows.append(f"{s.name:58} {'x'.join(map(str, s.shape)):>16} {s.dtype.name:>8} -> {self.dtype.name:<8}")
        rows.append(f"{len(self.tensors)} tensors, {_gb(sum(s.nbytes for s in self.tensors))} read, "
                    f"{_gb(self.output_bytes)} written as {self.dtype.name}; "
                    f"estimated peak RAM {_gb(self.peak_ram_bytes)}")
        return "\n".join(rows)


def _gb(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plan_conversion(source: ModelSource, dtype: str = "auto") -> ConversionPlan:
    """Checks the source folder (config and safetensors headers) and decides the output dtype:
    `auto` keeps the checkpoint's own (its tensors' dtype)."""
    config = Phi4Config.from_json(source.folder)
    tensors = inspect_hf(source.folder, config)
    if dtype == "auto":
        stored = {s.dtype for s in tensors}
        target = stored.pop() if len(stored) == 1 else np.dtype("float32")
    elif dtype in DTYPES:
        target = np.dtype(dtype)
    else:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return ConversionPlan(source, config, tensors, target)


# Atomic output.
@contextlib.contextmanager
def atomic_folder(output: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh hidden sibling of `output` to write into; renames it onto `output` when the
    block finishes, and removes it when the block raises. With `overwrite`, a previous `output`
    is kept until the new one is complete."""
    output = check_output(output, overwrite)
    parent, name = os.path.split(output)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(output):
            os.rename(output, old)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(output):
            os.rename(old, output)
        raise
    _remove(old)


def check_output(output: str, overwrite: bool, source: str | None = None, clean: bool = True) -> str:
    """The absolute output path, once it is known that it can be written (and would not replace
    or sit inside `source`). With `clean`, first removes what killed runs left beside it (putting
    back an old output that one had moved aside)."""
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    if not os.path.isdir(parent):
        raise ModelNotFoundError(f"the parent folder of {output} does not exist")
    if clean:
        _remove_leftovers(parent, name)
    if source is not None:
        src = os.path.realpath(source)
        real = os.path.realpath(output)
        if real == src or real.startswith(src + os.sep) or src.startswith(real + os.sep):
            raise OutputExistsError(f"{output} would overwrite or nest in the source {source}; "
                                    "choose another output folder")
    if os.path.lexists(output) and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it (it is kept "
                                "until the new one is complete)")
    return output


def _remove_leftovers(parent: str, name: str) -> None:
    """Removes what runs killed mid-way left beside `name` (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)$")
    for entry in sorted(os.listdir(parent)):
        match = pattern.match(entry)
        if not match or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "old" and not os.path.lexists(os.path.join(parent, name)):
            os.rename(path, os.path.join(parent, name))  # killed between the two renames
        else:
            _remove(path)


def _remove(path: str) -> None:
    """Removes a folder tree, or the file or link an overwritten OUTPUT was (never a link's target)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_space(folder: str, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutOfResourcesError(f"{folder} has {_gb(free)} free; the output needs about {_gb(needed)}")


@contextlib.contextmanager
def _disk_full_is_typed(where: str):
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfResourcesError(f"no space left while writing {where}") from None
        raise


# HF -> Orbax.
def convert(plan: ConversionPlan, output: str, overwrite: bool = False, progress: bool = True,
            verify: bool = False, on_tensor: Callable[[str], None] | None = None) -> str:
    """Writes the Orbax folder for `plan` at `output`, one source tensor at a time; returns its path.

    `verify` checks, before the output takes its name, that it gives the source's logits.
    `on_tensor(name)` is called after each source tensor is written (progress reporting).
    """
    check_output(output, overwrite, source=plan.source.folder)
    with atomic_folder(output, overwrite) as tmp, _disk_full_is_typed(output):
        _check_space(tmp, int(plan.output_bytes * 1.05) + 2**20)
        copied = _copy_side_files(plan.source.folder, tmp)
        ocp = _ocp()
        params_dir = os.path.join(tmp, PARAMS)
        # Each partial save costs more than the last (Orbax merges metadata), so tensors are
        # written in batches of up to one largest tensor's bytes: peak RAM stays ~3 largest tensors.
        budget = plan.largest_output_bytes
        pending: dict[tuple, np.ndarray] = {}
        for source, parts in read_hf_params(plan.tensors, plan.dtype, progress):
            pending.update((param_key(path), array) for path, array in parts.items())
            del parts
            if sum(a.nbytes for a in pending.values()) >= budget:
                ocp.partial.save(params_dir, traverse_util.unflatten_dict(pending))
                pending.clear()
                _return_freed_memory()
            if on_tensor is not None:
                on_tensor(source.name)
        if pending:
            ocp.partial.save(params_dir, traverse_util.unflatten_dict(pending))
        pending.clear()
        ocp.partial.finalize(params_dir)
        files = sorted({s.file for s in plan.tensors} | set(copied))
        index = os.path.join(plan.source.folder, INDEX_FILE)
        if os.path.exists(index):
            files.append(index)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "tool": "phi4_jax", "tool_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": os.path.abspath(plan.source.folder), "repo_id": plan.source.repo_id,
                       "revision": plan.source.revision},
            "source_files": {os.path.basename(f): _describe_file(f, progress) for f in files},
            "dtype": plan.dtype.name, "params": PARAMS,
            "num_parameters": plan.config.num_parameters,
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if verify:
            verify_logits(plan.source.folder, tmp, plan.dtype)
    return os.path.abspath(output)


def verify_logits(reference: str, folder: str, dtype, seq_len: int = 8, seed: int = 0) -> None:
    """Raises CheckpointError unless `folder` gives exactly `reference`'s logits on a short random
    prompt (both loaded in `dtype`, one after the other to keep one model in memory)."""
    from phi4_jax.loading import load

    config = Phi4Config.from_json(reference)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (1, seq_len), dtype=np.int32)
    want = np.asarray(load(reference, dtype=dtype)[0](ids))
    got = np.asarray(load(folder, dtype=dtype)[0](ids))
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


def _describe_file(path: str, progress: bool) -> dict:
    """Size and sha256; in an HF cache, a blob named by its sha256 must match it."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, desc=f"sha256 {os.path.basename(path)}", unit="B",
                                     unit_scale=True, disable=None if progress else True) as bar:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    sha = digest.hexdigest()
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


# Orbax -> parameters.
def _abstract_with_sharding(abstract: dict) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding or device),
                        abstract)


def read_manifest(folder: str) -> dict:
    """The manifest of an Orbax folder this module wrote; CheckpointError when its format version
    is not the one this phi4_jax reads (its parameter tree is laid out differently)."""
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        source = manifest.get("source") or {}
        model = source.get("repo_id") or source.get("path") or "HF_FOLDER"
        revision = f" --revision {shlex.quote(source['revision'])}" if source.get("repo_id") and source.get("revision") else ""
        raise CheckpointError(
            f"{folder} holds format version {version} of phi4_jax's Orbax checkpoints (written by "
            f"phi4_jax {manifest.get('tool_version', 'unknown')}); this phi4_jax reads version "
            f"{FORMAT_VERSION}. Convert the Hugging Face model again: python convert/hf_to_orbax.py "
            f"--model {shlex.quote(model)}{revision} --output {shlex.quote(folder)} --overwrite")
    return manifest


def restore_params(folder: str, abstract: dict) -> dict:
    """The parameter tree of an Orbax folder, restored into `abstract`'s shapes and dtypes, and
    onto its shardings when it has them (each device reads its own block; default: device 0)."""
    read_manifest(folder)
    params_dir = os.path.join(folder, PARAMS)
    if not os.path.isdir(params_dir):
        raise ModelNotFoundError(f"{params_dir} is missing; the folder is not a complete phi4_jax checkpoint")
    try:
        return _ocp().load(params_dir, _abstract_with_sharding(abstract))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot restore {params_dir}: {e}") from None


# Orbax -> HF.
def export_hf(folder: str, output: str, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False, progress: bool = True) -> str:
    """Writes an HF folder (fused `qkv_proj`/`gate_up_proj`, safetensors shards of at most
    `max_shard_bytes` with an index when there are several) from an Orbax folder."""
    if not is_orbax_folder(folder):
        raise ModelNotFoundError(f"{folder} is not a phi4_jax Orbax folder (no {MANIFEST} from convert)")
    manifest = read_manifest(folder)
    config = Phi4Config.from_json(folder)
    dtype = np.dtype(dtype or manifest["dtype"])
    ocp = _ocp()
    abstract = _abstract_params(config, dtype)

    def read(wanted: set) -> dict:  # only these parameters, from the Orbax checkpoint
        partial = {k: (v if k in wanted else ocp.PLACEHOLDER) for k, v in abstract.items()}
        restored = traverse_util.flatten_dict(ocp.load(os.path.join(folder, PARAMS),
                                                       traverse_util.unflatten_dict(partial)))
        return {k: v for k, v in restored.items() if k in wanted}

    check_output(output, overwrite, source=folder)
    with atomic_folder(output, overwrite) as tmp, _disk_full_is_typed(output):
        _check_space(tmp, int(config.num_parameters * dtype.itemsize * 1.05))
        _copy_side_files(folder, tmp)
        _write_hf_weights(tmp, config, dtype, max_shard_bytes, read, progress)
    return os.path.abspath(output)


def save_hf(params: dict, files: dict[str, str], output: str, dtype=None, overwrite: bool = False) -> str:
    """Writes an HF folder from parameters in memory (a pure-dict tree, `nnx.to_pure_dict` of the
    model's state) and side files given as text (`files["config.json"]` is required), atomically.
    Weights go to one `model.safetensors`; `dtype` (default: the parameters') is what is stored."""
    config = Phi4Config.from_dict(json.loads(files["config.json"]))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    dtype = np.dtype(dtype or next(iter(flat.values())).dtype)
    check_output(output, overwrite)
    with atomic_folder(output, overwrite) as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        _write_hf_weights(tmp, config, dtype, float("inf"), lambda wanted: {k: flat[k] for k in wanted}, False)
    return os.path.abspath(output)


def _write_hf_weights(tmp: str, config: Phi4Config, dtype, max_shard_bytes, read: Callable[[set], dict],
                      progress: bool) -> None:
    """The HF safetensors of `config`'s tensors in `dtype`, shard by shard; `read(keys)` returns the
    parameters (pure-dict keys -> arrays) that a shard needs."""
    tensors = hf_tensors(config)
    shards, size = [[]], 0
    for name, (shape, _) in tensors.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for shard, file_name in zip(tqdm(shards, desc="Writing shards", disable=None if progress else True), names):
        wanted = {param_key(t.path) for name in shard for t in tensors[name][1]}
        params = {".".join(map(str, k)): np.asarray(v).astype(dtype, copy=False) for k, v in read(wanted).items()}
        arrays = {name: fuse_hf_tensor(params, tensors[name][1]) for name in shard}
        del params
        save_file(arrays, os.path.join(tmp, file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    if len(shards) > 1:
        total = sum(int(np.prod(shape)) * dtype.itemsize for shape, _ in tensors.values())
        with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")


def _abstract_params(config: Phi4Config, dtype) -> dict:
    """Flat `{key: ShapeDtypeStruct}` of the parameter tree, placed on the default device."""
    from flax import nnx

    from phi4_jax.model import abstract_model

    state = nnx.to_pure_dict(nnx.state(abstract_model(config, param_dtype=dtype)))
    return traverse_util.flatten_dict(_abstract_with_sharding(state))
