"""Hugging Face safetensors -> our parameter tree: names, fused splits, transposes, tied head, dtypes.

HF stores every projection as `weight[out, in]`, with q/k/v fused in `qkv_proj` (rows
`[q; k; v]`, heads contiguous) and gate/up fused in `gate_up_proj` (rows `[gate; up]`). Our
kernels are `(in..., out...)` with heads as their own axis, and separate (so a tensor-parallel
split never straddles a fused boundary). `_layer_table` is the one place that says how.
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
from tqdm.auto import tqdm

from phi4_jax.config import Phi4Config
from phi4_jax.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that only a pickle loader can read: never opened (unpickling runs arbitrary code).
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where (part of) an HF tensor goes: our parameter path, the HF rows it takes, and how the
    `[out, in]` rows are laid out as our kernel."""

    path: str
    rows: slice | None
    layout: Callable[[np.ndarray], np.ndarray]


def _layer_table(c: Phi4Config) -> dict[str, list[Target]]:
    e, n, kv, d, i = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                      c.intermediate_size)
    q_rows, kv_rows = n * d, kv * d

    def in_heads(heads):  # [heads*d, e] -> [e, heads, d]
        return lambda w: w.T.reshape(e, heads, d)

    def transpose(w):  # [out, in] -> [in, out]
        return w.T

    def same(w):
        return w

    return {
        "self_attn.qkv_proj.weight": [
            Target("self_attn.q_proj.kernel", slice(0, q_rows), in_heads(n)),
            Target("self_attn.k_proj.kernel", slice(q_rows, q_rows + kv_rows), in_heads(kv)),
            Target("self_attn.v_proj.kernel", slice(q_rows + kv_rows, q_rows + 2 * kv_rows), in_heads(kv)),
        ],
        "self_attn.o_proj.weight": [  # [e, n*d] -> [n, d, e]
            Target("self_attn.o_proj.kernel", None, lambda w: w.T.reshape(n, d, e))],
        "mlp.gate_up_proj.weight": [
            Target("mlp.gate_proj.kernel", slice(0, i), transpose),
            Target("mlp.up_proj.kernel", slice(i, 2 * i), transpose),
        ],
        "mlp.down_proj.weight": [Target("mlp.down_proj.kernel", None, transpose)],
        "input_layernorm.weight": [Target("input_layernorm.weight", None, same)],
        "post_attention_layernorm.weight": [Target("post_attention_layernorm.weight", None, same)],
    }


def hf_tensors(config: Phi4Config) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
    """Every tensor an HF checkpoint of `config` holds: name -> (shape, where it goes)."""
    c = config
    e, d = c.hidden_size, c.head_dim
    layer_shapes = {
        "self_attn.qkv_proj.weight": ((c.num_attention_heads + 2 * c.num_key_value_heads) * d, e),
        "self_attn.o_proj.weight": (e, c.num_attention_heads * d),
        "mlp.gate_up_proj.weight": (2 * c.intermediate_size, e),
        "mlp.down_proj.weight": (e, c.intermediate_size),
        "input_layernorm.weight": (e,),
        "post_attention_layernorm.weight": (e,),
    }
    table = _layer_table(c)
    same = lambda w: w  # noqa: E731
    tensors = {
        "model.embed_tokens.weight": ((c.vocab_size, e), [Target("model.embed_tokens.weight", None, same)]),
        "model.norm.weight": ((e,), [Target("model.norm.weight", None, same)]),
    }
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = ((c.vocab_size, e), [Target("lm_head.weight", None, same)])
    for layer in range(c.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, targets in table.items():
            tensors[prefix + name] = (layer_shapes[name], [
                dataclasses.replace(t, path=prefix + t.path) for t in targets])
    return tensors


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


def read_hf_params(folder: str, config: Phi4Config, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Streams `(our parameter path, host array in dtype)` pairs from an HF folder, one source
    tensor at a time, after checking that the tensor names and shapes are exactly the config's."""
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
    dtype = np.dtype(dtype)
    with tqdm(total=len(expected), desc="Loading weights", unit="tensor", disable=None) as bar:
        for path, names in sorted(by_file.items()):
            with _open(path) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{path} does not hold tensor {name}, although "
                                              f"{INDEX_FILE} says it does")
                    shape, targets = expected[name]
                    found = tuple(f.get_slice(name).get_shape())
                    if found != shape:
                        raise CheckpointError(f"tensor {name} in {path} has shape {found}; "
                                              f"config.json implies {shape}")
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, TypeError, ValueError) as e:
                        raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None
                    if tensor.dtype.name not in FLOAT_DTYPES:
                        raise CheckpointError(f"tensor {name} in {path} has dtype {tensor.dtype}; "
                                              f"phi4_jax reads {'/'.join(FLOAT_DTYPES)} weights")
                    for t in targets:
                        part = tensor if t.rows is None else tensor[t.rows]
                        yield t.path, np.ascontiguousarray(t.layout(part).astype(dtype))
                    del tensor
                    bar.update()


def _some(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hf_params(folder: str, config: Phi4Config, abstract: dict) -> dict:
    """Fills a pure-dict parameter tree of `ShapeDtypeStruct`s (`nnx.to_pure_dict` of the abstract
    model's state) with the folder's weights, each put on the default device as soon as it is read."""
    wanted = traverse_util.flatten_dict(abstract)
    dtypes = {leaf.dtype for leaf in wanted.values()}
    if len(dtypes) != 1:
        raise ValueError(f"expected one parameter dtype, got {dtypes}")
    filled = {}
    for path, array in read_hf_params(folder, config, dtypes.pop()):
        key = tuple(int(part) if part.isdigit() else part for part in path.split("."))
        # A mismatch here is a bug in the mapping table, not in the user's files.
        assert array.shape == wanted[key].shape, (path, array.shape, wanted[key].shape)
        filled[key] = jax.device_put(array)
    assert filled.keys() == wanted.keys(), set(filled) ^ set(wanted)
    return traverse_util.unflatten_dict(filled)
