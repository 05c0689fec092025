"""Convert a real-size checkpoint and measure it: wall time, peak RSS and throughput against the I/O floor.

Writes a random bfloat16 checkpoint with the real names, shapes and shard layout of a released model
(from its `model.safetensors.index.json` in ../shared/fixtures; Phi-4-mini: 2 shards, 7.67 GB),
evicts it from the page cache, times one plain read of the same files (the read floor) and one plain
copy of them (the copy floor: the same bytes read and written, which any converter must do on this
disk), evicting it before each, then runs `convert/hf_to_orbax.py` on it in a child process and
records its wall time and peak RSS. The target is half the read floor's throughput; the RSS target
is 3 x the largest tensor + 1 GB.

With --mesh, a child process with that many (fake CPU) devices then loads the HF source and the
converted output onto the mesh (bfloat16) and records each load's wall time and peak RSS: on CPU
the devices' memory is the process's, so a peak near the model's size (not devices x size) shows
that each device got only its shards and no host copy of the whole model was made.

  python bench/convert.py --fixture ../shared/fixtures/phi-4-mini
  python bench/convert.py --fixture ../shared/fixtures/phi-4-mini --mesh tensor=8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from phi4_jax.checkpoints.convert import SIDE_FILES
from phi4_jax.config import Phi4Config
from runinfo import describe_run, write_record
from phi4_jax.checkpoints.hf import INDEX_FILE, hf_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "convert.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", default=os.path.join(ROOT, "..", "shared", "fixtures", "phi-4-mini"),
                   help="folder with the model's config.json and model.safetensors.index.json")
    p.add_argument("--workdir", default=None,
                   help="where to write the source and output (needs twice the model's size; default: a temp folder)")
    p.add_argument("--output", default=RESULTS, help="JSON file to write")
    p.add_argument("--keep", action="store_true", help="keep the generated source and output folders")
    p.add_argument("--mesh", default=None,
                   help="also time loading the source and the output onto this mesh of fake CPU devices, e.g. tensor=8")
    p.add_argument("--write-source", default=None, help=argparse.SUPPRESS)  # child: only generate
    p.add_argument("--load-child", default=None, help=argparse.SUPPRESS)  # child: only load onto --mesh
    return p


def random_bf16(rng: np.random.Generator, shape) -> np.ndarray:
    """Random bf16 values of either sign in [2^-15, 1), made from bits (fast; no NaN or Inf)."""
    bits = rng.integers(0x3800, 0x3F80, size=shape, dtype=np.uint16)
    bits |= (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)
    return bits.view(ml_dtypes.bfloat16)


def write_source(fixture: str, folder: str) -> None:
    """Writes the random checkpoint shard by shard."""
    os.makedirs(folder)
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(fixture, name)):
            shutil.copyfile(os.path.join(fixture, name), os.path.join(folder, name))
    shutil.copyfile(os.path.join(fixture, INDEX_FILE), os.path.join(folder, INDEX_FILE))
    with open(os.path.join(fixture, INDEX_FILE), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    shapes = {name: shape for name, (shape, _) in hf_tensors(Phi4Config.from_json(fixture)).items()}
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    rng = np.random.default_rng(0)
    for shard, names in sorted(shards.items()):
        print(f"writing {shard} ({len(names)} tensors)", file=sys.stderr)
        save_file({n: random_bf16(rng, shapes[n]) for n in names}, os.path.join(folder, shard),
                  metadata={"format": "pt"})


def evict(paths: list[str]) -> None:
    """Drops the files' pages from the page cache, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_floor(paths: list[str]) -> float:
    """Seconds to read the files once, start to end, in 64 MB chunks."""
    start = time.perf_counter()
    buf = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def copy_floor(paths: list[str], folder: str) -> float:
    """Seconds to copy the files into `folder` in 64 MB chunks (written to the page cache, as a
    converter's output is), then removes the copies after the disk has taken them."""
    os.makedirs(folder)
    start = time.perf_counter()
    buf = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f, open(os.path.join(folder, os.path.basename(path)), "wb") as g:
            while n := f.readinto(buf):
                g.write(memoryview(buf)[:n])
    seconds = time.perf_counter() - start
    os.sync()  # so its dirty pages do not slow the conversion's writes
    shutil.rmtree(folder)
    return seconds


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Runs a child; returns its wall seconds and its own peak RSS in bytes."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    wall_s = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(cmd)}")
    return wall_s, usage.ru_maxrss * 1024  # KiB on Linux


def load_onto_mesh(folder: str, spec: str) -> None:
    import math

    import jax

    from phi4_jax.parallel import mesh as meshes

    jax.config.update("jax_num_cpu_devices", math.prod(meshes.parse_mesh(spec).values()))
    from flax import nnx

    import phi4_jax

    model, _ = phi4_jax.load(folder, dtype="bfloat16", mesh=spec, progress=False)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.write_source:
        write_source(args.fixture, args.write_source)
        return 0
    if args.load_child:
        load_onto_mesh(args.load_child, args.mesh)
        return 0
    config = Phi4Config.from_json(args.fixture)
    largest = max(int(np.prod(shape)) * 2 for shape, _ in hf_tensors(config).values())
    workdir = args.workdir or tempfile.mkdtemp(prefix="phi4-jax-convert-bench-")
    source, output = os.path.join(workdir, "source"), os.path.join(workdir, "output")
    try:
        # Generated in a child: a forked child's peak RSS starts at its parent's, so the parent
        # must stay small for the converter's peak RSS to be its own.
        subprocess.run([sys.executable, os.path.abspath(__file__), "--fixture", args.fixture,
                        "--write-source", source], check=True)
        with open(os.path.join(source, INDEX_FILE), encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(source, s) for s in shards]
        source_bytes = sum(os.path.getsize(p) for p in paths)
        evict(paths)
        floor_s = read_floor(paths)
        evict(paths)
        copy_s = copy_floor(paths, os.path.join(workdir, "copy"))
        evict(paths)
        cmd = [sys.executable, os.path.join(ROOT, "convert", "hf_to_orbax.py"), "--model", source,
               "--output", output, "--quiet"]
        wall_s, peak_rss = run_measured(cmd)
        target = 3 * largest + 2**30
        record = {
            "benchmark": "convert", "schema": 2, "model": os.path.basename(os.path.normpath(args.fixture)),
            "source_dtype": "bfloat16", "shards": len(shards), "tensors": len(hf_tensors(config)),
            "source_bytes": source_bytes, "output_bytes": folder_bytes(output),
            "largest_tensor_bytes": largest,
            "read_floor_s": floor_s, "read_floor_gb_per_s": source_bytes / floor_s / 1e9,
            "convert_wall_s": wall_s, "convert_gb_per_s": source_bytes / wall_s / 1e9,
            "convert_vs_read_floor": wall_s / floor_s,
            "copy_floor_s": copy_s, "copy_floor_gb_per_s": source_bytes / copy_s / 1e9,
            "convert_vs_copy_floor": wall_s / copy_s,
            "target_gb_per_s": 0.5 * source_bytes / floor_s / 1e9,
            "meets_target": wall_s <= 2 * floor_s,
            "convert_peak_rss_bytes": peak_rss, "rss_target_bytes": target,
            "meets_rss_target": peak_rss <= target,
            "page_cache": "source evicted (posix_fadvise DONTNEED) before the floor read and the conversion",
            "convert_command": "python convert/hf_to_orbax.py --model SRC --output DIR --quiet",
            **describe_run(),
        }
        if args.mesh:
            record["mesh"] = args.mesh
            for name, folder in (("hf", source), ("orbax", output)):
                load_s, load_rss = run_measured([sys.executable, os.path.abspath(__file__), "--load-child", folder,
                                                 "--mesh", args.mesh])
                record[f"load_{name}_wall_s"], record[f"load_{name}_peak_rss_bytes"] = load_s, load_rss
                print(f"loading the {name} folder onto {args.mesh}: {load_s:.1f} s, peak RSS {load_rss / 1e9:.2f} GB",
                      file=sys.stderr)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{record['model']}: {source_bytes / 1e9:.2f} GB in {wall_s:.1f} s ({record['convert_gb_per_s']:.2f} GB/s); "
          f"read floor {floor_s:.1f} s ({record['read_floor_gb_per_s']:.2f} GB/s), "
          f"{record['convert_vs_read_floor']:.1f}x it; "
          f"copy floor {copy_s:.1f} s, {record['convert_vs_copy_floor']:.1f}x it; "
          f"peak RSS {peak_rss / 1e9:.2f} GB (target {target / 1e9:.2f} GB: "
          f"{'met' if record['meets_rss_target'] else 'MISSED'})", file=sys.stderr)
    write_record(args.output, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
