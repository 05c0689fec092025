"""`phi4-jax convert`: a Hugging Face Phi-3/Phi-4 folder (safetensors) into a phi4_jax Orbax folder.

Reads one tensor at a time (peak RAM about three times the largest tensor plus 1 GB), writes
everything into a hidden temporary folder beside OUTPUT and renames it onto OUTPUT at the end: an
interrupted or failed run leaves no OUTPUT (or the previous one intact). The output holds the Orbax
checkpoint, the config, generation config, tokenizer files and chat template, and a manifest with
each source file's sha256. `phi4_jax.load(OUTPUT)` loads it like the source folder.

`phi4-jax export` writes it back as an HF folder. `python convert/hf_to_orbax.py` in a checkout is
`phi4-jax convert`.

examples:
  phi4-jax convert --model ~/models/Phi-4-mini-instruct --output ~/ckpt/phi-4-mini
  phi4-jax convert --model microsoft/phi-4 --output phi-4-orbax --offline --dry-run
  phi4-jax convert --model ~/models/phi-4 --output ~/ckpt/phi-4-int8 --quantize int8
"""

from __future__ import annotations

import argparse
import sys

from phi4_jax.cli import common as cli
from phi4_jax.checkpoints import convert
from phi4_jax.checkpoints.hub import resolve
from phi4_jax.model import int8

HELP = "convert a Hugging Face folder to a phi4_jax Orbax folder (optionally int8)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="source: a local HF folder, or a repo id resolved through the local HF cache")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--dtype", default="auto", choices=["auto", *convert.DTYPES],
                   help="dtype of the saved parameters; auto keeps the checkpoint's own")
    p.add_argument("--quantize", default=None, choices=list(int8.KINDS),
                   help="store the projections, the LM head and the embedding table as int8 with a float32 "
                        "scale per output channel (weight-only; `phi4_jax.load` reads them without "
                        "quantizing again); the norms stay in --dtype. Default: float weights")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a repo id")
    p.add_argument(*cli.flag("--offline"), action="store_true",
                   help="never download: use only the local HF cache (also HF_HUB_OFFLINE=1)")
    p.add_argument(*cli.flag("--overwrite"), action="store_true",
                   help="replace an existing OUTPUT (kept until the new one is complete)")
    p.add_argument(*cli.flag("--dry-run"), action="store_true",
                   help="print the plan (tensors, shapes, dtypes, bytes, estimated peak RAM); write nothing")
    p.add_argument(*cli.flag("--verify"), action="store_true",
                   help="before OUTPUT takes its name, reload it and check that its logits on a short "
                        "random prompt equal the source's")
    p.add_argument(*cli.flag("--quiet"), action="store_true", help="no progress bars")


def run(args) -> int:
    source = resolve(args.model, revision=args.revision, offline=args.offline or None)
    plan = convert.plan_conversion(source, args.dtype, args.quantize)
    convert.check_output(args.output, args.overwrite, source=source.folder, clean=not args.dry_run)
    if args.dry_run:
        print(plan.describe())
        return cli.EXIT_OK
    out = convert.convert(plan, args.output, overwrite=args.overwrite, progress=not args.quiet, verify=args.verify)
    verified = ", logits verified equal to the source's" if args.verify else ""
    kind = f"{plan.quantize} weights, norms {plan.dtype.name}" if plan.quantize else plan.dtype.name
    print(f"wrote {out} ({len(plan.tensors)} tensors, {kind}{verified})", file=sys.stderr)
    return cli.EXIT_OK
