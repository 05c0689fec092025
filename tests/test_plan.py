"""The planner: per-device bytes and collectives of the real steps, compiled for a mesh without weights."""

import jax
import pytest

from phi4_jax.planner import plan
from phi4_jax.parallel import mesh as meshes
from phi4_jax.config import Phi4Config

# One worker compiles the plans, once; with the slow tests (`phi4-jax plan` has a quick test in test_commands).
pytestmark = [pytest.mark.xdist_group("plan"), pytest.mark.slow]


def tiny(shape):
    return Phi4Config.from_preset(f"tiny-{shape}")


@pytest.fixture(scope="session")  # kept while xdist interleaves other modules on its worker
def plans():
    config = tiny("phi-4")  # 40 q / 10 kv heads: tensor=4 repeats each KV head twice
    return {spec: plan.plan(config, meshes.make_mesh(spec, jax.devices()[:n]), context=64, batch=4,
                            dtype="float32", prefill_piece=16)
            for spec, n in (("tensor=1", 1), ("tensor=4", 4))}


def test_one_device_holds_everything_and_talks_to_no_one(plans):
    config = tiny("phi-4")
    p = plans["tensor=1"]
    assert p["per_device"]["weights_bytes"] == config.num_parameters * 4
    assert p["per_device"]["kv_cache_bytes"] == 2 * 2 * 4 * 10 * 64 * 4 * 4  # k+v, layers, B, KV, L, D, f32
    assert all(n == 0 for step in p["steps"].values() for n in step["collectives"].values())
    # XLA's arguments: the weights and the cache (and a few small per-row arrays).
    for step in p["steps"].values():
        resident = p["per_device"]["weights_bytes"] + p["per_device"]["kv_cache_bytes"]
        assert resident <= step["argument_bytes"] < resident * 1.1


def test_tensor_parallel_splits_weights_and_cache_and_all_reduces(plans):
    one, four = plans["tensor=1"], plans["tensor=4"]
    assert four["model"]["kv_heads_on_mesh"] == 20
    # the cache: twice the heads (repeated), a quarter of them per device
    assert four["per_device"]["kv_cache_bytes"] == one["per_device"]["kv_cache_bytes"] * 2 // 4
    assert four["per_device"]["weights_bytes"] < one["per_device"]["weights_bytes"] / 3
    for step in four["steps"].values():
        assert step["collectives"]["all-reduce"] >= 2  # attention and MLP outputs, per layer
        assert step["argument_bytes"] < one["steps"]["decode"]["argument_bytes"] / 2
    assert four["per_device"]["needed_bytes"] == (four["per_device"]["weights_bytes"]
                                                  + four["per_device"]["kv_cache_bytes"]
                                                  + max(s["temp_bytes"] for s in four["steps"].values()))


def test_fits_on_lists_the_accelerators_whose_usable_memory_holds_it():
    sizes = plan.ACCELERATORS
    for name, size in sizes.items():
        at_the_edge = int(plan.USABLE * size)
        fits = plan.fits_on(at_the_edge)
        assert name in fits and name not in plan.fits_on(at_the_edge + 1)
        assert fits == [n for n, s in sizes.items() if s >= size]  # every larger one, in the table's order
        assert name not in plan.fits_on(size)  # headroom is kept
    assert plan.fits_on(10**15) == [] and plan.fits_on(1) == list(sizes)


def test_a_compiler_refusal_for_memory_reads_as_the_temporaries_it_names():
    """XLA's TPU compiler refuses a program whose temporaries overflow the chip (Phi-4-mini's 128K
    ring prefill on v5e): the plan records what it would need rather than failing."""
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(16.19G) exceeds available HBM (15.75G).")
    assert plan._temporaries_refused(message) == int(16.19 * 2**30)
    assert plan._temporaries_refused("RESOURCE_EXHAUSTED: something else") is None


def test_a_kernel_is_planned_only_for_an_accelerator_target():
    """Fake CPU devices compile XLA's attention; a kernel asked for there is a ConfigError naming the
    targets that compile it, before anything is compiled ("auto" is XLA there)."""
    from phi4_jax.errors import ConfigError

    config = Phi4Config.from_preset("tiny")
    mesh = meshes.make_mesh("tensor=1", jax.devices()[:1])
    for kernel in ("splash", "cudnn"):
        with pytest.raises(ConfigError, match="compiles only for an accelerator named as the target.*v5e:2x4"):
            plan.plan(config, mesh, 64, batch=1, target="tpu" if kernel == "splash" else "gpu", attention=kernel)
    with pytest.raises(ConfigError, match="'cudnn' needs an NVIDIA GPU"):
        plan.plan(config, mesh, 64, batch=1, target="tpu", attention="cudnn")


def test_the_speculative_call_holds_a_drafting_step_beside_the_plain_one():
    """`speculative=`: the decode call that verifies drafts, its loop a drafting step (the K + 1
    positions' forward: the weights and cache read again, and more) beside the plain step."""
    from phi4_jax.engine.speculative import Speculation

    p = plan.plan(tiny("phi-4"), meshes.make_mesh("tensor=1", jax.devices()[:1]), context=64, batch=4,
                  dtype="float32", prefill_piece=16, speculative=Speculation(4))
    plain, spec = p["steps"]["decode"], p["steps"]["speculative"]
    assert spec["drafts"] == 4
    drafting = spec["main_memory_bytes_in_loops"] - plain["main_memory_bytes_in_loops"]
    resident = p["per_device"]["weights_bytes"] + p["per_device"]["kv_cache_bytes"]
    assert resident < drafting < 5 * plain["main_memory_bytes_in_loops"]
