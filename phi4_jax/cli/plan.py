"""`phi4-jax plan`: will it fit, and how fast can it be? A model's compiled steps on a mesh, planned here.

XLA compiles the engine's real prefill and decode steps for the mesh from shapes alone (no weights
are read: a 14B model plans on a laptop) and reports, per device, the weights, the KV cache, the
temporaries and the collectives of each step. The prefill fills a --context-slot cache with a
--context-token prompt (in pieces of --prefill-piece tokens); the decode step is one token per row
against that cache. Without an accelerator named, the steps are traced for --target gpu or tpu (the
forms those programs use, never XLA:CPU's own) and compiled for fake CPU devices.

An accelerator as --target compiles its programs themselves, with its own compiler and no such
device: a TPU slice (`v5e:2x4`, also v6e, v5p and v4 names; the tpu extra) or NVIDIA GPUs
(`h100:8`, `h200:8`; the gpu-compile extra). Then it also reports per-chip memory against the
chip's capacity, the FLOPs and HBM traffic read from the compiled program, and the step time the
chip's published bf16 peak and HBM bandwidth allow, with the tokens/s and MBU/MFU bounds that
follow. A model that does not fit is planned all the same and marked with what it would need.

examples:
  phi4-jax plan --model phi-4 --mesh tensor=8 --context 16k --batch 8
  phi4-jax plan --model phi-4-mini --mesh tensor=1 tensor=8 seq=8 --context 128k
  phi4-jax plan --model phi-4-mini --target v5e:2x4 --mesh tensor=8 seq=8 --context 32k
  phi4-jax plan --model ~/models/Phi-4-mini-instruct --target h100:1 --quantize int8 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from phi4_jax.cli import common as cli
from phi4_jax.config import RELEASED
from phi4_jax.errors import ConfigError
from phi4_jax.model import int8

HELP = "will it fit? plan a model's memory and step time on a GPU or TPU mesh, from any machine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(RELEASED)}; or a test shape of phi4_jax.config.TEST_SHAPES) or a "
                        "folder with a config.json")
    p.add_argument("--mesh", nargs="+", default=["tensor=1"],
                   help="the mesh or meshes to plan, e.g. 'tensor=8' 'data=2,tensor=4' (axes data, fsdp, tensor, seq)")
    p.add_argument("--context", type=cli.token_count, default=cli.token_count("16k"),
                   help="KV-cache slots per row, and the prompt's length (16k = 16384)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--dtype", default="bfloat16", choices=cli.DTYPES,
                   help="parameter, KV-cache and compute dtype")
    p.add_argument("--quantize", default=None, choices=list(int8.KINDS),
                   help="plan int8 weights with a float32 scale per output channel (phi4_jax.load(quantize=)); "
                        "activations and the KV cache stay in --dtype")
    p.add_argument("--target", default="gpu", type=_target,
                   help="gpu or tpu: the platform whose forms of the products are traced (never XLA:CPU's own), "
                        "compiled for fake CPU devices; or an accelerator to compile for, with its chip's rooflines: "
                        "a TPU slice (v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1; pip install 'phi4-jax[tpu]') or NVIDIA "
                        "GPUs (h100:8, h200:8; pip install 'phi4-jax[gpu-compile]')")
    from phi4_jax.model.attention import IMPLEMENTATIONS

    p.add_argument("--attention", default="auto", choices=list(IMPLEMENTATIONS),
                   help="attention implementation, as generate and serve take it: auto is splash on a TPU (head_dim "
                        "128), cuDNN on a GPU in bfloat16, else XLA; the kernels compile only for an accelerator "
                        "--target (fake CPU devices compile XLA's)")
    p.add_argument(*cli.flag("--prefill-piece"), type=int, default=None,
                   help="prompt tokens per row in one prefill piece (default: the engine's, 2048 tokens "
                        "shared by the rows)")
    p.add_argument("--speculative", default=None, metavar="ngram[:K[:MIN_N:MAX_N]]",
                   help="also compile the decode call that verifies K drafts a row (generate's --speculative): "
                        "with an accelerator --target, its traffic per token when all are accepted beside plain "
                        "decode's")
    p.add_argument("--json", action="store_true", help="print the records as one JSON list instead of the summary")
    p.add_argument("--output", default=None, help="also write the records to this JSON file")


def _target(value: str) -> str:
    from phi4_jax.planner import targets

    if value in ("gpu", "tpu") or targets.is_target(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give gpu or tpu (traced for, on fake CPU devices) or an "
                                     f"accelerator to compile for, e.g. {targets.EXAMPLES}")


def plan_records(args) -> list[dict]:
    """One record per --mesh: the plan of `planner.plan.plan`, with the chip's rooflines for an
    accelerator --target (`planner.roofline.chip_roofline`), or the accelerators it fits on."""
    import jax

    from phi4_jax.config import Phi4Config
    from phi4_jax.engine.speculative import Speculation
    from phi4_jax.parallel import mesh as meshes
    from phi4_jax.planner import plan, targets
    from phi4_jax.planner.roofline import chip_roofline

    speculative = Speculation.parse(args.speculative)  # (a bad value is refused before anything compiles)
    for name in ("context", "batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    sizes = [math.prod(meshes.parse_mesh(m).values()) for m in args.mesh]
    config = Phi4Config.from_name(args.model)
    jax.config.update("jax_platforms", "cpu")  # planning compiles for described or fake devices, even on a GPU host
    described = targets.is_target(args.target)  # an accelerator described to its own compiler
    if described:
        devices = targets.devices(args.target)
        if max(sizes) > len(devices):
            raise ConfigError(f"--mesh: {args.target} has {len(devices)} devices; a mesh of {max(sizes)} needs more")
    else:
        devices = _cpu_devices(max(sizes))
    records = []
    for spec, n in zip(args.mesh, sizes):
        mesh = meshes.make_mesh(spec, devices[:n])
        result = plan.plan(config, mesh, args.context, args.batch, args.dtype, args.prefill_piece,
                           target=devices[0].platform if described else args.target, quantize=args.quantize,
                           attention=args.attention, speculative=speculative)
        result = {"name": args.model, "mesh_spec": spec, **result}
        if described:
            result.update(topology=args.target, **chip_roofline(config, result, args.target, devices))
        else:
            result["fits_on"] = plan.fits_on(result["per_device"]["needed_bytes"])
        records.append(result)
        if not args.json:
            print(summary(result))
    return records


def _cpu_devices(n: int) -> list:
    """`n` CPU devices to compile for: fake ones, asked for before JAX starts (a process that
    started JAX already has the devices it has)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
    except RuntimeError:  # JAX has started; its devices are fixed
        pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ConfigError(f"--mesh: a mesh of {n} devices needs {n} CPU devices; this process started JAX with "
                          f"{len(devices)} (plan in a fresh process)")
    return devices


def run(args) -> int:
    records = plan_records(args)
    if args.json:
        print(json.dumps(records, indent=1))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
    return cli.EXIT_OK


def summary(r: dict) -> str:
    """A planned record as the lines a person reads: memory per device, each step's temporaries and
    collectives, and with an accelerator its roofline and whether it fits."""
    from phi4_jax.planner.plan import ACCELERATORS, USABLE

    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    d = r["per_device"]
    quantized = f" {r['quantize']}" if r.get("quantize") else ""
    lines = [f"{r['name']}{quantized} on {r['mesh_spec']} ({r['devices']} devices), context {r['context']}, "
             f"batch {r['batch']}, {r['dtype']}:",
             f"  per device: weights {gb(d['weights_bytes'])}, KV cache {gb(d['kv_cache_bytes'])}, "
             f"needed {gb(d['needed_bytes'])}"]
    for name, s in r["steps"].items():
        if "refused" in s:
            lines.append(f"  {name}: refused by the compiler, it would need {gb(s['temp_bytes'])} of temporaries "
                         f"({s['refused']})")
            continue
        collectives = ", ".join(f"{k} {v}" for k, v in s["collectives"].items() if v) or "none"
        lines.append(f"  {name}: temporaries {gb(s['temp_bytes'])} (float32 bound; the CPU bf16 compile: "
                     f"{gb(s['temp_bytes_cpu_compile'])}, of which CPU-only upcasts "
                     f"{gb(s['cpu_only_upcast_bytes'])}); collectives: {collectives}")
    if "chip" not in r:
        lines.append(f"  fits on: {', '.join(r['fits_on']) or 'none of ' + ', '.join(ACCELERATORS)}")
        return "\n".join(lines)
    c = r["chip"]
    for name, s in r["steps"].items():
        if "refused" in s:
            continue
        if name == "speculative":
            if "drafting_step_bytes" in s:
                per_token = s["bytes_per_token_all_accepted"] / 1e6
                lines.append(f"  speculative on one {c['name']}: a step verifying {s['drafts']} drafts a row moves "
                             f"{s['drafting_step_bytes'] / 1e9:.2f} GB: {per_token:.1f} MB a token when all are "
                             f"accepted, against {s['plain_bytes_per_token'] / 1e6:.1f} MB a token of plain decode")
            continue
        bound = f"MBU ≤ {100 * s['mbu_bound']:.0f}%" if name == "decode" else f"MFU ≤ {100 * s['mfu_bound']:.0f}%"
        lines.append(f"  {name} on one {c['name']}: {s['flops'] / 1e12:.3f} TFLOP, {s['step_bytes'] / 1e9:.2f} GB "
                     f"of HBM traffic (+{s['per_call_bytes'] / 1e9:.2f} GB per call) -> {1e3 * s['roofline_s']:.2f} ms "
                     f"({s['bound']}-bound), ≤ {s['tokens_per_s_bound']:.0f} tokens/s, {bound}")
    verdict = "fits" if r["fits"] else "DOES NOT FIT: it would need"
    lines.append(f"  {verdict} {gb(d['needed_bytes'])} of a chip's {gb(c['hbm_bytes'])} (with "
                 f"{100 - 100 * USABLE:.0f}% kept free)")
    return "\n".join(lines)
