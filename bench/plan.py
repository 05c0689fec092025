"""Will it fit? Per-device weights, KV cache and temporaries of the real prefill and decode steps of
a model on a target mesh, and the collectives in each step, from XLA compiling them on fake CPU
devices with abstract inputs (no weights are read; a 14B model plans on a laptop).

The prefill step fills a --context-slot cache with a --context-token prompt (in pieces of
--prefill-piece tokens); the decode step is one token per row against that cache. Both are traced
for the --target platform (the forms its programs use, never XLA:CPU's own). Results are merged
into bench/results/plan.json (one record per model, mesh, context, batch, dtype, piece and target).

  python bench/plan.py --model phi-4 --mesh tensor=8 --context 16k --batch 8
  python bench/plan.py --model phi-4-mini --mesh tensor=1 tensor=8 seq=2 seq=4 seq=8 --context 128k --batch 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from phi4_jax.cli_shared import token_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "plan.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a preset (phi-4, phi-4-mini, phi-3.5-mini) or a folder with a config.json")
    p.add_argument("--mesh", nargs="+", default=["tensor=1"],
                   help="target mesh(es), e.g. 'tensor=8' 'data=2,tensor=4' (each planned on as many fake devices)")
    p.add_argument("--context", type=token_count, default=token_count("16k"), help="KV-cache slots per row (16k = 16384)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="parameter, KV-cache and compute dtype")
    p.add_argument("--target", default="gpu", choices=["gpu", "tpu"],
                   help="the platform whose programs are planned: its forms of the products are traced "
                        "(never XLA:CPU's own), with XLA attention")
    p.add_argument("--prefill-piece", "--prefill_piece", type=int, default=None,
                   help="prompt tokens per row in one prefill piece (default: the engine's, 2048 tokens "
                        "shared by the rows)")
    p.add_argument("--output", default=RESULTS, help="JSON file the records are merged into")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from phi4_jax.parallel import mesh as meshes

    sizes = [math.prod(meshes.parse_mesh(m).values()) for m in args.mesh]
    jax.config.update("jax_platforms", "cpu")  # planning compiles for fake CPU devices, even on a GPU host
    jax.config.update("jax_num_cpu_devices", max(sizes))

    from phi4_jax.engine import plan
    from phi4_jax.config import Phi4Config
    from runinfo import describe_run, write_record

    config = Phi4Config.from_name(args.model)
    records = _existing(args.output)
    for spec, n in zip(args.mesh, sizes):
        mesh = meshes.make_mesh(spec, jax.devices()[:n])
        result = plan.plan(config, mesh, args.context, args.batch, args.dtype, args.prefill_piece, target=args.target)
        result = {"name": args.model, "mesh_spec": spec, **result, "fits_on": plan.fits_on(
            result["per_device"]["needed_bytes"])}
        _print(result)
        key = _key(result)
        records = [r for r in records if _key(r) != key] + [result]
    records.sort(key=lambda r: (r["name"], r["context"], r["batch"], r["devices"], r["mesh_spec"]))
    write_record(args.output, {"benchmark": "plan", "schema": 1, **describe_run(), "records": records})
    print(f"wrote {args.output}; bench/RESULTS.md's table:\n{TABLE_HEADER}", file=sys.stderr)
    print("\n".join(table_row(r) for r in records), file=sys.stderr)
    return 0


def table_row(r: dict) -> str:
    """The record as a row of bench/RESULTS.md's table (tests/test_docs.py checks that the page has it)."""
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    d, s = r["per_device"], r["steps"]
    return (f"| {r['name']} | `{r['mesh_spec']}` | {r['context'] // 1024}K × {r['batch']} | "
            f"{gb(d['weights_bytes'])} | {gb(d['kv_cache_bytes'])} | {gb(s['prefill']['temp_bytes'])} / "
            f"{gb(s['decode']['temp_bytes'])} | {gb(d['needed_bytes'])} | {', '.join(r['fits_on']) or 'none'} |")


TABLE_HEADER = ("| model | mesh | context × batch | weights | KV cache | temporaries: prefill / decode | "
                 "needed | fits on (that many of) |\n|---|---|---|---|---|---|---|---|")


def _key(r: dict) -> tuple:
    return r["name"], r["mesh_spec"], r["context"], r["batch"], r["dtype"], r["prefill_piece"], r["target"]


def _existing(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["records"]
    except (OSError, ValueError, KeyError):
        return []


def _print(r: dict) -> None:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    d = r["per_device"]
    print(f"{r['name']} on {r['mesh_spec']} ({r['devices']} devices), context {r['context']}, batch {r['batch']}, "
          f"{r['dtype']}:", file=sys.stderr)
    print(f"  per device: weights {gb(d['weights_bytes'])}, KV cache {gb(d['kv_cache_bytes'])}, "
          f"needed {gb(d['needed_bytes'])}", file=sys.stderr)
    for name, s in r["steps"].items():
        collectives = ", ".join(f"{k} {v}" for k, v in s["collectives"].items() if v) or "none"
        print(f"  {name}: temporaries {gb(s['temp_bytes'])} (float32 bound; the CPU bf16 compile: "
              f"{gb(s['temp_bytes_cpu_compile'])}, of which CPU-only upcasts {gb(s['cpu_only_upcast_bytes'])}); "
              f"collectives: {collectives}", file=sys.stderr)
    from phi4_jax.engine.plan import ACCELERATORS

    print(f"  fits on: {', '.join(r['fits_on']) or 'none of ' + ', '.join(ACCELERATORS)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
