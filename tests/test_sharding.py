"""Meshes, the rules table, GQA KV-head repeats, loading onto a mesh, and sharded generation
against the single-device run (8 simulated CPU devices; meshes smaller than 8 use the first ones)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import phi4_jax
from phi4_jax.checkpoints import convert
from phi4_jax.checkpoints.hub import resolve
from phi4_jax.checkpoints import hf as weights
from phi4_jax.parallel import heads
from phi4_jax.parallel import mesh as meshes
from phi4_jax.parallel import rules
from phi4_jax.config import Phi4Config
from phi4_jax.engine.runner import ModelRunner
from phi4_jax.planner.plan import abstract_on_mesh
from phi4_jax.model import int8, vocab_parallel
from phi4_jax.model.phi4 import abstract_model
from phi4_jax.errors import MeshError

from conftest import greedy_run

MESHES = ("tensor=2", "tensor=4", "tensor=8", "fsdp=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2")
LENGTHS = (5, 11, 3, 7)  # phi-4-mini's tiny LongRoPE threshold is 16: its rows cross it while decoding


def mesh(spec: str, devices: str | None = None):
    """A mesh over the first devices it needs (make_mesh's default), or over those `devices` names
    (as --devices takes them)."""
    return meshes.make_mesh(spec, None if devices is None else
                            [jax.devices()[i] for i in meshes.parse_devices(devices, len(jax.devices()))])


# --- mesh specs ------------------------------------------------------------------------------------

def test_mesh_spec_fills_missing_axes_with_one():
    assert meshes.parse_mesh("data=2, tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4, "seq": 1}
    m = meshes.make_mesh("data=2,fsdp=2,tensor=2")
    assert m.axis_names == ("data", "fsdp", "tensor", "seq") and tuple(m.shape.values()) == (2, 2, 2, 1)
    assert meshes.make_mesh(m) is m
    assert meshes.parse_mesh("data=2,tensor=4,") == meshes.parse_mesh("data=2,tensor=4")  # a trailing comma is fine


def test_a_mesh_with_other_axes_is_refused():
    other = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "tp"))
    with pytest.raises(MeshError, match="data.*fsdp.*tensor.*seq"):
        meshes.make_mesh(other)


@pytest.mark.parametrize("spec, words", [
    ("tensor=16", ["16 devices", "there are 8", "at most 8"]),
    ("tensor=four", ["AXIS=SIZE"]),
    ("model=8", ["unknown axis 'model'", "data, fsdp, tensor, seq"]),
    ("tensor=2,tensor=4", ["given twice"]),
    ("tensor=0,data=8", ["at least 1"]),
])
def test_bad_mesh_specs_say_what_is_wrong(spec, words):
    with pytest.raises(MeshError) as info:
        meshes.make_mesh(spec)
    for word in words:
        assert word in str(info.value), info.value


# --- GQA: the minimal KV-head repeat ----------------------------------------------------------------

def brute_force_repeat(n, kv, tensor):
    return min((r for r in range(1, n + 1) if (kv * r) % tensor == 0 and n % (kv * r) == 0), default=None)


@pytest.mark.parametrize("model, expected", [
    ("phi-4", {1: 1, 2: 1, 4: 2, 8: 4}),
    ("phi-4-mini", {1: 1, 2: 1, 4: 1, 8: 1}),
    ("phi-3.5-mini", {1: 1, 2: 1, 4: 1, 8: 1}),
])
def test_kv_repeat_of_the_real_models(fixtures_dir, model, expected):
    config = Phi4Config.from_json(fixtures_dir / model)
    n, kv = config.num_attention_heads, config.num_key_value_heads
    assert {t: heads.kv_repeat(config, t) for t in expected} == expected
    for tensor in range(1, 2 * n + 1):  # the rule of DESIGN §5, everywhere
        want = brute_force_repeat(n, kv, tensor)
        if want is None:
            with pytest.raises(MeshError, match="tensor sizes that work"):
                heads.kv_repeat(config, tensor)
        else:
            assert heads.kv_repeat(config, tensor) == want


def test_impossible_tensor_size_lists_the_ones_that_work(fixtures_dir):
    with pytest.raises(MeshError) as info:
        heads.kv_repeat(Phi4Config.from_json(fixtures_dir / "phi-4"), 16)
    assert "40 query / 10 KV heads" in str(info.value)
    assert "1, 2, 4, 5, 8, 10, 20, 40" in str(info.value)
    with pytest.raises(MeshError, match="1, 2, 3, 4, 6, 8, 12, 24"):
        heads.kv_repeat(Phi4Config.from_json(fixtures_dir / "phi-4-mini"), 16)


# --- the rules table --------------------------------------------------------------------------------

def test_rules_give_the_designed_layout(fixtures_dir):
    """DESIGN §5: embed -> fsdp, heads/mlp/vocab -> tensor, batch -> (data, fsdp), sequence -> seq."""
    m = meshes.make_mesh("data=2,fsdp=2,tensor=2")
    config = heads.config_for_mesh(Phi4Config.from_json(fixtures_dir / "phi-4"), m)
    state = nnx.state(abstract_model(config))
    specs = jax.tree.map(lambda s: tuple(s.spec), rules.param_shardings(m, state))
    layer = specs["model"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["weight"] == ("tensor", None, "fsdp")
    assert layer["self_attn"]["k_proj"]["weight"] == ("tensor", None, "fsdp")
    assert layer["self_attn"]["o_proj"]["weight"] == ("fsdp", "tensor", None)
    assert layer["mlp"]["gate_proj"]["weight"] == ("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["weight"] == ("fsdp", "tensor")
    assert layer["input_layernorm"]["weight"] == ("fsdp",)
    assert specs["lm_head"]["weight"] == ("tensor", "fsdp")
    cache = rules.spec(meshes.make_mesh("data=2,tensor=2,seq=2"), rules.CACHE_AXES, (4, 10, 256, 128))
    assert tuple(cache) == ("data", "tensor", "seq", None)


def test_axes_the_mesh_does_not_divide_stay_whole():
    m = meshes.make_mesh("data=2,tensor=4")
    assert tuple(rules.spec(m, ("batch", "kv_heads"), (1, 10))) == (None, None)
    assert tuple(rules.spec(m, ("batch", "kv_heads"), (6, 12))) == ("data", "tensor")


@pytest.mark.parametrize("spec", ["tensor=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_per_device_weights_of_real_phi4_are_total_over_fsdp_times_tensor(fixtures_dir, spec):
    """From the shardings of the real phi-4's parameters (shapes only): each device holds
    1/(fsdp*tensor) of the weights, plus its share of the repeated KV heads."""
    m = meshes.make_mesh(spec)
    config = Phi4Config.from_json(fixtures_dir / "phi-4")
    repeated = heads.config_for_mesh(config, m)
    _, state = abstract_on_mesh(repeated, m, "bfloat16")
    per_device = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
    extra_kv = 2 * config.num_hidden_layers * config.hidden_size * config.head_dim * 2 * (
        repeated.num_key_value_heads - config.num_key_value_heads)
    want = (config.num_parameters * 2 + extra_kv) / (m.shape["fsdp"] * m.shape["tensor"])
    assert per_device == pytest.approx(want, rel=0.005)


# --- loading onto a mesh ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_model):
    """Single-device logits and greedy tokens per shape."""
    made = {}

    def get(shape):
        if shape not in made:
            model = tiny_model(shape)[0]
            made[shape] = (np.asarray(phi4_jax.forward(*nnx.split(model), IDS)), greedy(ModelRunner(model)))
        return made[shape]

    return get


IDS = np.random.default_rng(0).integers(3, 256, (2, 12))


def greedy(engine):
    return greedy_run(engine, [np.random.default_rng(1).integers(3, 256, n).tolist() for n in LENGTHS])


# phi-4 (its KV heads repeated on tensor=4 and 8) on every mesh; Phi-4-mini (LongRoPE crossed while
# decoding, tied embeddings) on the meshes that split it differently: tensor only, and all three
# axes together (fsdp with its tied table; fsdp alone: phi-4's). Meshes of fewer than 8 devices take
# the first ones (make_mesh's default), except two over devices named as --devices names them: a
# range without device 0, and a list with gaps. Each case: (shape, mesh, devices, how describe()
# names the devices).
DEVICES = {("phi-4", "tensor=2"): ("6-7", "devices 6-7 of 8"),
           ("phi-4", "tensor=4"): ("1,3,5,7", "devices 1, 3, 5, 7 of 8"),
           ("phi-4-mini", "tensor=2"): (None, "devices 0-1 of 8")}
CASES = [(shape, spec, *DEVICES.get((shape, spec), (None, "all"))) for shape, spec in
         [("phi-4", spec) for spec in MESHES]
         + [("phi-4-mini", spec) for spec in ("tensor=2", "data=2,fsdp=2,tensor=2")]]


# The quick loop (`-m "not slow"`) keeps phi-4 with its KV heads repeated over named devices, and all
# three axes at once; the other meshes run with the slow tests.
QUICK = {("phi-4", "tensor=4"), ("phi-4", "data=2,fsdp=2,tensor=2")}


@pytest.mark.parametrize("shape,spec,devices,which", [
    pytest.param(*case, marks=() if case[:2] in QUICK else pytest.mark.slow,
                 id=f"{case[0]}-{case[1]}" + (f"-on-{case[2]}" if case[2] else "")) for case in CASES])
def test_sharded_logits_and_greedy_tokens_match_one_device(tiny_checkpoint, reference, shape, spec, devices, which):
    """On every mesh (8 simulated devices): the model lies on exactly the mesh's devices (the first
    ones, or those named), gives the one-device logits and greedy tokens, lays the KV cache out by
    the rules table, holds 1/(fsdp*tensor) of the weights per device, and its layout names the devices."""
    folder, _ = tiny_checkpoint(shape)
    everything = jax.devices()
    assert len(everything) == 8
    size = math.prod(meshes.parse_mesh(spec).values())
    picked = everything[:size] if devices is None else [everything[i] for i in meshes.parse_devices(devices, 8)]
    m = mesh(spec, devices)
    assert list(m.devices.flat) == picked
    model, _ = phi4_jax.load(folder, dtype="float32", mesh=m, progress=False)
    params = nnx.to_pure_dict(nnx.state(model))
    assert all(a.sharding.mesh == m for a in jax.tree.leaves(params))
    assert {d for a in jax.tree.leaves(params) for d in a.sharding.device_set} == set(picked)
    assert f"({size} cpu devices: {which};" in meshes.describe(params)
    want_logits, (want_tokens, _) = reference(shape)
    logits = phi4_jax.forward(*nnx.split(model), IDS)
    assert logits.shape == (2, 12, 256) and logits.dtype == np.float32
    # (a 4-way split sums apart: to 1e-5, on every mesh)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=1e-5)

    tokens, gen = greedy(ModelRunner(model))
    assert tokens == want_tokens
    cache = gen.state.cache.keys[0]  # laid out by the rules table
    assert cache.sharding.is_equivalent_to(rules.sharding(m, rules.CACHE_AXES, cache.shape), cache.ndim)
    # Per-device weights: 1/(fsdp*tensor) of the whole (the tiny models' norms stay whole on tensor).
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    assert meshes.device_bytes(params) == pytest.approx(total / (m.shape["fsdp"] * m.shape["tensor"]), rel=0.02)


def test_device_lists_are_parsed_and_checked():
    assert meshes.parse_devices("0-1,6-7", 8) == [0, 1, 6, 7]
    assert meshes.parse_devices(" 5 ", 8) == [5]
    for bad, words in (("3-1", "backwards"), ("0,0", "twice"), ("8", "indices 0-7"), ("a-b", "range such as 4-7"),
                       (",", "names no device")):
        with pytest.raises(MeshError, match=words):
            meshes.parse_devices(bad, 8)


def test_kv_heads_are_repeated_on_tensor_meshes_that_need_it(tiny_checkpoint):
    folder, _ = tiny_checkpoint("phi-4")
    model, _ = phi4_jax.load(folder, dtype="float32", mesh=mesh("tensor=8"), progress=False)
    assert model.config.num_key_value_heads == 40
    plain, _ = phi4_jax.load(folder, dtype="float32", progress=False)
    k = np.asarray(model.model.layers[0].self_attn.k_proj.weight[...])
    np.testing.assert_array_equal(k, np.repeat(np.asarray(plain.model.layers[0].self_attn.k_proj.weight[...]), 4, 0))


@pytest.mark.parametrize("spec, devices", [("tensor=4", "1,3,5,7"), ("data=2,fsdp=2,tensor=2", None)])
def test_orbax_checkpoints_restore_onto_the_mesh(tiny_checkpoint, reference, tmp_path, spec, devices):
    """(The meshes of the phi-4 cases above: their forward is compiled once.)"""
    folder, _ = tiny_checkpoint("phi-4")
    orbax = str(tmp_path / "orbax")
    convert.convert(convert.plan_conversion(resolve(str(folder)), "float32"), orbax,
                       progress=False)
    m = mesh(spec, devices)
    model, _ = phi4_jax.load(orbax, mesh=m, progress=False)
    placed = rules.param_shardings(m, nnx.state(model))
    for array, want in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))), jax.tree.leaves(placed)):
        assert array.sharding.is_equivalent_to(want, array.ndim)
    np.testing.assert_allclose(np.asarray(phi4_jax.forward(*nnx.split(model), IDS)), reference("phi-4")[0],
                               rtol=0, atol=1e-5)


class RecordingSlice:
    """A safetensors slice that records the size of every block read from it."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __getitem__(self, index):
        block = self.inner[index]
        self.log.append(block.nbytes)
        return block

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("spec, biggest_share", [("fsdp=8", 1 / 8), ("tensor=2", 1 / 2), ("tensor=8", 1 / 8)])
def test_each_device_reads_only_its_block(tiny_checkpoint, monkeypatch, spec, biggest_share):
    """Devices read their own blocks from the file (never the whole tensor on a sharded mesh), and
    devices that hold the same block share one read: every tensor is read about once in all."""
    folder, _ = tiny_checkpoint("phi-4")
    reads: dict[str, list[int]] = {}
    opened = weights._open

    class Recording:
        def __init__(self, path):
            self.f = opened(path)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_slice(self, name):
            return RecordingSlice(self.inner.get_slice(name), reads.setdefault(name, []))

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(weights, "_open", Recording)
    phi4_jax.load(folder, dtype="float32", mesh=mesh(spec), progress=False)
    sizes = {s.name: s.nbytes for s in weights.inspect_hf(str(folder), Phi4Config.from_json(folder))}
    for name, log in reads.items():
        if "norm" in name:  # vectors: replicated over tensor
            continue
        # (tensor=8 repeats the 10 KV heads to 40: a device reads 1-2 stored heads of its 5.)
        assert max(log) <= sizes[name] * biggest_share, (name, log)
        assert sum(log) <= sizes[name] * 1.25, (name, log)


def test_host_memory_stays_near_one_tensor(tiny_checkpoint):
    """Loading holds about one tensor on the host beyond what stays on the devices (on CPU, the
    devices' buffers are host memory too, and may be the very blocks that were read)."""
    import tracemalloc

    folder, _ = tiny_checkpoint("phi-4")
    sizes = [s.nbytes for s in weights.inspect_hf(str(folder), Phi4Config.from_json(folder))]
    phi4_jax.load(folder, dtype="float32", mesh=mesh("data=2,tensor=4"), progress=False)  # one-time caches
    tracemalloc.start()
    try:
        model, _ = phi4_jax.load(folder, dtype="float32", mesh=mesh("data=2,tensor=4"), progress=False)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(sizes) > 5 * max(sizes)
    assert peak - kept < 2 * max(sizes), (peak, kept, max(sizes), sum(sizes))


def test_a_mesh_that_cannot_split_the_heads_is_refused(tiny_checkpoint):
    folder, _ = tiny_checkpoint("phi-3.5-mini")  # 4 query / 4 KV heads
    with pytest.raises(MeshError, match="tensor=8 cannot split .* tensor sizes that work: 1, 2, 4"):
        phi4_jax.load(folder, dtype="float32", mesh="tensor=8", progress=False)


def test_place_moves_a_model_in_memory_onto_the_mesh(tiny_checkpoint, reference):
    folder, _ = tiny_checkpoint("phi-4-mini")
    model = phi4_jax.load(folder, dtype="float32", progress=False)[0]
    placed = meshes.place(model, mesh("data=2,tensor=4"))
    assert meshes.mesh_of(nnx.state(placed)).shape["tensor"] == 4
    np.testing.assert_allclose(np.asarray(phi4_jax.forward(*nnx.split(placed), IDS)), reference("phi-4-mini")[0],
                               rtol=0, atol=1e-5)
    # A phi-4 in memory as one device holds it (its 10 KV heads as stored): tensor=4 needs them repeated.
    unrepeated = phi4_jax.load(tiny_checkpoint("phi-4")[0], dtype="float32", progress=False)[0]
    assert unrepeated.config.num_key_value_heads == 10
    with pytest.raises(MeshError, match="config_for_mesh"):
        meshes.place(unrepeated, mesh("tensor=4"))


@pytest.mark.parametrize("spec", ["tensor=4", "data=2,tensor=2", "fsdp=2,tensor=2"])
@pytest.mark.parametrize("quantized", [False, True])
def test_the_vocabulary_parallel_lookup_gives_the_gather_s_rows(spec, quantized):
    """Each device looks up the ids its rows hold and one all-reduce sums them: the very rows (and,
    for an int8 table, the same rows times their scales) a gather from the whole table gives, with the
    ids split over the batch axes too."""
    on = mesh(spec)
    rng = np.random.default_rng(0)
    table, scale = rng.standard_normal((64, 16)).astype(np.float32), None
    if quantized:
        table, scale = int8.quantize(table, 1)
    ids = rng.integers(0, 64, (4, 6)).astype(np.int32)
    want = table[ids] if scale is None else table[ids] * scale[ids][..., None]
    place = lambda x, axes: jax.device_put(x, rules.sharding(on, axes, x.shape))  # noqa: E731
    args = (place(table, ("vocab", "embed")), None if scale is None else place(scale, ("vocab",)),
            place(ids, ("batch", None)))
    got = jax.jit(lambda w, s, i: vocab_parallel.lookup(on, w, s, i, jnp.float32))(*args)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


def test_the_embedding_is_looked_up_vocabulary_parallel_only_where_the_rules_split_its_rows(tiny_checkpoint):
    folder, _ = tiny_checkpoint("phi-4-mini")
    for spec, split in (("tensor=2", True), ("data=2,tensor=4", True), ("fsdp=8", False)):
        model = phi4_jax.load(folder, dtype="float32", mesh=spec, progress=False)[0]
        assert (model.model.embed_tokens.split is not None) == split, spec
    assert phi4_jax.load(folder, dtype="float32", progress=False)[0].model.embed_tokens.split is None


def test_layout_description_names_every_kind_of_parameter(tiny_checkpoint):
    folder, _ = tiny_checkpoint("phi-4")
    model, _ = phi4_jax.load(folder, dtype="float32", mesh=mesh("data=2,tensor=4"), progress=False)
    text = meshes.describe(nnx.to_pure_dict(nnx.state(model)))
    assert "mesh: data=2, fsdp=1, tensor=4, seq=1" in text
    keys = {".".join("*" if isinstance(k, int) else k for k in key)
            for key in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))}
    for key in keys:
        assert key in text
    assert re.search(r"model\.layers\.\*\.self_attn\.k_proj\.weight +\(20, 4, 160\) +\('tensor', None, None\) "
                     r"+per device \(5, 4, 160\)", text), text
    assert "1.68 MB in all, 0.42 MB on the fullest device" in text


# --- the command line, and several processes -----------------------------------------------------
# (chat_checkpoint: phi-4's tiny shape, its 10 KV heads repeated on tensor=4 and 8, with Phi-3.5-mini's
# tokenizer and vocabulary)

GENERATE = ["--prompt", "Hello there", "--ignore-chat-template", "--max-tokens", "8", "--json"]


def cli_json(capsys, *flags):
    from phi4_jax.cli import common as cli
    from phi4_jax.generate import main

    assert main(list(flags)) == cli.EXIT_OK
    out, err = capsys.readouterr()
    return __import__("json").loads(out.strip().splitlines()[-1]), err


def test_cli_mesh_gives_the_one_device_tokens_and_verbose_shows_the_layout(chat_checkpoint, capsys):
    """--mesh (a trailing comma is fine) and --devices give the one-device tokens; --verbose shows the layout."""
    one, _ = cli_json(capsys, "--model", str(chat_checkpoint), *GENERATE, "--quiet")
    sharded, err = cli_json(capsys, "--model", str(chat_checkpoint), *GENERATE, "--mesh", "tensor=8,",
                            "--verbose")
    assert sharded["tokens"] == one["tokens"] and len(one["tokens"]) == 8
    assert "mesh: data=1, fsdp=1, tensor=8, seq=1 (8 cpu devices: all;" in err
    assert re.search(r"self_attn\.k_proj\.weight +\(40, 4, 160\)", err), err  # 10 KV heads, repeated 4x
    part, err = cli_json(capsys, "--model", str(chat_checkpoint), *GENERATE, "--mesh", "tensor=4",
                         "--devices", "4-7", "--verbose")
    assert part["tokens"] == one["tokens"]
    assert "mesh: data=1, fsdp=1, tensor=4, seq=1 (4 cpu devices: devices 4-7 of 8;" in err


@pytest.mark.parametrize("flags, words", [
    (["--mesh", "tensor=3"], ["tensor=3 cannot split", "tensor sizes that work: 1, 2, 4, 5, 8"]),
    (["--mesh", "tensor=16"], ["has 16 devices"]),
    (["--mesh", "tensor=4", "--devices", "6-9"], ["there are 8 devices, indices 0-7"]),
    (["--mesh", "tensor=4", "--devices", "0-2"], ["4 devices but there are 3"]),
    (["--devices", "0-3"], ["give --mesh too"]),
    (["--mesh", "heads=8"], ["unknown axis 'heads'"]),
    (["--process-id", "2", "--num-processes", "2", "--coordinator-address", "127.0.0.1:1"],
     ["process id 2 is not in 0..1"]),
])
def test_cli_bad_mesh_is_a_usage_error(chat_checkpoint, capsys, flags, words):
    """Each is a usage error that says what is wrong. (A trailing comma, which is fine, is in the test above.)"""
    from phi4_jax.cli import common as cli
    from phi4_jax.generate import main

    code = main(["--model", str(chat_checkpoint), *GENERATE, *flags])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and out == ""
    for word in words:
        assert word in err, err


def run_processes(n: int, args: list[str], port: int, stdin: str | None = None) -> list[tuple[int, str, str]]:
    """Runs `python -m phi4_jax.generate ARGS` as processes 0..n-1 of one run on loopback (4 CPU
    devices each); returns each one's (exit code, stdout, stderr)."""
    import os
    import subprocess
    import sys

    # (at -O0, as this process compiles: conftest.py)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}  # never listen beyond loopback
    procs = [subprocess.Popen(
        [sys.executable, "-m", "phi4_jax.generate", *args, "--coordinator-address", f"127.0.0.1:{port}",
         "--num-processes", str(n), "--process-id", str(i)], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(stdin, timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process of the multi-process run hung")
        results.append((p.returncode, out, err))
    return results


def test_multihost_runs_refuse_stdin_prompts(chat_checkpoint):
    """Only one host has the terminal: `--prompt -` and `--chat` are refused once a run is joined
    (here a run of one process, which joins at once)."""
    for flags in (["--prompt", "-"], ["--chat"]):
        [(code, out, err)] = run_processes(1, ["--model", str(chat_checkpoint), *flags, "--mesh", "tensor=4"],
                                           free_port(), stdin="Hello\n")
        assert code == 2 and "reads no stdin" in err and out.strip() == "", (code, err[-2000:])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_tokens_of_one(chat_checkpoint, capsys):
    """Two processes x 4 CPU devices (jax.distributed on loopback, gloo collectives), one tensor=8
    mesh across both, then a seq=8 one (ring prefill): the same greedy tokens as one process with 8
    devices; only process 0 prints."""
    import json

    one, _ = cli_json(capsys, "--model", str(chat_checkpoint), *GENERATE, "--quiet", "--mesh", "tensor=8")
    results = run_processes(2, ["--model", str(chat_checkpoint), *GENERATE, "--mesh", "tensor=8"], free_port())
    for code, _, err in results:
        # 134 (SIGABRT): JAX's heartbeat ended a process whose peer died.
        assert code == 0, (code, err[-3000:])
    ours = [[line for line in out.splitlines() if line.startswith("{")] for _, out, _ in results]
    assert len(ours[0]) == 1 and ours[1] == []  # gloo's own "[Gloo] ..." lines aside, process 1 is silent
    assert json.loads(ours[0][0])["tokens"] == one["tokens"]
    # The same over seq=8: the prompt is prefilled with ring attention across both processes.
    ring = run_processes(2, ["--model", str(chat_checkpoint), *GENERATE, "--mesh", "seq=8"], free_port())
    assert [code for code, _, _ in ring] == [0, 0], ring[0][2][-3000:]
    [line] = [line for line in ring[0][1].splitlines() if line.startswith("{")]
    assert json.loads(line)["tokens"] == one["tokens"]
    # Without --mesh each process would hold its own model: refused on every process, with the fix.
    for code, out, err in run_processes(2, ["--model", str(chat_checkpoint), *GENERATE], free_port()):
        assert code == 2 and "give a mesh over all their devices" in err and "data=2,tensor=4" in err, err[-2000:]
