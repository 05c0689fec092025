"""Phi4Config: both config.json dialects, validation with typed errors, presets, real-size shapes."""

import json

import jax
import pytest
from flax import nnx

from conftest import REAL_MODELS
from phi4_jax import ConfigError, ModelNotFoundError, Phi4Config, Phi4ForCausalLM
from phi4_jax.config import PRESETS

EXPECTED_PARAMETERS = {"phi-4": 14_659_507_200, "phi-4-mini": 3_836_021_760, "phi-3.5-mini": 3_821_079_552}


def real_config(fixtures_dir, name) -> dict:
    return json.loads((fixtures_dir / name / "config.json").read_text())


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_configs_parse_and_equal_presets(fixtures_dir, name):
    raw = real_config(fixtures_dir, name)
    if "auto_map" in raw:
        with pytest.warns(UserWarning, match="auto_map.*ignored"):
            config = Phi4Config.from_json(fixtures_dir / name)
    else:
        config = Phi4Config.from_json(fixtures_dir / name / "config.json")
    assert config == Phi4Config.from_preset(name)


def test_from_name_takes_a_preset_or_a_folder(fixtures_dir):
    assert Phi4Config.from_name("phi-4") == Phi4Config.from_preset("phi-4")
    assert Phi4Config.from_name(str(fixtures_dir / "phi-4")) == Phi4Config.from_preset("phi-4")
    # Neither a preset nor a folder: the error names the presets.
    with pytest.raises(ModelNotFoundError, match=r"'phi-5' is neither a preset \(phi-4, phi-4-mini, phi-3.5-mini;"):
        Phi4Config.from_name("phi-5")
    with pytest.raises(ConfigError, match="the released models are phi-4, phi-4-mini, phi-3.5-mini"):
        Phi4Config.from_preset("phi-5")


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_size_parameter_count_from_eval_shape(name):
    config = Phi4Config.from_preset(name)
    state = jax.eval_shape(lambda: nnx.state(Phi4ForCausalLM(config, rngs=nnx.Rngs(0))))
    count = sum(leaf.size for leaf in jax.tree.leaves(state))
    assert count == EXPECTED_PARAMETERS[name] == config.num_parameters


def test_derived_fields():
    phi4, mini, phi35 = (Phi4Config.from_preset(n) for n in REAL_MODELS)
    assert (phi4.head_dim, phi4.rotary_dim, phi4.num_kv_groups, phi4.attention_factor) == (128, 128, 4, 1.0)
    assert (mini.head_dim, mini.rotary_dim, mini.num_kv_groups) == (128, 96, 3)
    assert mini.attention_factor == pytest.approx(1.1902, abs=1e-4)
    assert (phi35.head_dim, phi35.rotary_dim, phi35.num_kv_groups) == (96, 96, 1)
    assert mini.tie_word_embeddings and not phi4.tie_word_embeddings
    # A window at least as long as the context cannot bite; Phi-3-mini-4k's (2047) does.
    assert mini.window is None and phi35.window is None and phi4.window is None
    assert phi35.replace(max_position_embeddings=4096, sliding_window=2047).window == 2047


def _mini_v5() -> dict:
    """Phi-4-mini's config in transformers-v5 dialect: everything rope-related in rope_parameters."""
    raw = dict(PRESETS["phi-4-mini"])
    rope = dict(raw.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    rope.update(rope_theta=raw.pop("rope_theta"), partial_rotary_factor=raw.pop("partial_rotary_factor"),
                original_max_position_embeddings=raw["original_max_position_embeddings"])
    return {**raw, "rope_parameters": rope}


def test_both_dialects_and_old_rope_names_agree():
    legacy = Phi4Config.from_preset("phi-4-mini")
    assert Phi4Config.from_dict(_mini_v5()) == legacy
    for old_name in ("su", "yarn"):
        raw = dict(PRESETS["phi-4-mini"], rope_scaling=dict(PRESETS["phi-4-mini"]["rope_scaling"], type=old_name))
        assert Phi4Config.from_dict(raw) == legacy
    assert legacy.rope_type == "longrope" and legacy.rope_theta == 10000.0
    assert legacy.partial_rotary_factor == 0.75 and len(legacy.rope_long_factor) == 48


def test_eos_list_and_explicit_attention_factor():
    raw = dict(PRESETS["phi-3.5-mini"], eos_token_id=[32007, 32001, 32000])
    raw["rope_scaling"] = dict(raw["rope_scaling"], attention_factor=1.5)
    config = Phi4Config.from_dict(raw)
    assert config.eos_token_id == (32007, 32001, 32000)
    assert config.attention_factor == 1.5


def _with(name="phi-4-mini", rope=None, **changes):
    raw = dict(PRESETS[name], **changes)
    if rope is not None:
        raw["rope_scaling"] = dict(raw["rope_scaling"], **rope)
    return raw


@pytest.mark.parametrize("raw,field", [
    (_with(rope={"type": "dynamic"}), "rope_scaling.type"),
    (_with("phi-4", rope_parameters={"rope_type": "linear"}), "rope_parameters.rope_type"),
    (_with(rope={"long_factor": [1.0] * 64}), "long_factor"),
    (_with(rope={"short_factor": [1.0] * 47}), "short_factor"),
    (_with(rope={"short_factor": None}), "short_factor"),
    (_with(rope={"long_factor": ["1.0"] * 48}), "long_factor"),
    (_with(num_attention_heads=25), "num_attention_heads"),
    (_with(num_key_value_heads=5), "num_key_value_heads"),
    (_with(model_type="llama"), "model_type"),
    (_with(model_type=None), "model_type"),
    (_with(hidden_size=-3072), "hidden_size"),
    (_with(hidden_size=3072.0), "hidden_size"),
    (_with(hidden_act="gelu"), "hidden_act"),
    (_with(head_dim=64), "head_dim"),
    (_with(sliding_window=0), "sliding_window"),
    (_with(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (_with(rope_theta="x"), "rope_theta"),
    (_with(rms_norm_eps=None), "rms_norm_eps"),
    (_with(rope={"attention_factor": "big"}), "attention_factor"),
    ({k: v for k, v in PRESETS["phi-4"].items() if k != "vocab_size"}, "vocab_size"),
])
def test_invalid_configs_raise_config_error_naming_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Phi4Config.from_dict(raw, source="my/config.json")
    with pytest.raises(ConfigError, match="my/config.json"):
        Phi4Config.from_dict(raw, source="my/config.json")


def test_file_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        Phi4Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Phi4Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        Phi4Config.from_json(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        Phi4Config.from_json(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'phi-5'"):
        Phi4Config.from_preset("phi-5")


def test_config_is_frozen_and_replace_revalidates():
    config = Phi4Config.from_preset("phi-4")
    with pytest.raises(AttributeError):
        config.hidden_size = 1
    assert config.replace(num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        config.replace(num_key_value_heads=3)
