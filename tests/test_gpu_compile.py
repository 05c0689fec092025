"""GPU programs compiled on this CPU machine for described NVIDIA H100s (the CUDA plugin and ptxas
of the `gpu-compile` extra; no GPU, no driver): the engine's prefill and decode on a `tensor` mesh."""

import pytest

from phi4_jax.config import Phi4Config
from phi4_jax.errors import ConfigError
from phi4_jax.planner import plan
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
    return plan.plan(CONFIG, meshes.make_mesh("tensor=2", devices), 512, batch=1, dtype="bfloat16", prefill_piece=256)


def test_the_steps_compile_for_h100s_with_the_gpu_s_own_program(tensor_plan):
    """Each layer all-reduces its attention and MLP outputs; the vocabulary-split embedding lookup
    is left out of the count: XLA's GPU partitioner all-gathers the whole table for it (a departure
    BUILD.md records)."""
    assert tensor_plan["target"] == "gpu" and tensor_plan["devices"] == 2
    for name, rows in (("prefill", 256), ("decode", 1)):
        step = tensor_plan["steps"][name]
        assert step["matmul_flops"] > 0 and step["cpu_only_upcast_bytes"] == 0
        assert step["xla_flops"] is None  # GPU's compiler gives no cost analysis
        sizes = step["collective_result_bytes"]["all-reduce"]
        assert sum(b >= rows * CONFIG.hidden_size * 2 for b in sizes) >= 2 * CONFIG.num_hidden_layers, (name, sizes)
    # Two 256-token pieces over the 512 slots: the loop's body counted twice.
    per_piece_projections = 2 * 256 * CONFIG.num_hidden_layers * CONFIG.layer_parameters // 2
    assert tensor_plan["steps"]["prefill"]["matmul_flops"] > 2 * per_piece_projections
