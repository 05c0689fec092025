"""Prefix reuse on a multi-turn chat: time to first token of each turn with the prefix cache on and off.

A conversation with a long system prompt (--history-tokens of documentation text) and --turns short
user questions runs through the engine (`phi4_jax.Engine`, as the server runs it, one request at a
time) twice: with `enable_prefix_caching` on, where each turn extends the idle sequence of the
last and prefills only its new tokens, and off, where each turn prefills its whole prompt. The
assistant's replies are generated greedily (--max-tokens) and must be the same both ways. A first
pass compiles every program both runs need, so the times are of prefill, not compile. Each turn's
record: its prompt tokens, the tokens reused, the seconds to its first token on and off (median of
--repeats conversations), and their ratio. With --beside N, N other streams (random prompts, long
outputs) run in the same engine the whole time, so each turn arrives while a batch runs and the
previous turn's row, finished, is what holds its prefix.

  python bench/prefix.py                     # SmolLM2-135M-Instruct (bench/smollm2.py), the committed run
  python bench/prefix.py --beside 3          # the same chat while 3 other streams run
  python bench/prefix.py --model ~/models/Phi-4-mini-instruct --history-tokens 2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "prefix.jsonl")
SCHEMA = "phi4_jax.bench.prefix/1"
QUESTIONS = ["What does the engine's step do?", "Why does the scheduler admit a power of two of prompts?",
             "When is a cache reused?", "What happens when a device call fails?", "How does draining work?"]


def history_text(tokenizer, tokens: int) -> str:
    """Documentation text (this repository's BUILD.md, repeated) of about `tokens` tokens."""
    with open(os.path.join(ROOT, "BUILD.md"), encoding="utf-8") as f:
        text = f.read()
    while len(tokenizer.encode(text)) < tokens:
        text += "\n" + text
    ids = tokenizer.encode(text)[:tokens]
    return tokenizer.decode(ids)


BESIDE_PROMPT, BESIDE_TOKENS = 64, 4000  # the other streams: they outlast the conversation


def conversation(engine, tokenizer, system: str, turns: int, max_tokens: int, beside: int = 0) -> list[dict]:
    """Runs the chat turn by turn (with `beside` other streams running throughout); per turn:
    prompt tokens, reused tokens, seconds to the first token, reply."""
    import numpy as np

    from phi4_jax import SamplingParams

    rng = np.random.default_rng(0)
    others = [f"beside-{i}" for i in range(beside)]
    for rid in others:
        engine.add_request(rid, rng.integers(100, 10000, BESIDE_PROMPT).tolist(),
                           SamplingParams(max_tokens=BESIDE_TOKENS, ignore_eos=True))
    messages, out = [{"role": "system", "content": system}], []
    for t in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        start = time.perf_counter()
        engine.add_request(f"turn-{t}", ids, SamplingParams(max_tokens=max_tokens))
        first, text, cached, tokens, finished = None, "", 0, [], False
        while not finished:
            for o in engine.step():
                if o.request_id != f"turn-{t}":
                    if o.finished:
                        raise RuntimeError(f"{o.request_id} ended ({o.finish_reason}) before the conversation")
                    continue
                if o.token_ids and first is None:
                    first = time.perf_counter() - start
                text += o.text
                tokens += o.token_ids
                cached, finished = o.stats.cached_tokens, o.finished
        out.append({"prompt_tokens": len(ids), "cached_tokens": cached, "ttft_s": first, "tokens": tokens})
        messages.append({"role": "assistant", "content": text})
    for rid in others:
        engine.abort(rid)
    for _ in engine.outputs():
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/prefix.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder with a tokenizer (default: bench/smollm2.py's)")
    p.add_argument("--history-tokens", type=int, default=1500, help="tokens of the system prompt (default 1500)")
    p.add_argument("--turns", type=int, default=4, help="user turns (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of each reply (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="conversations timed each way (default 3)")
    p.add_argument("--beside", type=int, default=0,
                   help="other streams running in the same engine throughout (default 0: the chat alone)")
    p.add_argument("--output", default=RESULTS, help=f"JSON lines appended here (default {RESULTS})")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from runinfo import describe_run

    import phi4_jax
    from phi4_jax import Engine, ModelRunner

    folder = args.model
    if folder is None:
        import smollm2

        folder = smollm2.folder()
    model, tokenizer = phi4_jax.load(folder, dtype="float32", progress=False)
    if tokenizer is None:
        p.error(f"--model {folder} has no tokenizer")
    runner = ModelRunner(model)
    system = history_text(tokenizer, args.history_tokens)
    runs = {}
    def chat(caching):
        engine = Engine(runner, tokenizer, max_batch=args.beside + 1, enable_prefix_caching=caching)
        return conversation(engine, tokenizer, system, args.turns, args.max_tokens, args.beside)

    for caching in (True, False):  # the first pass of each compiles what the timed ones run
        chat(caching)
    for caching in (True, False):
        runs[caching] = [chat(caching) for _ in range(args.repeats)]
    base = {"schema": SCHEMA, **describe_run(), "model": os.path.basename(os.path.normpath(folder)),
            "history_tokens": args.history_tokens, "max_tokens": args.max_tokens, "repeats": args.repeats,
            "beside": args.beside}
    with open(args.output, "a", encoding="utf-8") as f:
        for t in range(args.turns):
            on = [run[t] for run in runs[True]]
            off = [run[t] for run in runs[False]]
            record = {**base, "turn": t + 1, "prompt_tokens": on[0]["prompt_tokens"],
                      "cached_tokens": on[0]["cached_tokens"],
                      "ttft_s_cached": statistics.median(r["ttft_s"] for r in on),
                      "ttft_s_uncached": statistics.median(r["ttft_s"] for r in off),
                      "same_tokens": all(r["tokens"] == off[0]["tokens"] for r in on + off)}
            record["speedup"] = record["ttft_s_uncached"] / record["ttft_s_cached"]
            f.write(json.dumps(record) + "\n")
            print(f"beside {args.beside}, turn {t + 1}: {record['prompt_tokens']} prompt tokens, "
                  f"{record['cached_tokens']} reused; first token {record['ttft_s_cached'] * 1e3:.0f} ms cached, "
                  f"{record['ttft_s_uncached'] * 1e3:.0f} ms "
                  f"not: {record['speedup']:.1f}x; same tokens: {record['same_tokens']}", file=sys.stderr)
    print(f"appended {args.turns} records to {args.output}", file=sys.stderr)
    return 0 if all(r[t]["tokens"] == runs[False][0][t]["tokens"] for r in runs[True] for t in range(args.turns)) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
