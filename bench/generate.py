"""Generation speed against the device's rooflines: prefill, decode, products, compile; one JSON line each.

Each --model in turn (by default the two shapes the CPU numbers are set on: `phi3-110m`, 4 thick
layers, and `deep-thin`, 30 thin ones): a preset with random weights, cut to --layers, or the real
weights of an HF/Orbax folder) generates through the engine, greedy, with every token forced (no stop):
  prefill: --prefill-len prompts (batch 1): seconds, tokens/s, and MFU = the prefill's matmul
           FLOPs / time / the measured matmul peak.
  decode:  each --batch x --prompt-len: time to first token, decode tokens/s of --new-tokens as one
           device call (the median of --repeats), per-token latency p50/p90/p99 with the host
           looking after every token, and MBU = bytes a step must read (weights once, the input
           embedding one row per sequence, plus the KV cache) x steps/s / the measured read bandwidth.
  products: each --batch: the step's weight products alone in one program (every weight matrix
           a step reads times that many rows): beside the step, what its other work costs; beside
           the read bandwidth, the rate at which XLA's products read the weights.
  compile: two fresh processes sharing an empty compilation cache time their first token: cold
           (compiling) and warm (from JAX's persistent cache).
  speculative: (a model folder with its tokenizer; not run by default) greedy chat answers of up to
           --new-tokens tokens, with --speculative and without, in alternation, on two workloads:
           "grounded" (copy, edit or quote a document or code given in the prompt: this repository's
           own files) and "free" (open questions and stories), at each --batch (rows of different
           prompts; at least 4 prompts, in batches one after the other): decode tokens/s of both (the
           median of --repeats), whether every token is the same, the drafts' acceptance rate and the
           tokens a row makes per step.
The rooflines are read beside the work they judge, since a shared machine's speed drifts: before
each timed run of a decode, the read bandwidth (a 1 GiB buffer on a CPU, three multi-threaded
readers); before each timed run of a prefill, the matmul peak. A record holds the median of its
readings, with how they were taken. The reading's buffer stays allocated through the measurement
(--read-buffer-mb sizes it), and the record's memory peaks include it.

  python bench/generate.py                                   # the committed CPU run
  python bench/generate.py --model phi-4-mini --dtype bfloat16 --batch 1 64 --prefill-len 2048  # GPU
  python bench/generate.py --parts prefill --mesh seq=4 --prefill-len 1k 2k 4k   # one line per seq size
  python bench/generate.py --model $(python bench/smollm2.py) --parts speculative --batch 1 16 --new-tokens 256
Then `python bench/plot.py` draws the figures from the results file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "generate.jsonl")
SCHEMA = "phi4_jax.bench.generate/2"  # 2: each record holds its own roofline readings
MODELS = ("phi3-110m", "deep-thin")  # thick and shallow, deep and thin: a speed-up must hold on both

def build_parser() -> argparse.ArgumentParser:
    from phi4_jax.cli.common import token_count as tokens

    p = argparse.ArgumentParser(prog="bench/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(MODELS),
                   help="presets of phi4_jax.config.PRESETS with random weights (default: phi3-110m deep-thin, "
                        "the models the CPU numbers are set on; also tiny, phi-4, phi-4-mini, phi-3.5-mini), or "
                        "HF / Orbax folders (their real weights, when they have them), measured one after the other")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many decoder layers (default: all)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter and compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"],
                   help="attention implementation (default auto)")
    p.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8"],
                   help="weights measured, one after the other for each model: none (float, --dtype) and/or int8 "
                        "(weight-only, phi4_jax.load(quantize='int8')); MBU counts int8 weights at a byte "
                        "(default none)")
    p.add_argument("--mesh", default=None,
                   help="shard over this mesh, e.g. tensor=2 or seq=4 (on a CPU: that many fake devices)")
    p.add_argument("--parts", nargs="+", choices=["prefill", "decode", "products", "compile", "speculative"],
                   default=["prefill", "decode", "products", "compile"],
                   help="what to measure (see above; default the first four)")
    p.add_argument("--speculative", default="ngram",
                   help="the speculative part's setting, as phi4-jax generate --speculative (default ngram: K=6, "
                        "n-grams of 2 to 4)")
    p.add_argument("--speculative-rows", type=int, nargs="+", default=[None],
                   help="the speculative part's --speculative-rows, each measured in turn (default: the backend's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="decode batch sizes (default 1 4 16 64)")
    p.add_argument("--prompt-len", "--prompt_len", type=tokens, nargs="+", default=[16],
                   help="decode prompt lengths in tokens (default 16)")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=128, help="tokens generated per row (default 128)")
    p.add_argument("--prefill-len", "--prefill_len", type=tokens, nargs="+", default=[128, 512, 2048],
                   help="prefill prompt lengths in tokens, 2k = 2048 (default 128 512 2048)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measurement, after a compiling one (default 5; the median counts)")
    p.add_argument("--read-buffer-mb", "--read_buffer_mb", type=int, default=None,
                   help="size of the buffer read to measure bandwidth (default 1024 on a CPU, 4096 elsewhere; "
                        "keep it far larger than the last-level cache)")
    p.add_argument("--matmul-sizes", "--matmul_sizes", type=int, nargs="+", default=None,
                   help="square matmul sizes the peak is read at, the fastest counting (default 1024 2048 4096 on a "
                        "CPU, 4096 8192 16384 elsewhere; smaller ones read a lower peak, for quick checks)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a jax.profiler trace of one decode run (the first batch) to DIR")
    p.add_argument("--output", default=RESULTS,
                   help="JSON-lines file the records are appended to (default bench/results/generate.jsonl)")
    p.add_argument("--first-token-child", action="store_true", help=argparse.SUPPRESS)  # the compile part
    return p


def model_config(args):
    from phi4_jax import Phi4Config

    config = Phi4Config.from_name(args.model)
    return config.replace(num_hidden_layers=args.layers) if args.layers else config


def has_weights(path: str) -> bool:
    return os.path.isdir(path) and any(n.endswith(".safetensors") or n in ("params", "_CHECKPOINT_METADATA")
                                       for n in os.listdir(path))


def build_model(args, config, mesh, dtype):
    """The model: real weights from a folder that has them (all layers), else random ones."""
    import jax.numpy as jnp
    from flax import nnx

    from phi4_jax import Phi4ForCausalLM, load
    from phi4_jax.parallel import heads
    from phi4_jax.parallel import mesh as meshes

    quantize = quantized(args)
    if has_weights(args.model) and not args.layers:
        return load(args.model, dtype=dtype, mesh=mesh, attention=args.attention, quantize=quantize)[0]
    if mesh is None:
        return Phi4ForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype), attention=args.attention,
                               quantize=quantize)
    return meshes.place(Phi4ForCausalLM(heads.config_for_mesh(config, mesh), rngs=nnx.Rngs(0),
                                        param_dtype=jnp.dtype(dtype), attention=args.attention, quantize=quantize),
                        mesh)


def quantized(args) -> str | None:
    """The run's weight quantization ("int8"), or None for float weights."""
    return None if args.quantize[-1] == "none" else args.quantize[-1]


def prompts_of(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` random token ids (the same for the same arguments)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab_size, length).tolist() for _ in range(batch)]


def peak_memory() -> dict:
    """The process's peaks so far (not of one measurement alone): the device's bytes in use where
    the backend reports them, and the host's RSS."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {f"latency_p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def timings(run, repeats: int, before=None) -> list[float]:
    """Seconds of `repeats` calls of `run`, after one that compiles; `before()` (a roofline
    reading) runs before each timed call."""
    run()
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


class Rooflines:
    """Readings of the device's read bandwidth or matmul peak, taken beside one measurement; the
    reader (and its buffer) lives until `close()`, so the timed runs between readings see no
    allocation of it."""

    def __init__(self, read_bytes: int | None, dtype: str, matmul_sizes: tuple[int, ...] | None = None):
        self.read_bytes, self.dtype, self.readings, self._readers = read_bytes, dtype, [], {}
        self.matmul_sizes = matmul_sizes

    def _read(self, kind, make) -> None:
        if kind not in self._readers:
            self._readers[kind] = make()
        self.readings.append(self._readers[kind].measure(repeats=2))

    def read_bandwidth(self) -> None:
        from roofline import ReadBandwidth

        self._read("read", lambda: ReadBandwidth(self.read_bytes))

    def matmul_peak(self) -> None:
        from roofline import MatmulPeak

        self._read("matmul", lambda: MatmulPeak(self.dtype, self.matmul_sizes))

    def close(self) -> dict:
        """Frees the readers; returns the median of the readings (empty when none were taken)."""
        from roofline import median_reading

        for reader in self._readers.values():
            reader.close()
        self._readers = {}
        return median_reading(self.readings) if self.readings else {}


def measure_prefill(engine, config, length: int, repeats: int, peaks: Rooflines) -> dict:
    from phi4_jax.planner.roofline import prefill_flops
    from phi4_jax import SamplingParams

    prompts, params = prompts_of(config.vocab_size, 1, length), SamplingParams(max_tokens=1, ignore_eos=True)
    # engine.start returns with the first token
    times = timings(lambda: engine.start(prompts, params, [[]]), repeats, peaks.matmul_peak)
    seconds = statistics.median(times)
    return {"part": "prefill", "batch": 1, "prompt_len": length, "seconds": seconds, "best_seconds": min(times),
            "tokens_per_s": length / seconds, "flops": prefill_flops(config, 1, length)}


def measure_decode(engine, config, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                   profile: str | None, peaks: Rooflines) -> dict:
    import jax

    from phi4_jax import SamplingParams

    prompts = prompts_of(config.vocab_size, batch, prompt_len)
    params, stops = SamplingParams(max_tokens=new_tokens, ignore_eos=True), [[]] * batch
    steps = new_tokens - 1  # the first token comes with the prefill
    engine.start(prompts, params, stops).advance(steps)  # compiles prefill and decode
    first, device = [], []
    for _ in range(repeats):
        peaks.read_bandwidth()  # the reader's buffer stays allocated from here to the record's end
        start = time.perf_counter()
        gen = engine.start(prompts, params, stops)
        started = time.perf_counter()
        gen.advance(steps)  # one host call: the whole decode loop on device
        first.append(started - start)
        device.append(time.perf_counter() - started)
        del gen  # its KV cache, before the next one is made
    gen = engine.start(prompts, params, stops)
    per_token = []
    for _ in range(steps):  # the host looks after every token, as a streaming server does
        start = time.perf_counter()
        gen.advance(1)
        per_token.append(time.perf_counter() - start)
    if profile:
        with jax.profiler.trace(profile):
            engine.start(prompts, params, stops).advance(steps)
    seconds = statistics.median(device)
    return {"part": "decode", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "time_to_first_token_s": statistics.median(first), "decode_seconds": seconds,
            "best_decode_seconds": min(device), "tokens_per_s": batch * steps / seconds,
            "step_ms": 1e3 * seconds / steps, **percentiles(per_token),
            # the mean number of cached tokens a step reads
            "mean_context": prompt_len + (steps - 1) / 2}


GROUNDED = ("Copy the following text exactly, word for word:\n\n{text}",
            "Here is some Python code. Return the whole code with a short comment added above each function, "
            "changing nothing else:\n\n{code}",
            "Quote the three most important sentences of this text, word for word, one per line:\n\n{text}",
            "Rename the variable `self` to `this` in the following code and return all of it:\n\n{code}")
FREE = ("Write a story about a dragon who learns to bake bread.", "What are the main causes of climate change?",
        "Write a poem about the sea at night.", "Explain how a bicycle stays upright.",
        "Give me ideas for a birthday party for a ten-year-old.", "Why is the sky blue?",
        "Describe a day in the life of a medieval blacksmith.", "What should I pack for a week of hiking?",
        "Write a letter to a friend you have not seen in years.", "How do vaccines work?",
        "Tell me about the history of the printing press.", "Invent a new board game and explain its rules.",
        "What makes a good teacher?", "Write a short mystery set on a train.",
        "Compare cats and dogs as pets.", "Describe the city of the future.")


def speculative_prompts(tokenizer, workload: str, batch: int) -> list[list[int]]:
    """`batch` chat prompts of a workload: "grounded" pieces of this repository's own text and code
    under the GROUNDED tasks (each row another piece), or "free" questions (FREE)."""
    if workload == "free":
        texts = [FREE[i % len(FREE)] for i in range(batch)]
    else:
        docs = [open(os.path.join(ROOT, name), encoding="utf-8").read() for name in ("README.md", "BUILD.md")]
        code = [open(os.path.join(ROOT, "phi4_jax", "engine", name), encoding="utf-8").read()
                for name in ("scheduler.py", "async_engine.py")]
        texts = []
        for i in range(batch):
            doc, source = docs[i % len(docs)], code[i % len(code)]
            start = 1500 * (i // len(docs))
            text, piece = doc[start:start + 1500], source[2000 + start:3500 + start]
            texts.append(GROUNDED[i % len(GROUNDED)].format(text=text, code=piece))
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]


def measure_speculative(model, tokenizer, spec: str, rows: int | None, workload: str, batch: int, new_tokens: int,
                        repeats: int) -> dict:
    """Greedy generation of one workload's prompts by two runners, plain and speculating, in
    alternation: decode tokens/s (after each row's first token), tokens per step, acceptance."""
    from phi4_jax import ModelRunner, SamplingParams

    runners = {"plain": ModelRunner(model),
               "speculative": ModelRunner(model, speculative=spec, speculative_rows=rows)}
    # At least 4 prompts (every task of a workload), in batches of `batch` rows one after the other.
    prompts = speculative_prompts(tokenizer, workload, max(batch, len(GROUNDED)))
    params, stops = SamplingParams(max_tokens=new_tokens), [tokenizer.eos_token_ids] * batch

    def run(runner):
        out, seconds, drafted = [], 0.0, np.zeros(3, np.int64)
        for first in range(0, len(prompts), batch):
            gen = runner.start(prompts[first:first + batch], params, stops)
            rows = [list(t) for t in gen.advance(0)]
            start = time.perf_counter()
            while not gen.finished:
                for row, new in zip(rows, gen.advance(new_tokens)):
                    row += new
                drafted += gen.drafted.sum(axis=0)
            seconds += time.perf_counter() - start
            out += rows
        return out, seconds, drafted

    seen = {name: run(r)[0] for name, r in runners.items()}  # (compiles)
    seconds = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            out, took, drafted = run(runner)
            seconds[name].append(took)
            assert out == seen[name], f"{name} generation is not deterministic"
    tokens = sum(len(row) - 1 for row in seen["plain"])
    drafts, draft_tokens, accepted = (int(x) for x in drafted)
    plain, fast = statistics.median(seconds["plain"]), statistics.median(seconds["speculative"])
    return {"part": "speculative", "workload": workload, "batch": batch, "new_tokens": new_tokens,
            "speculative": str(runners["speculative"].speculative),
            "speculative_rows": runners["speculative"].speculative_rows,
            "prompt_tokens": [len(p) for p in prompts], "tokens": tokens,
            "same_tokens": seen["plain"] == seen["speculative"],
            "plain_tokens_per_s": tokens / plain, "tokens_per_s": tokens / fast, "speedup": plain / fast,
            "plain_seconds": seconds["plain"], "speculative_seconds": seconds["speculative"],
            "drafts": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
            "acceptance_rate": accepted / max(draft_tokens, 1),
            "tokens_per_step": tokens / max(tokens - accepted, 1),  # (a row's tokens over its decode steps)
            "tokens_per_drafting_step": 1 + accepted / max(drafts, 1)}


def measure_products(engine, config, batch: int, repeats: int, peaks: Rooflines) -> dict:
    """The decode step's weight products alone, in one program: every weight matrix a step reads
    (the input embedding only where it is also the head), as `[out, in]`, times `batch` rows, in
    the faster of the two plain forms (rows x weights, weights x rows). Beside the step of the same
    batch it shows what the rest of the step costs; beside the read bandwidth, the rate at which
    XLA's products read the weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    from phi4_jax.model import int8
    from phi4_jax.model.backend import Backend

    flat = traverse_util.flatten_dict(nnx.to_pure_dict(engine.params))
    # int8 weights [out, in] with their scales [out]; float ones with None.
    weights = [(w, flat.get((*path[:-1], "scale"))) for path, w in sorted(flat.items(), key=lambda kv: str(kv[0]))
               if path[-1] == "weight" and w.ndim >= 2
                  and not ("embed_tokens" in path and not config.tie_word_embeddings)]
    weights = [(w.reshape(-1, w.shape[-1]), None) if s is None else (w.reshape(s.size, -1), s.reshape(-1))
               for w, s in weights]
    dtype, chunked = engine.dtype, Backend.of(jax.tree.leaves(engine.params)[0].devices()).chunked_dequantize
    rows = [jnp.ones((batch, w.shape[-1]), dtype) for w, _ in weights]
    forms = {"rows_x_weights": lambda x, w: x @ w.T, "weights_x_rows": lambda x, w: (w @ x.T).T}

    def product(x, w, scale, dense):  # as the model computes it: int8 weights dequantized inside
        return dense(x, w) if scale is None else int8.product(x, w, scale, dtype, dense, chunked)

    measured = {}
    for name, form in forms.items():
        products = jax.jit(lambda weights, rows, form=form: sum(product(x, w, s, form).sum()
                                                                for (w, s), x in zip(weights, rows)))
        times = timings(lambda: products(weights, rows).block_until_ready(), repeats, peaks.read_bandwidth)
        measured[name] = (statistics.median(times), min(times))
    best = min(measured, key=lambda name: measured[name][0])
    seconds = measured[best][0]
    weight_bytes = sum(w.nbytes + (0 if s is None else s.nbytes) for w, s in weights)
    return {"part": "products", "batch": batch, "products_ms": 1e3 * seconds,
            "best_products_ms": 1e3 * measured[best][1], "products_form": best,
            "form_ms": {name: 1e3 * m[0] for name, m in measured.items()},
            "weight_bytes": weight_bytes, "products_gb_per_s": weight_bytes / seconds / 1e9,
            "products": len(weights)}


# JAX's own timings of the work before a first run: where a warm start's time goes.
PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_s",
          "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s"}


def first_token_seconds(args) -> dict:
    """In a fresh process (the compile part's child): seconds to the first token of a new engine,
    split into JAX's phases, then of a second request of the same shape (no compiling)."""
    from jax import monitoring

    from phi4_jax import SamplingParams

    devices(args)
    config, mesh, dtype = setup(args)
    from phi4_jax import ModelRunner, compilation_cache

    compilation_cache.enable()  # in the folder the parent gave this child

    engine = ModelRunner(build_model(args, config, mesh, dtype))
    prompts, params = (prompts_of(config.vocab_size, 1, args.prompt_len[0]),
                       SamplingParams(max_tokens=1, ignore_eos=True))
    phases = dict.fromkeys(PHASES.values(), 0.0)

    def listen(event, seconds, **_):
        if event in PHASES:
            phases[PHASES[event]] += seconds

    monitoring.register_event_duration_secs_listener(listen)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        engine.start(prompts, params, [[]])
        seconds.append(time.perf_counter() - start)
        if len(seconds) == 1:
            monitoring.unregister_event_duration_listener(listen)
    return {"first_s": seconds[0], "second_s": seconds[1], **phases}


def measure_compile(args, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="phi4-jax-cache-") as cache:
        # Only this empty folder: a cache folder the user gave JAX would make the cold run warm.
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["PHI4_JAX_COMPILATION_CACHE"] = cache
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--first-token-child"],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"bench/generate.py: the first-token child failed:\n{out.stderr}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    return {"part": "compile", "batch": 1, "prompt_len": args.prompt_len[0],
            "cold_first_token_s": cold["first_s"], "warm_first_token_s": warm["first_s"],
            "run_first_token_s": warm["second_s"], "warm_speedup": cold["first_s"] / warm["first_s"],
            **{f"cold_{k}": cold[k] for k in PHASES.values()}, **{f"warm_{k}": warm[k] for k in PHASES.values()}}


def devices(args) -> None:
    """Before any device is used: a CPU host splits into as many devices as the mesh has (GPU/TPU
    hosts: ignored)."""
    import jax

    from phi4_jax.parallel import mesh as meshes

    if args.mesh:
        jax.config.update("jax_num_cpu_devices", math.prod(meshes.parse_mesh(args.mesh).values()))


def setup(args):
    """(config, mesh or None, dtype name); the devices are set (`devices`)."""
    from phi4_jax.model.phi4 import default_dtype
    from phi4_jax.parallel import mesh as meshes

    mesh = meshes.make_mesh(args.mesh) if args.mesh else None
    return model_config(args), mesh, args.dtype or default_dtype().name


def metadata(args, config, dtype) -> dict:
    from phi4_jax.model.attention import resolve
    from runinfo import describe_run

    import jax

    return {"schema": SCHEMA, **describe_run(), "model": args.model, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "parameters": config.num_parameters, "dtype": dtype,
            "attention": resolve(args.attention, dtype, jax.default_backend(), config.head_dim),
            "mesh": args.mesh or "", "quantize": quantized(args),
            "weights": "loaded" if has_weights(args.model) else "random",
            "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", "")}


def utilisation(record: dict, config, dtype_bytes: int, devices: int, quantize: str | None = None) -> dict:
    """MFU / MBU against the measured peak of one device times the `devices` that do the work."""
    from phi4_jax.planner.roofline import decode_step_bytes

    if record["part"] == "prefill":
        achieved = record["flops"] / record["seconds"]
        return {"flop_per_s": achieved, "mfu": achieved / (devices * record["matmul_flop_per_s"])}
    if record["part"] == "products":
        return {"products_of_read_bandwidth":
                record["products_gb_per_s"] * 1e9 / (devices * record["read_bytes_per_s"])}
    if record["part"] == "decode":
        # int8 weights at a byte (their scales and the norms, under 0.5% of the bytes, left out).
        step = decode_step_bytes(config, record["batch"], record["mean_context"], 1 if quantize else dtype_bytes,
                                 cache_bytes=dtype_bytes)
        achieved = step * record["tokens_per_s"] / record["batch"]
        return {"step_bytes": step, "bytes_per_s": achieved, "mbu": achieved / (devices * record["read_bytes_per_s"])}
    return {}


def check(parser, args, config) -> None:
    """Refuses what cannot be measured, before anything is written."""
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed needs a step after the first token)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if "speculative" in args.parts and not has_weights(args.model):
        parser.error(f"--parts speculative needs a model folder with weights and a tokenizer (as that of "
                     f"bench/smollm2.py), not {args.model}")
    if args.layers and has_weights(args.model):
        parser.error(f"--layers cuts random-weight models; {args.model} has weights (drop --layers)")
    lengths = ([n + 1 for n in args.prefill_len] if "prefill" in args.parts else []) + (
        [n + args.new_tokens for n in args.prompt_len] if {"decode", "compile"} & set(args.parts) else [])
    if lengths and max(lengths) > config.max_position_embeddings:
        parser.error(f"{max(lengths)} tokens (prompt + generated) do not fit {args.model}'s context of "
                     f"{config.max_position_embeddings}: shorten --prefill-len / --prompt-len / --new-tokens")


def describe(r: dict) -> str:
    if r["part"] == "prefill":
        return (f"prefill {r['prompt_len']:6d} tokens: {r['seconds']:.3f} s, {r['tokens_per_s']:9.1f} tok/s, "
                f"MFU {100 * r['mfu']:.1f}% of {r['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s")
    if r["part"] == "decode":
        return (f"decode batch {r['batch']:3d}, prompt {r['prompt_len']}: {r['tokens_per_s']:8.1f} tok/s, "
                f"step {r['step_ms']:.2f} ms (p50/p90/p99 {r['latency_p50_ms']:.2f}/{r['latency_p90_ms']:.2f}/"
                f"{r['latency_p99_ms']:.2f} ms), TTFT {1e3 * r['time_to_first_token_s']:.1f} ms, "
                f"MBU {100 * r['mbu']:.1f}% "
                f"of {r['read_bytes_per_s'] / 1e9:.1f} GB/s")
    if r["part"] == "speculative":
        return (f"speculative {r['workload']} batch {r['batch']:3d} (rows {r['speculative_rows']}): "
                f"{r['tokens_per_s']:8.1f} tok/s against "
                f"{r['plain_tokens_per_s']:.1f} ({r['speedup']:.2f}x), same tokens {r['same_tokens']}, acceptance "
                f"{100 * r['acceptance_rate']:.0f}%, {r['tokens_per_step']:.2f} tokens a step")
    if r["part"] == "products":
        return (f"products batch {r['batch']:3d}: {r['products_ms']:.2f} ms for {r['weight_bytes'] / 1e6:.0f} MB of "
                f"weights, {r['products_gb_per_s']:.1f} GB/s ({100 * r['products_of_read_bandwidth']:.0f}% of "
                f"{r['read_bytes_per_s'] / 1e9:.1f} GB/s)")
    phases = lambda when: ", ".join(f"{k[:-2]} {r[f'{when}_{k}']:.2f}" for k in PHASES.values())  # noqa: E731
    return (f"first token: cold {r['cold_first_token_s']:.2f} s ({phases('cold')}), warm "
            f"{r['warm_first_token_s']:.2f} s ({phases('warm')}): {r['warm_speedup']:.1f}x; "
            f"compiled {r['run_first_token_s']:.3f} s")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    models, args.model = args.model, args.model[-1]  # a child process measures the last one
    if args.first_token_child:
        print(json.dumps(first_token_seconds(args)))
        return 0
    devices(args)
    kinds, args.quantize = args.quantize, args.quantize[-1:]
    runs = [argparse.Namespace(**{**vars(args), "model": m, "quantize": [q]}) for m in models for q in kinds]
    for one in runs:  # every model's arguments are checked before anything is measured
        check(parser, one, model_config(one))
    for one in runs:  # (the last --model and --quantize count)
        measure_model(one, [*argv, "--model", one.model, "--quantize", one.quantize[0]])
    return 0


def measure_model(args, argv: list[str]) -> None:
    """Every part of args.parts on one model (args.model), each record appended as it is measured."""
    config, mesh, dtype = setup(args)
    import jax
    import jax.numpy as jnp

    from phi4_jax import ModelRunner

    model = build_model(args, config, mesh, dtype)
    config = model.config
    engine = ModelRunner(model)
    measurements = []  # (what, run(peaks)) in order; each record is written as soon as it is measured
    if "prefill" in args.parts:
        measurements += [(f"prefill {n}", lambda peaks, n=n: measure_prefill(engine, config, n, args.repeats, peaks))
                         for n in args.prefill_len]
    if "decode" in args.parts:
        profile = args.profile  # traces the first decode only
        for batch in args.batch:
            for prompt_len in args.prompt_len:
                measurements.append((f"decode batch {batch} prompt {prompt_len}",
                                     lambda peaks, b=batch, n=prompt_len, t=profile: measure_decode(
                                         engine, config, b, n, args.new_tokens, args.repeats, t, peaks)))
                profile = None
    if "products" in args.parts:
        measurements += [(f"products batch {b}",
                          lambda peaks, b=b: measure_products(engine, config, b, args.repeats, peaks))
                         for b in args.batch]
    if "compile" in args.parts:
        measurements.append(("compile (two fresh processes)", lambda peaks: measure_compile(args, argv)))
    if "speculative" in args.parts:
        from phi4_jax import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        measurements += [(f"speculative {w} batch {b}", lambda peaks, w=w, b=b, r=r: measure_speculative(
            model, tokenizer, args.speculative, r, w, b, args.new_tokens, args.repeats))
            for r in args.speculative_rows for w in ("grounded", "free") for b in args.batch]
    base = metadata(args, config, dtype)
    # Fake CPU devices share one machine's cores and memory; real ones each bring their own.
    peak_devices = 1 if mesh is None or jax.default_backend() == "cpu" else mesh.size
    base["peak_devices"] = peak_devices
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    read_bytes = args.read_buffer_mb and args.read_buffer_mb * 2**20
    for what, run in measurements:
        print(f"{what} ...", file=sys.stderr)
        peaks = Rooflines(read_bytes, dtype, args.matmul_sizes and tuple(args.matmul_sizes))
        measured = run(peaks)
        memory = peak_memory()  # (with the rooflines' buffers, which are freed next)
        record = {**base, **measured, **peaks.close(), **memory}
        record.update(utilisation(record, config, jnp.dtype(dtype).itemsize, peak_devices, quantized(args)))
        print(f"  {describe(record)}", file=sys.stderr)
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    print(f"appended {len(measurements)} records of {args.model} to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
