"""`phi4-jax export`: a phi4_jax Orbax folder back to a Hugging Face folder that transformers loads.

Writes the fused `qkv_proj` / `gate_up_proj` layout that transformers' Phi3ForCausalLM reads, as
`model.safetensors` or, past --max-shard-size, as `model-0000x-of-0000y.safetensors` shards with
`model.safetensors.index.json`; the config, generation config and tokenizer files are copied. Like
the converter, it writes into a temporary folder and renames it onto OUTPUT at the end.
`python convert/orbax_to_hf.py` in a checkout is `phi4-jax export`.

example:
  phi4-jax export --model ~/ckpt/phi-4-mini --output ~/models/phi-4-mini-export
"""

from __future__ import annotations

import argparse
import sys

from phi4_jax.cli import common as cli
from phi4_jax.checkpoints import convert

HELP = "export a phi4_jax Orbax folder to a Hugging Face folder"


def _size(text: str) -> int:
    """An argparse type: "5GB" -> 5e9, "500MiB" -> 500 * 2**20, "1000" -> 1000 bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    upper = text.strip().upper()
    try:
        for unit, scale in units.items():
            if upper.endswith(unit):
                return int(float(upper[: -len(unit)]) * scale)
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a folder written by `phi4-jax convert`")
    p.add_argument("--output", required=True, help="HF folder to create")
    p.add_argument("--dtype", default=None, choices=convert.DTYPES,
                   help="dtype of the exported tensors (default: the checkpoint's)")
    p.add_argument(*cli.flag("--max-shard-size"), type=_size, default="5GB",
                   help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument(*cli.flag("--dequantize"), action="store_true",
                   help="export an int8 checkpoint (phi4-jax convert --quantize int8) as float weights q * scale, "
                        "each within half a scale step of the original; without it such a checkpoint is refused")
    p.add_argument(*cli.flag("--overwrite"), action="store_true",
                   help="replace an existing OUTPUT (kept until the new one is complete)")
    p.add_argument(*cli.flag("--quiet"), action="store_true", help="no progress bars")


def run(args) -> int:
    out = convert.export_hf(args.model, args.output, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                            overwrite=args.overwrite, progress=not args.quiet, dequantize=args.dequantize)
    print(f"wrote {out}", file=sys.stderr)
    return cli.EXIT_OK
