"""Serving benchmark: streaming clients against an OpenAI-compatible server, beside offline batch-16 generation.

By default it measures `python -m phi4_jax.serve` (prefix caching off, as vLLM is run beside it:
the probes repeat one prompt) on a preset with random weights (a word-level
tokenizer of the preset's vocabulary is written beside them), started and stopped here; `--url`
drives any other OpenAI-compatible server instead (vLLM, llama.cpp, ...: /v1/completions with
token-id prompts, streamed), so one run can measure two engines on the same machine.

Phases, one record each in bench/results/serve.jsonl:
- `offline`: the same model with no HTTP: steady decode tokens/s of 16 rows (`ModelRunner`), and the
  whole mix generated in static batches of 16 and through `phi4_jax.Engine` with 16 slots
  (continuous batching), prefill included: output tokens/s of each, and whether their tokens agree;
- `lone_ttft`: a lone request's time to first token (TTFT) on an idle server against
  `ModelRunner.start`'s for the same prompt, measured in turns, for each `--probe-tokens` size;
- `clients`: 1, 4, 16 and 64 concurrent streaming clients, each sending its share of the seeded
  request mix one after another (after one unmeasured pass of the mix, which compiles what the
  mix needs): output tokens/s, requests/s, TTFT, inter-token latency (ITL: a request's time per
  output token after the first) and the gaps between streamed chunks, p50/p99; from the server's
  /metrics (phi4_jax only) the slot occupancy and the share of its device time spent in prefill;
- `burst`: 16 prompts of --burst-tokens sent at once: when the last one's first token came, against
  one batched prefill of all 16 (`ModelRunner.start`);
- `ttft_under_load`: TTFT of the largest probe while 15 other clients stream, against the lone one.

examples:
  python bench/serve.py                                  # phi3-110m shape, phi4_jax's server
  python bench/serve.py --model demo --clients 1,16
  python bench/serve.py --url http://127.0.0.1:8000 --served-model NAME --no-offline
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serve.jsonl")
SCHEMA = 1


def schedule_bound(mix: list[dict], clients: int, offline: dict) -> dict:
    """What a scheduler without delays would reach on this mix with this run's offline rates: every
    decode step (of 16 rows, at the offline step time) as full as the clients allow (`mean_rows`),
    every prompt prefilled packed at the offline rate, one after the other: output tokens / (steps x
    step time + prompt tokens / prefill rate). Hiding prefill inside decode steps would at most drop
    the second term (the bound without it is also given)."""
    steps, rows = mean_rows(mix, clients)
    step_seconds = 16 / offline["decode_tokens_per_s"]
    output = sum(r["max_tokens"] for r in mix)
    prefill_seconds = sum(len(r["prompt"]) for r in mix) / offline["packed_prefill_tokens_per_s"]
    return {"bound_mean_rows": rows, "bound_steps": steps,
            "bound_tokens_per_s": output / (steps * step_seconds + prefill_seconds),
            "bound_without_prefill_tokens_per_s": output / (steps * step_seconds)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="phi3-110m",
                   help="a preset of phi4_jax.config.PRESETS (random weights), 'demo', or a model folder with a "
                        "tokenizer (default phi3-110m)")
    p.add_argument("--url", default=None,
                   help="an OpenAI-compatible server to drive instead of starting phi4_jax's (its base URL)")
    p.add_argument("--served-model", default=None, help="the model name the --url server serves")
    p.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrent client counts")
    p.add_argument("--requests", type=int, default=64, help="requests in each client count's phase")
    p.add_argument("--prompt-tokens", default="16,256", help="MIN,MAX prompt tokens of the mix (log-uniform)")
    p.add_argument("--output-tokens", default="64,256", help="MIN,MAX output tokens of the mix (uniform)")
    p.add_argument("--max-batch", type=int, default=16, help="--max-batch of the started server")
    p.add_argument("--mesh", default=None, help="the device mesh of the started server and the offline engine")
    p.add_argument("--probe-tokens", default="16,512", help="comma-separated prompt sizes of the TTFT probes")
    p.add_argument("--probes", type=int, default=5, help="TTFT probes per probe phase")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--no-offline", action="store_true", help="skip the offline batch-16 phase")
    p.add_argument("--offline-only", action="store_true", help="only the offline phase: start no server")
    p.add_argument("--burst-tokens", type=int, default=256, help="prompt tokens of each of the burst's 16 requests")
    p.add_argument("--engine-label", default=None,
                   help="the engine's name in the records (default: phi4_jax, or the --url)")
    p.add_argument("--output", default=RESULTS, help="JSON-lines file the records are appended to")
    return p


def request_mix(count: int, vocab: int, prompt_range, output_range, seed: int) -> list[dict]:
    """`count` requests: token-id prompts of log-uniform lengths, uniform output lengths, greedy,
    no EOS (each runs its length out)."""
    rng = np.random.default_rng(seed)
    low, high = np.log(prompt_range[0]), np.log(prompt_range[1])
    mix = []
    for _ in range(count):
        n = int(np.exp(rng.uniform(low, high)))
        mix.append({"prompt": rng.integers(100, vocab, n).tolist(),
                    "max_tokens": int(rng.integers(output_range[0], output_range[1] + 1))})
    return mix


def mean_rows(mix: list[dict], clients: int, slots: int = 16) -> tuple[int, float]:
    """The mix as `clients` clients send it (each its next request when its last one ends), on a
    scheduler without delays: every running request gets a token each decode step, a request starts
    the step after the previous one of its client ended, at most `slots` run. (Steps until the last
    request ends, output tokens per step.) No scheduler keeps more rows busy on this mix."""
    step, queue, running, free_at = 0, list(range(len(mix))), {}, [0] * clients
    while queue or running:
        for c in range(clients):
            if queue and c not in running and free_at[c] <= step and len(running) < slots:
                running[c] = mix[queue.pop(0)]["max_tokens"]
        step += 1
        for c in list(running):
            running[c] -= 1
            if running[c] == 0:
                del running[c]
                free_at[c] = step
    return step, sum(r["max_tokens"] for r in mix) / step


# The model folder and the server.

def write_model(preset: str, folder: str) -> None:
    """A preset with transformers' seeded random weights and a word-level tokenizer of its vocabulary."""
    from compare_transformers import save_checkpoint
    from tokenizers import Tokenizer, models, pre_tokenizers

    from phi4_jax.config import PRESETS

    shape = PRESETS[preset]
    save_checkpoint(shape, folder)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(shape["vocab_size"] - 3)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>"}, f)


def start_server(folder: str, max_batch: int, max_context: int, mesh: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "phi4_jax.serve", "--model", folder, "--port", str(port),
                                "--served-model-name", "bench", "--max-batch", str(max_batch),
                                "--max-context", str(max_context), "--log-level", "warning",
                                "--no-enable-prefix-caching"]  # (as vLLM is run beside it: repeated probes)
                               + (["--mesh", mesh] if mesh else []),
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, url
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)  # (503 while it compiles)
    process.kill()
    log.seek(0)
    sys.exit(f"the server did not come up:\n{log.read()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


# Clients.

def stream_request(url: str, model: str, request: dict) -> dict:
    """One streamed completion: when its tokens came (seconds after sending) and how many."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:300]!r}")
    arrivals, tokens = [], None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter() - sent)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return {"arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals),
            "seconds": time.perf_counter() - sent, "sent": sent}


def burst(url: str, model: str, prompts: list[list[int]]) -> float:
    """Seconds from sending every prompt at once (a thread each) to the last one's first token."""
    def one(prompt):
        r = stream_request(url, model, {"prompt": prompt, "max_tokens": 2})
        return r["sent"] + r["arrivals"][0] if r["arrivals"] else r["sent"] + r["seconds"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return max(pool.map(one, prompts)) - start


def server_metrics(url: str) -> dict[str, float]:
    """phi4_jax's /metrics samples by their line's name and labels (empty from other servers)."""
    parts = urllib.parse.urlsplit(url)
    try:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode() if response.status == 200 else ""
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("phi4_jax_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def occupancy_sampler(url: str, stop: threading.Event, samples: list) -> None:
    """Reads phi4_jax_slot_occupancy every 0.25 s until `stop`."""
    while not stop.wait(0.25):
        value = server_metrics(url).get("phi4_jax_slot_occupancy")
        if value is not None:
            samples.append(value)


def run_clients(url: str, model: str, mix: list[dict], clients: int, requests: int) -> dict:
    """`clients` threads share `requests` requests of the mix, each sending its next one when the
    previous has ended."""
    queue = list(range(requests))
    lock = threading.Lock()
    results = []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            result = stream_request(url, model, mix[i % len(mix)])
            with lock:
                results.append(result)

    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=occupancy_sampler, args=(url, stop, samples), daemon=True)
    sampler.start()
    before = server_metrics(url)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = server_metrics(url)
    busy = {kind: after.get(f'phi4_jax_scheduler_seconds_total{{kind="{kind}"}}', 0.0)
            - before.get(f'phi4_jax_scheduler_seconds_total{{kind="{kind}"}}', 0.0) for kind in ("prefill", "decode")}
    ttft = [r["arrivals"][0] for r in results if r["arrivals"]]
    # A chunk may carry several tokens (phi4_jax streams what one device call made): the ITL is each
    # request's time per output token after its first (TPOT), and the chunk gaps show the stalls.
    itl = [(r["arrivals"][-1] - r["arrivals"][0]) / (r["tokens"] - 1) for r in results
           if len(r["arrivals"]) > 1 and r["tokens"] > 1]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"phase": "clients", "clients": clients, "requests": len(results), "output_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "requests_per_s": len(results) / seconds,
            **_quantiles("ttft", ttft), **_quantiles("itl", itl), **_quantiles("chunk_gap", gaps),
            "slot_occupancy_mean": statistics.fmean(samples) if samples else None,
            "prefill_share": busy["prefill"] / sum(busy.values()) if sum(busy.values()) else None,
            "compile_seconds": (after["phi4_jax_compile_seconds_total"] - before["phi4_jax_compile_seconds_total"]
                                if "phi4_jax_compile_seconds_total" in after else None)}


def probe_ttft(url: str, model: str, prompt: list[int], probes: int, background: int = 0,
               background_mix: list[dict] | None = None, beside=None) -> tuple[list[float], list[float]]:
    """TTFT of `probes` requests of `prompt` (1 output token each), one at a time, while
    `background` clients stream requests of `background_mix` without pause; with `beside` (a
    function of the prompt giving seconds), that measured in turns with each probe."""
    stop = threading.Event()

    def streamer(k):
        i = k
        while not stop.is_set():
            stream_request(url, model, background_mix[i % len(background_mix)])
            i += background

    threads = [threading.Thread(target=streamer, args=(k,), daemon=True) for k in range(background)]
    for t in threads:
        t.start()
    if background:
        time.sleep(3.0)  # every background stream running
    seconds, turns = [], []
    for _ in range(probes):
        if beside is not None:
            turns.append(beside(prompt))
        result = stream_request(url, model, {"prompt": prompt, "max_tokens": 1})
        seconds.append(result["arrivals"][0])
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    return seconds, turns


def _quantiles(name: str, seconds: list[float]) -> dict:
    if not seconds:
        return {f"{name}_p50_ms": None, f"{name}_p99_ms": None}
    ms = np.array(seconds) * 1e3
    return {f"{name}_p50_ms": float(np.percentile(ms, 50)), f"{name}_p99_ms": float(np.percentile(ms, 99))}


# Offline.

class Offline:
    """The model's `ModelRunner` in this process (no HTTP): what the server's numbers are set against."""

    def __init__(self, folder: str, max_context: int, mesh: str | None):
        import phi4_jax
        from phi4_jax.engine.runner import ModelRunner

        model, _ = phi4_jax.load(folder, progress=False, mesh=mesh)
        self.engine = ModelRunner(model, max_context=max_context)

    def decode(self, mix: list[dict], steps: int = 64, repeats: int = 3) -> float:
        """Steady decode tokens/s of 16 rows (the mix's first prompts) in a cache as long as the
        mix's longest request needs (as the server's is while those run)."""
        from phi4_jax import SamplingParams

        prompts = [r["prompt"] for r in mix[:16]]
        longest = max(len(r["prompt"]) + r["max_tokens"] for r in mix)
        params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        times = []
        for i in range(repeats + 1):
            gen = self.engine.start(prompts, params, [[]] * len(prompts), length=longest)
            gen.advance(0)
            start = time.perf_counter()
            gen.advance(steps)
            times.append(time.perf_counter() - start)
            del gen
        return len(prompts) * steps / statistics.median(times[1:])  # the first compiles

    def mix(self, mix: list[dict]) -> tuple[float, list[list[int]]]:
        """Output tokens/s of the whole mix in static batches of 16 (prefill included), and its tokens."""
        from phi4_jax import SamplingParams

        def run(batch):
            gen = self.engine.start([r["prompt"] for r in batch],
                                    [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True) for r in batch],
                                    [[]] * len(batch))
            out = gen.advance(0)
            while not gen.finished:
                out = [a + b for a, b in zip(out, gen.advance(max(r["max_tokens"] for r in batch)))]
            return out

        batches = [mix[i:i + 16] for i in range(0, len(mix), 16)]
        for batch in batches:
            run(batch)  # compiles each batch's shapes
        start = time.perf_counter()
        tokens = [t for batch in batches for t in run(batch)]
        return sum(r["max_tokens"] for r in mix) / (time.perf_counter() - start), tokens

    def continuous(self, mix: list[dict], steps_per_call: int = 16) -> tuple[float, list[list[int]]]:
        """Output tokens/s of the whole mix through `phi4_jax.Engine` with 16 slots (continuous
        batching: each waiting prompt joins as a row finishes; prefill included), and its tokens."""
        from phi4_jax import Engine, SamplingParams

        def run():
            engine = Engine(self.engine, max_batch=16, max_queue=len(mix), steps_per_call=steps_per_call)
            engine.add_requests([(str(i), r["prompt"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True))
                                 for i, r in enumerate(mix)])
            tokens = [[] for _ in mix]
            for out in engine.outputs():
                tokens[int(out.request_id)] += out.token_ids
            return tokens

        run()  # compiles what the mix needs
        start = time.perf_counter()
        tokens = run()
        return sum(r["max_tokens"] for r in mix) / (time.perf_counter() - start), tokens

    def packed_prefill(self, mix: list[dict], budget: int = 2048, repeats: int = 3) -> float:
        """Prompt tokens/s of prefilling the mix's prompts packed (`ModelRunner.prefill_packed`, as the
        engine admits them: in order, at most `budget` tokens a call), the median of `repeats` after one
        that compiles."""
        import jax

        from phi4_jax import SamplingParams

        groups, tokens = [[]], 0
        for r in mix:
            if tokens + len(r["prompt"]) > budget:
                groups, tokens = groups + [[]], 0
            groups[-1].append(r["prompt"])
            tokens += len(r["prompt"])
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for group in groups:
                packed = self.engine.prefill_packed(group, [SamplingParams(max_tokens=1)] * len(group),
                                                    [[]] * len(group), budget)
                jax.block_until_ready(packed.hidden)
            times.append(time.perf_counter() - start)
        return sum(len(r["prompt"]) for r in mix) / statistics.median(times[1:])

    def batched_prefill(self, prompts: list[list[int]], repeats: int = 3) -> float:
        """Seconds of one prefill of every prompt together to their first tokens (`ModelRunner.start`),
        the median of `repeats` after one that compiles."""
        from phi4_jax import SamplingParams

        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            self.engine.start(prompts, SamplingParams(max_tokens=1), [[]] * len(prompts)).advance(0)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def ttft(self, prompt: list[int]) -> float:
        """Seconds of `ModelRunner.start` to the first token of `prompt` (what `generate` waits)."""
        from phi4_jax import SamplingParams

        start = time.perf_counter()
        self.engine.start([prompt], SamplingParams(max_tokens=1), [[]]).advance(0)
        return time.perf_counter() - start


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from runinfo import describe_run

    from phi4_jax.checkpoints.hub import resolve
    from phi4_jax.config import PRESETS, Phi4Config

    clients = [int(c) for c in args.clients.split(",")]
    prompt_range = tuple(int(x) for x in args.prompt_tokens.split(","))
    output_range = tuple(int(x) for x in args.output_tokens.split(","))
    probe_sizes = [int(x) for x in args.probe_tokens.split(",")]
    work = tempfile.mkdtemp(prefix="phi4_jax-serve-bench-")
    try:
        if args.url is None and args.model in PRESETS and args.model != "demo":
            folder = os.path.join(work, args.model)
            write_model(args.model, folder)
        else:
            # (with --url, a model folder still gives the mix its vocabulary: the same prompts as ours)
            folder = resolve(args.model).folder if args.url is None or os.path.isdir(args.model) else None
        config = Phi4Config.from_json(folder) if folder else None
        vocab = config.vocab_size if config else 32000
        max_context = max(prompt_range[1], *probe_sizes) + output_range[1]
        if config and max_context > config.max_position_embeddings:
            sys.exit(f"prompts of up to {max(prompt_range[1], *probe_sizes)} tokens and outputs of up to "
                     f"{output_range[1]} exceed the model's {config.max_position_embeddings} positions: lower "
                     "--prompt-tokens, --probe-tokens or --output-tokens")
        mix = request_mix(max(args.requests, 16), vocab, prompt_range, output_range, args.seed)
        meta = {"benchmark": "serve", "schema": SCHEMA, **describe_run(), "model": args.model,
                "engine": args.engine_label or ("phi4_jax" if args.url is None else args.url),
                "max_batch": args.max_batch,
                "mix_prompt_tokens": list(prompt_range), "mix_output_tokens": list(output_range), "seed": args.seed,
                "requests": args.requests, "mesh": args.mesh}
        records = []
        offline = None
        if not args.no_offline and args.url is None:
            offline = Offline(folder, max_context, args.mesh)
            static, static_tokens = offline.mix(mix[:args.requests])
            continuous, continuous_tokens = offline.continuous(mix[:args.requests])
            record = {"phase": "offline", "batch": 16, "decode_tokens_per_s": offline.decode(mix),
                      "packed_prefill_tokens_per_s": offline.packed_prefill(mix[:args.requests]),
                      "mix_tokens_per_s": static, "mix_continuous_tokens_per_s": continuous,
                      "continuous_vs_static": continuous / static,
                      "continuous_tokens_identical": continuous_tokens == static_tokens}
            records.append({**meta, **record})
            print(f"offline batch 16: decode {record['decode_tokens_per_s']:.1f} tokens/s, the mix "
                  f"{record['mix_tokens_per_s']:.1f} tokens/s in static batches, "
                  f"{record['mix_continuous_tokens_per_s']:.1f} continuously "
                  f"({record['continuous_vs_static']:.2f}x; tokens identical: "
                  f"{record['continuous_tokens_identical']})", flush=True)
        process = None
        if args.offline_only:
            pass
        elif args.url is None:
            process, url = start_server(folder, args.max_batch, max_context, args.mesh)
            model = "bench"
        else:
            url, model = args.url.rstrip("/"), args.served_model
        try:
            lone = {}
            for size in probe_sizes if not args.offline_only else []:
                probe = mix[0]["prompt"][:1] * size
                stream_request(url, model, {"prompt": probe, "max_tokens": 2})  # compiles the probe's bucket
                if offline:
                    offline.ttft(probe)
                served, alone = probe_ttft(url, model, probe, args.probes, beside=offline.ttft if offline else None)
                lone[size] = statistics.median(served)
                record = {"phase": "lone_ttft", "prompt_tokens": size, "ttft_ms": 1e3 * lone[size]}
                if alone:
                    record["generate_ttft_ms"] = 1e3 * statistics.median(alone)
                    record["overhead_ms"] = record["ttft_ms"] - record["generate_ttft_ms"]
                records.append({**meta, **record})
                print(f"lone TTFT of {size} tokens: {record['ttft_ms']:.1f} ms"
                      + (f" (generate {record['generate_ttft_ms']:.1f} ms)" if alone else ""), flush=True)
            if args.offline_only:
                clients = []
            else:
                run_clients(url, model, mix, max(clients), max(args.requests, max(clients)))  # compiles
            for n in clients:
                result = run_clients(url, model, mix, n, max(args.requests, n))
                if offline:
                    result["vs_offline_decode"] = result["tokens_per_s"] / records[0]["decode_tokens_per_s"]
                    result["vs_offline_mix"] = result["tokens_per_s"] / records[0]["mix_tokens_per_s"]
                    if n >= args.max_batch == 16:  # (the offline decode step is one of 16 rows, as the server's then)
                        sent = [mix[i % len(mix)] for i in range(max(args.requests, n))]  # (as run_clients sends)
                        result.update(schedule_bound(sent, n, records[0]))
                records.append({**meta, **result})
                print(f"{n} clients: {result['tokens_per_s']:.1f} tokens/s, {result['requests_per_s']:.2f} req/s, "
                      f"TTFT p50 {result['ttft_p50_ms']:.0f} ms p99 {result['ttft_p99_ms']:.0f} ms, "
                      f"ITL p50 {result['itl_p50_ms']:.2f} ms p99 {result['itl_p99_ms']:.2f} ms, chunk gap p99 "
                      f"{result['chunk_gap_p99_ms']:.1f} ms, slots {result['slot_occupancy_mean'] or 0:.2f}, "
                      f"prefill share {result['prefill_share'] or 0:.2f}, compiling "
                      f"{result['compile_seconds'] or 0:.1f} s"
                      + (f"; a scheduler without delays: {result['bound_tokens_per_s']:.1f} tokens/s "
                         f"({result['bound_mean_rows']:.1f} rows a step; "
                         f"{result['bound_without_prefill_tokens_per_s']:.1f} with prefill free)"
                         if "bound_tokens_per_s" in result else ""), flush=True)
            if not args.offline_only:  # the burst and the TTFT under load
                rng = np.random.default_rng(args.seed + 1)
                prompts = [rng.integers(3, vocab, args.burst_tokens).tolist() for _ in range(16)]
                burst(url, model, prompts)  # compiles
                record = {"phase": "burst", "prompt_tokens": args.burst_tokens, "requests": 16,
                          "last_first_token_ms": 1e3 * statistics.median(burst(url, model, prompts) for _ in range(3))}
                if offline:
                    record["batched_prefill_ms"] = 1e3 * offline.batched_prefill(prompts)
                    record["vs_batched_prefill"] = record["last_first_token_ms"] / record["batched_prefill_ms"]
                records.append({**meta, **record})
                print(f"a burst of 16 {args.burst_tokens}-token prompts: the last first token after "
                      f"{record['last_first_token_ms']:.0f} ms"
                      + (f", {record['vs_batched_prefill']:.2f}x one batched prefill of them "
                         f"({record['batched_prefill_ms']:.0f} ms)" if offline else ""), flush=True)
                size = max(probe_sizes)
                loaded, _ = probe_ttft(url, model, mix[0]["prompt"][:1] * size, args.probes, background=15,
                                       background_mix=mix)
                record = {"phase": "ttft_under_load", "prompt_tokens": size, "background_clients": 15,
                          "ttft_ms": 1e3 * statistics.median(loaded), "lone_ttft_ms": 1e3 * lone[size]}
                record["vs_lone"] = record["ttft_ms"] / record["lone_ttft_ms"]
                records.append({**meta, **record})
                print(f"TTFT with 15 streaming: {record['ttft_ms']:.1f} ms ({record['vs_lone']:.2f}x lone)", flush=True)
        finally:
            if process is not None:
                stop_server(process)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(records)} records to {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
