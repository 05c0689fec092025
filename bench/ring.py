"""Long prompts over the `seq` axis: prefill time and per-device memory against prompt length and
seq size, and the memory of the real 128K-token Phi-4-mini prefill planned from shapes alone.

Two parts (--parts):
  time: a random-weight model (--model cut to --layers, --intermediate and --vocab, so it runs on a
        small host) prefills one prompt of each --lengths on a seq=n mesh for each --seq: the
        engine's own step (ring attention for seq > 1, 2048-token pieces on one device), the best
        of --repeats after a compiling run. Per-device memory is XLA's for the same compiled step
        (weights, KV cache, temporaries), and the backend's peak where it reports one (GPU, TPU).
        On a CPU host the seq devices are fake and share its cores: there the times show the cost
        of the ring's extra work, not a speed-up; memory is what it would be on real devices.
  plan: the full --plan-model at --plan-context tokens on seq = each --seq (fake CPU devices, no
        weights): per-device weights, KV cache and prefill/decode temporaries (bench/plan.py's).

  python bench/ring.py                                   # both parts, the committed defaults
  python bench/ring.py --parts time --seq 1 --lengths 32k --layers 32 --intermediate 8192 --vocab 200064 \
      --dtype bfloat16 --attention cudnn --output bench/results/ring-h100-cudnn.json   # one GPU; then xla
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from phi4_jax.cli.common import token_count as tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "ring.json")



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/ring.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["time", "plan"], default=["time", "plan"],
                   help="what to measure (see above)")
    p.add_argument("--seq", type=int, nargs="+", default=[1, 2, 4, 8], help="seq axis sizes")
    p.add_argument("--mesh", default="",
                   help="the other mesh axes every seq mesh has, e.g. tensor=2 (default: none; seq only)")
    p.add_argument("--model", default="phi-4-mini", help="the timed model's preset or config folder")
    p.add_argument("--layers", type=int, default=1, help="timed model: decoder layers")
    p.add_argument("--intermediate", type=int, default=3072, help="timed model: MLP size")
    p.add_argument("--vocab", type=int, default=32064, help="timed model: vocabulary size")
    p.add_argument("--lengths", type=tokens, nargs="+", default=[tokens(n) for n in ("1k", "2k", "4k")],
                   help="timed prompt lengths (powers of two; the prompt is one token shorter, so that it "
                        "and its first generated token fill a cache of this length)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="timed model dtype (float32 on CPU: XLA:CPU runs bf16 matmuls slowly)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"],
                   help="timed model's attention implementation")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the best counts)")
    p.add_argument("--plan-model", "--plan_model", default="phi-4-mini", help="planned model (preset or folder)")
    p.add_argument("--plan-context", "--plan_context", type=tokens, default=tokens("128k"),
                   help="planned prompt length = KV-cache slots")
    p.add_argument("--output", default=RESULTS, help="JSON file to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from phi4_jax.parallel.mesh import parse_mesh

    if "seq" in args.mesh:
        raise SystemExit("bench/ring.py: --mesh holds the other axes; give the seq sizes with --seq")
    # Fake CPU devices for the plan (on any host) and for timing on a CPU host; before any device is touched.
    jax.config.update("jax_num_cpu_devices", max(args.seq) * math.prod(parse_mesh(args.mesh).values()))
    from phi4_jax.config import Phi4Config
    from runinfo import describe_run, write_record

    record = {"benchmark": "ring", "schema": 1, **describe_run(), "mesh": args.mesh}
    if "time" in args.parts:
        config = Phi4Config.from_name(args.model).replace(
            num_hidden_layers=args.layers, intermediate_size=args.intermediate, vocab_size=args.vocab)
        record["timed_model"] = {"from": args.model, "layers": args.layers, "hidden": config.hidden_size,
                                 "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                                 "intermediate": args.intermediate, "vocab": args.vocab, "dtype": args.dtype,
                                 "attention": args.attention, "parameters": config.num_parameters}
        record["timed"] = [_time(config, _mesh(n, args.mesh), length, args)
                           for length in args.lengths for n in args.seq]
    if "plan" in args.parts:
        config = Phi4Config.from_name(args.plan_model)
        record["planned"] = [_plan(config, args.plan_model, _mesh(n, args.mesh, "cpu"), args.plan_context)
                             for n in args.seq]
    write_record(args.output, record)
    print(f"wrote {args.output}", file=sys.stderr)
    if "timed" in record:
        print(f"bench/RESULTS.md's timed table:\n{TIMED_HEADER}\n" + "\n".join(map(timed_row, record["timed"])),
              file=sys.stderr)
    if "planned" in record:
        print(f"bench/RESULTS.md's table:\n{TABLE_HEADER}\n" + "\n".join(map(table_row, record["planned"])),
              file=sys.stderr)
    return 0


def _mesh(n: int, others: str, platform: str | None = None):
    """seq=n with the `others` axes, over the first devices (of `platform`) it needs."""
    import jax

    from phi4_jax.parallel import mesh as meshes

    return meshes.make_mesh(",".join(filter(None, [others, f"seq={n}"])), jax.devices(platform))


def _time(config, mesh, length: int, args) -> dict:
    """Prefill of a `length - 1`-token prompt (and its first token) on `mesh`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi4_jax import ModelRunner, Phi4ForCausalLM, SamplingParams
    from phi4_jax.planner import plan
    from phi4_jax.model.backend import Backend
    from phi4_jax.parallel import mesh as meshes
    from phi4_jax.parallel.heads import config_for_mesh

    n = mesh.shape["seq"]
    dtype = jnp.dtype(args.dtype)
    backend = Backend.of(mesh.devices.flat)
    model = meshes.place(Phi4ForCausalLM(config_for_mesh(config, mesh), rngs=nnx.Rngs(0), param_dtype=dtype,
                                         attention=args.attention, backend=backend), mesh)
    engine = ModelRunner(model, max_context=length)
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, length - 1).tolist()
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    seconds = []
    for _ in range(1 + args.repeats):  # the first run compiles
        begin = time.perf_counter()
        engine.start([prompt], params, [[]])  # returns once the first token is on the host
        seconds.append(time.perf_counter() - begin)
    best = min(seconds[1:])
    memory = plan.plan(config, mesh, length, 1, args.dtype, target=backend.platform)  # the program timed
    peaks = [s.get("peak_bytes_in_use") for s in (d.memory_stats() for d in mesh.devices.flat) if s]
    row = {"seq": n, "length": length, "prompt_tokens": length - 1, "prefill_seconds": best,
           "prefill_tokens_per_s": (length - 1) / best, "first_call_seconds": seconds[0],
           "ring": n > 1, "per_device": {
               "weights_bytes": memory["per_device"]["weights_bytes"],
               "kv_cache_bytes": memory["per_device"]["kv_cache_bytes"],
               "prefill_temp_bytes": memory["steps"]["prefill"]["temp_bytes"],
               "backend_peak_bytes": max(peaks) if peaks else None}}
    print(f"seq={n} length {length}: prefill {best:.2f} s ({row['prefill_tokens_per_s']:.0f} tokens/s), "
          f"temporaries {row['per_device']['prefill_temp_bytes'] / 1e6:.0f} MB per device", file=sys.stderr)
    del engine, model
    jax.clear_caches()
    return row


def _plan(config, name: str, mesh, context: int) -> dict:
    from phi4_jax.planner import plan

    n = mesh.shape["seq"]
    result = plan.plan(config, mesh, context, 1, "bfloat16")  # planned on CPU devices, even on a GPU host
    d, s = result["per_device"], result["steps"]
    row = {"name": name, "seq": n, "context": context, "batch": 1, "dtype": "bfloat16",
           "weights_bytes": d["weights_bytes"], "kv_cache_bytes": d["kv_cache_bytes"],
           "prefill_temp_bytes": s["prefill"]["temp_bytes"], "decode_temp_bytes": s["decode"]["temp_bytes"],
           "needed_bytes": d["needed_bytes"], "fits_on": plan.fits_on(d["needed_bytes"]),
           "collectives": {step: s[step]["collectives"] for step in s}}
    print(table_row(row), file=sys.stderr)
    return row


TABLE_HEADER = ("| seq | weights | KV cache | prefill temporaries | decode temporaries | needed per device |\n"
                 "|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    """A planned record as a row of bench/RESULTS.md's ring table (tests/test_docs.py checks the page has it)."""
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    return (f"| {r['seq']} | {gb(r['weights_bytes'])} | {gb(r['kv_cache_bytes'])} | {gb(r['prefill_temp_bytes'])} | "
            f"{gb(r['decode_temp_bytes'])} | {gb(r['needed_bytes'])} |")


TIMED_HEADER = ("| prompt slots | seq | prefill | tokens/s | temporaries per device |\n"
                "|---|---|---|---|---|")


def timed_row(r: dict) -> str:
    """A timed record as a row of bench/RESULTS.md's table (tests/test_docs.py checks the page has it)."""
    return (f"| {r['length']} | {r['seq']} | {r['prefill_seconds']:.2f} s | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['per_device']['prefill_temp_bytes'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    sys.exit(main())
