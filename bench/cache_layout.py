"""The serving cache's layout, measured: what attending over unused slots costs, what pages would cost
in XLA, and what joining a row to the running batch costs.

The scheduler keeps one cache of per-slot contiguous ranges (slot = position) whose length follows
the longest running row in powers of two. This measures, on a preset with random weights, batch 16:
- `decode_by_length`: a decode step of rows holding `--context` tokens, in caches of 512 .. 4096
  slots: the work of attending over slots no row uses;
- `paged_attention`: one layer's decode attention over a contiguous cache against the same keys
  in 128-token pages gathered through a page table (how XLA would read pages without a kernel);
- `join`: `Generation.join` of a one-row prefill into a running batch, and `resize` from half the
  rows to all, against a decode call of 8 steps (a cache of 1024 slots).

example:
  python bench/cache_layout.py --model phi3-110m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cache_layout.json")
PAGE = 128


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="phi3-110m", help="a preset of phi4_jax.config.PRESETS (random weights)")
    p.add_argument("--batch", type=int, default=16, help="rows decoding together")
    p.add_argument("--context", type=int, default=400, help="tokens each row holds while measured")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="cache lengths (slots) to decode in")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is kept)")
    p.add_argument("--mesh", default=None, help="the device mesh of the decode and join measurements")
    p.add_argument("--output", default=RESULTS, help="the JSON record to write")
    return p


def median_seconds(run, repeats: int) -> float:
    run()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_by_length(engine, config, batch, context, lengths, repeats) -> list[dict]:
    from phi4_jax import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, context).tolist() for _ in range(batch)]
    rows = []
    for length in lengths:
        # max_tokens sets the cache length (the next power of two of prompt + max_tokens).
        params = SamplingParams(max_tokens=length - context, ignore_eos=True)
        gen = engine.start(prompts, params, [[]] * batch)
        seconds = median_seconds(lambda gen=gen: gen.advance(4), repeats) / 4
        assert gen.length == length, (gen.length, length)
        rows.append({"length": length, "step_ms": 1e3 * seconds})
        del gen
    return rows


def paged_attention(config, batch, context, repeats) -> dict:
    import jax
    import jax.numpy as jnp

    from phi4_jax.model import attention

    kv, d, heads = config.num_key_value_heads, config.head_dim, config.num_attention_heads
    length = -(-context // PAGE) * PAGE
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, kv, length, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, kv, length, d)), jnp.float32)
    mask = jnp.ones((batch, 1, length), bool)
    # The same keys as pages in a shuffled pool, and each row's page table.
    per_row = length // PAGE
    order = rng.permutation(batch * per_row)
    pool = lambda x: x.reshape(batch, kv, per_row, PAGE, d).transpose(0, 2, 1, 3, 4).reshape(  # noqa: E731
        batch * per_row, kv, PAGE, d)[np.argsort(order)]
    k_pages, v_pages = pool(k), pool(v)
    table = jnp.asarray(order.reshape(batch, per_row))

    contiguous = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask))

    @jax.jit
    def paged(q, k_pages, v_pages, table):
        def gather(pages):  # [B, per_row, kv, PAGE, d] -> [B, kv, L, d]
            return jnp.take(pages, table, axis=0).transpose(0, 2, 1, 3, 4).reshape(batch, kv, length, d)
        return attention.attend(q, gather(k_pages), gather(v_pages), mask)

    np.testing.assert_allclose(contiguous(q, k, v), paged(q, k_pages, v_pages, table), rtol=1e-5, atol=1e-5)
    return {"keys": length, "page": PAGE,
            "contiguous_ms": 1e3 * median_seconds(lambda: contiguous(q, k, v).block_until_ready(), repeats),
            "paged_gather_ms": 1e3 * median_seconds(
                lambda: paged(q, k_pages, v_pages, table).block_until_ready(), repeats)}


def join_cost(engine, config, batch, context, repeats) -> dict:
    from phi4_jax import SamplingParams

    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=1024 - context, ignore_eos=True)
    prompts = [rng.integers(3, config.vocab_size, context).tolist() for _ in range(batch)]
    gen = engine.start(prompts, params, [[]] * batch)
    decode = median_seconds(lambda: gen.advance(8), repeats)

    def timed(setup, run) -> float:
        """Median seconds of `run(setup())`, the setup untimed (after one run that compiles)."""
        times = []
        for i in range(repeats + 1):
            ready = setup()
            start = time.perf_counter()
            run(ready)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def one_row():
        gen.stop([0])
        return engine.start(prompts[:1], params, [[]])

    join = timed(one_row, lambda one: gen.join(0, one))
    half = batch // 2
    grow = timed(lambda: engine.start(prompts[:half], params, [[]] * half),
                 lambda g: g.resize(list(range(half)) + [None] * (batch - half)))
    return {"cache_length": gen.length, "decode_call_8_steps_ms": 1e3 * decode, "join_ms": 1e3 * join,
            f"resize_{half}_to_{batch}_ms": 1e3 * grow}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tempfile

    from compare_transformers import save_checkpoint
    from runinfo import describe_run, write_record

    import phi4_jax
    from phi4_jax.config import PRESETS, Phi4Config
    from phi4_jax.engine.runner import ModelRunner

    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(PRESETS[args.model], folder)
        model, _ = phi4_jax.load(folder, progress=False, mesh=args.mesh)
    config = Phi4Config.from_preset(args.model)
    engine = ModelRunner(model, max_context=max(lengths))
    record = {"benchmark": "cache_layout", "schema": 1, **describe_run(), "model": args.model, "batch": args.batch,
              "context": args.context, "mesh": args.mesh}
    record["decode_by_length"] = decode_by_length(engine, config, args.batch, args.context, lengths, args.repeats)
    print(json.dumps(record["decode_by_length"]), flush=True)
    record["paged_attention"] = paged_attention(config, args.batch, args.context, args.repeats)
    print(json.dumps(record["paged_attention"]), flush=True)
    record["join"] = join_cost(engine, config, args.batch, args.context, args.repeats)
    print(json.dumps(record["join"]), flush=True)
    write_record(args.output, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
