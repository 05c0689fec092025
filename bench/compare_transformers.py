"""phi4_jax against transformers on the same model, the same prompts and the same greedy tokens.

For each --model (by default the two shapes the CPU numbers are set on: `phi3-110m`, 4 thick
layers, and `deep-thin`, 30 thin ones), float32: a preset with transformers' own seeded random
weights, saved once as safetensors, or a real HF folder; each engine loads it in its own process
(its own peak RSS, and no imports of the other framework):
  transformers-eager, transformers-sdpa   PyTorch on the CPU, `model.generate`, greedy
  phi4_jax                                the engine, greedy (sharded over --mesh when given)
The engines then take turns: each measurement is taken once by every engine in a round, for
--repeats rounds (the order rotating), while the others wait idle; so the machine's drift over the
run falls on every engine alike, and the median of the rounds counts. After a warm-up call per shape:
  prefill: seconds to the first token of one --prefill-len-token prompt -> prompt tokens/s;
  decode:  for each --batch, the seconds of --new-tokens tokens after a --prompt-len prompt minus,
           in the same round, those of the first token alone -> (new tokens - 1) x batch / s.
Every engine's greedy tokens must be identical to transformers-eager's (the reference); the run
says where they first differ if not. Ratios are against transformers-sdpa (and eager).
Each round also reads the machine's rooflines, in a process of their own (its buffers stay out of
the engines' memory): the read bandwidth and the float32 matmul peak. Every record then holds the
tokens/s those allow
(`roofline_tokens_per_s`: prefill at the matmul peak; decode at the slower of reading every weight
and the KV cache once per step at the read bandwidth and doing its matmuls at the peak), so a
target beyond the machine shows as such in the same run.

  python bench/compare_transformers.py             # the committed run (2-core CPU)
  python bench/compare_transformers.py --model ~/models/Phi-4-mini-instruct --batch 1 --prefill-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time

import generate  # bench/generate.py: the shapes and prompts

ENGINES = ("transformers-eager", "transformers-sdpa", "phi4_jax")
RESULTS = os.path.join(generate.ROOT, "bench", "results", "compare_transformers.jsonl")
SCHEMA = "phi4_jax.bench.compare_transformers/3"  # 3: phi4_jax through the Engine; a record per --prefill-len
ROOFLINE = "roofline"  # the worker that reads the machine's rooflines
# Between turns: lets the engine that just ran put its worker threads to sleep (OpenMP spins a while).
PAUSE_S = 0.2
ANSWER_TIMEOUT_S = 3600  # a worker silent for this long is taken for hung


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/compare_transformers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(generate.MODELS),
                   help="presets of phi4_jax.config.PRESETS, run with transformers' own seeded random weights, "
                        "or HF folders (config.json and safetensors: their real weights), measured one after "
                        f"the other (default {' '.join(generate.MODELS)})")
    p.add_argument("--mesh", default=None,
                   help="run phi4_jax sharded over this mesh, e.g. tensor=2 (on a CPU: that many fake devices; "
                        "transformers runs on one device)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes (default 1 16)")
    p.add_argument("--prompt-len", "--prompt_len", type=int, default=16, help="decode prompt tokens (default 16)")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=128, help="tokens generated per row (default 128)")
    p.add_argument("--prefill-len", "--prefill_len", type=int, nargs="+", default=[512],
                   help="prefill prompt lengths in tokens, each measured in its own rounds (default 512)")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds per measurement, after a warm-up call (default 5; the median counts)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="engines to run (default all three)")
    p.add_argument("--read-buffer-mb", "--read_buffer_mb", type=int, default=None,
                   help="size of the buffer read to measure bandwidth (default 1024 on a CPU, 4096 elsewhere; "
                        "keep it far larger than the last-level cache)")
    p.add_argument("--matmul-sizes", "--matmul_sizes", type=int, nargs="+", default=None,
                   help="square matmul sizes the peak is read at, the fastest counting (default 1024 2048 4096 on a "
                        "CPU, 4096 8192 16384 elsewhere; smaller ones read a lower peak, for quick checks)")
    p.add_argument("--output", default=RESULTS,
                   help="JSON-lines file the records are appended to "
                        "(default bench/results/compare_transformers.jsonl)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # ENGINE:FOLDER, one engine's process
    return p


def save_checkpoint(shape: dict, folder: str) -> None:
    """transformers' own random initialisation (seeded) of a preset, saved as safetensors with its config."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in shape.items() if k != "model_type"}
    Phi3ForCausalLM(Phi3Config(**fields)).save_pretrained(folder, safe_serialization=True)


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


def phi4_jax_runner(folder: str, mesh: str | None):
    import math

    import jax
    import numpy as np

    from phi4_jax.parallel.mesh import parse_mesh

    if mesh and jax.default_backend() == "cpu":  # (before any device is used) that many fake devices
        jax.config.update("jax_num_cpu_devices", math.prod(parse_mesh(mesh).values()))
    from phi4_jax import Engine, ModelRunner, SamplingParams, load

    runner = ModelRunner(load(folder, dtype="float32", mesh=mesh)[0])  # as transformers runs it, on any backend

    def run(prompts, n):  # through the engine, as generate() runs: every row in one batch, one decode call
        engine = Engine(runner, max_batch=len(prompts), steps_per_call=n)
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        engine.add_requests([(str(b), p, params) for b, p in enumerate(prompts)])
        tokens = [[] for _ in prompts]
        for out in engine.outputs():
            tokens[int(out.request_id)] += out.token_ids
        return np.asarray(tokens).tolist()
    return run


def serve(args) -> None:
    """One engine's process: loads the model, then runs each request (a JSON line on stdin: batch,
    prompt_len, new_tokens) and answers with its seconds, tokens and the peak RSS so far. The
    "roofline" process answers each request with a reading of the read bandwidth and matmul peak."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)  # the answers' own channel ...
    os.dup2(2, 1)  # ... so that anything else printed goes to stderr
    engine, folder = args.child.split(":", 1)
    if engine == ROOFLINE:
        from roofline import MatmulPeak, ReadBandwidth

        read = ReadBandwidth(args.read_buffer_mb and args.read_buffer_mb * 2**20)
        matmul = MatmulPeak("float32", args.matmul_sizes and tuple(args.matmul_sizes))  # what the engines compute in
        answer.write(json.dumps({"ready": True}) + "\n")
        for _ in sys.stdin:
            answer.write(json.dumps({**read.measure(repeats=2), **matmul.measure(repeats=2)}) + "\n")
        return
    run = (phi4_jax_runner(folder, args.mesh) if engine == "phi4_jax"
           else transformers_runner(folder, engine.removeprefix("transformers-")))
    threads = None
    if engine != "phi4_jax":
        import torch

        threads = torch.get_num_threads()
    vocab = generate.model_config(argparse.Namespace(model=args.model, layers=None)).vocab_size
    answer.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        prompts = generate.prompts_of(vocab, request["batch"], request["prompt_len"])
        start = time.perf_counter()
        tokens = run(prompts, request["new_tokens"])
        seconds = time.perf_counter() - start
        answer.write(json.dumps({"seconds": seconds, "tokens": tokens, "torch_threads": threads,
                                 "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}) + "\n")


class EngineFailed(Exception):
    pass


class Worker:
    """An engine's process, asked for one run at a time."""

    def __init__(self, engine: str, folder: str, argv: list[str]):
        self.engine = engine
        self._log = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{engine}:{folder}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        try:
            self._answer()  # loaded
        except EngineFailed:
            self.close()
            raise

    def run(self, batch: int, prompt_len: int, new_tokens: int) -> dict:
        return self._ask({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens})

    def roofline(self) -> dict:
        """The machine's read bandwidth and matmul peak, measured now (the roofline process)."""
        return self._ask({})

    def _ask(self, request: dict) -> dict:
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _answer says how
        return self._answer()

    def _answer(self) -> dict:
        # One request, one line: nothing waits in the pipe's buffer between answers.
        ready, _, _ = select.select([self._process.stdout], [], [], ANSWER_TIMEOUT_S)
        if not ready:
            self._process.kill()
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            self._log.seek(0)
            why = (f"gave no answer in {ANSWER_TIMEOUT_S} s and was killed" if not ready
                   else f"failed (exit status {code})")
            raise EngineFailed(f"{self.engine} {why}:\n{self._log.read()}")
        return json.loads(line)

    def close(self) -> None:
        if self._log.closed:
            return
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._log.close()


def in_turns(workers: list[Worker], reader: Worker, rounds: int, measure, readings: list) -> dict[str, list]:
    """`measure(worker)` once per engine to warm up, then `rounds` times each, engine after engine
    (the order rotating each round); returns each engine's results in round order. Each round
    starts with a roofline reading by `reader`, appended to `readings`."""
    for w in workers:
        measure(w)
    results = {w.engine: [] for w in workers}
    for r in range(rounds):
        readings.append(reader.roofline())
        for w in workers[r % len(workers):] + workers[:r % len(workers)]:
            time.sleep(PAUSE_S)
            results[w.engine].append(measure(w))
    return results


def measure_all(args, workers: list[Worker], reader: Worker) -> dict[str, dict]:
    """Every engine's prefill and decode numbers (medians over the rounds), tokens and peak RSS."""
    runs = {w.engine: {"engine": w.engine, "prefill": [], "decode": []} for w in workers}
    for length in args.prefill_len:
        print(f"prefill {length} tokens ...", file=sys.stderr)
        readings = []
        prefill = in_turns(workers, reader, args.repeats, lambda w, n=length: w.run(1, n, 1)["seconds"], readings)
        for engine, seconds in prefill.items():
            median = statistics.median(seconds)
            runs[engine]["prefill"].append({"prompt_len": length, "seconds": median, "tokens_per_s": length / median,
                                            "round_seconds": seconds, "readings": readings})
    for batch in args.batch:
        print(f"decode batch {batch} ...", file=sys.stderr)

        def decode(w, batch=batch):  # the first token alone, then all of them, back to back
            first = w.run(batch, args.prompt_len, 1)
            total = w.run(batch, args.prompt_len, args.new_tokens)
            return first["seconds"], total["seconds"], total["tokens"]

        readings = []
        for engine, results in in_turns(workers, reader, args.repeats, decode, readings).items():
            rates = [batch * (args.new_tokens - 1) / (total - first) for first, total, _ in results]
            runs[engine]["decode"].append({
                "batch": batch, "first_token_s": statistics.median(r[0] for r in results),
                "total_s": statistics.median(r[1] for r in results), "tokens_per_s": statistics.median(rates),
                "round_tokens_per_s": rates, "tokens": results[-1][2], "readings": readings})
    for w in workers:  # a last, short run reports each process's peak RSS and threads
        last = w.run(1, args.prompt_len, 1)
        runs[w.engine].update(peak_rss_bytes=last["peak_rss_bytes"], torch_threads=last["torch_threads"])
    return runs


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int] | None:
    """[row, position] of the first token where two batches differ, or None."""
    for row, (x, y) in enumerate(zip(a, b)):
        for pos, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return [row, pos]
    return None


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        args.model = args.model[-1]
        serve(args)
        return 0
    for model in args.model:
        check(parser, argparse.Namespace(**{**vars(args), "model": model}))
    worst = 0
    for model in args.model:
        one = argparse.Namespace(**{**vars(args), "model": model})
        worst = max(worst, compare_one(one, [*argv, "--model", model]))  # (the last --model counts)
    return worst


def compare_one(args, argv: list[str]) -> int:
    """Every engine on one model (args.model); its records appended; 1 if tokens differ."""
    workers, reader = [], None
    with tempfile.TemporaryDirectory(prefix="phi4-jax-compare-") as scratch:
        folder = args.model if generate.has_weights(args.model) else scratch
        if folder == scratch:
            from phi4_jax.config import PRESETS

            print(f"saving a random {args.model} checkpoint ...", file=sys.stderr)
            save_checkpoint(PRESETS[args.model], folder)
        try:  # all engines or nothing: no record is written unless every one ran
            reader = Worker(ROOFLINE, folder, argv)
            for engine in args.engines:
                print(f"loading {engine} ...", file=sys.stderr)
                workers.append(Worker(engine, folder, argv))
            runs = measure_all(args, workers, reader)
        except EngineFailed as e:
            sys.exit(f"bench/compare_transformers.py: {e}\nnothing was written")
        finally:
            for w in [*workers, reader]:
                if w:
                    w.close()
    return write(args, runs)


def check(parser, args) -> None:
    """Refuses what cannot be measured, before anything runs."""
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed needs a step after the first token)")
    if len(set(args.engines)) < len(args.engines):
        parser.error("--engines names an engine twice")
    from phi4_jax import Phi4Config
    from phi4_jax.config import PRESETS

    if args.model not in PRESETS and not generate.has_weights(args.model):
        parser.error(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor an HF folder "
                     "with safetensors weights")
    if args.mesh:
        from phi4_jax.parallel.mesh import parse_mesh

        parse_mesh(args.mesh)  # a malformed spec is refused here, not in a worker
    context = Phi4Config.from_name(args.model).max_position_embeddings
    longest = max(max(args.prefill_len) + 1, args.prompt_len + args.new_tokens)
    if longest > context:
        parser.error(f"{longest} tokens (prompt + generated) do not fit {args.model}'s context of {context}: "
                     "shorten --prefill-len / --prompt-len / --new-tokens")


def rooflines(config, record: dict, readings: list[dict], new_tokens: int) -> dict:
    """The median readings of a measurement's rounds, and the tokens/s they allow it: a prefill
    at the matmul peak; a decode step at the slower of reading its weights and mean KV cache at the
    read bandwidth and doing its matmuls at the matmul peak."""
    from roofline import median_reading

    from phi4_jax.planner.roofline import decode_step_bytes, decode_step_flops, prefill_flops

    if not readings:
        return {}
    peaks = median_reading(readings)
    if record["part"] == "prefill":
        flops = prefill_flops(config, 1, record["prompt_len"])
        return {**peaks, "flops": flops,
                "roofline_tokens_per_s": peaks["matmul_flop_per_s"] * record["prompt_len"] / flops}
    batch, context = record["batch"], record["prompt_len"] + (new_tokens - 2) / 2  # mean cached tokens
    step, flops = decode_step_bytes(config, batch, context, 4), decode_step_flops(config, batch, context)
    bound = {"bandwidth_bound_tokens_per_s": batch * peaks["read_bytes_per_s"] / step,
             "flop_bound_tokens_per_s": batch * peaks["matmul_flop_per_s"] / flops}
    return {**peaks, "step_bytes": step, "step_flops": flops, **bound, "roofline_tokens_per_s": min(bound.values())}


def write(args, runs: dict) -> int:
    from runinfo import describe_run

    config = generate.model_config(argparse.Namespace(model=args.model, layers=None))
    base = {"schema": SCHEMA, **describe_run(), "model": args.model, "mesh": args.mesh or "",
            "parameters": config.num_parameters,
            "dtype": "float32", "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "rounds": args.repeats, "engines": list(runs)}
    reference = runs.get("transformers-eager")
    records = []
    for engine, run in runs.items():
        common = {**base, "engine": engine,
                  "torch_threads": run.get("torch_threads"), "peak_rss_bytes": run["peak_rss_bytes"]}
        for p in run["prefill"]:
            records.append({**common, "part": "prefill", "batch": 1, **{k: v for k, v in p.items() if k != "readings"}})
            records[-1].update(rooflines(config, records[-1], p["readings"], args.new_tokens))
        for d in run["decode"]:
            diff = None if reference is None else first_difference(
                d["tokens"], next(r["tokens"] for r in reference["decode"] if r["batch"] == d["batch"]))
            records.append({**common, "part": "decode",
                            **{k: v for k, v in d.items() if k not in ("tokens", "readings")},
                            "tokens_identical_to_eager": diff is None if reference else None,
                            "first_difference": diff})
            records[-1].update(rooflines(config, records[-1], d["readings"], args.new_tokens))
    for r in records:  # ratios against each transformers implementation that ran
        for name in ("sdpa", "eager"):
            other = next((o for o in records if o["engine"] == f"transformers-{name}" and o["part"] == r["part"]
                          and o["batch"] == r["batch"] and o["prompt_len"] == r["prompt_len"]), None)
            if other:
                r[f"speedup_vs_{name}"] = r["tokens_per_s"] / other["tokens_per_s"]
                r[f"peak_rss_vs_{name}"] = r["peak_rss_bytes"] / other["peak_rss_bytes"]
    with open(args.output, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            what = f"prefill {r['prompt_len']}" if r["part"] == "prefill" else f"decode batch {r['batch']}"
            same = "" if r["part"] == "prefill" or r["tokens_identical_to_eager"] is None else (
                "  tokens identical" if r["tokens_identical_to_eager"]
                else f"  TOKENS DIFFER at {r['first_difference']}")
            roofline = f"  (roofline {r['roofline_tokens_per_s']:.1f})" if "roofline_tokens_per_s" in r else ""
            print(f"{r['engine']:>20} {what:>15}: {r['tokens_per_s']:9.1f} tok/s{roofline}  "
                  f"{r.get('speedup_vs_sdpa', float('nan')):5.2f}x sdpa  RSS {r['peak_rss_bytes'] / 1e9:.2f} GB{same}",
                  file=sys.stderr)
    differ = [r for r in records if r.get("tokens_identical_to_eager") is False]
    print(f"appended {len(records)} records to {args.output}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
