"""GPU programs compiled on this CPU machine for described NVIDIA H100s (the CUDA plugin and ptxas
of the `gpu-compile` extra; no GPU, no driver): the engine's prefill and decode on a `tensor` mesh."""

import dataclasses

import jax.numpy as jnp
import pytest

from phi4_jax.config import Phi4Config
from phi4_jax.errors import ConfigError
from phi4_jax.model.backend import Backend
from phi4_jax.planner import hlo, plan
from phi4_jax.parallel import mesh as meshes
from phi4_jax.planner import targets

pytest.importorskip("jax_plugins.xla_cuda12", reason="the gpu-compile extra (the CUDA plugin) compiles for GPUs")

CONFIG = Phi4Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    original_max_position_embeddings=512)


@pytest.fixture(scope="module")
def tensor_plan():
    try:
        devices = targets.devices("h100:2")
    except ConfigError as e:  # the plugin without ptxas, or a jaxlib of another version
        pytest.skip(f"no GPU compiler here: {e}")
    return plan.plan(CONFIG, meshes.make_mesh("tensor=2", devices), 512, batch=1, dtype="bfloat16", prefill_piece=256,
                     attention="xla")


def test_the_steps_compile_for_h100s_with_the_gpu_s_own_program(tensor_plan):
    """Each layer all-reduces its attention and MLP outputs (in each of the prompt's two pieces, one
    group each), and the vocabulary-split embedding lookup its looked-up rows once; nothing larger
    than a row of logits (and the sampler's few values beside it) is gathered (left to itself,
    XLA's GPU partitioner all-gathers the whole table at every decode step for that lookup)."""
    assert tensor_plan["target"] == "gpu" and tensor_plan["devices"] == 2
    for name, rows, pieces in (("prefill", 256, 2), ("decode", 1, 1)):
        step = tensor_plan["steps"][name]
        assert step["matmul_flops"] > 0 and step["cpu_only_upcast_bytes"] == 0
        assert step["xla_flops"] is None  # GPU's compiler gives no cost analysis
        sizes = step["collective_result_bytes"]
        activations = [b for b in sizes["all-reduce"] if b >= rows * CONFIG.hidden_size * 2]
        assert len(activations) == pieces * 2 * CONFIG.num_hidden_layers + 1, (name, sizes)
        assert max(sizes.get("all-gather", [0])) <= rows * (CONFIG.vocab_size + 128) * 4, (name, sizes)
    # Two 256-token pieces over the 512 slots: the loop's body counted twice.
    per_piece_projections = 2 * 256 * CONFIG.num_hidden_layers * CONFIG.layer_parameters // 2
    assert tensor_plan["steps"]["prefill"]["matmul_flops"] > 2 * per_piece_projections


@pytest.mark.parametrize("kv_heads", [2, 4])  # two queries per KV head, or one
def test_decode_on_one_h100_reads_the_cache_where_it_lies(kv_heads):
    """One H100 holding several KV heads: the decode step reads each cache layer where it lies and
    writes its new slot there; it copies none of it and moves at most 1.15x what it must read (before:
    two queries a head had every layer's values transposed and copied out and back each step; one
    query a head had them multiplied out whole before their sum, 1.46x)."""
    try:
        devices = targets.devices("h100:1")
    except ConfigError as e:
        pytest.skip(f"no GPU compiler here: {e}")
    config = dataclasses.replace(CONFIG, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                                 original_max_position_embeddings=2048)
    one = plan.plan(config, meshes.make_mesh("tensor=1", devices), 2048, batch=1, dtype="bfloat16", prefill_piece=256,
                    attention="xla")
    decode, layer = one["steps"]["decode"], kv_heads * 2048 * config.head_dim * 2  # one layer's keys, bf16
    assert decode["memory_copy_bytes"] < layer / 4, decode
    assert decode["main_memory_bytes_in_loops"] <= 1.15 * one["per_device"]["decode_reads_bytes"], decode


def test_cudnn_serves_the_prompt_and_decode_stays_with_xla():
    """"auto" on a GPU in bfloat16 is cuDNN: its flash attention in the prefill's program (the same
    work as XLA's products, counted from the kernel calls' operands), and XLA's products in the
    decode step (cuDNN's call reads keys and values token-major: it transposed every cache layer at
    each step where the engine decoded through it)."""
    pytest.importorskip("nvidia.cudnn", reason="cuDNN's library (the gpu-compile extra) builds its kernels")
    try:
        devices = targets.devices("h100:1")
    except ConfigError as e:
        pytest.skip(f"no GPU compiler here: {e}")
    mesh = meshes.make_mesh("tensor=1", devices)
    text = {(step, kernel): plan.lower_step(step, CONFIG, mesh, 512, 1, jnp.bfloat16, 256, Backend("gpu"),
                                            attention=kernel).compile().as_text()
            for step in ("prefill", "decode") for kernel in ("cudnn", "xla")}
    assert '"__cudnn$fmha' in text["prefill", "cudnn"] and "__cudnn" not in text["decode", "cudnn"]
    flops = {key: hlo.matmul_flops(hlo.parse(program)) for key, program in text.items()}
    assert flops["prefill", "cudnn"] == flops["prefill", "xla"] and flops["decode", "cudnn"] == flops["decode", "xla"]


def test_a_prompt_in_groups_of_pieces_copies_no_cache_layer():
    """A prompt in pieces runs in groups (`prefill.reach_groups`), one loop each; the next group
    writes the cache only once this group's reads are done (a barrier between them). Without it
    XLA's GPU compiler inlined the one-trip groups, scheduled a write before a read of the version it
    replaces, and copied the cache layer to keep it: here 9 layers' worth per prefill (Phi-4-mini,
    4 rows of 4K on one H100: 8.6 GB, temporaries 2.4 -> 1.3 GB without)."""
    try:
        devices = targets.devices("h100:1")
    except ConfigError as e:
        pytest.skip(f"no GPU compiler here: {e}")
    two = plan.plan(CONFIG, meshes.make_mesh("tensor=1", devices), 512, batch=2, dtype="bfloat16", prefill_piece=64,
                    attention="xla")
    layer = 2 * CONFIG.num_key_value_heads * 512 * CONFIG.head_dim * 2  # one layer's keys, bf16
    assert two["steps"]["prefill"]["memory_copy_bytes"] < layer / 4


@pytest.mark.parametrize("mesh", ["tensor=2", "seq=2"])
def test_cudnn_runs_per_gpu_on_a_mesh_and_in_the_ring(mesh):
    """cuDNN's call on a mesh runs per GPU under shard_map (`attention.per_device`), on `tensor` and
    inside ring attention's map on `seq`: the same work as XLA's attention there."""
    pytest.importorskip("nvidia.cudnn", reason="cuDNN's library (the gpu-compile extra) builds its kernels")
    try:
        devices = targets.devices("h100:2")
    except ConfigError as e:
        pytest.skip(f"no GPU compiler here: {e}")
    got = plan.plan(CONFIG, meshes.make_mesh(mesh, devices), 512, batch=1, dtype="bfloat16", prefill_piece=256)
    want = plan.plan(CONFIG, meshes.make_mesh(mesh, devices), 512, batch=1, dtype="bfloat16", prefill_piece=256,
                     attention="xla")
    assert got["attention"] == "cudnn"
    assert got["steps"]["prefill"]["matmul_flops"] == want["steps"]["prefill"]["matmul_flops"]

