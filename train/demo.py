"""Train the built-in demo model from scratch and write it as a Hugging Face folder.

A Phi-4-mini-architecture model of about a million parameters (partial rotary, LongRoPE, GQA,
tied embeddings) learns 1-3 digit addition and subtraction in Phi-4-mini's chat format, from
synthetic problems and a byte-level BPE tokenizer made here (train/demo_data.py). Deterministic for
a seed on one machine. It reports exact-match accuracy on 500 held-out problems (never trained
on), writes the folder through phi4_jax's HF exporter, and records seed, steps, accuracy and the
weights' sha256 in the folder's training.json.

  python train/demo.py --overwrite           # rewrites phi4_jax/demo_model (about 25 min on 2 cores)
  python train/demo.py --output /tmp/demo --steps 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # demo_data beside it; phi4_jax from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    import demo_data as demo

    from phi4_jax.cli import common as cli

    p = argparse.ArgumentParser(prog="train/demo.py", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--output", default=demo.FOLDER, help="the HF folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--seed", type=int, default=0, help="seeds the tokenizer's corpus, the weights and the data")
    p.add_argument("--steps", type=int, default=12000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="problems per step")
    p.add_argument("--learning-rate", "--learning_rate", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--mesh", default=None, help="train data-parallel on this mesh, e.g. data=8 (CPU: fake devices)")
    p.add_argument("--held-out", "--held_out", type=int, default=500,
                   help="problems kept out of training and scored after it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from phi4_jax.cli import common as cli

    return cli.run(lambda: train(args))


def train(args) -> int:
    import math

    import jax

    from phi4_jax.parallel import mesh as meshes

    if args.mesh:
        jax.config.update("jax_num_cpu_devices", math.prod(meshes.parse_mesh(args.mesh).values()))
    import demo_data as demo
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    from phi4_jax import load
    from phi4_jax.checkpoints.hf import save_hf
    from phi4_jax.checkpoints.output import check_output
    from phi4_jax.config import Phi4Config
    from phi4_jax.errors import ConfigError
    from phi4_jax.model.phi4 import Phi4ForCausalLM
    from phi4_jax.train import Trainer, TrainConfig

    if args.held_out < 1:
        raise ConfigError(f"--held-out must be at least 1, got {args.held_out}")
    check_output(args.output, args.overwrite)
    start = time.perf_counter()
    tokenizer = demo.train_tokenizer(args.seed)
    raw = demo.config(tokenizer.get_vocab_size())
    model = Phi4ForCausalLM(Phi4Config.from_dict(raw), rngs=nnx.Rngs(args.seed), param_dtype=jnp.float32)
    mesh = meshes.make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        model = meshes.place(model, mesh)
    config = TrainConfig(learning_rate=args.learning_rate, total_steps=args.steps,
                         warmup_steps=min(200, args.steps // 10))
    trainer = Trainer(model, config, mesh)
    held_out = demo.held_out(args.held_out)
    data = demo.batches(tokenizer, args.batch, demo.LENGTH, args.seed, {q for q, _ in held_out})
    with tqdm(range(args.steps), desc="Training", disable=True if args.quiet else None) as bar:
        for step in bar:
            loss = trainer.step(*next(data))
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
            if bar.disable and step % 1000 == 0:  # no bar (not a terminal): a line now and then
                print(f"step {step}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    files = {"config.json": json.dumps(raw, indent=2) + "\n", **demo.tokenizer_files(tokenizer)}
    save_hf(nnx.to_pure_dict(nnx.state(trainer.model)), files, args.output, overwrite=args.overwrite)
    shipped, shipped_tokenizer = load(args.output, dtype="float32", progress=False)
    score = demo.accuracy(shipped, shipped_tokenizer, held_out)
    with open(os.path.join(args.output, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "learning_rate": args.learning_rate,
              "final_loss": loss, "held_out_accuracy": score, "held_out_problems": len(held_out),
              "model_safetensors_sha256": digest, "parameters": shipped.config.num_parameters,
              "train_seconds": round(time.perf_counter() - start, 1),
              "command": f"python train/demo.py --seed {args.seed} --steps {args.steps} --batch {args.batch} "
                         f"--learning-rate {args.learning_rate}"
                         + (f" --held-out {args.held_out}" if args.held_out != 500 else "")}
    with open(os.path.join(args.output, "training.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"held-out accuracy {score:.1%} on {len(held_out)} problems; wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
