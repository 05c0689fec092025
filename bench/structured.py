"""Structured outputs' cost: 16 rows constrained by a JSON schema against the same rows unconstrained.

The engine (`phi4_jax.Engine`, as the server runs it) generates for --rows prompts at once, first
each constrained by a JSON schema (`structured_outputs`), then the same prompts unconstrained, each
row told to generate as many tokens as its constrained run did (`ignore_eos`): the batch holds the
same rows step by step in both runs, so their decode rates compare the steps themselves. A
constrained row takes one decode step a device call (its next mask is computed on the host between
calls, `runner.Generation.advance`); the unconstrained ones take --steps-per-call. Recorded: both
runs' tokens/s over their decode seconds, their ratio, the host's seconds computing masks, and how
many constrained outputs parse and validate. The best of --repeats rounds (the first compiles).

  python bench/structured.py                  # SmolLM2-135M-Instruct (bench/smollm2.py)
  python bench/structured.py --model demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "structured.jsonl")
SCHEMA_VERSION = "phi4_jax.bench.structured/1"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 40},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}


def generate(model, tokenizer, prompts, params, steps_per_call: int) -> tuple[dict, float, float]:
    """({row: (text, tokens)}, decode seconds, seconds computing masks) of one engine run."""
    from phi4_jax.engine.engine import Engine

    engine = Engine(model, tokenizer, max_batch=len(prompts), steps_per_call=steps_per_call)
    masking = [0.0]
    masks = engine._masks

    def timed(*args, **kwargs):  # (the host's share: the masks between device calls)
        start = time.perf_counter()
        try:
            return masks(*args, **kwargs)
        finally:
            masking[0] += time.perf_counter() - start

    engine._masks = timed
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), ids, p)
    out = {}
    for o in engine.outputs():
        text, tokens = out.get(o.request_id, ("", 0))
        out[o.request_id] = (text + o.text, tokens + len(o.token_ids))
    return out, engine.load().decode_seconds, masking[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (bench/smollm2.py), demo, or a folder")
    parser.add_argument("--rows", type=int, default=16, help="requests generated together")
    parser.add_argument("--max-tokens", type=int, default=96, help="most tokens a constrained row generates")
    parser.add_argument("--steps-per-call", type=int, default=8, help="the engine's decode steps per device call")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is recorded")
    parser.add_argument("--output", default=RESULTS, help="JSON-lines file the record is appended to")
    args = parser.parse_args(argv)

    import jsonschema_rs
    from runinfo import append_record, describe_run

    import phi4_jax
    from phi4_jax import SamplingParams, platforms

    platforms.quiet_without_tpu()
    if args.model == "smollm2":
        import smollm2

        folder = smollm2.folder()
    else:
        folder = args.model
    model, tokenizer = phi4_jax.load(folder, dtype="float32", progress=False)
    questions = [f"Describe person number {i + 1} of a story as JSON: name, age, city and hobbies."
                 for i in range(args.rows)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    constrained = [SamplingParams(max_tokens=args.max_tokens, structured_outputs={"json": SCHEMA})] * args.rows
    best = None
    for _ in range(args.repeats):
        json_out, json_s, mask_s = generate(model, tokenizer, prompts, constrained, args.steps_per_call)
        free = [SamplingParams(max_tokens=json_out[str(i)][1], ignore_eos=True) for i in range(args.rows)]
        free_out, free_s, _ = generate(model, tokenizer, prompts, free, args.steps_per_call)
        tokens = sum(n for _, n in json_out.values())
        assert tokens == sum(n for _, n in free_out.values())
        rates = (tokens / json_s, tokens / free_s)
        if best is None or rates[0] / rates[1] > best["ratio"]:
            valid = 0
            for text, _ in json_out.values():
                try:
                    jsonschema_rs.validate(SCHEMA, json.loads(text))
                    valid += 1
                except (ValueError, jsonschema_rs.ValidationError):
                    pass
            best = {"schema": SCHEMA_VERSION, "model": args.model, "rows": args.rows,
                    "steps_per_call": args.steps_per_call, "tokens": tokens,
                    "constrained_tokens_per_s": rates[0], "unconstrained_tokens_per_s": rates[1],
                    "ratio": rates[0] / rates[1], "constrained_decode_s": json_s, "unconstrained_decode_s": free_s,
                    "mask_s": mask_s, "mask_us_per_token": 1e6 * mask_s / tokens, "valid": valid}
    record = {**best, **describe_run()}
    append_record(args.output, record)
    print(f"| {args.model} | {args.rows} | {record['tokens']} | {record['constrained_tokens_per_s']:.1f} | "
          f"{record['unconstrained_tokens_per_s']:.1f} | {record['ratio']:.2f}× | "
          f"{record['mask_us_per_token']:.0f} µs | {record['valid']} of {args.rows} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
