"""The accelerator's own checks for bench/gpu.sh: tokens equal to the CPU's, and memory against the plan.

  parity: a tiny random model (seeded) decodes greedily in float32 on the accelerator and on the
          host's CPU, in this one process: the tokens must be identical. Then the accelerator's
          bfloat16 logits of the same weights against its float32 ones, within a stated tolerance.
          float32 matmuls run at "highest" precision (XLA would use TF32 on NVIDIA GPUs otherwise).
  memory: one --context-token prompt prefilled into a cache of as many slots (the engine's pieces),
          on one accelerator, with zero weights: the device's peak bytes in use against the planner's needed bytes for
          the same model, context and dtype (`planner/plan.py`, compiled here on the host's CPU).

Each check appends one JSON line to --output.

  python bench/gpu_check.py parity
  python bench/gpu_check.py memory --model phi-4-mini --context 32k
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from phi4_jax.cli.common import token_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "gpu_check.jsonl")
SCHEMA = "phi4_jax.bench.gpu_check/1"
# bf16 logits against float32 ones: |difference| at most this share of the largest |logit|. bf16 keeps
# 8 bits of mantissa (a relative step of 2**-8 = 0.4%); two layers of rounded products stay within 3%.
BF16_TOLERANCE = 0.03


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["parity", "memory"], help="which check (see above)")
    p.add_argument("--model", default="tiny",
                   help="memory: the preset whose prefill is measured (default tiny; bench/gpu.sh gives phi-4-mini); "
                        "parity always uses a tiny model")
    p.add_argument("--context", type=token_count, default=token_count("1k"),
                   help="memory: the prompt's tokens plus one, the cache's slots (default 1k; 32k = 32768)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="memory: the parameter and cache dtype (default bfloat16)")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=32,
                   help="parity: greedy tokens compared (default 32)")
    p.add_argument("--output", default=RESULTS, help="JSON-lines file the record is appended to")
    return p


def _greedy(model, prompts, new_tokens: int) -> list[list[int]]:
    from phi4_jax import ModelRunner, SamplingParams

    gen = ModelRunner(model).start(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True), [[]] * len(prompts))
    gen.advance(new_tokens - 1)
    return np.asarray(gen.state.tokens)[:, :new_tokens].tolist()


def parity(args) -> dict:
    import jax

    with jax.default_matmul_precision("highest"):
        return _parity(args)


def _parity(args) -> dict:
    import jax

    from phi4_jax import Phi4Config

    config = Phi4Config.from_preset("tiny-phi-4-mini")  # GQA 3:1, partial rotary, LongRoPE, tied head
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (7, 12)]
    accelerator, host = jax.devices()[0], jax.devices("cpu")[0]
    tokens = {name: _greedy_on(device, config, prompts, args.new_tokens)
              for name, device in (("accelerator", accelerator), ("cpu", host))}
    error = _bf16_error(accelerator, config, prompts[1])
    return {"check": "parity", "model": "tiny-phi-4-mini", "accelerator": accelerator.device_kind,
            "new_tokens": args.new_tokens, **verdict(tokens["accelerator"], tokens["cpu"], error)}


def _build(config, device, dtype):
    """The seeded tiny model, made on `device` in `dtype`."""
    import jax
    from flax import nnx

    from phi4_jax import Phi4ForCausalLM
    from phi4_jax.model.backend import Backend

    with jax.default_device(device):
        return Phi4ForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=dtype, backend=Backend(device.platform))


def _greedy_on(device, config, prompts, new_tokens: int) -> list[list[int]]:
    """The float32 model's greedy tokens, made and run on `device`."""
    import jax
    import jax.numpy as jnp

    with jax.default_device(device):
        return _greedy(_build(config, device, jnp.float32), prompts, new_tokens)


def _bf16_error(device, config, prompt) -> float:
    """The largest |bf16 logit - float32 logit| of one prompt on `device`, over the largest |float32 logit|."""
    import jax.numpy as jnp
    from flax import nnx

    from phi4_jax.model.phi4 import forward

    ids = jnp.asarray([prompt], device=device)
    # Jitted: run op by op, the forward compiled each of its ~200 ops alone (9 s of a CPU dry run).
    full, half = (np.asarray(forward(*nnx.split(_build(config, device, dtype)), ids), np.float32)
                  for dtype in (jnp.float32, jnp.bfloat16))
    return float(np.abs(full - half).max() / np.abs(full).max())


def verdict(accelerator: list[list[int]], cpu: list[list[int]], error: float) -> dict:
    """The parity check's verdict: where the accelerator's greedy tokens first differ from the CPU's
    ([row, position], None when identical), and the bf16 logits' error against the tolerance."""
    first = next(([b, t] for b, (x, y) in enumerate(zip(accelerator, cpu))
                  for t, (p, q) in enumerate(zip(x, y)) if p != q), None)
    return {"tokens_identical": first is None, "first_difference": first,
            "bf16_max_relative_logit_error": error, "bf16_tolerance": BF16_TOLERANCE,
            "bf16_within_tolerance": error <= BF16_TOLERANCE, "passed": first is None and error <= BF16_TOLERANCE}


def planned_bytes(config, context: int, dtype: str) -> int:
    """The planner's needed bytes for one device: compiled on the host's CPU, traced as for a GPU."""
    import jax
    from jax.sharding import Mesh

    from phi4_jax.planner import plan

    mesh = Mesh(np.array(jax.devices("cpu")[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "seq"))
    return plan.plan(config, mesh, context, 1, dtype, target="gpu")["per_device"]["needed_bytes"]


def memory(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi4_jax import ModelRunner, Phi4Config, SamplingParams
    from phi4_jax.model.phi4 import abstract_model

    config = Phi4Config.from_preset(args.model)
    planned = planned_bytes(config, args.context, args.dtype)
    device = jax.devices()[0]
    # Zero weights, made in their dtype on the device: a random init's float32 draws would set the
    # process's peak before the prefill does (what the values are does not change the memory).
    graphdef, state = nnx.split(abstract_model(config, param_dtype=args.dtype))
    model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))
    prompt = np.random.default_rng(0).integers(1, config.vocab_size, args.context - 1).tolist()
    engine = ModelRunner(model, max_context=args.context)
    gen = engine.start([prompt], SamplingParams(max_tokens=1, ignore_eos=True), [[]])  # fills every slot
    gen.advance(0)
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"check": "memory", "model": args.model, "context": args.context, "dtype": args.dtype,
            "device": device.device_kind, "cache_slots": gen.length, "peak_bytes_in_use": peak,
            "planned_needed_bytes": planned, "peak_vs_plan": None if peak is None else peak / planned,
            # the plan bounds the run from above (its temporaries are a float32 bound)
            "passed": None if peak is None else peak <= planned}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from runinfo import describe_run

    measured = parity(args) if args.check == "parity" else memory(args)
    record = {"schema": SCHEMA, **describe_run(), **measured}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(measured), file=sys.stderr)
    return 0 if record["passed"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
