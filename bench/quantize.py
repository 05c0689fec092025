"""Weight-only int8 against float32: what quantizing the weights does to the logits and the answers.

For each random-weight checkpoint (a preset with transformers' own seeded initialisation, or the
tiny test shapes' larger weights) and for the demo model, both models are loaded from the same
folder, float32 and `quantize="int8"`, and run on the same 256 positions of random tokens:
  max |Δlogit|, RMS Δlogit over the logits' standard deviation, and top-1 agreement;
and for the demo model, which is trained, also:
  exact-match accuracy on its 500 held-out problems (greedy, as train/demo.py scores it), and its
  mean next-token loss and perplexity on the answers of those problems (the tokens it was
  trained to produce), int8 against float32.
Records go to bench/results/quantize.json.

  python bench/quantize.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "quantize.json")
sys.path[:0] = [os.path.join(ROOT, "train")]  # demo_data: the demo model's problems and tokenizer
RANDOM = ("phi3-110m", "deep-thin")  # transformers' initialisation (std 0.02)
POSITIONS = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/quantize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", nargs="*", default=list(RANDOM),
                   help="presets of phi4_jax.config.PRESETS to check with random weights (default: phi3-110m "
                        "deep-thin; tiny-* presets get the test suite's larger weights)")
    p.add_argument("--held-out", "--held_out", type=int, default=500,
                   help="demo problems to score (default 500, the demo's own held-out set)")
    p.add_argument("--output", default=RESULTS, help="JSON file to write (default bench/results/quantize.json)")
    return p


def logit_agreement(folder: str, vocab_size: int) -> dict:
    """Float32 and int8 models of one folder on the same random tokens: how far the logits move."""
    import phi4_jax

    ids = np.random.default_rng(0).integers(0, vocab_size, (1, POSITIONS), dtype=np.int32)
    want = np.asarray(phi4_jax.load(folder, dtype="float32", progress=False)[0](ids))[0]
    got = np.asarray(phi4_jax.load(folder, dtype="float32", quantize="int8", progress=False)[0](ids))[0]
    diff = got - want
    return {"positions": POSITIONS, "max_abs_logit_diff": float(np.abs(diff).max()),
            "logit_std": float(want.std()), "rms_diff_over_std": float(np.sqrt(np.mean(diff ** 2)) / want.std()),
            "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def random_checkpoint(name: str, folder: str) -> None:
    """A preset's random checkpoint: transformers' initialisation, or (tiny-*) the tests' weights."""
    from compare_transformers import save_checkpoint

    from phi4_jax.config import PRESETS

    if not name.startswith("tiny-"):
        save_checkpoint(PRESETS[name], folder)
        return
    sys.path[:0] = [os.path.join(ROOT, "tests")]
    from tiny_models import make_hf_model

    make_hf_model(name[len("tiny-"):]).save_pretrained(folder)


def answer_loss(model, tokenizer, problems: list[tuple[str, str]]) -> float:
    """Mean next-token cross-entropy on each problem's answer and closing <|end|> (`train.loss`)."""
    import demo_data as demo
    import jax.numpy as jnp

    from phi4_jax.train import loss

    ids, weights = demo.encode(tokenizer, problems, demo.LENGTH)
    return float(loss(model, jnp.asarray(ids), jnp.asarray(weights)))


def demo_scores(held_out: int) -> dict:
    import demo_data as demo
    from tokenizers import Tokenizer

    import phi4_jax
    from phi4_jax.checkpoints.hub import DEMO_FOLDER

    problems = demo.held_out(held_out)
    raw = Tokenizer.from_file(os.path.join(DEMO_FOLDER, "tokenizer.json"))
    scores = {}
    for kind in ("float32", "int8"):
        model, tokenizer = phi4_jax.load(DEMO_FOLDER, dtype="float32", quantize=None if kind == "float32" else kind,
                                         progress=False)
        value = answer_loss(model, raw, problems)
        scores[kind] = {"held_out_accuracy": demo.accuracy(model, tokenizer, problems),
                        "answer_loss": value, "answer_perplexity": math.exp(value)}
    scores["perplexity_increase"] = scores["int8"]["answer_perplexity"] / scores["float32"]["answer_perplexity"] - 1
    return scores


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    from runinfo import describe_run, write_record

    from phi4_jax.checkpoints.hub import DEMO_FOLDER
    from phi4_jax.config import PRESETS, Phi4Config

    records = []
    for name in args.random:
        with tempfile.TemporaryDirectory() as folder:
            random_checkpoint(name, folder)
            records.append({"model": name, "weights": "random", **logit_agreement(folder, PRESETS[name]["vocab_size"])})
        print(records[-1], file=sys.stderr)
    demo = {"model": "demo", "weights": "trained",
            **logit_agreement(DEMO_FOLDER, Phi4Config.from_json(DEMO_FOLDER).vocab_size), **demo_scores(args.held_out)}
    records.append(demo)
    print(demo, file=sys.stderr)
    write_record(args.output, {"benchmark": "quantize", "schema": 1, **describe_run(),
                               "held_out_problems": args.held_out,
                               "records": records})
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
