"""The planner's rows of bench/RESULTS.md: `phi4-jax plan` merged into bench/results/plan.json.

It runs `phi4-jax plan` (the same flags; `phi4_jax/cli/plan.py` says what it compiles and reports),
merges its records into --output (one record per model, mesh, context, batch, dtype, piece, target
and quantization), and prints the RESULTS.md tables of all of them.

  python bench/plan.py --model phi-4 --mesh tensor=8 --context 16k --batch 8
  python bench/plan.py --model phi-4-mini --mesh tensor=1 tensor=8 seq=2 seq=4 seq=8 --context 128k --batch 1
  python bench/plan.py --model phi-4-mini --target v5e:2x4 --mesh tensor=8 seq=8 --context 32k
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phi4_jax.cli import common as cli
from phi4_jax.cli import plan as plan_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "plan.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/plan.py", description=__doc__, formatter_class=cli.HelpFormatter)
    plan_command.add_arguments(p)
    for action in p._actions:  # the same flags; here --output is the file the records are merged into
        if action.dest == "output":
            action.help, action.default = "JSON file the records are merged into", RESULTS
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: _merge(args))


def _merge(args) -> int:
    from runinfo import describe_run, write_record

    output, args.output = args.output, None  # the records are merged here, not written over
    records, new = _existing(output), plan_command.plan_records(args)
    if args.json:
        print(json.dumps(new, indent=1))
    for result in new:
        records = [r for r in records if _key(r) != _key(result)] + [result]
    records.sort(key=lambda r: (r["name"], r["context"], r["batch"], r["devices"], r["mesh_spec"]))
    write_record(output, {"benchmark": "plan", "schema": 1, **describe_run(), "records": records})
    planned = [r for r in records if "topology" not in r]
    compiled = [r for r in records if "topology" in r]
    print(f"wrote {output}; bench/RESULTS.md's tables:\n{TABLE_HEADER}", file=sys.stderr)
    print("\n".join(table_row(r) for r in planned), file=sys.stderr)
    print(f"\n{COMPILED_TABLE_HEADER}", file=sys.stderr)
    print("\n".join(compiled_table_row(r) for r in compiled), file=sys.stderr)
    return 0


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
                    "MFU bound | decode step: roofline time, tokens/s, MBU bound | "
                    "decode HBM traffic / what it must read |\n"
                    "|---|---|---|---|---|---|---|---|")

TABLE_HEADER = ("| model | mesh | context × batch | weights | KV cache | temporaries: prefill / decode | "
                 "needed | fits on (that many of) |\n|---|---|---|---|---|---|---|---|")


def _model(r: dict) -> str:
    """The model's name, with its weights' quantization when it has one and its attention kernel
    where it is not XLA's ("phi-4 int8 (splash)")."""
    return r["name"] + (f" {r['quantize']}" if r.get("quantize") else "") + (
        f" ({r['attention']})" if r.get("attention", "xla") != "xla" else "")


def _key(r: dict) -> tuple:
    return (r["name"], r["mesh_spec"], r["context"], r["batch"], r["dtype"], r["prefill_piece"], r["target"],
            r.get("topology"), r.get("quantize"), r.get("attention", "xla"))


def _existing(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["records"]
    except (OSError, ValueError, KeyError):
        return []


if __name__ == "__main__":
    sys.exit(main())
