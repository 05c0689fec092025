"""Will it fit? Per-device memory and collectives of the engine's programs on a target mesh.

XLA compiles the real prefill and decode steps with abstract inputs (shapes and shardings; no
weights, no memory).

Run it on CPU with as many fake devices as the mesh has. The engine's own jitted steps are
compiled, traced for the target platform (`model/backend.py`: the plain forms of GPU and TPU
programs, not XLA:CPU's own), so what is reported is what `ModelRunner` runs there, with XLA's
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

import contextlib
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flax import nnx

from phi4_jax.config import Phi4Config
from phi4_jax.engine import runner
from phi4_jax.errors import ConfigError
from phi4_jax.model import attention as attn
from phi4_jax.planner import hlo
from phi4_jax.engine.prefill import piece_for, seq_mesh
from phi4_jax.engine.sampling import SamplingParams, sampler_state
from phi4_jax.engine.speculative import Speculation
from phi4_jax.model.backend import Backend
from phi4_jax.model.cache import KVCache
from phi4_jax.model.phi4 import abstract_model
from phi4_jax.parallel import mesh as meshes
from phi4_jax.parallel import rules
from phi4_jax.parallel.heads import config_for_mesh
from phi4_jax.parallel.rules import placed_shapes

_CONVERT = re.compile(r"convert_computation[.\w]* \(param[.\w]*: bf16\[([\d,]*)\]\) -> f32\[")
# A computation of one int8 operand giving a float array as large: an int8 weight dequantized.
_DEQUANTIZE = re.compile(r"^%\S+ \(param[.\w]*: s8\[([\d,]*)\]\) -> (f32|bf16|f16)\[([\d,]*)\]", re.M)


def plan(config: Phi4Config, mesh: Mesh, context: int, batch: int, dtype="bfloat16",
         prefill_piece: int | None = None, target: str = "gpu", quantize: str | None = None,
         attention: str = "auto", speculative: Speculation | None = None) -> dict:
    """Compiles a prefill of a `context`-token prompt (in pieces of `prefill_piece` tokens per row;
    default the engine's `prefill.piece_for(batch)`) into a `context`-slot cache, and one decode
    step against it, for `batch` rows on `mesh`, as traced for the `target` platform ("gpu" or
    "tpu": the plain forms, never XLA:CPU's own; "cpu": XLA:CPU's program). `attention` as the
    engine resolves it on the mesh's devices ("auto": splash on a TPU for head_dim 128, cuDNN on a
    GPU for 16-bit compute, else XLA; on fake CPU devices XLA, the only one they compile).
    A mesh of accelerator devices described without one (`planner.targets.devices`: a TPU slice,
    NVIDIA GPUs) compiles that accelerator's programs themselves: their temporaries are its own, and
    XLA's cost analysis comes with them where the compiler gives one (TPU's; GPU's has none).
    Each step reports, per device and call, its matmul FLOPs and main-memory bytes read from the
    program (`hlo`: loops counted as many times as they run; decode's loop of steps once, a step)
    and the bytes it copies within main memory. A step the accelerator's compiler refuses for want
    of memory reports the temporaries it would need ("refused"). `quantize="int8"`: the model's
    weights are int8 with their scales (`model/int8.py`). `speculative`: also the decode call that
    verifies drafts ("speculative": its loop holds a drafting step beside a plain one, each counted
    once; `drafts` says how many). Returns a JSON-ready dict."""
    model_config = config_for_mesh(config, mesh)
    prefill_piece = prefill_piece or piece_for(batch)
    platform = mesh.devices.flat[0].platform
    own = platform in ("tpu", "gpu")  # the accelerator's own compiler, not XLA:CPU tracing for it
    target = platform if own else target
    backend = Backend(target)
    attn.check(attention, dtype, target)
    attention = attn.resolve(attention, dtype, platform, config.head_dim)
    if attention != "xla" and not own:
        raise ConfigError(f"attention {attention!r} compiles only for an accelerator named as the target "
                          "(a TPU slice such as v5e:2x4, or h100:8); fake CPU devices compile XLA's attention")
    steps = {}
    for name in ("prefill", "decode") + (("speculative",) if speculative else ()):
        started = time.perf_counter()
        try:
            # (Mosaic lowers a TPU kernel for the default device's chip: the target's, not the CPU's.)
            with _no_persistent_cache(own), jax.default_device(mesh.devices.flat[0]):
                real = lower_step(name, model_config, mesh, context, batch, jnp.dtype(dtype), prefill_piece,
                                  backend, quantize, attention, speculative).compile()
        except jax.errors.JaxRuntimeError as e:  # an accelerator's compiler refuses what overflows its memory
            needed = _temporaries_refused(str(e))
            if needed is None:
                raise
            steps[name] = {"refused": str(e).splitlines()[0], "temp_bytes": needed}
            continue
        # Tracing, lowering and compiling on this machine (the target's compiler where it is one).
        seconds = time.perf_counter() - started
        # XLA:CPU's bf16 upcasts (see the module's docstring) need a float32 bound; an accelerator's has none.
        upper = real if own or jnp.dtype(dtype) == jnp.float32 else lower_step(
            name, model_config, mesh, context, batch, jnp.dtype(jnp.float32), prefill_piece, backend,
            quantize, speculative=speculative).compile()
        steps[name] = _report(real, upper, cpu_compile=not own) | {"compile_seconds": round(seconds, 1)}
        if name == "speculative":
            steps[name]["drafts"] = speculative.k
        if own:  # XLA's own figures, each loop body counted once (XLA:CPU's would be for its own program)
            cost = real.cost_analysis() or {}
            steps[name].update(xla_flops=cost.get("flops"), xla_bytes_accessed=cost.get("bytes accessed"),
                               xla_optimal_seconds=cost.get("optimal_seconds"))
    weights, cache, table = _resident_bytes(model_config, mesh, context, batch, jnp.dtype(dtype), quantize)
    # A refusal's figure covers the step's parameters too (phi-4 int8 decode on one v5e named 18.2 GiB
    # beside 16.4 GB of weights and cache): it is the step's whole need.
    need = max(s["temp_bytes"] if "refused" in s else weights + cache + s["temp_bytes"] for s in steps.values())
    return {
        "model": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                  "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "kv_heads_on_mesh": model_config.num_key_value_heads, "parameters": config.num_parameters},
        "mesh": dict(mesh.shape), "devices": mesh.devices.size, "context": context, "batch": batch,
        "dtype": str(jnp.dtype(dtype)), "quantize": quantize, "prefill_piece": prefill_piece, "target": target,
        "attention": attention,
        "per_device": {"weights_bytes": weights, "kv_cache_bytes": cache, "needed_bytes": need,
                       # What a decode step must read: all but an embedding table apart from the head
                       # (a row of it per token), and the whole cache.
                       "decode_reads_bytes": weights - table + cache},
        "steps": steps,
    }


def lower_step(step: str, config: Phi4Config, mesh: Mesh | None, context: int, batch: int, dtype, piece: int,
               backend: Backend, quantize: str | None = None, attention: str = "xla",
               speculative: Speculation | None = None) -> jax.stages.Lowered:
    """The engine's own "prefill" (`_start`), "decode" or "speculative" (`_decode`, with `speculative`)
    program, lowered for `backend`
    from abstract inputs on `mesh` (shapes and shardings; no weights; None: one device, as an
    `ModelRunner` without a mesh runs): `config` is the model's config on the mesh (KV heads repeated),
    the cache holds `context` slots of `batch` rows, a prompt fills them. `attention`: the
    implementation (`model/attention.py`)."""
    graphdef, state = abstract_on_mesh(config, mesh, dtype, backend, quantize, attention)
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
    allowed = ints((batch, runner.mask_width(config.vocab_size)))  # (the first token's mask: any)
    start_args = (ints((batch, context)), rows, rows, rows, rows, ints((batch, 1)), sampler, allowed,
                  ints((batch, context)), KVCache(layers, layers))
    # As the engine runs it: ring attention on a seq mesh, else in pieces of `piece`.
    ring = seq_mesh(mesh, context)
    options = dict(continuing=False, layout=layout, piece=piece, ring=ring)
    if step == "prefill":
        return runner._start.lower(graphdef, state, *start_args, **options)
    # The DecodeState the prefill hands over.
    decoded = jax.eval_shape(functools.partial(runner._start, graphdef, **options), state, *start_args)
    decoded = jax.tree.map(lambda a: _sds(a, whole), decoded)._replace(cache=KVCache(layers, layers))
    return runner._decode.lower(graphdef, state, decoded, ints(()), layout=layout, ring=ring,
                                spec=speculative if step == "speculative" else None)


def abstract_on_mesh(config: Phi4Config, mesh: Mesh | None, dtype, backend: Backend = Backend("gpu"),
                     quantize: str | None = None, attention: str = "xla"):
    """The model (its config already suited to `mesh`: `heads.config_for_mesh`) split into its
    graphdef and a state of `ShapeDtypeStruct`s laid out on `mesh` (None: the first device), with
    this attention, traced for `backend`: what `jit(...).lower` takes to compile without weights."""
    model = abstract_model(config, param_dtype=dtype, attention=attention, backend=backend, quantize=quantize)
    graphdef, state = nnx.split(meshes.mark_mesh(model, mesh))
    nnx.replace_by_pure_dict(state, placed_shapes(state, mesh))
    return graphdef, state


def _sds(a, s) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)


def _report(real, upper, cpu_compile: bool) -> dict:
    memory = real.memory_analysis()
    text = real.as_text()
    upcasts = sum(_elements(dims) * 4 for dims in _CONVERT.findall(text))
    dequantized = _dequantized_bytes(text if upper is real else upper.as_text()) if cpu_compile else 0
    program = hlo.parse(text)
    counts = hlo.collective_counts(program)
    return {
        "matmul_flops": hlo.matmul_flops(program),
        "main_memory_bytes": hlo.main_memory_bytes(program),
        "main_memory_bytes_in_loops": hlo.main_memory_bytes(program, looped=True),  # decode: one step's
        "memory_copy_bytes": hlo.memory_copy_bytes(program),
        "collective_result_bytes": hlo.collective_result_bytes(program),
        "permutes_under_compute": hlo.permutes_under_compute(program),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        # The float32 upper bound, less XLA:CPU's copies of dequantized int8 weights (GPU and TPU
        # compilers convert inside the matmul; XLA:CPU writes each, and hoists them out of loops).
        "temp_bytes": upper.memory_analysis().temp_size_in_bytes - dequantized,
        "cpu_only_dequantized_bytes": dequantized,
        "temp_bytes_cpu_compile": memory.temp_size_in_bytes,
        "cpu_only_upcast_bytes": upcasts,
        "collectives": {c: counts.get(c, 0) for c in hlo.COLLECTIVES},
    }


def _elements(dims: str) -> int:
    return math.prod(map(int, filter(None, dims.split(","))))


def _dequantized_bytes(text: str) -> int:
    """Bytes of the float copies of int8 weights an XLA:CPU program writes (`_DEQUANTIZE`)."""
    sizes = {"f32": 4, "bf16": 2, "f16": 2}
    return sum(_elements(out) * sizes[kind] for weight, kind, out in _DEQUANTIZE.findall(text)
               if _elements(weight) == _elements(out))


def _resident_bytes(config: Phi4Config, mesh: Mesh, context: int, batch: int, dtype,
                    quantize: str | None = None) -> tuple[int, int, int]:
    """Per-device bytes of the weights (int8 ones with their scales), of the KV cache and of an untied
    embedding table (0 when the LM head is the table), from their shardings (the fullest device)."""
    shard = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(abstract_on_mesh(config, mesh, dtype, quantize=quantize)[1])
    weights = sum(shard(a) for _, a in leaves)
    table = 0 if config.tie_word_embeddings else sum(
        shard(a) for path, a in leaves if "embed_tokens" in jax.tree_util.keystr(path))
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    layer = math.prod(rules.sharding(mesh, rules.CACHE_AXES, shape).shard_shape(shape)) * dtype.itemsize
    return weights, 2 * config.num_hidden_layers * layer, table


def _temporaries_refused(message: str) -> int | None:
    """The temporaries' bytes an out-of-memory refusal of XLA's TPU compiler names ("the total memory
    required for HLO temporaries (16.19G) exceeds available HBM (15.75G)"), or None."""
    match = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
    return None if match is None else int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)


@contextlib.contextmanager
def _no_persistent_cache(off: bool):
    """Compiles for a described accelerator stay out of the persistent compilation cache: what they
    produce can only run on that accelerator, and this process has none to load it on."""
    if not off:
        yield
        return
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


# Memory per device of accelerators people rent, as sold (GB = 1e9 bytes).
ACCELERATORS = {"L4": 24e9, "A100-40GB": 40e9, "A100-80GB / H100": 80e9, "H200": 141e9,
                "TPU v5e": 16e9, "TPU v6e": 32e9, "TPU v5p": 95e9}
USABLE = 0.9  # the runtime, XLA's workspace and fragmentation take the rest


def fits_on(needed_bytes: int) -> list[str]:
    """The accelerators whose memory holds `needed_bytes` per device, with `USABLE` headroom."""
    return [name for name, size in ACCELERATORS.items() if needed_bytes <= USABLE * size]
