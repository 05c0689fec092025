"""Export a phi4_jax Orbax checkpoint folder back to a Hugging Face folder.

Writes the fused `qkv_proj` / `gate_up_proj` layout that transformers' Phi3ForCausalLM reads, as
`model.safetensors` or, past --max-shard-size, as `model-0000x-of-0000y.safetensors` shards with
`model.safetensors.index.json`; the config, generation config and tokenizer files are copied. Like
the converter, it writes into a temporary folder and renames it onto OUTPUT at the end.

example:
  python convert/orbax_to_hf.py --model ~/ckpt/phi-4-mini --output ~/models/phi-4-mini-export
"""

from __future__ import annotations

import argparse
import sys

from phi4_jax import cli_shared as cli
from phi4_jax.checkpoints import convert


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * scale)
    return int(upper)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orbax_to_hf.py", description=__doc__,
                                epilog=cli.EXIT_CODES_HELP, formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by convert/hf_to_orbax.py")
    p.add_argument("--output", required=True, help="HF folder to create")
    p.add_argument("--dtype", default=None, choices=convert.DTYPES,
                   help="dtype of the exported tensors (default: the checkpoint's)")
    p.add_argument(*cli.flag("--max-shard-size"), type=_size, default="5GB",
                   help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument(*cli.flag("--dequantize"), action="store_true",
                   help="export an int8 checkpoint (hf_to_orbax.py --quantize int8) as float weights q * scale, "
                        "each within half a scale step of the original; without it such a checkpoint is refused")
    p.add_argument(*cli.flag("--overwrite"), action="store_true",
                   help="replace an existing OUTPUT (kept until the new one is complete)")
    p.add_argument(*cli.flag("--quiet"), action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        out = convert.export_hf(args.model, args.output, dtype=args.dtype,
                                   max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                                   progress=not args.quiet, dequantize=args.dequantize)
        print(f"wrote {out}", file=sys.stderr)

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
