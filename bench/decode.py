"""Decode tokens/s, and the share of each step spent on the host while streaming.

A random-weight float32 model (default: 4 layers, hidden 1024, 16 heads, vocab 32064) decodes
--new-tokens greedily after a --prompt-len prompt, at each --batch. Two timings per batch, after a
warm-up run compiles everything:
  device:    the whole generation as one compiled while_loop (one host call);
  streaming: `stream_generate` (batch 1) or `Generation.advance(--chunk)` (batch > 1) with the
             host looking in every --chunk tokens: detokenizing, stop checks, Python bookkeeping.
The host share is 1 - device / streaming.

  python bench/decode.py --batch 1 8
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "decode.json")
TOKENIZER = os.path.join(ROOT, "..", "shared", "fixtures", "phi-3.5-mini")  # vocab 32064


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (16 heads of hidden/16)")
    p.add_argument("--intermediate", type=int, default=2816, help="MLP size")
    p.add_argument("--prompt-len", "--prompt_len", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per device call while streaming")
    p.add_argument("--tokenizer", default=TOKENIZER, help="a tokenizer folder with a 32064-token vocabulary")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the best counts)")
    p.add_argument("--mesh", default=None,
                   help="shard the model over this mesh, e.g. tensor=4 (on CPU: that many fake devices)")
    p.add_argument("--output", default=RESULTS, help="JSON file to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi4_jax import sharding

    if args.mesh:  # a CPU host splits into as many devices as the mesh has (GPU/TPU hosts: ignored)
        jax.config.update("jax_num_cpu_devices", math.prod(sharding.parse_mesh(args.mesh).values()))
    from phi4_jax import Phi4Config, Phi4ForCausalLM, load_tokenizer, stream_generate
    from phi4_jax.engine import Engine
    from phi4_jax.runinfo import describe_run, write_record
    from phi4_jax.sampling import SamplingParams

    config = Phi4Config.from_dict(dict(
        model_type="phi3", vocab_size=32064, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=4096, original_max_position_embeddings=4096))
    if args.mesh:
        mesh = sharding.make_mesh(args.mesh)
        model = sharding.place(Phi4ForCausalLM(sharding.config_for_mesh(config, mesh), rngs=nnx.Rngs(0),
                                               param_dtype=jnp.float32), mesh)
    else:
        model = Phi4ForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    engine = Engine(model)
    tokenizer = load_tokenizer(args.tokenizer)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        prompts = [rng.integers(100, 30000, args.prompt_len).tolist() for _ in range(batch)]

        def device():
            gen = engine.start(prompts, params, [[] for _ in prompts])
            gen.advance(args.new_tokens)

        def prefill_only():
            engine.start(prompts, params, [[] for _ in prompts]).advance(0)

        if batch == 1:
            text = tokenizer.decode(prompts[0])

            def streaming():
                for _ in stream_generate(engine, tokenizer, text, params, chunk=args.chunk):
                    pass
        else:
            def streaming():
                gen = engine.start(prompts, params, [[] for _ in prompts])
                while not gen.finished:
                    gen.advance(args.chunk)

        runs = {"device": device, "streaming": streaming, "prefill": prefill_only}
        for run in runs.values():
            run()  # compile
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all three
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        device_s, streaming_s, prefill_s = best["device"], best["streaming"], best["prefill"]
        decode_device_s = device_s - prefill_s
        decode_streaming_s = streaming_s - prefill_s
        steps = args.new_tokens - 1  # the first token comes from the prefill
        row = {"batch": batch, "new_tokens": args.new_tokens, "chunk": args.chunk,
               "prefill_s": prefill_s, "device_decode_s": decode_device_s,
               "streaming_decode_s": decode_streaming_s,
               "device_tokens_per_s": batch * steps / decode_device_s,
               "streaming_tokens_per_s": batch * steps / decode_streaming_s,
               "step_ms": 1e3 * decode_streaming_s / steps,
               "host_share": 1 - decode_device_s / decode_streaming_s}
        rows.append(row)
        print(f"batch {batch}: {row['streaming_tokens_per_s']:.1f} tok/s streaming "
              f"({row['device_tokens_per_s']:.1f} in one device call), step {row['step_ms']:.2f} ms, "
              f"host share {100 * row['host_share']:.1f}%", file=sys.stderr)
    record = {"benchmark": "decode", "schema": 1, "dtype": "float32", "layers": args.layers,
              "hidden": args.hidden, "intermediate": args.intermediate, "vocab": 32064,
              "prompt_len": args.prompt_len, "mesh": args.mesh, "streaming_api": "stream_generate at batch 1, Generation.advance above",
              **describe_run(), "results": rows}
    write_record(args.output, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
