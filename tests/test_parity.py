"""Logits of phi4_jax.load(folder) against transformers' Phi3ForCausalLM (float32, eager)."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from flax import nnx

import phi4_jax
from conftest import TINY_SHAPES

TOL = 1e-4  # max |Δlogit|, float32
BATCH = 2


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids).long()).logits.numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    """The jitted forward's logits (`phi4_jax.forward`, one program per shape)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(phi4_jax.forward(*nnx.split(model), ids.astype(np.int32)))


def eager_logits(model, ids: np.ndarray, positions=None) -> np.ndarray:
    """The model called op by op, outside jit."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(ids.astype(np.int32), positions))


def random_ids(seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(BATCH, seq_len))


# (shape, sequence length): longrope shapes below and above original_max_position_embeddings (16),
# the sliding-window shape past its window (7).
CASES = [("phi-4", 24), ("phi-4-mini", 12), ("phi-4-mini", 40), ("phi-3.5-mini", 16),
         ("phi-3.5-mini", 17), ("phi-3.5-mini", 40), ("phi-3-mini-4k", 24)]


@pytest.mark.parametrize("shape,seq_len", CASES)
def test_logits_match_transformers(tiny_model, shape, seq_len):
    model, hf_model = tiny_model(shape)
    ids = random_ids(seq_len)
    got = our_logits(model, ids)
    want = hf_logits(hf_model, ids)
    assert got.shape == want.shape == (BATCH, seq_len, 256)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # Logits of this size make the tolerance meaningful: a wrong detail moves them by far more.
    assert np.abs(want).max() > 1.0


@pytest.mark.parametrize("shape", [s if s in ("phi-4", "phi-4-mini") else pytest.param(s, marks=pytest.mark.slow)
                                   for s in sorted(TINY_SHAPES)])  # op by op: many small compiles
def test_jitted_forward_matches_eager_and_explicit_positions_are_the_default(tiny_model, shape):
    """The jitted forward equals the model run op by op, and positions 0..T-1 given explicitly
    change nothing."""
    model, _ = tiny_model(shape)
    ids = random_ids(20, seed=1).astype(np.int32)
    positions = np.broadcast_to(np.arange(20, dtype=np.int32), ids.shape)
    eager = eager_logits(model, ids)
    np.testing.assert_allclose(our_logits(model, ids), eager, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(eager_logits(model, ids, positions), eager)


def _legacy_config(v5: dict) -> dict:
    """The same config as a pre-v5 transformers release wrote it (`rope_scaling` with `type`,
    `rope_theta` and `partial_rotary_factor` at the top level)."""
    legacy = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(v5["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 1.0)
    rope.pop("original_max_position_embeddings", None)
    rope_type = rope.pop("rope_type")
    rope.pop("type", None)
    legacy["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    legacy["torch_dtype"] = "float32"
    return legacy


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_legacy_dialect_config_gives_identical_logits(tiny_checkpoint, tiny_model, tmp_path, shape):
    folder, _ = tiny_checkpoint(shape)
    v5 = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5  # the file is v5 dialect
    legacy = _legacy_config(v5)
    if legacy["rope_scaling"] is not None and shape == "phi-4-mini":
        legacy["rope_scaling"]["type"] = "su"  # the oldest name of longrope
    (tmp_path / "config.json").write_text(json.dumps(legacy, indent=2))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    ids = random_ids(40, seed=3)
    v5_model, _ = tiny_model(shape)
    legacy_model, _ = phi4_jax.load(tmp_path, dtype="float32")
    assert legacy_model.config == v5_model.config
    np.testing.assert_array_equal(our_logits(legacy_model, ids), our_logits(v5_model, ids))


def test_swapped_longrope_factors_break_parity(tiny_checkpoint, tmp_path):
    """The parity test can fail: using the short factors past the threshold is caught."""
    folder, hf_model = tiny_checkpoint("phi-4-mini")
    raw = json.loads((folder / "config.json").read_text())
    rope = raw["rope_parameters"]
    rope["long_factor"] = rope["short_factor"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    model, _ = phi4_jax.load(tmp_path, dtype="float32")
    ids = random_ids(40)
    assert np.abs(our_logits(model, ids) - hf_logits(hf_model, ids)).max() > 100 * TOL


def test_bfloat16_checkpoint_is_cast_on_load(tmp_path):
    """A bf16 checkpoint loaded as float32 equals transformers running the same bf16 weights in f32."""
    from conftest import make_hf_model

    hf_model = make_hf_model("phi-4", seed=5)
    with torch.no_grad():  # round the parameters only (`.to(bf16)` would round rope buffers too)
        for p in hf_model.parameters():
            p.copy_(p.bfloat16().float())
    bf16 = {k: v.bfloat16().contiguous() for k, v in hf_model.state_dict().items()}
    hf_model.save_pretrained(tmp_path, state_dict=bf16)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _ = phi4_jax.load(tmp_path, dtype="float32")
    assert jax.tree.leaves(nnx.state(model))[0].dtype == np.float32
    ids = random_ids(10)
    np.testing.assert_allclose(our_logits(model, ids), hf_logits(hf_model, ids), atol=TOL, rtol=0)


def test_bfloat16_parameters_and_compute(tiny_checkpoint, tiny_model):
    """dtype="bfloat16": parameters and logits in bf16, close to the float32 run."""
    folder, _ = tiny_checkpoint("phi-4-mini")
    model, _ = phi4_jax.load(folder, dtype=jax.numpy.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {np.dtype(jax.numpy.bfloat16)}
    ids = random_ids(12)
    got = phi4_jax.forward(*nnx.split(model), ids.astype(np.int32))
    assert got.dtype == jax.numpy.bfloat16
    want = our_logits(tiny_model("phi-4-mini")[0], ids)
    assert np.abs(np.asarray(got, np.float32) - want).max() < 0.1 * np.abs(want).max()


@pytest.mark.parametrize("dtype", ["int32", "float8", "nonsense", bool])
def test_non_float_dtype_is_refused(tiny_checkpoint, dtype):
    with pytest.raises(phi4_jax.ConfigError, match="floating-point"):
        phi4_jax.load(tiny_checkpoint("phi-4")[0], dtype=dtype)


@pytest.mark.parametrize("rows", [1, 2, 16, 64, 65, 300])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_projections_put_the_weight_first_for_a_few_rows_on_cpu(rows, platform):
    """`project` gives x @ w.T; traced for XLA:CPU, from 2 to 64 rows as the faster `w @ x.T` (a
    [out, rows] product, then transposed), else, and for every accelerator, the plain product."""
    import re

    from phi4_jax.model.backend import Backend
    from phi4_jax.model.phi4 import project

    first = Backend(platform).weight_first_rows
    assert first == (64 if platform == "cpu" else 0)
    rng = np.random.default_rng(rows)
    x, w = rng.standard_normal((rows, 48), np.float32), rng.standard_normal((80, 48), np.float32)
    product = jax.jit(lambda x, w: project(x, w, first))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(product(x, w))
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-4)
    assert got.shape == (rows, 80) and got.dtype == np.float32
    text = product.lower(x, w).as_text()  # StableHLO: the form as traced, whatever compiles it
    weight_first = re.search(rf"stablehlo.dot_general[^\n]*\(tensor<80x48xf32>, tensor<{rows}x48xf32>\)", text)
    assert (weight_first is not None) == (1 < rows <= first), text
    assert ("optimization_barrier" in text) == (1 < rows <= first)
