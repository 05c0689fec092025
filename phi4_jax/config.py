"""Phi4Config: the model hyper-parameters, parsed and validated from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

from phi4_jax.errors import ConfigError, ModelNotFoundError

# The rope types Phi3ForCausalLM knows; `su` and `yarn` are old names of `longrope`.
_ROPE_TYPE_ALIASES = {"default": "default", "longrope": "longrope", "su": "longrope", "yarn": "longrope"}


@dataclasses.dataclass(frozen=True)
class Phi4Config:
    """Hyper-parameters of a Phi-3/Phi-4 causal LM; field names follow HF `config.json`.

    The rope settings, nested in `rope_scaling` (legacy) or `rope_parameters` (transformers v5) in
    the file, are flattened here with a `rope_` prefix.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_type: str = "default"  # "default" or "longrope"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_factor: float | None = None  # explicit LongRoPE `factor`; else max/original positions
    rope_attention_factor: float | None = None  # explicit LongRoPE `attention_factor`; else derived
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} does not divide "
                              f"hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.rope_type not in ("default", "longrope"):
            raise ConfigError(f"rope type {self.rope_type!r} is not supported; Phi3ForCausalLM uses "
                              "'default' or 'longrope' (alias 'su', 'yarn')")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"rotary dims = head_dim {self.head_dim} x partial_rotary_factor "
                              f"{self.partial_rotary_factor} = {self.rotary_dim}; must be even and >= 2")
        if self.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, name)
                field = name.removeprefix("rope_")
                if factors is None:
                    raise ConfigError(f"longrope needs rope_scaling.{field} (a list of "
                                      f"{self.rotary_dim // 2} numbers)")
                if len(factors) != self.rotary_dim // 2:
                    raise ConfigError(f"rope_scaling.{field} has {len(factors)} entries; it must have "
                                      f"rotary_dim/2 = {self.rotary_dim // 2}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")

    # Derived values.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Leading channels of each head that are rotated; the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head; query head h reads KV head h // num_kv_groups."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_scaling_factor(self) -> float:
        if self.rope_factor is not None:
            return self.rope_factor
        return self.max_position_embeddings / self.original_max_position_embeddings

    @property
    def attention_factor(self) -> float:
        """Constant multiplier of LongRoPE's cos/sin at every length (1.0 for default rope)."""
        if self.rope_type != "longrope":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        factor = self.rope_scaling_factor
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @property
    def window(self) -> int | None:
        """The sliding window when it can bite (shorter than the context), else None."""
        if self.sliding_window is None or self.sliding_window >= self.max_position_embeddings:
            return None
        return self.sliding_window

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: its projections, then its two norms (2 x hidden)."""
        e, i = self.hidden_size, self.intermediate_size
        qkv = e * self.head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads)
        return qkv + self.num_attention_heads * self.head_dim * e + 3 * e * i + 2 * e

    @property
    def num_parameters(self) -> int:
        e, v = self.hidden_size, self.vocab_size
        return self.num_hidden_layers * self.layer_parameters + v * e * (1 if self.tie_word_embeddings else 2) + e

    # Parsing.
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Phi4Config:
        """Parses an HF config dict in either dialect (legacy `rope_scaling` or v5 `rope_parameters`)."""
        if raw.get("quantization_config"):
            method = (raw["quantization_config"] or {}).get("quant_method", "unnamed method") if isinstance(
                raw["quantization_config"], dict) else "unnamed method"
            raise ConfigError(f"{source}: the model is quantized already ({method}; its quantization_config); "
                              "phi4_jax reads float weights and quantizes them itself (quantize='int8', "
                              "--quantize int8): use the model's float checkpoint")
        try:
            return cls(**_fields_from_hf(raw))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Phi4Config:
        """Reads `config.json` (or a folder holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{path} does not exist; a model folder needs the config.json "
                                     "that came with its weights") from None
        except OSError as e:
            raise ConfigError(f"{path} cannot be read: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_preset(cls, name: str) -> Phi4Config:
        """The config of a preset by name: a released model (`RELEASED`) or a test shape (`TEST_SHAPES`)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; the released models are {', '.join(RELEASED)} (test "
                              f"shapes: {', '.join(TEST_SHAPES)})")
        return cls.from_dict(PRESETS[name], source=f"preset {name}")

    @classmethod
    def from_name(cls, name: str) -> Phi4Config:
        """A preset (`from_preset`) by its name, else a config.json or its folder (`from_json`)."""
        if name in PRESETS:
            return cls.from_preset(name)
        if not os.path.exists(name):
            raise ModelNotFoundError(f"{name!r} is neither a preset ({', '.join(RELEASED)}; test shapes: "
                                     f"{', '.join(TEST_SHAPES)}) nor a config.json or a folder holding one")
        return cls.from_json(name)

    def replace(self, **changes) -> Phi4Config:
        """A copy with some fields changed (validated again), e.g. fewer layers for a benchmark."""
        return dataclasses.replace(self, **changes)


def _fields_from_hf(raw: dict) -> dict:
    if raw.get("model_type") != "phi3":
        raise ConfigError(f"model_type is {raw.get('model_type')!r}; phi4_jax runs Phi3ForCausalLM "
                          "checkpoints (model_type 'phi3': phi-4, Phi-4-mini, Phi-3/3.5-mini)")
    if raw.get("auto_map"):
        warnings.warn("config.json has an auto_map (remote code); it is ignored: phi4_jax never "
                      "runs code shipped with a model", stacklevel=3)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads"):
        if name not in raw:
            raise ConfigError(f"{name} is missing")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported (Phi-3/4 use 'silu')")
    if raw.get("head_dim") not in (None, raw["hidden_size"] // max(1, raw["num_attention_heads"])):
        raise ConfigError(f"head_dim={raw['head_dim']} differs from hidden_size/num_attention_heads; "
                          "Phi3ForCausalLM does not support that")

    # Rope: v5 keeps everything in `rope_parameters`; legacy splits it between `rope_scaling` and
    # the top level. Where both give a value, the nested one wins, as in transformers.
    nested_key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    rope = raw.get(nested_key) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{nested_key} must be an object or null, got {rope!r}")
    type_key = "rope_type" if "rope_type" in rope else "type"
    rope_type = rope.get(type_key, "default")
    if rope_type not in _ROPE_TYPE_ALIASES:
        raise ConfigError(f"{nested_key}.{type_key}={rope_type!r} is not supported; Phi3ForCausalLM "
                          "uses 'default' or 'longrope' (alias 'su', 'yarn')")

    def factors(name):
        value = rope.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{nested_key}.{name} must be a list of numbers")
        return tuple(float(x) for x in value)

    eos = raw.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    # transformers gives the top-level original_max_position_embeddings priority for Phi3.
    original = raw.get("original_max_position_embeddings",
                       rope.get("original_max_position_embeddings", 4096))
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        original_max_position_embeddings=original,
        rope_type=_ROPE_TYPE_ALIASES[rope_type],
        rope_theta=_number(rope, raw, "rope_theta", 10000.0),
        partial_rotary_factor=_number(rope, raw, "partial_rotary_factor", 1.0),
        rope_short_factor=factors("short_factor"),
        rope_long_factor=factors("long_factor"),
        rope_factor=_number(rope, {}, "factor", None),
        rope_attention_factor=_number(rope, {}, "attention_factor", None),
        sliding_window=raw.get("sliding_window"),
        rms_norm_eps=_number({}, raw, "rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=_number({}, raw, "initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
    )


def _number(nested: dict, top: dict, key: str, default):
    """A float from the nested rope dict, else the top level, else `default`; bad types named."""
    value = nested.get(key, top.get(key, default))
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


# The released models, as their config.json files give them (legacy dialect; fields that do not
# change the computation left out).
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
PHI35_MINI_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
]
PHI35_MINI_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533,
]

PRESETS: dict[str, dict] = {
    "phi-4": dict(
        model_type="phi3", vocab_size=100352, hidden_size=5120, intermediate_size=17920,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
        max_position_embeddings=16384, original_max_position_embeddings=16384,
        rope_theta=250000, rope_scaling=None, sliding_window=None, rms_norm_eps=1e-05,
        tie_word_embeddings=False, bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
    ),
    "phi-4-mini": dict(
        model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_theta=10000.0, partial_rotary_factor=0.75,
        rope_scaling=dict(type="longrope", short_factor=[1.0] * 48, long_factor=PHI4_MINI_LONG_FACTOR),
        sliding_window=262144, rms_norm_eps=1e-05, tie_word_embeddings=True,
        bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
    ),
    "phi-3.5-mini": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling=dict(type="longrope", short_factor=PHI35_MINI_SHORT_FACTOR,
                          long_factor=PHI35_MINI_LONG_FACTOR),
        sliding_window=262144, rms_norm_eps=1e-05, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    ),
}

# Test and benchmark shapes (`TEST_SHAPES`), in the same form: no model was released in them.
# phi3-110m is the model the CPU benchmarks are set on (float32, 110M parameters, Phi-3.5-mini's
# vocabulary), with deep-thin as its deep counterpart; tiny is for smoke runs; demo is the built-in
# demo model's shape (train/demo.py, its vocabulary fixed by the tokenizer it trains); the tiny-*
# shapes carry each family member's distinguishing features at test size (transformers-v5 dialect).
def _factors(n: int, start: float, step: float) -> list[float]:
    return [round(start + step * i, 4) for i in range(n)]


_TINY = dict(model_type="phi3", vocab_size=256, num_hidden_layers=2, rms_norm_eps=1e-5, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
PRESETS.update({
    "phi3-110m": dict(model_type="phi3", vocab_size=32064, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=4096, original_max_position_embeddings=4096),
    # 30 thin layers with a tied 49152 vocabulary: the shape of the common trained ~135M models, where
    # per-op overhead rather than bandwidth bounds a step (Phi-4-mini has 32 layers, phi-4 40)
    "deep-thin": dict(model_type="phi3", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=8192, original_max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(model_type="phi3", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048, original_max_position_embeddings=2048,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "demo": dict(
        model_type="phi3", vocab_size=282, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=64, partial_rotary_factor=0.75, rope_theta=10000.0,
        rope_scaling=dict(type="longrope", short_factor=[1.0] * 6, long_factor=[1.0 + 0.5 * i for i in range(6)]),
        rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=None, hidden_act="silu",
        initializer_range=0.02, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    # full rotary, theta 250000, GQA 4:1 with phi-4's 40 query / 10 KV heads, untied head
    "tiny-phi-4": dict(_TINY, hidden_size=160, intermediate_size=192, num_attention_heads=40,
                       num_key_value_heads=10, max_position_embeddings=64, original_max_position_embeddings=64,
                       rope_parameters=dict(rope_type="default", rope_theta=250000.0),
                       tie_word_embeddings=False, sliding_window=None),
    # partial rotary 0.75, longrope with distinct short/long factors, Phi-4-mini's 24 query / 8 KV
    # heads, tied head
    "tiny-phi-4-mini": dict(_TINY, hidden_size=192, intermediate_size=256, num_attention_heads=24,
                            num_key_value_heads=8, max_position_embeddings=256, original_max_position_embeddings=16,
                            partial_rotary_factor=0.75,
                            rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                                 short_factor=_factors(3, 1.0, 0.15),
                                                 long_factor=_factors(3, 1.5, 8.0)),
                            tie_word_embeddings=True, sliding_window=262144),
    # MHA, longrope, untied head
    "tiny-phi-3.5-mini": dict(_TINY, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=16,
                              rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                   short_factor=_factors(8, 1.0, 0.1),
                                                   long_factor=_factors(8, 2.0, 3.0)),
                              tie_word_embeddings=False, sliding_window=262144),
    # MHA, default rope, a sliding window shorter than the test sequences
    "tiny-phi-3-mini-4k": dict(_TINY, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=64,
                               rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                               tie_word_embeddings=False, sliding_window=7),
})
RELEASED = ("phi-4", "phi-4-mini", "phi-3.5-mini")  # the presets of released models
# The rest are test and benchmark shapes: no model was released in them.
TEST_SHAPES = tuple(name for name in PRESETS if name not in RELEASED)
