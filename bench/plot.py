"""Figures from bench/generate.py's records: decode tokens/s and MBU against batch size, prefill
seconds against prompt length (one line per mesh, so seq=1/2/4/8 runs compare).

Where a measurement was repeated (same device, model, dtype, mesh and shape) the newest record
counts. Needs matplotlib (`pip install -e '.[plot]'`).

  python bench/plot.py                       # bench/results/generate.jsonl -> bench/results/*.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=os.path.join(RESULTS, "generate.jsonl"), help="bench/generate.py's records")
    p.add_argument("--output-dir", "--output_dir", default=RESULTS, help="folder the PNGs are written to")
    p.add_argument("--mesh", nargs="+", default=None,
                   help="draw only the records of these meshes, e.g. 'none' (one device) seq=4 (default: all)")
    return p


def newest(records: list[dict]) -> list[dict]:
    """One record per measurement: the last one written."""
    key = lambda r: (r["device"], r["model"], r["layers"], r["dtype"], r["mesh"], r["part"],  # noqa: E731
                     r["batch"], r["prompt_len"])
    return list({key(r): r for r in records}.values())


def series(records: list[dict], part: str, x: str, y: str) -> dict[str, tuple[list, list]]:
    """Lines of `y` against `x`, one per (device, model, dtype, mesh; prompt length when x is the
    batch), points sorted by x."""
    lines: dict[str, list] = {}
    for r in records:
        if r["part"] == part:
            label = f"{r['device']} {r['model']} ({r['layers']} layers) {r['dtype']}" + (
                f", mesh {r['mesh']}" if r["mesh"] else "") + (f", prompt {r['prompt_len']}" if x == "batch" else "")
            lines.setdefault(label, []).append((r[x], r[y]))
    return {label: tuple(map(list, zip(*sorted(points)))) for label, points in lines.items()}


def draw(lines, path: str, xlabel: str, ylabel: str, title: str, percent: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in lines.items():
        ax.plot(xs, [100 * y for y in ys] if percent else ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for xs, _ in lines.values() for x in xs}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(args.input, encoding="utf-8") as f:
            records = newest([json.loads(line) for line in f if line.strip()])
    except FileNotFoundError:
        sys.exit(f"bench/plot.py: {args.input} does not exist: run bench/generate.py first")
    if args.mesh is not None:
        wanted = {"" if m == "none" else m for m in args.mesh}
        records = [r for r in records if r["mesh"] in wanted]
    os.makedirs(args.output_dir, exist_ok=True)
    figures = [
        ("decode", "batch", "tokens_per_s", "decode_tokens_per_s.png", "batch size", "tokens/s",
         "Decode throughput", False),
        ("decode", "batch", "mbu", "decode_mbu.png", "batch size", "MBU (% of measured read bandwidth)",
         "Decode: model-bandwidth utilisation", True),
        ("prefill", "prompt_len", "seconds", "prefill_seconds.png", "prompt tokens", "seconds",
         "Prefill time (batch 1)", False),
    ]
    for part, x, y, name, xlabel, ylabel, title, percent in figures:
        lines = series(records, part, x, y)
        if lines:
            path = os.path.join(args.output_dir, name)
            draw(lines, path, xlabel, ylabel, title, percent)
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
