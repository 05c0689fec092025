"""Hugging Face safetensors <-> our parameter tree: names, fused splits, head axes, tied head, dtypes.

HF stores every projection as `weight[out, in]`, with q/k/v fused in `qkv_proj` (rows
`[q; k; v]`, heads contiguous) and gate/up fused in `gate_up_proj` (rows `[gate; up]`). Ours keep
that `(out..., in...)` layout (no transposes) with heads as their own axis, and separate (so a
tensor-parallel split never straddles a fused boundary). `_layer_table` is the one place that says how.
Reading streams one tensor at a time, each device reading only its own block; writing
(`write_hf_weights`, `save_hf`) fuses the parameters back into HF's tensors and shards.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can return it)
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from phi4_jax.checkpoints.output import atomic_folder, check_output
from phi4_jax.config import Phi4Config
from phi4_jax.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError
from phi4_jax.model import int8
from phi4_jax.parallel.heads import repeat_kv_heads, stored_heads

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that only a pickle loader can read: never opened (unpickling runs arbitrary code).
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SAFETENSORS_FLOATS = {"F16": np.dtype("float16"), "BF16": np.dtype("bfloat16"),
                      "F32": np.dtype("float32"), "F64": np.dtype("float64")}


Index = tuple[slice, ...]  # a block of an array: one `slice(start, stop)` per dimension


@dataclasses.dataclass(frozen=True)
class Layout:
    """How HF `[out, in]` rows become one of our parameters, and back.

    `read(get, index)` makes the block `index` of our parameter from `get(hf_index)`, which reads a
    block of the HF rows, so a device can load its shard without the whole tensor being read.
    """

    read: Callable[[Callable[[Index], np.ndarray], Index], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda get, index: get(index), lambda p: p)


def _heads_out(d: int, repeat: int) -> Layout:
    """[heads*d, e] <-> [heads*repeat, d, e]: the output rows split into heads, each repeated
    `repeat` times in a row (GQA on a mesh whose tensor axis does not divide the KV heads; see
    `parallel/heads.py`)."""
    def read(get, index):
        h, dim, e = index
        stored = stored_heads(h, repeat)  # the stored heads covering h
        rows = get((slice(stored.start * d, stored.stop * d), e)).reshape(-1, d, e.stop - e.start)
        return (rows if repeat == 1 else repeat_kv_heads(rows, repeat, h))[:, dim]

    def to_hf(p):
        heads, _, e = p.shape
        return p[::repeat].reshape(heads // repeat * d, e)

    return Layout(read, to_hf)


def _heads_in(d: int) -> Layout:
    """[e, n*d] <-> [e, n, d]: the input columns split into heads."""
    def read(get, index):
        e, n, dim = index
        cols = get((e, slice(n.start * d, n.stop * d)))
        return cols.reshape(e.stop - e.start, n.stop - n.start, d)[:, :, dim]

    return Layout(read, lambda p: p.reshape(p.shape[0], p.shape[1] * d))


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


@dataclasses.dataclass(frozen=True)
class Target:
    """One of our parameters made from consecutive rows of an HF tensor (all rows if `rows` is None)."""

    path: str
    rows: int | None
    layout: Layout
    shape: tuple[int, ...]  # of our parameter


def _layer_table(c: Phi4Config, kv_repeat: int) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
    """Per-layer HF tensors: name -> (HF shape, the parameters its rows become, in row order)."""
    e, n, kv, d, i = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                      c.intermediate_size)
    kv_out = kv * kv_repeat
    return {
        "self_attn.qkv_proj.weight": (((n + 2 * kv) * d, e), [
            Target("self_attn.q_proj.weight", n * d, _heads_out(d, 1), (n, d, e)),
            Target("self_attn.k_proj.weight", kv * d, _heads_out(d, kv_repeat), (kv_out, d, e)),
            Target("self_attn.v_proj.weight", kv * d, _heads_out(d, kv_repeat), (kv_out, d, e)),
        ]),
        "self_attn.o_proj.weight": ((e, n * d), [Target("self_attn.o_proj.weight", None, _heads_in(d), (e, n, d))]),
        "mlp.gate_up_proj.weight": ((2 * i, e), [
            Target("mlp.gate_proj.weight", i, SAME, (i, e)),
            Target("mlp.up_proj.weight", i, SAME, (i, e)),
        ]),
        "mlp.down_proj.weight": ((e, i), [Target("mlp.down_proj.weight", None, SAME, (e, i))]),
        "input_layernorm.weight": ((e,), [Target("input_layernorm.weight", None, SAME, (e,))]),
        "post_attention_layernorm.weight": ((e,), [Target("post_attention_layernorm.weight", None, SAME, (e,))]),
    }


def hf_tensors(config: Phi4Config, kv_repeat: int = 1) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
    """Every tensor an HF checkpoint of `config` holds, in HF's order: name -> (shape, targets).
    `kv_repeat` > 1 makes the k/v weights with each KV head repeated (a model on a mesh)."""
    c = config
    vocab = (c.vocab_size, c.hidden_size)
    table = {"model.embed_tokens.weight": (vocab, [Target("model.embed_tokens.weight", None, SAME, vocab)])}
    for layer in range(c.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, (shape, targets) in _layer_table(c, kv_repeat).items():
            table[prefix + name] = (shape, [dataclasses.replace(t, path=prefix + t.path) for t in targets])
    table["model.norm.weight"] = ((c.hidden_size,), [Target("model.norm.weight", None, SAME, (c.hidden_size,))])
    if not c.tie_word_embeddings:
        table["lm_head.weight"] = (vocab, [Target("lm_head.weight", None, SAME, vocab)])
    return table


def row_blocks(shape: tuple[int, ...], targets: list[Target]) -> list[tuple[Target, int, int]]:
    """Each target with the first and last + 1 rows of the HF tensor it is made from."""
    blocks, start = [], 0
    for t in targets:
        stop = shape[0] if t.rows is None else start + t.rows
        blocks.append((t, start, stop))
        start = stop
    return blocks


def split_hf_tensor(tensor: np.ndarray, targets: list[Target]) -> dict[str, np.ndarray]:
    """An HF tensor's rows as our parameters."""
    return {t.path: t.layout.read(lambda index, rows=tensor[start:stop]: rows[index], full_index(t.shape))
            for t, start, stop in row_blocks(tensor.shape, targets)}


def fuse_hf_tensor(params: dict[str, np.ndarray], targets: list[Target]) -> np.ndarray:
    """The inverse of `split_hf_tensor`: our parameters back into one HF tensor."""
    parts = [t.layout.to_hf(params[t.path]) for t in targets]
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))


def _ignorable(name: str, config: Phi4Config) -> bool:
    """Tensors some checkpoints carry that hold no parameter of ours."""
    if name.endswith("rotary_emb.inv_freq"):  # a buffer older exports saved
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"  # a saved copy of the tie


def tensor_files(folder: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file holding it (single file or sharded)."""
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index "
                                  f"(JSON with a 'weight_map'): {e!r}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index_path} is not a valid safetensors index: its 'weight_map' "
                                  "must map tensor names to shard file names")
        outside = sorted({s for s in weight_map.values() if s in ("", ".", "..") or os.path.basename(s) != s})
        if outside:
            raise CheckpointError(f"{index_path} names shard(s) outside its folder: {_some(outside)}; "
                                  "shards must be plain file names beside the index")
        files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
        missing = sorted({os.path.basename(p) for p in files.values() if not os.path.exists(p)})
        if missing:
            raise ModelNotFoundError(f"{index_path} lists shard(s) that are not in {folder}: "
                                     f"{', '.join(missing)}; download them again")
        return files
    if os.path.exists(single_path):
        with _open(single_path) as f:
            return {name: single_path for name in f.keys()}
    pickles = sorted({os.path.basename(p) for pattern in PICKLE_PATTERNS
                      for p in glob.glob(os.path.join(folder, pattern))})
    if pickles:
        raise UnsafeCheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); phi4_jax never unpickles "
            "(it can run arbitrary code). Get the safetensors version of the model, or convert it "
            "where you trust the file: `model.save_pretrained(dir, safe_serialization=True)`")
    raise ModelNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt "
                              f"download?): {e}") from None


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One tensor of an HF checkpoint, as its file's header describes it."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: np.dtype
    targets: list[Target]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def inspect_hf(folder: str, config: Phi4Config) -> list[SourceTensor]:
    """Reads the safetensors headers (no weights) and checks that the tensors are exactly the
    config's: names, shapes and float dtypes. Returns them grouped by file, in HF order within each."""
    files = tensor_files(folder)
    expected = hf_tensors(config)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(n for n in set(files) - set(expected) if not _ignorable(n, config))
    if missing or unexpected:
        lines = [f"the weights in {folder} do not match its config.json"]
        if missing:
            lines.append(f"missing {len(missing)} tensor(s): {_some(missing)}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): {_some(unexpected)}")
        raise CheckpointError("; ".join(lines))
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    sources = []
    for path, names in sorted(by_file.items()):
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path} does not hold tensor {name}, although "
                                          f"{INDEX_FILE} says it does")
                shape, targets = expected[name]
                header = f.get_slice(name)
                found = tuple(header.get_shape())
                if found != shape:
                    raise CheckpointError(f"tensor {name} in {path} has shape {found}; "
                                          f"config.json implies {shape}")
                dtype = SAFETENSORS_FLOATS.get(header.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"tensor {name} in {path} has dtype {header.get_dtype()}; "
                                          f"phi4_jax reads {'/'.join(SAFETENSORS_FLOATS)} weights")
                sources.append(SourceTensor(name, path, shape, dtype, targets))
    return sources


def read_hf_params(sources: list[SourceTensor], dtype, progress: bool = True,
                   ) -> Iterator[tuple[SourceTensor, dict[str, np.ndarray]]]:
    """Streams the tensors `inspect_hf` found, one at a time, as `(source, {our path: host array
    in dtype})` (None: the checkpoint's own); only one source tensor (and its parts) is held at once."""
    with tqdm(total=sum(s.nbytes for s in sources), desc="Reading weights", unit="B",
              unit_scale=True, disable=None if progress else True) as bar:
        for source in sources:
            # One open per tensor: the file is memory-mapped, and every page read stays in this
            # process's RSS until it is unmapped.
            with _open(source.file) as f:
                try:
                    tensor = f.get_tensor(source.name)
                except (SafetensorError, TypeError, ValueError) as e:
                    raise CheckpointError(f"cannot read tensor {source.name} from {source.file}: {e}") from None
            parts = {p: np.ascontiguousarray(a if dtype is None else a.astype(dtype, copy=False))
                     for p, a in split_hf_tensor(tensor, source.targets).items()}
            del tensor
            yield source, parts
            bar.update(source.nbytes)


def _some(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hf_params(folder: str, config: Phi4Config, abstract: dict, shardings: dict | None = None,
                   kv_repeat: int = 1, progress: bool = True) -> dict:
    """Fills a pure-dict parameter tree of `ShapeDtypeStruct`s (`nnx.to_pure_dict` of the abstract
    model's state) with the folder's weights, tensor by tensor.

    `shardings` (a pure dict of `Sharding`s; default: everything on the first device) places each
    parameter as it is read: every device reads only its own block of the safetensors file
    (`jax.make_array_from_callback`), so no process holds more than one tensor on the host.
    `kv_repeat`: repeat each KV head this many times (`heads.kv_repeat`).
    """
    wanted = traverse_util.flatten_dict(abstract)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placed = dict.fromkeys(wanted, device)
    else:
        placed = traverse_util.flatten_dict(shardings)
    sources = inspect_hf(folder, config)
    table = hf_tensors(config, kv_repeat)
    filled = {}
    with tqdm(total=sum(s.nbytes for s in sources), desc="Loading weights", unit="B", unit_scale=True,
              disable=None if progress else True) as bar:
        for source in sources:
            targets = table[source.name][1]
            with _open(source.file) as f:  # one open per tensor: see read_hf_params
                rows = f.get_slice(source.name)
                for target, start, _ in row_blocks(source.shape, targets):
                    key = param_key(target.path)
                    # A mismatch here is a bug in the mapping table, not in the user's files.
                    assert target.shape == wanted[key].shape, (target.path, target.shape, wanted[key].shape)
                    scale = int8_scale_key(key)
                    if scale in wanted:  # int8: each output channel's scale needs all its inputs
                        weight = target.layout.read(_reader(source, rows, start), full_index(target.shape))
                        q, s = int8.quantize_rows(weight, len(wanted[scale].shape))
                        del weight
                        filled[key] = jax.make_array_from_callback(q.shape, placed[key], lambda i, q=q: q[i])
                        filled[scale] = jax.make_array_from_callback(s.shape, placed[scale], lambda i, s=s: s[i])
                    else:
                        filled[key] = _place(source, rows, start, target, wanted[key].dtype, placed[key])
            bar.update(source.nbytes)
    assert filled.keys() == wanted.keys(), set(filled) ^ set(wanted)
    return traverse_util.unflatten_dict(filled)


def _place(source: SourceTensor, rows, start: int, target: Target, dtype, sharding) -> jax.Array:
    """One parameter on its devices; devices holding the same block share one read of it."""
    blocks: dict[tuple, np.ndarray] = {}
    get = _reader(source, rows, start)

    def block(index: Index) -> np.ndarray:
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, target.shape))
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            blocks[key] = np.ascontiguousarray(target.layout.read(get, index).astype(dtype, copy=False))
        return blocks[key]

    return jax.make_array_from_callback(target.shape, sharding, block)


def _reader(source: SourceTensor, rows, start: int) -> Callable[[Index], np.ndarray]:
    """Reads a block of the HF rows from `start` on (`Layout.read`'s `get`) from an open safetensors slice."""
    def get(hf_index: Index) -> np.ndarray:
        first = hf_index[0]
        try:
            return rows[(slice(start + first.start, start + first.stop), *hf_index[1:])]
        except (SafetensorError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {source.name} from {source.file}: {e}") from None

    return get


def int8_scale_key(key: tuple) -> tuple:
    """The key of the scales of the weight at `key`, in a quantized model's pure-dict tree."""
    return (*key[:-1], "scale")


def param_key(path: str) -> tuple:
    """"model.layers.3.mlp.up_proj.weight" -> the key tuple of the pure-dict parameter tree."""
    return tuple(int(part) if part.isdigit() else part for part in path.split("."))


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
        write_hf_weights(tmp, config, dtype, float("inf"), lambda wanted: {k: flat[k] for k in wanted}, False)
    return os.path.abspath(output)


def write_hf_weights(tmp: str, config: Phi4Config, dtype, max_shard_bytes, read: Callable[[set], dict],
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
