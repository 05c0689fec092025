"""phi4_jax against transformers on the same model, the same prompts and the same greedy tokens.

One random-weight checkpoint (transformers' `Phi3ForCausalLM`, float32, `phi3-110m` by default) is
saved once as safetensors; each engine then loads it in its own fresh process (so each has the
machine and its own peak RSS to itself), one after the other:
  transformers-eager, transformers-sdpa   PyTorch on the CPU, `model.generate`, greedy
  phi4_jax                                the engine, greedy
Each measures the same things the same way (median of --repeats after a warm-up run):
  prefill: time to the first token of one --prefill-len-token prompt -> prompt tokens/s;
  decode:  for each --batch, --new-tokens tokens after a --prompt-len prompt, minus the time to
           the first token -> (new tokens - 1) x batch / s.
Every engine's greedy tokens must be identical to transformers-eager's (the reference); the run
says where they first differ if not. Ratios are against transformers-sdpa (and eager).

  python bench/compare_transformers.py             # the committed run (2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import numpy as np

import generate  # bench/generate.py: the shapes and prompts

ENGINES = ("transformers-eager", "transformers-sdpa", "phi4_jax")
RESULTS = os.path.join(generate.ROOT, "bench", "results", "compare_transformers.jsonl")
SCHEMA = "phi4_jax.bench.compare_transformers/1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/compare_transformers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="phi3-110m", choices=sorted(generate.SHAPES),
                   help="the model's shape (default phi3-110m)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes (default 1 16)")
    p.add_argument("--prompt-len", "--prompt_len", type=int, default=16, help="decode prompt tokens (default 16)")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=128, help="tokens generated per row (default 128)")
    p.add_argument("--prefill-len", "--prefill_len", type=int, default=512, help="prefill prompt tokens (default 512)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per measurement, after a warm-up run (default 3; the median counts)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="engines to run (default all three)")
    p.add_argument("--output", default=RESULTS,
                   help="JSON-lines file the records are appended to (default bench/results/compare_transformers.jsonl)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # ENGINE:FOLDER, one engine's run
    return p


def save_checkpoint(shape: dict, folder: str) -> None:
    """transformers' own random initialisation (seeded), saved as safetensors with its config."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in shape.items() if k != "model_type"}
    Phi3ForCausalLM(Phi3Config(**fields)).save_pretrained(folder, safe_serialization=True)


def timed(run, repeats: int) -> float:
    return statistics.median(generate.timings(run, repeats))


def transformers_runner(folder: str, implementation: str):
    """`generate(prompts, n) -> tokens [B, n]`, greedy, exactly n tokens (no stop token)."""
    import torch
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation=implementation)
    model.eval()
    model.generation_config.eos_token_id = None  # no stop: every row generates all n tokens
    model.generation_config.pad_token_id = 0

    def run(prompts, n):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].tolist()
    return run


def phi4_jax_runner(folder: str):
    from phi4_jax import load
    from phi4_jax.engine import Engine
    from phi4_jax.sampling import SamplingParams

    engine = Engine(load(folder, dtype="float32")[0])  # as transformers runs it, on any backend

    def run(prompts, n):
        gen = engine.start(prompts, SamplingParams(max_tokens=n, ignore_eos=True), [[]] * len(prompts))
        gen.advance(n - 1)
        return np.asarray(gen.state.tokens)[:, :n].tolist()
    return run


def child(args) -> dict:
    """One engine's measurements (runs in its own process)."""
    engine, folder = args.child.split(":", 1)
    run = (phi4_jax_runner(folder) if engine == "phi4_jax"
           else transformers_runner(folder, engine.removeprefix("transformers-")))
    vocab = generate.SHAPES[args.model]["vocab_size"]
    out = {"engine": engine}
    if engine != "phi4_jax":  # (this process imports no JAX, nor the other engine's framework)
        import torch

        out["torch_threads"] = torch.get_num_threads()
    prompt = generate.prompts_of(vocab, 1, args.prefill_len)
    seconds = timed(lambda: run(prompt, 1), args.repeats)
    out["prefill"] = {"prompt_len": args.prefill_len, "seconds": seconds, "tokens_per_s": args.prefill_len / seconds}
    out["decode"] = []
    for batch in args.batch:
        prompts = generate.prompts_of(vocab, batch, args.prompt_len)
        first = timed(lambda: run(prompts, 1), args.repeats)
        total = timed(lambda: run(prompts, args.new_tokens), args.repeats)
        out["decode"].append({"batch": batch, "first_token_s": first, "total_s": total,
                              "tokens_per_s": batch * (args.new_tokens - 1) / (total - first),
                              "tokens": run(prompts, args.new_tokens)})
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int] | None:
    """[row, position] of the first token where two batches differ, or None."""
    for row, (x, y) in enumerate(zip(a, b)):
        for pos, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return [row, pos]
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = {}
    with tempfile.TemporaryDirectory(prefix="phi4-jax-compare-") as folder:
        print(f"saving a random {args.model} checkpoint ...", file=sys.stderr)
        save_checkpoint(generate.SHAPES[args.model], folder)
        argv = list(argv if argv is not None else sys.argv[1:])
        for engine in args.engines:
            print(f"running {engine} ...", file=sys.stderr)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", f"{engine}:{folder}"],
                                 capture_output=True, text=True)
            try:  # all engines or nothing: no record is written unless every one ran
                if out.returncode:
                    raise ValueError(f"exit status {out.returncode}")
                runs[engine] = json.loads(out.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError) as e:
                sys.exit(f"bench/compare_transformers.py: {engine} failed ({e}); nothing was written:\n{out.stderr}")
    return write(args, runs)


def write(args, runs: dict) -> int:
    from phi4_jax.runinfo import describe_run

    config = generate.model_config(argparse.Namespace(model=args.model, layers=None))
    base = {"schema": SCHEMA, **describe_run(), "model": args.model, "parameters": config.num_parameters,
            "dtype": "float32",
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    reference = runs.get("transformers-eager")
    records = []
    for engine, run in runs.items():
        common = {**base, "engine": engine,
                  "torch_threads": run.get("torch_threads"), "peak_rss_bytes": run["peak_rss_bytes"]}
        records.append({**common, "part": "prefill", "batch": 1, **run["prefill"]})
        for d in run["decode"]:
            diff = None if reference is None else first_difference(
                d["tokens"], next(r["tokens"] for r in reference["decode"] if r["batch"] == d["batch"]))
            records.append({**common, "part": "decode", **{k: v for k, v in d.items() if k != "tokens"},
                            "tokens_identical_to_eager": diff is None if reference else None,
                            "first_difference": diff})
    for r in records:  # ratios against each transformers implementation that ran
        for name in ("sdpa", "eager"):
            other = next((o for o in records if o["engine"] == f"transformers-{name}" and o["part"] == r["part"]
                          and o["batch"] == r["batch"]), None)
            if other:
                r[f"speedup_vs_{name}"] = r["tokens_per_s"] / other["tokens_per_s"]
                r[f"peak_rss_vs_{name}"] = r["peak_rss_bytes"] / other["peak_rss_bytes"]
    with open(args.output, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            what = f"prefill {r['prompt_len']}" if r["part"] == "prefill" else f"decode batch {r['batch']}"
            same = "" if r["part"] == "prefill" else (
                "  tokens identical" if r["tokens_identical_to_eager"] else f"  TOKENS DIFFER at {r['first_difference']}")
            print(f"{r['engine']:>20} {what:>15}: {r['tokens_per_s']:9.1f} tok/s  "
                  f"{r.get('speedup_vs_sdpa', float('nan')):5.2f}x sdpa  RSS {r['peak_rss_bytes'] / 1e9:.2f} GB{same}",
                  file=sys.stderr)
    differ = [r for r in records if r.get("tokens_identical_to_eager") is False]
    print(f"appended {len(records)} records to {args.output}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
