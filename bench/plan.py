"""Will it fit? Per-device weights, KV cache and temporaries of the real prefill and decode steps of
a model on a target mesh, and the collectives in each step, from XLA compiling them on fake CPU
devices with abstract inputs (no weights are read; a 14B model plans on a laptop).

The prefill step fills a --context-slot cache with a --context-token prompt (in pieces of
--prefill-piece tokens); the decode step is one token per row against that cache. Both are traced
for the --target platform (the forms its programs use, never XLA:CPU's own). Results are merged
into bench/results/plan.json (one record per model, mesh, context, batch, dtype, piece and target).

An accelerator as --target compiles its programs themselves, with its own compiler and no such
device: a TPU slice (`v5e:2x4`, also v6e, v5p and v4 names; the `tpu` extra) or NVIDIA GPUs
(`h100:8`, `h200:8`; the `gpu-compile` extra). It reports per-chip memory need against the chip's
capacity, FLOPs and HBM traffic per chip read from the compiled program (XLA's own cost analysis
beside them where it gives one), and the step time the chip's published bf16 peak and HBM
bandwidth allow (the slower of the two), with the tokens/s and the MBU/MFU bounds that follow
(`phi4_jax/parallel/targets.py` holds the chips' figures and their sources). A model that does not
fit is planned all the same and marked with what it would need.

  python bench/plan.py --model phi-4 --mesh tensor=8 --context 16k --batch 8
  python bench/plan.py --model phi-4-mini --mesh tensor=1 tensor=8 seq=2 seq=4 seq=8 --context 128k --batch 1
  JAX_PLATFORMS=cpu python bench/plan.py --model phi-4-mini --target v5e:2x4 --mesh tensor=8 seq=8 --context 32k
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
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="plan int8 weights with a float32 scale per output channel (phi4_jax.load(quantize=)); "
                        "activations and the KV cache stay in --dtype")
    p.add_argument("--target", default="gpu", type=target_name,
                   help="gpu or tpu: the platform whose forms of the products are traced (never XLA:CPU's own), "
                        "compiled on fake CPU devices; or an accelerator to compile for, with its chip's rooflines: "
                        "a TPU slice (v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1; the tpu extra) or NVIDIA GPUs (h100:8, "
                        "h200:8; the gpu-compile extra); run those with JAX_PLATFORMS=cpu")
    p.add_argument("--prefill-piece", "--prefill_piece", type=int, default=None,
                   help="prompt tokens per row in one prefill piece (default: the engine's, 2048 tokens "
                        "shared by the rows)")
    p.add_argument("--output", default=RESULTS, help="JSON file the records are merged into")
    return p


def target_name(value: str) -> str:
    from phi4_jax.parallel import targets

    if value in ("gpu", "tpu") or targets.is_target(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give gpu or tpu (traced for, on fake CPU devices) or an "
                                     f"accelerator to compile for, e.g. {targets.EXAMPLES}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import jax

    from phi4_jax.errors import ConfigError
    from phi4_jax.parallel import mesh as meshes
    from phi4_jax.parallel import targets

    sizes = [math.prod(meshes.parse_mesh(m).values()) for m in args.mesh]
    jax.config.update("jax_platforms", "cpu")  # planning compiles for fake CPU devices, even on a GPU host
    described = targets.is_target(args.target)  # an accelerator described to its own compiler
    if described:
        try:
            devices = targets.devices(args.target)
        except ConfigError as e:
            parser.error(f"--target: {e}")
        if max(sizes) > len(devices):
            parser.error(f"--mesh: {args.target} has {len(devices)} devices; a mesh of {max(sizes)} needs "
                         "more")
    else:
        jax.config.update("jax_num_cpu_devices", max(sizes))
        devices = jax.devices()

    from phi4_jax.engine import plan
    from phi4_jax.config import Phi4Config
    from runinfo import describe_run, write_record

    config = Phi4Config.from_name(args.model)
    records = _existing(args.output)
    for spec, n in zip(args.mesh, sizes):
        mesh = meshes.make_mesh(spec, devices[:n])
        result = plan.plan(config, mesh, args.context, args.batch, args.dtype, args.prefill_piece,
                           target=devices[0].platform if described else args.target, quantize=args.quantize)
        result = {"name": args.model, "mesh_spec": spec, **result}
        if described:
            result.update(topology=args.target, **chip_roofline(config, result, args.target, devices))
        else:
            result["fits_on"] = plan.fits_on(result["per_device"]["needed_bytes"])
        _print(result)
        key = _key(result)
        records = [r for r in records if _key(r) != key] + [result]
    records.sort(key=lambda r: (r["name"], r["context"], r["batch"], r["devices"], r["mesh_spec"]))
    write_record(args.output, {"benchmark": "plan", "schema": 1, **describe_run(), "records": records})
    planned = [r for r in records if "topology" not in r]
    compiled = [r for r in records if "topology" in r]
    print(f"wrote {args.output}; bench/RESULTS.md's tables:\n{TABLE_HEADER}", file=sys.stderr)
    print("\n".join(table_row(r) for r in planned), file=sys.stderr)
    print(f"\n{COMPILED_TABLE_HEADER}", file=sys.stderr)
    print("\n".join(compiled_table_row(r) for r in compiled), file=sys.stderr)
    return 0


def chip_roofline(config, r: dict, topology: str, devices: list) -> dict:
    """What one chip allows each compiled step (record fields): the step time at the slower of its
    FLOPs at the bf16 peak and its main-memory bytes at the HBM bandwidth, the tokens/s that
    follow, MBU (what a step must read: the weights, less an untied embedding table, and the whole
    KV cache, once) and MFU (the prefill's model FLOPs) at that time; and whether the steps' memory
    fits the chip with the planner's headroom (a step the compiler refused does not). The FLOPs are
    the larger of the program's matmul FLOPs (its loops counted as they run) and XLA's count (all
    operations, each loop body once): both fall short of the work, neither exceeds it."""
    from roofline import prefill_flops

    from phi4_jax.engine.plan import USABLE
    from phi4_jax.parallel import targets

    chip, per_chip = targets.chip(topology), targets.devices_per_chip(devices)
    peak, bandwidth, capacity = (chip.bf16_flop_per_s / per_chip, chip.hbm_bytes_per_s / per_chip,
                                 chip.hbm_bytes // per_chip)
    d, steps = r["per_device"], r["steps"]
    compiled = {name: step for name, step in steps.items() if "refused" not in step}
    for name, step in compiled.items():
        step["flops"] = max(step["matmul_flops"], step["xla_flops"] or 0)
        # A decode call runs its steps in a loop: a step reads what the loop does (what the call does
        # once around it, such as a relayout of the cache, is `per_call_bytes`).
        step["step_bytes"] = step["main_memory_bytes_in_loops"] if name == "decode" else step["main_memory_bytes"]
        step["per_call_bytes"] = step["main_memory_bytes"] - step["step_bytes"]
        compute, memory = step["flops"] / peak, step["step_bytes"] / bandwidth
        step.update(roofline_s=max(compute, memory), bound="flops" if compute >= memory else "bandwidth")
    if "decode" in compiled:
        decode, must_read = compiled["decode"], d["decode_reads_bytes"]
        decode.update(tokens_per_s_bound=r["batch"] / decode["roofline_s"],
                      mbu_bound=must_read / bandwidth / decode["roofline_s"],
                      bytes_over_must_read=decode["step_bytes"] / must_read)
    if "prefill" in compiled:
        prefill, work = compiled["prefill"], prefill_flops(config, r["batch"], r["context"]) / r["devices"]
        prefill.update(tokens_per_s_bound=r["batch"] * r["context"] / prefill["roofline_s"],
                       mfu_bound=work / peak / prefill["roofline_s"])
    return {"chip": {"name": chip.name, "bf16_flop_per_s": peak, "hbm_bytes_per_s": bandwidth,
                     "hbm_bytes": capacity, "devices_per_chip": per_chip, "source": chip.source},
            "fits": len(compiled) == len(steps) and d["needed_bytes"] <= USABLE * capacity}


def table_row(r: dict) -> str:
    """The record as a row of bench/RESULTS.md's table (tests/test_docs.py checks that the page has it)."""
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    d, s = r["per_device"], r["steps"]
    return (f"| {_model(r)} | `{r['mesh_spec']}` | {r['context'] // 1024}K × {r['batch']} | "
            f"{gb(d['weights_bytes'])} | {gb(d['kv_cache_bytes'])} | {gb(s['prefill']['temp_bytes'])} / "
            f"{gb(s['decode']['temp_bytes'])} | {gb(d['needed_bytes'])} | {', '.join(r['fits_on']) or 'none'} |")


def compiled_table_row(r: dict) -> str:
    """A record compiled for an accelerator as a row of bench/RESULTS.md's table of them
    (tests/test_docs.py checks that the page has it)."""
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    d, s, c = r["per_device"], r["steps"], r["chip"]
    need = f"{gb(d['needed_bytes'])} of {gb(c['hbm_bytes'])}" + ("" if r["fits"] else ": does not fit")
    refused = lambda step: f"refused: {gb(step['temp_bytes'])} of temporaries"  # noqa: E731
    prefill, decode = s["prefill"], s["decode"]
    prefill = refused(prefill) if "refused" in prefill else (
        f"{1e3 * prefill['roofline_s']:.1f} ms, {100 * prefill['mfu_bound']:.0f}%")
    decode = (refused(decode) + " | " if "refused" in decode else
              f"{1e3 * decode['roofline_s']:.2f} ms, {decode['tokens_per_s_bound']:.0f} tokens/s, "
              f"{100 * decode['mbu_bound']:.0f}% | {decode['bytes_over_must_read']:.2f}×")
    return (f"| {_model(r)} | {r['topology']} | `{r['mesh_spec']}` | {r['context'] // 1024}K × {r['batch']} | "
            f"{need} | {prefill} | {decode} |")


COMPILED_TABLE_HEADER = ("| model | target | mesh | context × batch | per-chip memory needed | prefill: roofline time, "
                    "MFU bound | decode step: roofline time, tokens/s, MBU bound | decode HBM traffic / what it must read |\n"
                    "|---|---|---|---|---|---|---|---|")

TABLE_HEADER = ("| model | mesh | context × batch | weights | KV cache | temporaries: prefill / decode | "
                 "needed | fits on (that many of) |\n|---|---|---|---|---|---|---|---|")


def _model(r: dict) -> str:
    """The model's name, with its weights' quantization when it has one ("phi-4 int8")."""
    return r["name"] + (f" {r['quantize']}" if r.get("quantize") else "")


def _key(r: dict) -> tuple:
    return (r["name"], r["mesh_spec"], r["context"], r["batch"], r["dtype"], r["prefill_piece"], r["target"],
            r.get("topology"), r.get("quantize"))


def _existing(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["records"]
    except (OSError, ValueError, KeyError):
        return []


def _print(r: dict) -> None:
    from phi4_jax.engine.plan import ACCELERATORS, USABLE

    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    d = r["per_device"]
    print(f"{_model(r)} on {r['mesh_spec']} ({r['devices']} devices), context {r['context']}, batch {r['batch']}, "
          f"{r['dtype']}:", file=sys.stderr)
    print(f"  per device: weights {gb(d['weights_bytes'])}, KV cache {gb(d['kv_cache_bytes'])}, "
          f"needed {gb(d['needed_bytes'])}", file=sys.stderr)
    for name, s in r["steps"].items():
        if "refused" in s:
            print(f"  {name}: refused by the compiler, it would need {gb(s['temp_bytes'])} of temporaries "
                  f"({s['refused']})", file=sys.stderr)
            continue
        collectives = ", ".join(f"{k} {v}" for k, v in s["collectives"].items() if v) or "none"
        print(f"  {name}: temporaries {gb(s['temp_bytes'])} (float32 bound; the CPU bf16 compile: "
              f"{gb(s['temp_bytes_cpu_compile'])}, of which CPU-only upcasts {gb(s['cpu_only_upcast_bytes'])}); "
              f"collectives: {collectives}", file=sys.stderr)
    if "chip" in r:
        c = r["chip"]
        for name, s in r["steps"].items():
            if "refused" in s:
                continue
            bound = (f"MBU ≤ {100 * s['mbu_bound']:.0f}%" if name == "decode" else f"MFU ≤ {100 * s['mfu_bound']:.0f}%")
            print(f"  {name} on one {c['name']}: {s['flops'] / 1e12:.3f} TFLOP, {s['step_bytes'] / 1e9:.2f} GB "
                  f"of HBM traffic (+{s['per_call_bytes'] / 1e9:.2f} GB per call) -> {1e3 * s['roofline_s']:.2f} ms ({s['bound']}-bound), "
                  f"≤ {s['tokens_per_s_bound']:.0f} tokens/s, {bound}", file=sys.stderr)
        verdict = "fits" if r["fits"] else "DOES NOT FIT: it would need"
        print(f"  {verdict} {gb(d['needed_bytes'])} of a chip's {gb(c['hbm_bytes'])} (with "
              f"{100 - 100 * USABLE:.0f}% kept free)", file=sys.stderr)
        return
    print(f"  fits on: {', '.join(r['fits_on']) or 'none of ' + ', '.join(ACCELERATORS)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
