"""Compile seconds of the jitted forward, cold and from JAX's persistent compilation cache.

Each layer count is compiled in two fresh processes sharing one empty cache folder: the first
compiles from scratch (cold), the second finds the executable in the cache (warm). Lowering (trace
to StableHLO) is timed apart from compiling, since the cache only saves the latter. Shapes are
abstract, so no weights are allocated: any preset at full width fits in a laptop's memory.

  python bench/compile.py --preset phi-4 --layers 2 16 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from phi4_jax.config import PRESETS
from runinfo import describe_run, write_record

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi-4", choices=sorted(PRESETS),
                   help="model shape, at full width (default phi-4)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 16, 40],
                   help="decoder layer counts to compile (default 2 16 40)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the compiled forward (default 1)")
    p.add_argument("--seq-len", "--seq_len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--dtype", default="float32", help="parameter and compute dtype (default float32)")
    p.add_argument("--mesh", default=None,
                   help="compile for this mesh, e.g. tensor=8 (on fake CPU devices; default: one device)")
    p.add_argument("--output", default=RESULTS, help=f"JSON file to write (default {os.path.relpath(RESULTS)})")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one timed compile
    return p


def compile_once(args) -> dict:
    """Runs in a child process: lowers and compiles the forward once, returns the seconds."""
    import math

    import jax
    import jax.numpy as jnp
    from phi4_jax import compilation_cache
    from phi4_jax.parallel import mesh as meshes

    compilation_cache.enable()  # in the folder the parent gave this child
    if args.mesh:  # compile for the mesh on as many fake CPU devices, whatever this machine has
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", math.prod(meshes.parse_mesh(args.mesh).values()))
    from phi4_jax import Phi4Config, forward
    from phi4_jax.planner.plan import abstract_on_mesh
    from phi4_jax.model.backend import Backend
    from phi4_jax.parallel.heads import config_for_mesh

    config = Phi4Config.from_preset(args.preset).replace(num_hidden_layers=args.layers[0])
    mesh = meshes.make_mesh(args.mesh or "")
    graphdef, state = abstract_on_mesh(config_for_mesh(config, mesh), mesh, jnp.dtype(args.dtype),
                                       Backend.of(mesh.devices.flat))
    ids = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=meshes.replicated(mesh))
    start = time.perf_counter()
    lowered = forward.lower(graphdef, state, ids)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at}


def run_child(args, layers: int, cache_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", args.preset,
           "--layers", str(layers), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--dtype", args.dtype] + (["--mesh", args.mesh] if args.mesh else [])
    env = dict(os.environ, PHI4_JAX_COMPILATION_CACHE=cache_dir)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"compiling {layers} layers failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(compile_once(args)))
        return 0
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="phi4-jax-cache-") as cache_dir:
            cold = run_child(args, layers, cache_dir)
            warm = run_child(args, layers, cache_dir)
        row = {"layers": layers,
               "cold_lower_s": cold["lower_s"], "cold_compile_s": cold["compile_s"],
               "warm_lower_s": warm["lower_s"], "warm_compile_s": warm["compile_s"],
               "compile_speedup": cold["compile_s"] / warm["compile_s"],
               "total_speedup": (cold["lower_s"] + cold["compile_s"]) / (warm["lower_s"] + warm["compile_s"])}
        rows.append(row)
        print(f"{layers:3d} layers: cold lower {row['cold_lower_s']:.2f}s compile {row['cold_compile_s']:.2f}s"
              f" | warm lower {row['warm_lower_s']:.2f}s compile {row['warm_compile_s']:.3f}s"
              f" | compile {row['compile_speedup']:.0f}x, lower+compile {row['total_speedup']:.1f}x faster",
              file=sys.stderr)
    record = {"benchmark": "compile", "schema": 1, "preset": args.preset, "mesh": args.mesh, "batch": args.batch,
              "seq_len": args.seq_len, "dtype": args.dtype, "function": "phi4_jax.forward",
              **describe_run(), "results": rows}
    write_record(args.output, record)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
