"""Start-up: the wall time of one chat answer from a fresh process, phi4_jax's CLI against a transformers script.

For each --model (a preset with transformers' own seeded random weights and the tokenizer of
--tokenizer, or an HF folder with its own), --repeats rounds, the order rotating within each:
  transformers    a fresh Python that imports transformers, loads the folder (float32, sdpa),
                  applies the chat template and generates --max-tokens tokens greedily
  phi4_jax-cold   `python -m phi4_jax.generate` on the same prompt, with an empty compilation cache
  phi4_jax-warm   the same with the cache a cold run of this model filled
Every process is timed from its start to its exit (imports, load, compile, prefill, decode); the
median of the rounds counts. phi4_jax's own statistics (its --json) say how much of its time was
compiling and loading from the cache, and its greedy tokens must equal the script's.

  python bench/startup.py                         # the committed run (phi3-110m and deep-thin)
  python bench/startup.py --model ~/models/Phi-4-mini-instruct --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import generate  # bench/generate.py: the presets measured by default

RESULTS = os.path.join(generate.ROOT, "bench", "results", "startup.jsonl")
SCHEMA = "phi4_jax.bench.startup/1"
TOKENIZER = os.path.join(generate.ROOT, "..", "shared", "fixtures", "phi-3.5-mini")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "generation_config.json")
RUNS = ("transformers", "phi4_jax-cold", "phi4_jax-warm")

# What a transformers user runs for one answer (the tokens go to stderr for the check).
TRANSFORMERS_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa")
ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
model.generation_config.eos_token_id = None  # n tokens, like the CLI's --ignore-eos (min_new_tokens
model.generation_config.pad_token_id = 0      # would instead forbid the end-of-turn token)
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
print(tokenizer.decode(out[0, ids.shape[1]:]))
print(json.dumps(out[0, ids.shape[1]:].tolist()), file=sys.stderr)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/startup.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(generate.MODELS),
                   help="presets of phi4_jax.config.PRESETS (random weights) or HF folders with weights and a "
                        f"tokenizer, measured one after the other (default {' '.join(generate.MODELS)})")
    p.add_argument("--tokenizer", default=TOKENIZER,
                   help="the folder whose tokenizer files a preset gets (default: the Phi-3.5-mini fixture, whose "
                        "32064 ids fit every preset's vocabulary)")
    p.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=64,
                   help="tokens generated, every one (no stop token; default 64)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median of each run counts (default 3)")
    p.add_argument("--warm-up", "--warm_up", type=int, default=1,
                   help="uncounted cold runs before the rounds, so every counted run finds the files in the page "
                        "cache and Python's bytecode compiled (default 1)")
    p.add_argument("--output", default=RESULTS, help="JSON-lines file the records are appended to "
                                                     "(default bench/results/startup.jsonl)")
    return p


def check(parser, args) -> None:
    """Refuses what cannot be measured, before anything runs."""
    from phi4_jax.config import PRESETS

    if args.repeats < 1 or args.max_tokens < 1 or args.warm_up < 0:
        parser.error("--repeats and --max-tokens must be at least 1, --warm-up at least 0")
    for model in args.model:
        if model in PRESETS:
            if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
                parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there (a preset takes its tokenizer "
                             "from this folder)")
        elif not (generate.has_weights(model) and os.path.isfile(os.path.join(model, "tokenizer_config.json"))):
            parser.error(f"--model {model}: neither a preset nor an HF folder with safetensors and a tokenizer")


def preset_folder(name: str, tokenizer: str, folder: str) -> None:
    """A preset's HF folder: transformers' seeded random weights and the tokenizer files of `tokenizer`."""
    from compare_transformers import save_checkpoint
    from tokenizers import Tokenizer

    from phi4_jax.config import PRESETS

    ids = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if ids > PRESETS[name]["vocab_size"]:
        sys.exit(f"bench/startup.py: --tokenizer {tokenizer} has {ids} ids, more than {name}'s "
                 f"{PRESETS[name]['vocab_size']}-token vocabulary")
    save_checkpoint(PRESETS[name], folder)
    for file in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer, file)):
            shutil.copyfile(os.path.join(tokenizer, file), os.path.join(folder, file))


def timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"bench/startup.py: {' '.join(command[:4])} ... failed:\n{out.stderr[-4000:]}\nnothing was written")
    return seconds, out


def run_once(run: str, folder: str, args, caches: dict) -> dict:
    """One fresh process of `run`: its wall seconds, tokens and (phi4_jax) its own statistics."""
    env = dict(os.environ)
    if run == "transformers":
        seconds, out = timed([sys.executable, "-c", TRANSFORMERS_SCRIPT, folder, args.prompt, str(args.max_tokens)],
                             env)
        return {"wall_s": seconds, "tokens": json.loads(out.stderr.strip().splitlines()[-1])}
    if run == "phi4_jax-cold":
        shutil.rmtree(caches["folder"], ignore_errors=True)  # empty; the warm runs after it find it filled
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PHI4_JAX_COMPILATION_CACHE"] = caches["folder"]
    seconds, out = timed([sys.executable, "-m", "phi4_jax.generate", "--model", folder, "--prompt", args.prompt,
                          "--max-tokens", str(args.max_tokens), "--ignore-eos", "--dtype", "float32", "--json"], env)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": seconds, "tokens": answer["tokens"], **answer["stats"]}


def measure(args, folder: str, scratch: str) -> dict[str, list[dict]]:
    caches = {"folder": os.path.join(scratch, "compilation-cache")}
    runs: dict[str, list[dict]] = {run: [] for run in RUNS}
    for _ in range(args.warm_up):  # fills the caches (also the compilation cache): not counted
        first = run_once("phi4_jax-cold", folder, args, caches)
        print(f"  (a warm-up cold run: {first['wall_s']:.2f} s, not counted)", file=sys.stderr)
    for round_ in range(args.repeats):
        # A warm run before this round's cold one finds the cache the previous cold run filled.
        for run in RUNS[round_ % 3:] + RUNS[:round_ % 3]:
            runs[run].append(run_once(run, folder, args, caches))
            print(f"  round {round_ + 1} {run:>14}: {runs[run][-1]['wall_s']:.2f} s", file=sys.stderr)
    return runs


def records_of(args, model: str, runs: dict[str, list[dict]]) -> list[dict]:
    from runinfo import describe_run

    config = generate.model_config(argparse.Namespace(model=model, layers=None))
    base = {"schema": SCHEMA, **describe_run(), "model": model, "layers": config.num_hidden_layers,
            "parameters": config.num_parameters, "dtype": "float32", "max_tokens": args.max_tokens,
            "rounds": args.repeats, "prompt": args.prompt}
    reference = runs["transformers"][0]["tokens"]
    median = {run: statistics.median(r["wall_s"] for r in rs) for run, rs in runs.items()}
    records = []
    for run, rs in runs.items():
        record = {**base, "run": run, "wall_s": median[run], "wall_s_rounds": [r["wall_s"] for r in rs],
                  "vs_transformers": median[run] / median["transformers"],
                  "tokens_identical": all(r["tokens"] == reference for r in rs)}
        for stat in ("compile_seconds", "compile_cache_seconds", "prompt_tps", "generation_tps"):
            if stat in rs[0]:
                record[stat] = statistics.median(r[stat] for r in rs)
        records.append(record)
    return records


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    from phi4_jax.config import PRESETS

    records = []
    for model in args.model:
        print(f"{model}:", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="phi4-jax-startup-") as scratch:
            folder = model
            if model in PRESETS:
                folder = os.path.join(scratch, "model")
                preset_folder(model, args.tokenizer, folder)
            records += records_of(args, model, measure(args, folder, scratch))
    with open(args.output, "a", encoding="utf-8") as f:  # all models or nothing
        for r in records:
            f.write(json.dumps(r) + "\n")
            same = "tokens identical" if r["tokens_identical"] else "TOKENS DIFFER from transformers'"
            print(f"{r['model']:>12} {r['run']:>14}: {r['wall_s']:6.2f} s  {r['vs_transformers']:4.2f}x "
                  f"transformers  {same}", file=sys.stderr)
    print(f"appended {len(records)} records to {args.output}", file=sys.stderr)
    return 0 if all(r["tokens_identical"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
