"""Shared fixtures: simulated devices, the real model files, tiny HF checkpoints written by transformers."""

import os

# Meshes are simulated with 8 CPU devices; this must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("PHI4_JAX_COMPILATION_CACHE", "off")  # tests measure nothing across runs

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REAL_MODELS = ("phi-4", "phi-4-mini", "phi-3.5-mini")


@pytest.fixture(scope="session")
def fixtures_dir():
    """`../shared/fixtures`: real config/tokenizer/index files of the released models (no weights)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} is absent")
    return FIXTURES


# Tiny configs with each family member's distinguishing features (transformers v5 keywords).
def _factors(n, start, step):
    return [round(start + step * i, 4) for i in range(n)]


TINY_SHAPES = {
    # full rotary, theta 250000, GQA 4:1 with phi-4's 40 query / 10 KV heads, untied head
    "phi-4": dict(hidden_size=160, intermediate_size=192, num_attention_heads=40, num_key_value_heads=10,
                  max_position_embeddings=64, original_max_position_embeddings=64,
                  rope_parameters=dict(rope_type="default", rope_theta=250000.0),
                  tie_word_embeddings=False, sliding_window=None),
    # partial rotary 0.75, longrope with distinct short/long factors, Phi-4-mini's 24 query / 8 KV
    # heads, tied head
    "phi-4-mini": dict(hidden_size=192, intermediate_size=256, num_attention_heads=24, num_key_value_heads=8,
                       max_position_embeddings=256, original_max_position_embeddings=16,
                       partial_rotary_factor=0.75,
                       rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                            partial_rotary_factor=0.75,
                                            short_factor=_factors(3, 1.0, 0.15),
                                            long_factor=_factors(3, 1.5, 8.0)),
                       tie_word_embeddings=True, sliding_window=262144),
    # MHA, longrope, untied head
    "phi-3.5-mini": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, original_max_position_embeddings=16,
                         rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                              short_factor=_factors(8, 1.0, 0.1),
                                              long_factor=_factors(8, 2.0, 3.0)),
                         tie_word_embeddings=False, sliding_window=262144),
    # MHA, default rope, a sliding window shorter than the test sequences
    "phi-3-mini-4k": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=64, original_max_position_embeddings=64,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                          tie_word_embeddings=False, sliding_window=7),
}
TINY_COMMON = dict(vocab_size=256, num_hidden_layers=2, rms_norm_eps=1e-5, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)


def make_hf_model(shape: str, seed: int = 0):
    """A transformers Phi3ForCausalLM of a tiny shape, float32, eager attention, with weights large
    enough that every part of the network moves the logits by far more than test tolerances."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**TINY_COMMON, **TINY_SHAPES[shape])
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


def greedy_run(engine, prompts, max_tokens=24, chunk=8):
    """Greedy generation of a batch through `Engine.start` / `advance`: (tokens per row, Generation)."""
    from phi4_jax.sampling import SamplingParams

    gen = engine.start(prompts, SamplingParams(max_tokens=max_tokens), [[] for _ in prompts])
    out = [[] for _ in prompts]
    while not gen.finished:
        for row, new in zip(out, gen.advance(chunk)):
            row += new
    return out, gen
