"""Rotary tables against transformers' Phi3RotaryEmbedding, on the real configs (no weights needed)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import REAL_MODELS
from phi4_jax.config import Phi4Config
from phi4_jax.model.rope import apply_rope, inverse_frequencies, rope_tables


def hf_rotary(fixtures_dir, name):
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    raw = json.loads((fixtures_dir / name / "config.json").read_text())
    hf_config = Phi3Config(**{k: v for k, v in raw.items() if k != "auto_map" and not k.startswith("_")})
    raw.pop("auto_map", None)
    return Phi3RotaryEmbedding(hf_config), Phi4Config.from_dict(raw)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_inverse_frequencies_match_transformers(fixtures_dir, name):
    hf, config = hf_rotary(fixtures_dir, name)
    assert hf.attention_scaling == pytest.approx(config.attention_factor, rel=1e-12)
    # Ours is float32 correctly rounded; torch's pow is within one ulp of it.
    np.testing.assert_array_max_ulp(inverse_frequencies(config), hf.original_inv_freq.numpy(), maxulp=1)
    if config.rope_type == "longrope":
        hf(torch.zeros(1), torch.tensor([[config.original_max_position_embeddings]]))  # builds long table
        np.testing.assert_array_max_ulp(inverse_frequencies(config, long=True),
                                        hf.long_inv_freq.numpy(), maxulp=1)


@pytest.mark.parametrize("name", REAL_MODELS)
@pytest.mark.parametrize("length", [100, 4096, 4097, pytest.param(16384, marks=pytest.mark.slow),
                                    pytest.param(131072, marks=pytest.mark.slow)])
def test_tables_match_transformers(fixtures_dir, name, length):
    """Lengths at and just past Phi-4-mini's original context (4096) cross the short/long switch."""
    hf, config = hf_rotary(fixtures_dir, name)
    positions = np.arange(length)[None]
    want_cos, want_sin = (t.numpy() for t in hf(torch.zeros(1), torch.from_numpy(positions)))
    cos, sin = rope_tables(config, jnp.asarray(positions, jnp.int32))
    assert cos.shape == (1, length, config.rotary_dim) and cos.dtype == jnp.float32
    # Where torch's pow is one ulp (~2e-9) off a frequency, the angle drifts by that per position.
    atol = 1e-6 + 3e-9 * length
    np.testing.assert_allclose(np.asarray(cos), want_cos, atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), want_sin, atol=atol, rtol=0)


def test_longrope_switch_and_attention_factor(fixtures_dir):
    config = Phi4Config.from_preset("phi-4-mini")
    assert config.attention_factor == pytest.approx(1.1902380714238083)
    orig = config.original_max_position_embeddings
    last = np.array([[orig - 1]])
    # The same position gets the short table when the call ends at orig, the long one past it.
    short_cos, _ = rope_tables(config, jnp.asarray(np.concatenate([last, last], axis=1)))
    long_cos, _ = rope_tables(config, jnp.asarray(np.array([[orig - 1, orig]])))
    angle = (orig - 1) * inverse_frequencies(config)
    np.testing.assert_allclose(np.asarray(short_cos)[0, 0, :48], np.cos(angle) * config.attention_factor, atol=1e-6)
    assert np.abs(np.asarray(long_cos)[0, 0] - np.asarray(short_cos)[0, 0]).max() > 0.1
    # The switch is per row (each row as transformers runs it alone), and `lengths` overrides the
    # positions' own length (right padding past the threshold must not flip a short row).
    both, _ = rope_tables(config, jnp.asarray(np.array([[orig - 1, orig - 1], [orig - 1, orig]])))
    np.testing.assert_array_equal(np.asarray(both)[0, 0], np.asarray(short_cos)[0, 0])
    np.testing.assert_array_equal(np.asarray(both)[1, 0], np.asarray(long_cos)[0, 0])
    padded, _ = rope_tables(config, jnp.asarray(np.array([[orig - 1, orig]])), lengths=jnp.array([orig]))
    np.testing.assert_array_equal(np.asarray(padded)[0, 0], np.asarray(short_cos)[0, 0])


def test_partial_rotary_passes_trailing_channels_through():
    config = Phi4Config.from_preset("phi-4-mini")  # head_dim 128, rotary_dim 96
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 2, 128)), jnp.float32)
    cos, sin = rope_tables(config, jnp.arange(5)[None])
    y = np.asarray(apply_rope(x, cos, sin))
    np.testing.assert_array_equal(y[..., 96:], np.asarray(x)[..., 96:])
    # Channel i rotates with channel i + 48 (rotate-half), scaled by the attention factor.
    c, s = np.asarray(cos)[0, 3, 0], np.asarray(sin)[0, 3, 0]
    xi, xj = np.asarray(x)[0, 3, 0, 0], np.asarray(x)[0, 3, 0, 48]
    assert y[0, 3, 0, 0] == pytest.approx(xi * c - xj * s, abs=1e-6)
    assert y[0, 3, 0, 48] == pytest.approx(xj * c + xi * s, abs=1e-6)
