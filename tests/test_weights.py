"""Corrupt model folders, written for real on disk: `phi4_jax.load` must raise the right typed error,
naming the file (and the tensor) at fault, and never unpickle anything."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import phi4_jax
from phi4_jax.errors import (CheckpointError, ConfigError, ModelNotFoundError, Phi4Error,
                             UnsafeCheckpointError)

SHAPE = "phi-4"  # untied head, GQA: every kind of tensor
TIED = "phi-4-mini"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NORM = "model.norm.weight"  # (128,) in SHAPE


def load_fails(path, error, *names):
    """Asserts `phi4_jax.load(path)` raises exactly `error` and that its message names each of
    `names` (paths or tensor names, taken literally)."""
    pattern = "(?s)" + "".join(f"(?=.*{re.escape(str(name))})" for name in names)
    with pytest.raises(error, match=pattern) as info:
        phi4_jax.load(path, dtype="float32")
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, Phi4Error)
    return info.value


def logits(folder) -> np.ndarray:
    """The logits of the model in `folder`, through the jitted forward (one program per shape)."""
    model, _ = phi4_jax.load(folder, dtype="float32")
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 12)).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        return np.asarray(phi4_jax.forward(*nnx.split(model), ids))


@pytest.fixture
def copy_of(tiny_checkpoint, tmp_path):
    """`copy_of(shape)` -> a private copy of the shared tiny checkpoint folder, free to corrupt."""
    def make(shape=SHAPE):
        return shutil.copytree(tiny_checkpoint(shape)[0], tmp_path / "model")
    return make


def rewrite_tensors(folder, change):
    """Rewrites `folder`/model.safetensors with the tensor dict that `change(tensors)` leaves."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


# --- 1, 2: a single model.safetensors that safetensors cannot read --------------------------------

@pytest.mark.parametrize("keep", ["4 bytes", "100 bytes", "half", "all but 3 bytes"])
def test_truncated_file(copy_of, keep):
    folder = copy_of()
    path = folder / WEIGHTS
    data = path.read_bytes()
    size = {"4 bytes": 4, "100 bytes": 100, "half": len(data) // 2,
            "all but 3 bytes": len(data) - 3}[keep]
    path.write_bytes(data[:size])
    load_fails(folder, CheckpointError, path, "truncated or corrupt")


def test_trailing_bytes(copy_of):
    folder = copy_of()
    with open(folder / WEIGHTS, "ab") as f:
        f.write(b"\0" * 16)
    load_fails(folder, CheckpointError, folder / WEIGHTS)


def _garbage_length(data):
    return b"\xff" * 8 + data[8:]


def _garbage_json(data):
    n = int.from_bytes(data[:8], "little")
    return data[:8] + b"!" * n + data[8 + n:]


def _short_length(data):
    return (2).to_bytes(8, "little") + data[8:]


def _lying_dtype(data):
    """Header JSON still valid, but says the first tensor is twice as many bytes as it is."""
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert b'"F32"' in header
    return data[:8] + header.replace(b'"F32"', b'"F64"', 1) + data[8 + n:]


@pytest.mark.parametrize("corrupt", [_garbage_length, _garbage_json, _short_length, _lying_dtype,
                                     lambda data: b""], ids=["length", "json", "short length",
                                                             "dtype", "zero bytes"])
def test_garbage_header(copy_of, corrupt):
    folder = copy_of()
    path = folder / WEIGHTS
    path.write_bytes(corrupt(path.read_bytes()))
    load_fails(folder, CheckpointError, path)


# --- 3: sharded checkpoints ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """SHAPE saved by transformers in many shards (+ index); shared, so tests copy it."""
    folder = tmp_path_factory.mktemp(f"sharded-{SHAPE}")
    tiny_checkpoint(SHAPE)[1].save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (folder / WEIGHTS).exists()
    return folder


@pytest.fixture
def sharded_copy(sharded_checkpoint, tmp_path):
    return shutil.copytree(sharded_checkpoint, tmp_path / "sharded")


def _weight_map(folder) -> dict:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def _write_weight_map(folder, weight_map):
    raw = json.loads((folder / INDEX).read_text())
    raw["weight_map"] = weight_map
    (folder / INDEX).write_text(json.dumps(raw))


def test_sharded_checkpoint_loads_like_single_file(tiny_checkpoint, sharded_checkpoint):
    np.testing.assert_array_equal(logits(sharded_checkpoint), logits(tiny_checkpoint(SHAPE)[0]))


def test_missing_shard(sharded_copy):
    shard = _weight_map(sharded_copy)[NORM]
    (sharded_copy / shard).unlink()
    load_fails(sharded_copy, ModelNotFoundError, sharded_copy / INDEX, shard)


def test_index_points_to_a_shard_without_the_tensor(sharded_copy):
    weight_map = _weight_map(sharded_copy)
    wrong = next(s for s in sorted(set(weight_map.values())) if s != weight_map[NORM])
    weight_map[NORM] = wrong
    _write_weight_map(sharded_copy, weight_map)
    load_fails(sharded_copy, CheckpointError, sharded_copy / wrong, NORM, INDEX)


def test_index_lists_a_tensor_no_shard_holds(sharded_copy):
    weight_map = _weight_map(sharded_copy)
    weight_map["model.layers.0.mlp.extra.weight"] = weight_map[NORM]
    _write_weight_map(sharded_copy, weight_map)
    load_fails(sharded_copy, CheckpointError, "model.layers.0.mlp.extra.weight", sharded_copy)


@pytest.mark.parametrize("text", ['{"weight_map": {', "", "\xff not json",
                                  "[]", '{"metadata": {}}', '{"weight_map": []}',
                                  '{"weight_map": {"model.norm.weight": 3}}'],
                         ids=["cut", "empty", "garbage", "list", "no weight_map",
                              "weight_map list", "shard not a string"])
def test_invalid_index(sharded_copy, text):
    (sharded_copy / INDEX).write_text(text, encoding="latin-1")
    load_fails(sharded_copy, CheckpointError, sharded_copy / INDEX)


@pytest.mark.parametrize("shard", ["../model-00001-of-00011.safetensors", "/etc/passwd", "", "."])
def test_index_naming_a_shard_outside_the_folder(sharded_copy, shard):
    weight_map = _weight_map(sharded_copy)
    weight_map[NORM] = shard
    _write_weight_map(sharded_copy, weight_map)
    load_fails(sharded_copy, CheckpointError, sharded_copy / INDEX, "outside its folder")


def test_truncated_shard(sharded_copy):
    shard = sharded_copy / _weight_map(sharded_copy)[NORM]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    load_fails(sharded_copy, CheckpointError, shard)


# --- 4: tensor names -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape,name", [(SHAPE, NORM), (SHAPE, "model.layers.1.self_attn.qkv_proj.weight"),
                                        (SHAPE, "lm_head.weight"), (TIED, "model.embed_tokens.weight")])
def test_missing_tensor(copy_of, shape, name):
    folder = copy_of(shape)
    rewrite_tensors(folder, lambda t: t.pop(name))
    load_fails(folder, CheckpointError, name, folder, "missing 1 tensor")


@pytest.mark.parametrize("name", ["model.layers.2.mlp.down_proj.weight", "model.extra.bias",
                                  "model.layers.0.self_attn.qkv_proj.bias"])
def test_unexpected_tensor(copy_of, name):
    folder = copy_of()
    rewrite_tensors(folder, lambda t: t.update({name: np.ones(4, np.float32)}))
    load_fails(folder, CheckpointError, name, folder, "unexpected 1 tensor")


@pytest.mark.parametrize("shape,name", [(TIED, "lm_head.weight"),
                                        (SHAPE, "model.layers.0.self_attn.rotary_emb.inv_freq"),
                                        (TIED, "model.layers.1.self_attn.rotary_emb.inv_freq")])
def test_ignorable_tensor_is_accepted(tiny_checkpoint, copy_of, shape, name):
    folder = copy_of(shape)

    def add(tensors):
        if name == "lm_head.weight":  # a saved copy of the tie, as some exports write
            tensors[name] = tensors["model.embed_tokens.weight"].copy()
        else:  # the rope buffer older exports saved
            tensors[name] = np.ones(4, np.float32)
    rewrite_tensors(folder, add)
    with safe_open(folder / WEIGHTS, framework="numpy") as f:
        assert name in f.keys()
    np.testing.assert_array_equal(logits(folder), logits(tiny_checkpoint(shape)[0]))


# --- 5, 6: tensor shapes and dtypes --------------------------------------------------------------

@pytest.mark.parametrize("name,change", [
    (NORM, lambda w: w[:-1]),
    ("model.layers.1.mlp.down_proj.weight", lambda w: w.T.copy()),
    ("model.embed_tokens.weight", lambda w: w[:, :, None].copy()),
], ids=["short", "transposed", "extra axis"])
def test_tensor_with_wrong_shape(copy_of, name, change):
    folder = copy_of()
    shapes = {}

    def edit(tensors):
        shapes["want"] = tensors[name].shape
        tensors[name] = change(tensors[name])
        shapes["found"] = tensors[name].shape
    rewrite_tensors(folder, edit)
    load_fails(folder, CheckpointError, name, folder / WEIGHTS, f"shape {shapes['found']}",
               f"implies {shapes['want']}")


def test_config_that_does_not_fit_the_weights(copy_of):
    folder = copy_of()
    raw = json.loads((folder / "config.json").read_text())
    raw["intermediate_size"] = 224  # the weights have 192
    (folder / "config.json").write_text(json.dumps(raw))
    err = load_fails(folder, CheckpointError, folder / WEIGHTS, "config.json implies")
    assert re.search(r"model\.layers\.\d\.mlp\.gate_up_proj\.weight .* \(384, 160\);.*\(448, 160\)"
                     r"|model\.layers\.\d\.mlp\.down_proj\.weight .* \(160, 192\);.*\(160, 224\)",
                     str(err)), err


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_])
def test_non_float_tensor(copy_of, dtype):
    folder = copy_of()
    rewrite_tensors(folder, lambda t: t.update({NORM: np.ones(t[NORM].shape, dtype)}))
    load_fails(folder, CheckpointError, NORM, folder / WEIGHTS, np.dtype(dtype).name)


# --- 7: pickle weights are refused, never unpickled ----------------------------------------------

class Canary:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin",
                                      "consolidated.00.pth"])
def test_pickle_only_folder_is_refused_unopened(tiny_checkpoint, tmp_path, filename):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_checkpoint(SHAPE)[0] / "config.json", folder)
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": Canary(marker)}, folder / filename)
    load_fails(folder, UnsafeCheckpointError, folder, filename, "never unpickles")
    assert not marker.exists()
    # The canary is live: a pickle loader would have run it.
    torch.load(folder / filename, weights_only=False)
    assert marker.exists()


# --- 8: folder, config.json ----------------------------------------------------------------------

def test_folder_without_weights(tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint(SHAPE)[0] / "config.json", tmp_path)
    (tmp_path / "model.safetensors.bak").write_bytes(b"")
    load_fails(tmp_path, ModelNotFoundError, tmp_path, WEIGHTS, INDEX)


def test_path_that_does_not_exist(tmp_path):
    load_fails(tmp_path / "nowhere", ModelNotFoundError, tmp_path / "nowhere", "does not exist")


def test_path_that_is_a_file(tiny_checkpoint):
    path = tiny_checkpoint(SHAPE)[0] / WEIGHTS  # read, not changed
    load_fails(path, ModelNotFoundError, path, "is a file")


def test_missing_config(copy_of):
    folder = copy_of()
    (folder / "config.json").unlink()
    load_fails(folder, ModelNotFoundError, folder / "config.json")


@pytest.mark.parametrize("text", ["", "not json", '{"model_type": "phi3",', "[1, 2]", "\xff\xfe"],
                         ids=["empty", "garbage", "cut", "list", "not utf-8"])
def test_config_that_is_not_json(copy_of, text):
    folder = copy_of()
    (folder / "config.json").write_text(text, encoding="latin-1")
    load_fails(folder, ConfigError, folder / "config.json")


def test_config_of_another_model_type(copy_of):
    folder = copy_of()
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(raw))
    load_fails(folder, ConfigError, folder / "config.json", "'llama'", "phi3")


def test_shared_checkpoint_is_untouched(tiny_checkpoint):
    """The corrupting tests above worked on copies: the shared folder still loads."""
    folder = tiny_checkpoint(SHAPE)[0]
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", WEIGHTS]
    logits(folder)
