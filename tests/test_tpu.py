"""TPU programs compiled on this CPU machine for a described v5e slice (libtpu; no TPU): the engine's
prefill and decode on `tensor` and `seq` meshes, their memory, bytes and collectives as designed."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from phi4_jax.config import Phi4Config
from phi4_jax.model import attention
from phi4_jax.model.backend import Backend
from phi4_jax.errors import ConfigError
from phi4_jax.parallel import mesh as meshes
from phi4_jax.planner import hlo, plan, targets

# One worker compiles the plans, once; compiling for a TPU slice is slow, so these run with the slow tests.
pytestmark = [pytest.mark.xdist_group("tpu"), pytest.mark.slow]

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles for TPU")

SLICE = "v5e:2x2"  # one host's 4 chips, the smallest slice libtpu describes
# Head dim 128 as phi-4 and Phi-4-mini (TPU tiles are 128 lanes wide; 4-wide test heads would be
# padded 32x and swamp every byte count); 2 KV heads, repeated to 4 on tensor=4.
CONFIG = Phi4Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    original_max_position_embeddings=512)
CONTEXT = 512


@pytest.fixture(scope="session")  # kept while xdist interleaves other modules on its worker
def plans():
    devices = targets.devices(SLICE)
    return {axis: plan.plan(CONFIG, meshes.make_mesh(f"{axis}=4", devices), CONTEXT, batch=1, dtype="bfloat16",
                            prefill_piece=256, attention="xla")
            for axis in ("tensor", "seq")}


@pytest.mark.parametrize("axis", ["tensor", "seq"])
def test_prefill_and_decode_compile_for_the_slice_with_xla_costs(plans, axis):
    p = plans[axis]
    assert p["target"] == "tpu" and p["devices"] == 4
    for step in p["steps"].values():
        assert step["xla_flops"] > 0 and step["xla_bytes_accessed"] > 0 and step["main_memory_bytes"] > 0
        # TPU's compile: no CPU-only upcasts of bf16 operands, and its own temporaries.
        assert step["cpu_only_upcast_bytes"] == 0 and step["temp_bytes"] == step["temp_bytes_cpu_compile"]


def test_a_prompt_in_pieces_attends_only_what_its_groups_reach_and_counts_each_trip(plans):
    """Eight 64-token pieces run in groups (`prefill.reach_groups`: pieces 1, 2, 3, 4, 5-6, 7-8), each
    attending up to its group's end: 38 blocks of 64 x 64 query-key pairs, 1.19x the causal 32 (the
    whole prompt from every piece: 64). One 512-token piece attends in causal blocks of 256 queries:
    48. The program's matmul FLOPs count each group's loop as often as it runs (XLA's own count has
    a loop's body once)."""
    slice_mesh = meshes.make_mesh("tensor=4", targets.devices(SLICE))
    options = dict(batch=1, dtype="bfloat16", attention="xla")
    whole = plan.plan(CONFIG, slice_mesh, CONTEXT, prefill_piece=CONTEXT, **options)["steps"]["prefill"]
    pieces = plan.plan(CONFIG, slice_mesh, CONTEXT, prefill_piece=64, **options)["steps"]["prefill"]
    assert CONTEXT == 2 * attention.CAUSAL_BLOCK == 8 * 64
    # Scores and their values (2 products, 2 FLOPs a multiply-add) of a 64 x 64 block, a device's
    # heads, every layer.
    block = 2 * 2 * (CONFIG.num_attention_heads // 4) * 64 * 64 * CONFIG.head_dim * CONFIG.num_hidden_layers
    assert pieces["matmul_flops"] == whole["matmul_flops"] - (48 - 38) * block
    assert pieces["xla_flops"] < pieces["matmul_flops"]
    # Without a loop, the matmuls are nearly all of XLA's FLOPs.
    assert 0.9 * whole["xla_flops"] <= whole["matmul_flops"] <= whole["xla_flops"]


@pytest.mark.parametrize("axis", ["tensor", "seq"])
def test_splash_runs_on_the_mesh_where_xla_wrote_the_scores(plans, axis):
    """The default ("auto") on a TPU: splash attention, under shard_map on a tensor mesh and inside
    the ring's blocks on a seq mesh (Mosaic refuses a kernel XLA would have to partition). The
    prompt's attention is the same work as XLA's (every piece up to its reach, every ring block),
    counted from the kernel calls' operands where XLA's products are gone; the decode step (one
    query) stays XLA's. (At these sizes XLA keeps its scores in VMEM: the HBM the kernel saves is
    measured on the real shapes, bench/RESULTS.md.)"""
    devices = targets.devices(SLICE)
    splash = plan.plan(CONFIG, meshes.make_mesh(f"{axis}=4", devices), CONTEXT, batch=1, dtype="bfloat16",
                       prefill_piece=256)
    xla = plans[axis]
    assert splash["attention"] == "splash" and xla["attention"] == "xla"
    got, want = splash["steps"]["prefill"], xla["steps"]["prefill"]
    assert got["matmul_flops"] == want["matmul_flops"]
    assert splash["steps"]["decode"]["matmul_flops"] == xla["steps"]["decode"]["matmul_flops"]


@pytest.mark.parametrize("axis", ["tensor", "seq"])
def test_a_decode_step_reads_the_weights_and_cache_once_and_copies_none_within_hbm(plans, axis):
    """TPU reads what it computes on through VMEM (asynchronous copies into memory space S(1));
    a weight or a cache layer copied within HBM would cost a second read and write every step.
    The step's HBM traffic is the weights (less the untied embedding table: a row of it is read)
    and the cache read once, plus at most the cache written
    back: at this short context TPU stages each whole cache layer in VMEM, updates its slot there
    and writes the layer back (at Phi-4-mini's 8K it writes the slot alone). XLA's "bytes accessed"
    counts the staging copies on top of the reads, several times the weights and the cache."""
    p = plans[axis]
    decode = p["steps"]["decode"]
    smallest_layer = 2 * CONFIG.hidden_size * CONFIG.head_dim // 4  # one head's bf16 projection shard
    assert decode["memory_copy_bytes"] < smallest_layer
    reads, cache = p["per_device"]["decode_reads_bytes"], p["per_device"]["kv_cache_bytes"]
    # A call (one step and what runs around the loop) reads them all; a step of its loop no more than
    # that (weights staged in VMEM before the loop are read once per call).
    assert decode["main_memory_bytes_in_loops"] <= 1.02 * reads + cache and reads <= decode["main_memory_bytes"]
    assert decode["xla_bytes_accessed"] > 3 * reads


def test_tensor_parallel_all_reduces_twice_per_layer(plans):
    """Of the all-reduces that move activations, each layer has two (the attention's and the MLP's
    outputs; in each of the prompt's two pieces, one group each) and the vocabulary-split embedding
    lookup one; the rest are a few scalars per row (the sampler's), and the decode step gathers
    nothing larger than a row of logits."""
    steps = plans["tensor"]["steps"]
    for name, rows, pieces in (("prefill", 256, 2), ("decode", 1, 1)):  # pieces of the prompt, or one token
        sizes = steps[name]["collective_result_bytes"]
        activations = [b for b in sizes["all-reduce"] if b >= rows * CONFIG.hidden_size * 2]
        assert len(activations) == pieces * 2 * CONFIG.num_hidden_layers + 1, (name, sizes)
        assert max(sizes["all-reduce"][len(activations):], default=0) <= 64, (name, sizes)
        assert max(sizes.get("all-gather", [0])) <= rows * CONFIG.vocab_size * 4, (name, sizes)


def test_the_seq_ring_sends_the_next_block_while_it_computes_this_one(plans):
    """Each layer's ring passes its key, value and position blocks on (3 collective-permutes per
    step but the last, in each prompt piece), and TPU's scheduler puts every transfer's start
    before the block's attention and its done after it."""
    prefill = plans["seq"]["steps"]["prefill"]
    permutes = prefill["collectives"]["collective-permute"]
    assert permutes >= 3 * CONFIG.num_hidden_layers and prefill["collectives"]["all-to-all"] == 0
    assert prefill["permutes_under_compute"] == permutes


def test_a_ring_prefill_holds_one_layers_hidden_states_not_every_layers():
    """12 layers on seq=4, 2048 tokens a chip: without a barrier after each layer, XLA's TPU
    compiler wrote the residual stream as one sum of every layer's outputs in a fusion at the end
    (16 operands of a chip's hidden-state shape), each output live to the last layer (temporaries
    62 MB here, 30 MB with the barrier; at 128K on v5e-8, 6.6 GB against 1.4 GB)."""
    config, context = dataclasses.replace(CONFIG, num_hidden_layers=12), 8192
    mesh = meshes.make_mesh("seq=4", targets.devices(SLICE))
    with jax.default_device(mesh.devices.flat[0]):
        program = hlo.parse(plan.lower_step("prefill", config, mesh, context, 1, jnp.dtype(jnp.bfloat16), 256,
                                            Backend("tpu")).compile().as_text())
    hidden = sorted([context // 4, config.hidden_size])  # a chip's hidden states, any unit axes aside
    shaped = lambda name: any(sorted(d for d in a.dims if d > 1) == hidden  # noqa: E731
                              for a in program.by_name[name].arrays)
    counts = [sum(map(shaped, i.operands)) for i, _ in program.instructions(fused=False) if i.op == "fusion"]
    assert 1 <= max(counts) <= 4, sorted(counts)[-5:]


@pytest.mark.parametrize("mesh_spec, batch, context", [("tensor=1", 1, 32768), ("seq=4", 2, 65536)])
def test_a_decode_call_keeps_the_cache_where_it_lies_with_several_kv_heads_a_chip(mesh_spec, batch, context):
    """8 KV heads on a chip (one device, or each seq shard), 256 MB of cache a chip: the new token's
    keys/values pinned to the cache's layout (`xla_tpu.as_cache_layout`), the decode loop carries
    the cache as it is stored, for the plain write (`cache.write`) and the split cache's
    (`cache.write_at`): nothing runs outside the loop but scalars. Left free, XLA's TPU compiler
    relaid each layer out token-major into the loop and back (963 MB a call here)."""
    config = dataclasses.replace(CONFIG, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                                 num_hidden_layers=2, max_position_embeddings=context,
                                 original_max_position_embeddings=context)
    mesh = meshes.make_mesh(mesh_spec, targets.devices(SLICE))
    with jax.default_device(mesh.devices.flat[0]):
        program = hlo.parse(plan.lower_step("decode", config, mesh, context, batch, jnp.dtype(jnp.bfloat16), 256,
                                            Backend("tpu")).compile().as_text())
    cache = 2 * config.num_hidden_layers * batch * 8 * (context // mesh.shape["seq"]) * 128 * 2  # a chip's
    outside = hlo.main_memory_bytes(program) - hlo.main_memory_bytes(program, looped=True)
    assert cache >= 2**28 and outside < cache / 1000 and hlo.memory_copy_bytes(program) < cache / 1000


def test_a_slice_that_libtpu_cannot_describe_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape(targets.TPU_EXAMPLES)):
        targets.devices("v5e:1x1")  # a slice fills a host
    with pytest.raises(ConfigError, match="not an accelerator target"):
        targets.devices("v5e-8")


def test_target_names_give_their_chips_and_a_gpu_without_its_compiler_is_a_config_error(monkeypatch):
    assert targets.chip("v6e:2x4").hbm_bytes == 32 * 2**30 and targets.chip("h200:8").hbm_bytes == 141 * 10**9
    assert targets.is_target("h100:8") and not targets.is_target("gpu") and not targets.is_target("h100")
    from jax.experimental import topologies

    def no_plugin(**_):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(ConfigError, match=r"phi4-jax\[gpu-compile\]"):
        targets.devices("h100:8")


@pytest.fixture(scope="session")
def int8_plan():
    return plan.plan(CONFIG, meshes.make_mesh("tensor=4", targets.devices(SLICE)), CONTEXT, batch=1,
                     dtype="bfloat16", prefill_piece=256, quantize="int8", attention="xla")


def test_an_int8_decode_step_reads_the_int8_weights_and_no_float_copy_of_them(plans, int8_plan):
    """Weight-only int8 on the slice: the weights take half their bf16 bytes per chip (scales beside
    them split as their channels do), and a decode step's HBM traffic is those int8 bytes and the
    cache, once: the int8 -> bf16 conversion happens inside the matmul's fusion, with no bf16 copy
    of a weight written to HBM (which would read and write twice the int8 bytes again)."""
    bf16, int8 = plans["tensor"]["per_device"], int8_plan["per_device"]
    assert 0.5 * bf16["weights_bytes"] < int8["weights_bytes"] < 0.55 * bf16["weights_bytes"]
    decode = int8_plan["steps"]["decode"]
    assert int8_plan["quantize"] == "int8" and decode["cpu_only_dequantized_bytes"] == 0
    # As bf16's step (above). No copy within HBM, nor the int8 table relaid out for the lookup of
    # one token (XLA's one-row gather, a dynamic slice, did: its shard read and written every step,
    # 1.035x here; `model/xla_tpu.py`).
    assert decode["memory_copy_bytes"] < 1024
    assert decode["main_memory_bytes_in_loops"] <= 1.02 * (int8["decode_reads_bytes"] + int8["kv_cache_bytes"])
    assert decode["main_memory_bytes_in_loops"] < 0.7 * plans["tensor"]["steps"]["decode"]["main_memory_bytes_in_loops"]
