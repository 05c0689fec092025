"""Weight-only int8: the quantizer's error bound, logits near float32, conversion round trips that
are bit-exact, a sharded int8 model that gives the one-device one, no float copy of a weight in the
programs, and the refusals (unknown kinds, bad scales, quantized sources, HF export)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import TINY_SHAPES
from test_checkpoint import to_hf, to_orbax

import phi4_jax
from phi4_jax.cli import common as cli
from phi4_jax.checkpoints import orbax
from phi4_jax.config import Phi4Config
from phi4_jax.errors import CheckpointError, ConfigError
from phi4_jax.model import int8, xla_cpu
from phi4_jax.model.backend import Backend
from phi4_jax.model.phi4 import Phi4ForCausalLM
from phi4_jax.parallel.mesh import make_mesh

UNTIED, TIED = "phi-4", "phi-4-mini"


def params(model) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def ids_for(config, shape=(2, 128), seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape, dtype=np.int32)


def logits(model, ids) -> np.ndarray:
    """The model's logits, through the jitted forward: one program per kind of model and shape of
    `ids` (the tests below use the same ones), not an eager dispatch per operation."""
    return np.asarray(phi4_jax.forward(*nnx.split(model), ids))


@pytest.fixture(scope="module")
def one_device(tiny_checkpoint, tiny_model):
    """`one_device(shape)` -> (float32 logits, int8 logits) of the tiny checkpoint on one device, for
    `ids_for(config)`."""
    made = {}

    def get(shape):
        if shape not in made:
            folder, _ = tiny_checkpoint(shape)
            ids = ids_for(Phi4Config.from_json(folder))
            made[shape] = (logits(tiny_model(shape)[0], ids),
                           logits(phi4_jax.load(folder, dtype="float32", quantize="int8", progress=False)[0], ids))
        return made[shape]

    return get


@pytest.mark.parametrize("outputs, shape", [(1, (96, 40)), (2, (6, 8, 40)), (1, (40, 6, 8))])
def test_quantizer_error_is_within_half_a_step_per_channel(outputs, shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * np.geomspace(1e-3, 10, shape[0])[
        (slice(None),) + (None,) * (len(shape) - 1)]
    w[3] = 0  # a channel of zeros: scale 0, values 0, no division by zero
    q, scale = int8.quantize_rows(w, outputs, chunk_bytes=512)  # several blocks of rows
    assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == np.float32 and scale.shape == shape[:outputs]
    err = np.abs(int8.dequantize(q, scale) - w)
    bound = scale.reshape(*scale.shape, *(1,) * (w.ndim - outputs)) / 2
    assert np.all(err <= bound * (1 + 1e-6))
    assert np.abs(q).max() == int8.QMAX and not np.any(q[3]) and scale[3].max() == 0
    # The same numbers from jax.numpy (a model's own random weights) and in one block.
    jq, js = int8.quantize(jnp.asarray(w), outputs, xp=jnp)
    np.testing.assert_array_equal(np.asarray(jq), q)
    np.testing.assert_array_equal(np.asarray(js), scale)


def test_every_quantized_tensor_of_a_checkpoint_is_within_half_a_step(tiny_checkpoint):
    folder, hf = tiny_checkpoint(TIED)
    model, _ = phi4_jax.load(folder, dtype="float32", quantize="int8", progress=False)
    got = params(model)
    checked = 0
    for key, value in params(phi4_jax.load(folder, dtype="float32", progress=False)[0]).items():
        scale_key = (*key[:-1], "scale")
        if scale_key not in got:
            np.testing.assert_array_equal(got[key], value)  # the norms stay float
            continue
        assert got[key].dtype == np.int8
        err = np.abs(int8.dequantize(got[key], got[scale_key]) - value)
        assert np.all(err <= got[scale_key].reshape(*got[scale_key].shape, *(1,) * (value.ndim - got[scale_key].ndim))
                      / 2 * (1 + 1e-6)), key
        checked += 1
    config = Phi4Config.from_json(folder)
    assert checked == 7 * config.num_hidden_layers + 1  # q k v o gate up down per layer, the tied table


@pytest.mark.parametrize("shape", [UNTIED, TIED])
def test_int8_logits_are_near_float32_and_pick_the_same_tokens(tiny_checkpoint, one_device, shape):
    folder, _ = tiny_checkpoint(shape)
    want, got = one_device(shape)
    assert got.shape == want.shape == (2, 128, Phi4Config.from_json(folder).vocab_size)
    # Random weights, every part of them moving the logits (std ~1, max ~4.5), and nearly flat
    # top-2 margins: int8 moves them by 3-4.5% RMS and at most ~0.1 of their largest (measured),
    # and keeps 92-95% of the greedy tokens.
    diff = got - want
    assert 0 < np.sqrt(np.mean(diff**2)) <= 0.06 * want.std()
    assert np.abs(diff).max() <= 0.12 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_chunked_dequantization_gives_the_plain_product(monkeypatch):
    """XLA:CPU's blocked form (with a remainder block) is the same product as the accelerators' one."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.integers(-127, 128, (70, 48), dtype=np.int8))
    scale = jnp.asarray(rng.random(70, dtype=np.float32))
    x = jnp.asarray(rng.standard_normal((3, 5, 48), dtype=np.float32))
    dense = lambda x, w: jnp.einsum("...k,nk->...n", x, w)  # noqa: E731
    monkeypatch.setattr(xla_cpu, "CHUNK_BYTES", 16 * 48 * 4)  # 16 rows a block: 4 blocks and 6 rows left
    chunked = int8.product(x, q, scale, jnp.float32, dense, chunk_rows=True)
    plain = int8.product(x, q, scale, jnp.float32, dense, chunk_rows=False)
    assert chunked.shape == (3, 5, 70)
    # float32 sums in another order: to ~1e-6 of the largest output (|y| reaches ~200 here).
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-5,
                               atol=2e-6 * float(jnp.abs(plain).max()))
    text = jax.jit(lambda x: int8.product(x, q, scale, jnp.float32, dense, True)).lower(x).as_text()
    assert "while" in text  # the blocks are a loop, not unrolled


@pytest.mark.parametrize("shape, spec", [(UNTIED, "data=2,tensor=4"), (TIED, "fsdp=2,tensor=2")])
def test_sharded_int8_model_matches_the_one_device_int8_model(tiny_checkpoint, one_device, shape, spec):
    folder, _ = tiny_checkpoint(shape)
    ids = ids_for(Phi4Config.from_json(folder))
    mesh = make_mesh(spec)
    sharded = phi4_jax.load(folder, dtype="float32", quantize="int8", mesh=mesh, progress=False)[0]
    np.testing.assert_allclose(logits(sharded, ids), one_device(shape)[1], rtol=1e-5, atol=1e-5)
    # The scales follow their channels: a projection's scales split as its output axes do.
    attn = sharded.model.layers[0].self_attn
    assert attn.q_proj.scale[...].sharding.spec[0] == attn.q_proj.weight[...].sharding.spec[0] == "tensor"
    assert attn.o_proj.scale[...].sharding.spec[0] == attn.o_proj.weight[...].sharding.spec[0]


def test_int8_conversion_round_trips_bit_exactly(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(UNTIED)
    out = tmp_path / "int8"
    assert to_orbax(folder, out, "--quantize", "int8", "--dtype", "float32", "--verify") == 0
    manifest = json.loads((out / orbax.MANIFEST).read_text())
    assert manifest["quantization"] == "int8" and manifest["dtype"] == "float32"
    loaded = phi4_jax.load(out, progress=False)[0]  # int8 from the manifest: no quantize= needed
    assert loaded.quantize == "int8"
    want = params(phi4_jax.load(folder, dtype="float32", quantize="int8", progress=False)[0])
    got = params(loaded)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    # Asking for it again is no re-quantization: the same arrays.
    again = params(phi4_jax.load(out, quantize="int8", progress=False)[0])
    assert all(np.array_equal(again[k], got[k]) for k in got)


def test_an_int8_checkpoint_exports_to_hf_only_dequantized(tiny_checkpoint, tmp_path, capsys):
    folder, hf = tiny_checkpoint(TIED)
    out = tmp_path / "int8"
    assert to_orbax(folder, out, "--quantize", "int8") == 0
    assert to_hf(out, tmp_path / "hf") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "int8" in err and "--dequantize" in err and not (tmp_path / "hf").exists()
    assert to_hf(out, tmp_path / "hf", "--dequantize") == 0
    ids = ids_for(Phi4Config.from_json(folder))  # (the shape of the tests above: their programs)
    exported = logits(phi4_jax.load(tmp_path / "hf", dtype="float32", progress=False)[0], ids)
    quantized = logits(phi4_jax.load(out, dtype="float32", progress=False)[0], ids)
    np.testing.assert_allclose(exported, quantized, rtol=1e-5, atol=1e-5)  # q * scale, as the int8 model computes


def test_a_quantized_source_is_refused(tiny_checkpoint, tmp_path, capsys):
    folder, _ = tiny_checkpoint(UNTIED)
    out = tmp_path / "int8"
    assert to_orbax(folder, out, "--quantize", "int8") == 0
    assert to_orbax(out, tmp_path / "again", "--quantize", "int8") == cli.EXIT_USAGE
    assert "quantized already" in capsys.readouterr().err and not (tmp_path / "again").exists()
    # A Hugging Face folder quantized by another tool says so in its config.
    other = tmp_path / "gptq"
    other.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    for name in ("model.safetensors",):
        (other / name).symlink_to(folder / name)
    with pytest.raises(ConfigError, match=r"config.json.*quantized already \(gptq"):
        phi4_jax.load(other, quantize="int8", progress=False)


def test_unknown_kinds_are_usage_errors_naming_the_kinds(tiny_checkpoint, tmp_path, capsys):
    folder, _ = tiny_checkpoint(UNTIED)
    with pytest.raises(ConfigError, match="'int4'.*int8"):
        phi4_jax.load(folder, quantize="int4", progress=False)
    assert to_orbax(folder, tmp_path / "out", "--quantize", "int4") == cli.EXIT_USAGE
    assert "int8" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="int8"):
        Phi4ForCausalLM(Phi4Config.from_dict(TINY_SHAPES[UNTIED]), rngs=nnx.Rngs(0), quantize="fp8")


def test_missing_or_misshapen_scales_are_checkpoint_errors_naming_the_tensor(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(UNTIED)
    # A float checkpoint whose manifest claims int8: every scale is missing.
    assert to_orbax(folder, tmp_path / "float") == 0
    manifest = json.loads((tmp_path / "float" / orbax.MANIFEST).read_text())
    (tmp_path / "float" / orbax.MANIFEST).write_text(json.dumps({**manifest, "quantization": "int8"}))
    with pytest.raises(CheckpointError, match=r"no tensor \S+\.scale \(the int8 scales"):
        phi4_jax.load(tmp_path / "float", progress=False)
    # An int8 checkpoint with one channel's scale cut off.
    assert to_orbax(folder, tmp_path / "int8", "--quantize", "int8") == 0
    model = phi4_jax.load(tmp_path / "int8", progress=False)[0]
    flat = params(model)
    key = ("model", "layers", 1, "mlp", "down_proj", "scale")
    flat[key] = flat[key][:-1]
    bad = tmp_path / "bad"
    bad.mkdir()
    for side in (tmp_path / "int8").iterdir():
        if side.is_file():
            (bad / side.name).write_bytes(side.read_bytes())
    with orbax.ParamsWriter(str(bad / orbax.PARAMS)) as writer:
        writer.write(traverse_util.unflatten_dict(flat))
        writer.finish()
    expected = re.escape(f"model.layers.1.mlp.down_proj.scale in {bad / orbax.PARAMS} has shape ({flat[key].size},)")
    with pytest.raises(CheckpointError, match=expected):
        phi4_jax.load(bad, progress=False)


@pytest.mark.slow  # a 1-layer model of full-size weight blocks, compiled
def test_xla_cpu_dequantizes_a_block_at_a_time_never_a_whole_weight(monkeypatch):
    """The decode step XLA:CPU runs: every float array converted from int8 is a block of at most
    `CHUNK_BYTES` and at most half a weight. The accelerators' form, compiled by XLA:CPU, converts
    each weight whole (what the check would find)."""
    from phi4_jax.planner import plan

    config = Phi4Config.from_dict({**TINY_SHAPES[UNTIED], "num_hidden_layers": 1})  # one layer has every weight
    smallest = min(config.num_key_value_heads * config.head_dim, config.hidden_size) * config.hidden_size

    def dequantized_arrays(platform):
        jax.clear_caches()  # the step is traced again, with the block size of now
        lowered = plan.lower_step("decode", config, None, 64, 1, jnp.float32, 16, Backend(platform), "int8")
        text = lowered.compile().as_text()
        # Every computation that makes float32 values from int8 ones (a block is sliced out in it).
        return [plan._elements(out) * 4 for params, out in
                re.findall(r"^%\S+ \(([^)]*)\) -> f32\[([\d,]*)\]", text, re.M) if "s8[" in params]

    whole = dequantized_arrays("gpu")
    assert whole and max(whole) >= config.vocab_size * config.hidden_size * 4
    halves = dequantized_arrays("cpu")  # tiny weights: two blocks each
    assert halves and max(halves) <= config.vocab_size * config.hidden_size * 4 // 2
    monkeypatch.setattr(xla_cpu, "CHUNK_BYTES", 8 * 1024)
    blocks = dequantized_arrays("cpu")
    assert blocks and max(blocks) <= 8 * 1024 < smallest * 4
