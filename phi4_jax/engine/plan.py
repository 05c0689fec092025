"""Will it fit? Per-device memory and collectives of the engine's programs on a target mesh.

XLA compiles the real prefill and decode steps with abstract inputs (shapes and shardings; no
weights, no memory).

Run it on CPU with as many fake devices as the mesh has. The engine's own jitted steps are
compiled, traced for the target platform (`model/backend.py`: the plain forms of GPU and TPU
programs, not XLA:CPU's own), so what is reported is what `Engine` runs there, with XLA's
attention. Weights and the KV cache per device come from
their shardings (XLA's argument sizes, also reported, hold them plus a few small inputs);
temporaries are XLA's temp allocation.

One CPU artefact: XLA:CPU rewrites every bfloat16 dot as float32 and materialises float32 copies
of its bf16 operands (weights, KV cache), which GPU and TPU compiles do not. So each step is also
compiled entirely in float32, whose temporaries bound the accelerator's from above (activations
are at most twice their bf16 size; attention scores are float32 either way). Both are reported,
with the CPU-only upcasts found in the bf16 program's HLO.
"""

from __future__ import annotations

import collections
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flax import nnx

from phi4_jax.config import Phi4Config
from phi4_jax.engine import engine
from phi4_jax.engine.prefill import piece_for, seq_mesh
from phi4_jax.engine.sampling import SamplingParams, sampler_state
from phi4_jax.model.backend import Backend
from phi4_jax.model.cache import KVCache
from phi4_jax.model.phi4 import abstract_model
from phi4_jax.parallel import mesh as meshes
from phi4_jax.parallel import rules
from phi4_jax.parallel.heads import config_for_mesh
from phi4_jax.parallel.rules import placed_shapes

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_CONVERT = re.compile(r"convert_computation[.\w]* \(param[.\w]*: bf16\[([\d,]*)\]\) -> f32\[")


def plan(config: Phi4Config, mesh: Mesh, context: int, batch: int, dtype="bfloat16",
         prefill_piece: int | None = None, target: str = "gpu") -> dict:
    """Compiles a prefill of a `context`-token prompt (in pieces of `prefill_piece` tokens per row;
    default the engine's `prefill.piece_for(batch)`) into a `context`-slot cache, and one decode
    step against it, for `batch` rows on `mesh`, as traced for the `target` platform ("gpu" or
    "tpu": the plain forms, never XLA:CPU's own; "cpu": XLA:CPU's program), attention by XLA.
    Returns per-device bytes and collective counts (a JSON-ready dict)."""
    model_config = config_for_mesh(config, mesh)
    prefill_piece = prefill_piece or piece_for(batch)
    backend = Backend(target)
    steps = {}
    for name in ("prefill", "decode"):
        real = lower_step(name, model_config, mesh, context, batch, jnp.dtype(dtype), prefill_piece, backend).compile()
        upper = real if jnp.dtype(dtype) == jnp.float32 else lower_step(
            name, model_config, mesh, context, batch, jnp.dtype(jnp.float32), prefill_piece, backend).compile()
        steps[name] = _report(real, upper)
    weights, cache = _resident_bytes(model_config, mesh, context, batch, jnp.dtype(dtype))
    need = weights + cache + max(s["temp_bytes"] for s in steps.values())
    return {
        "model": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                  "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "kv_heads_on_mesh": model_config.num_key_value_heads, "parameters": config.num_parameters},
        "mesh": dict(mesh.shape), "devices": mesh.devices.size, "context": context, "batch": batch,
        "dtype": str(jnp.dtype(dtype)), "prefill_piece": prefill_piece, "target": target,
        "per_device": {"weights_bytes": weights, "kv_cache_bytes": cache, "needed_bytes": need},
        "steps": steps,
    }


def lower_step(step: str, config: Phi4Config, mesh: Mesh | None, context: int, batch: int, dtype, piece: int,
               backend: Backend) -> jax.stages.Lowered:
    """The engine's own "prefill" (`_start`) or "decode" (`_decode`) program, lowered for `backend`
    from abstract inputs on `mesh` (shapes and shardings; no weights; None: one device, as an
    `Engine` without a mesh runs): `config` is the model's config on the mesh (KV heads repeated),
    the cache holds `context` slots of `batch` rows, a prompt fills them."""
    graphdef, state = abstract_on_mesh(config, mesh, dtype, backend)
    cache_shape = (batch, config.num_key_value_heads, context, config.head_dim)
    if mesh is None:
        layout = None
        whole = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        whole = meshes.replicated(mesh)
        layout = rules.sharding(mesh, rules.CACHE_AXES, cache_shape)
    layers = tuple(jax.ShapeDtypeStruct(cache_shape, dtype, sharding=layout or whole)
                   for _ in range(config.num_hidden_layers))
    ints = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32, sharding=whole)
    sampler = jax.tree.map(lambda a: _sds(a, whole), sampler_state(SamplingParams(), batch))
    rows = ints((batch,))  # starts, lengths, rope lengths, limits
    start_args = (ints((batch, context)), rows, rows, rows, rows, ints((batch, 1)), sampler, ints((batch, context)),
                  KVCache(layers, layers))
    # As the engine runs it: ring attention on a seq mesh, else in pieces of `piece`.
    ring = seq_mesh(mesh, context)
    options = dict(continuing=False, layout=layout, piece=piece, ring=ring)
    if step == "prefill":
        return engine._start.lower(graphdef, state, *start_args, **options)
    # The DecodeState the prefill hands over.
    decoded = jax.eval_shape(functools.partial(engine._start, graphdef, **options), state, *start_args)
    decoded = jax.tree.map(lambda a: _sds(a, whole), decoded)._replace(cache=KVCache(layers, layers))
    return engine._decode.lower(graphdef, state, decoded, ints(()), layout=layout, ring=ring)


def abstract_on_mesh(config: Phi4Config, mesh: Mesh | None, dtype, backend: Backend = Backend("gpu")):
    """The model (its config already suited to `mesh`: `heads.config_for_mesh`) split into its
    graphdef and a state of `ShapeDtypeStruct`s laid out on `mesh` (None: the first device), with
    XLA attention, traced for `backend`: what `jit(...).lower` takes to compile without weights."""
    graphdef, state = nnx.split(abstract_model(config, param_dtype=dtype, attention="xla", backend=backend))
    nnx.replace_by_pure_dict(state, placed_shapes(state, mesh))
    return graphdef, state


def _sds(a, s) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)


def _report(real, upper) -> dict:
    memory = real.memory_analysis()
    text = real.as_text()
    upcasts = sum(math.prod(map(int, filter(None, dims.split(",")))) * 4 for dims in _CONVERT.findall(text))
    counts = collections.Counter(re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", text))
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": upper.memory_analysis().temp_size_in_bytes,  # the float32 upper bound
        "temp_bytes_cpu_compile": memory.temp_size_in_bytes,
        "cpu_only_upcast_bytes": upcasts,
        "collectives": {c: counts.get(c, 0) for c in COLLECTIVES},
    }


def _resident_bytes(config: Phi4Config, mesh: Mesh, context: int, batch: int, dtype) -> tuple[int, int]:
    """Per-device bytes of the weights and of the KV cache, from their shardings (the fullest device)."""
    weights = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                  for a in jax.tree.leaves(abstract_on_mesh(config, mesh, dtype)[1]))
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    layer = math.prod(rules.sharding(mesh, rules.CACHE_AXES, shape).shard_shape(shape)) * dtype.itemsize
    return weights, 2 * config.num_hidden_layers * layer


# Memory per device of accelerators people rent, as sold (GB = 1e9 bytes).
ACCELERATORS = {"L4": 24e9, "A100-40GB": 40e9, "A100-80GB / H100": 80e9, "H200": 141e9,
                "TPU v5e": 16e9, "TPU v6e": 32e9, "TPU v5p": 95e9}
USABLE = 0.9  # the runtime, XLA's workspace and fragmentation take the rest


def fits_on(needed_bytes: int) -> list[str]:
    """The accelerators whose memory holds `needed_bytes` per device, with `USABLE` headroom."""
    return [name for name, size in ACCELERATORS.items() if needed_bytes <= USABLE * size]
