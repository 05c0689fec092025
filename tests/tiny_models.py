"""The tiny transformers models the tests compare against: each family member's shape at test size.

Free of side effects, so that a benchmark script can import it too (`tests/conftest.py` sets up the
test process: devices, compiler flags, shared folders).
"""

from phi4_jax.config import PRESETS

# Each family member's distinguishing features at test size: the `tiny-*` presets of phi4_jax.config.
TINY_SHAPES = {shape: PRESETS[f"tiny-{shape}"] for shape in ("phi-4", "phi-4-mini", "phi-3.5-mini", "phi-3-mini-4k")}


def hf_config(shape: str, **changes):
    """transformers' Phi3Config of a tiny shape (with `changes`)."""
    from transformers import Phi3Config

    return Phi3Config(**{k: v for k, v in {**TINY_SHAPES[shape], **changes}.items() if k != "model_type"})


def make_hf_model(shape: str, seed: int = 0, **changes):
    """A transformers Phi3ForCausalLM of a tiny shape (with config `changes`), float32, eager
    attention, with weights large enough that every part of the network moves the logits by far
    more than test tolerances."""
    import torch
    from transformers import Phi3ForCausalLM

    config = hf_config(shape, **changes)
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
