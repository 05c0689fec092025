"""Shared fixtures: simulated devices, the real model files, tiny HF checkpoints written by transformers."""

import os
import shutil
import tempfile

# Meshes are simulated with 8 CPU devices; this must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CPU only, also where libtpu is installed (the test extra has it, to compile for TPU slices):
# JAX would otherwise look for TPU chips first, and libtpu warns on every process start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a lockfile per host so that two processes never drive the same chips; compiling for a
# described slice drives none, and xdist's workers each load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One compilation cache per test run, shared by its xdist workers (they inherit the controller's
# environment) and the processes tests start: the same tiny programs compile in many tests. A fresh
# folder, so no run reads another's; the controller removes it at the end.
os.environ.setdefault("PHI4_JAX_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), f"phi4_jax-tests-{os.getpid()}"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

from phi4_jax import compilation_cache  # noqa: E402
from phi4_jax.config import PRESETS  # noqa: E402

compilation_cache.enable()  # for programs compiled without phi4_jax.load too


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without workers)
        shutil.rmtree(os.environ["PHI4_JAX_COMPILATION_CACHE"], ignore_errors=True)


FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REAL_MODELS = ("phi-4", "phi-4-mini", "phi-3.5-mini")


@pytest.fixture(scope="session")
def fixtures_dir():
    """`../shared/fixtures`: real config/tokenizer/index files of the released models (no weights)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} is absent")
    return FIXTURES


# Each family member's distinguishing features at test size: the `tiny-*` presets of phi4_jax.config.
TINY_SHAPES = {shape: PRESETS[f"tiny-{shape}"] for shape in ("phi-4", "phi-4-mini", "phi-3.5-mini", "phi-3-mini-4k")}


def hf_config(shape: str, **changes):
    """transformers' Phi3Config of a tiny shape (with `changes`)."""
    from transformers import Phi3Config

    return Phi3Config(**{k: v for k, v in {**TINY_SHAPES[shape], **changes}.items() if k != "model_type"})


def make_hf_model(shape: str, seed: int = 0):
    """A transformers Phi3ForCausalLM of a tiny shape, float32, eager attention, with weights large
    enough that every part of the network moves the logits by far more than test tolerances."""
    import torch
    from transformers import Phi3ForCausalLM

    config = hf_config(shape)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(shape)` -> (folder written by save_pretrained, the transformers model)."""
    made = {}

    def get(shape: str):
        if shape not in made:
            model = make_hf_model(shape)
            folder = tmp_path_factory.mktemp(f"tiny-{shape}")
            model.save_pretrained(folder)
            made[shape] = (folder, model)
        return made[shape]

    return get


def greedy_run(engine, prompts, max_tokens=24, steps_per_call=8):
    """Greedy generation of a batch through `Engine.start` / `advance`: (tokens per row, Generation)."""
    from phi4_jax.engine.sampling import SamplingParams

    gen = engine.start(prompts, SamplingParams(max_tokens=max_tokens), [[] for _ in prompts])
    out = [[] for _ in prompts]
    while not gen.finished:
        for row, new in zip(out, gen.advance(steps_per_call)):
            row += new
    return out, gen
