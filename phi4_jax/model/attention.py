"""Causal grouped-query attention over position-tagged keys, through one block interface.

Every attention path (dense, ring blocks, a split KV cache) asks an implementation for the same
thing: the attention of some queries over a block of keys under a boolean mask (an array, or
`Causal`: each query's last visible key, which a kernel masks from without the array), as the
normalised output and the log-sum-exp of each query's scores. Results over different key blocks
then combine exactly (`merge`). Implementations:

- "xla": the reference, einsums and a float32 softmax, on every backend (CPU and the tests use it);
- "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
  bfloat16/float16) for calls of at least CUDNN_MIN_QUERIES queries, XLA for fewer (decode);
- "splash": JAX's splash attention kernel for TPUs (`model/tpu_attention.py`) for calls of at
  least 128 queries, XLA for fewer (decode); on a "cpu" backend in Pallas interpret mode (checks).

"auto" picks cuDNN on a GPU for 16-bit compute, splash on a TPU for a head_dim that is a multiple
of 128 (phi-4, Phi-4-mini: the kernel's own lane width; Phi-3.5-mini's 96 runs under "splash" as it
is, but untimed on a chip, so "auto" keeps XLA there), and XLA otherwise. On a mesh the kernels
are given it (`mesh`) and run per device under `shard_map` (`per_device`): XLA partitions its own
path, but not a Mosaic kernel, nor cuDNN's call inside ring attention's map. Which path a layer
takes is one of the static choices at the end (`Dense`, `Ring`, `SplitCache`), handed to the model
per call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from phi4_jax.errors import ConfigError
from phi4_jax.model import tpu_attention, xla_cpu, xla_gpu
from phi4_jax.model.backend import Backend
from phi4_jax.parallel import rules

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# cuDNN serves calls of at least this many queries (prompts); fewer (a decode step) take XLA's path,
# as splash's do: cuDNN's call reads keys and values token-major, so it would transpose every cache
# layer it attends over at each step.
CUDNN_MIN_QUERIES = 128
# A prompt's attention over its own keys runs in blocks of this many queries, each over the keys up
# to its last query (`attend_causal`): the scores no query can see are not computed.
CAUSAL_BLOCK = 256


def causal_mask(q_positions: jax.Array, k_positions: jax.Array, window: int | None) -> jax.Array:
    """`[batch, q, k]` bool: a query sees keys at its own or earlier positions, within `window`.

    `window` counts the query itself: with window w, keys at positions p-w+1 .. p are visible.
    """
    delta = q_positions[:, :, None] - k_positions[:, None, :]
    mask = delta >= 0
    if window is not None:
        mask &= delta < window
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Causal:
    """A causal mask given by each query's last visible key, for keys in position order: key j (of
    `keys`) is visible to query i of row b when `j <= last[b, i]`, `last[b, i] - j < window` (keys
    at consecutive positions) and, with `segments` `[B, T]` (the keys are then the queries
    themselves), in the query's segment. `last` `[B, T]` int; below 0: the query sees no key.

    The form a kernel masks from without a `[B, T, keys]` array (splash computes each block's mask
    from `last` and skips the blocks it hides); `dense()` is that array, for the others."""

    last: jax.Array
    keys: int = dataclasses.field(metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    segments: jax.Array | None = None

    def dense(self) -> jax.Array:
        """The `[B, T, keys]` bool mask."""
        mask = causal_mask(self.last, jnp.broadcast_to(jnp.arange(self.keys), (self.last.shape[0], self.keys)),
                           self.window)
        if self.segments is not None:
            mask &= self.segments[:, :, None] == self.segments[:, None, :]
        return mask


def reads_limits(implementation: str) -> bool:
    """Whether `implementation` takes a `Causal` as it is (splash); the others are given the array,
    and paths that can make either make the array for them as they did."""
    return implementation == "splash"


def dense(mask: jax.Array | Causal) -> jax.Array:
    """`mask` as a `[B, T, S]` bool array."""
    return mask.dense() if isinstance(mask, Causal) else mask


def check(implementation: str, dtype, platform: str) -> None:
    """Raises ConfigError when `implementation` is unknown or cannot run on `platform` with `dtype`."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention implementation {implementation!r}; "
                          f"choose one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "cudnn":
        if platform != "gpu":
            raise ConfigError(f"attention 'cudnn' needs an NVIDIA GPU; this backend is "
                              f"{platform!r}: use --attention xla (or auto)")
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ConfigError(f"attention 'cudnn' computes in bfloat16 or float16, not {jnp.dtype(dtype)}: "
                              "use --dtype bfloat16, or --attention xla")
    if implementation == "splash" and platform == "gpu":
        raise ConfigError("attention 'splash' is a TPU kernel (Pallas/Mosaic), it cannot run on a GPU: "
                          "use --attention cudnn (or auto, or xla)")


def resolve(implementation: str, dtype, platform: str, head_dim: int | None = None) -> str:
    """The implementation "auto" stands for on `platform` with this compute dtype and `head_dim`
    (None: not known, taken as a multiple of 128)."""
    if implementation != "auto":
        return implementation
    if platform == "tpu" and (head_dim is None or head_dim % tpu_attention.LANES == 0):
        return "splash"
    cudnn = platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if cudnn else "xla"


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str = "xla",
                 backend: Backend = Backend("cpu"), mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of queries over one block of keys, KV heads shared by groups of query heads.

    Args:
      q: `[batch, q_len, heads, head_dim]`, already rotated.
      k, v: `[batch, kv_heads, k_len, head_dim]` (the KV-cache layout).
      mask: `[batch, q_len, k_len]` bool, True where a query may see a key, or that mask as a
        `Causal` (splash reads it as it is; the other paths make the array).
      implementation: "xla", "cudnn" or "splash" (see the module doc).
      backend: the backend traced for: it picks the forms of XLA's products (`model/xla_cpu.py`,
        `model/xla_gpu.py`).
      mesh: the mesh the arrays lie on (None: one device): a kernel runs per device (`per_device`).
    Returns:
      `(out, lse)`: `[batch, q_len, heads, head_dim]` float32, normalised over this block, and
      `[batch, q_len, heads]` float32, the log-sum-exp of the query's scaled scores over it. A query
      that sees no key gets zeros and -inf. Query head h reads KV head h // (heads/kv_heads).
    """
    if implementation == "cudnn" and q.shape[1] >= CUDNN_MIN_QUERIES:
        return per_device(mesh, functools.partial(_jax_nn_block, kernel="cudnn"), q, k, v, dense(mask))
    if implementation == "splash" and tpu_attention.splash_serves(q.shape[1]):
        return per_device(mesh, functools.partial(_splash_block, interpret=backend.platform == "cpu"), q, k, v, mask)
    return _xla_block(q, k, v, dense(mask), backend)


def _splash_block(q, k, v, mask, interpret: bool, with_lse: bool = True):
    """`attend_block` by splash, its mask as given: an array, or a `Causal`'s limits."""
    if isinstance(mask, Causal):
        return tpu_attention.splash_causal(q, k, v, mask.last, mask.window, mask.segments, interpret, with_lse)
    return tpu_attention.splash_block(q, k, v, mask, interpret, with_lse)


# A kernel's operands and results by their logical axes (`parallel/rules.py`); None: never split.
_AXES = {"q": ("batch", None, "q_heads", "head_dim"), "kv": ("batch", "kv_heads", None, "head_dim"),
         "mask": ("batch", None, None), "lse": ("batch", None, "q_heads"), "queries": ("batch", None)}


def per_device(mesh: Mesh | None, kernel, q, k, v, mask, with_lse: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """`kernel(q, k, v, mask)` -> `(out, lse)` (`lse` None where not `with_lse`; arguments as in
    `attend_block`) on each device's rows (batch over data/fsdp) and heads (query and KV heads over
    tensor) under `shard_map`, manual over every mesh axis not manual yet (inside ring attention's
    map: all but seq), the specs from the rules table. XLA cannot partition a Mosaic kernel
    (splash) at all, nor cuDNN's call inside a map manual over some axes only. A KV head's query
    heads lie on its device (heads split contiguously), so the GQA pairing holds in every shard.
    None: one device."""
    context = jax.sharding.get_abstract_mesh()
    manual = set() if mesh is None or context.empty else set(context.manual_axes)
    if mesh is None or manual >= set(mesh.axis_names):
        return kernel(q, k, v, mask)
    free = {a for a in mesh.axis_names if a not in manual}  # size-1 axes too: none may stay automatic
    spec = lambda name, x: rules.spec(mesh, _AXES[name], x.shape, over=free)  # noqa: E731
    q_spec = spec("q", q)
    if isinstance(mask, Causal):  # its arrays per query
        mask_spec = dataclasses.replace(mask, last=spec("queries", mask.last), segments=None if mask.segments is None
                                        else spec("queries", mask.segments))
    else:
        mask_spec = spec("mask", mask)

    def run(q, k, v, mask):
        out, lse = kernel(q, k, v, mask)
        return (out,) if lse is None else (out, lse)

    got = jax.shard_map(run, mesh=context if manual else mesh,
                        in_specs=(q_spec, spec("kv", k), spec("kv", v), mask_spec),
                        out_specs=(q_spec, spec("lse", q[..., 0])) if with_lse else (q_spec,),
                        axis_names=free, check_vma=False)(q, k, v, mask)
    return got if with_lse else (got[0], None)


def _jax_nn_block(q, k, v, mask, kernel):
    """`attend_block` by `jax.nn.dot_product_attention` with `implementation=kernel`."""
    out, lse = jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask[:, None],
        scale=q.shape[-1] ** -0.5, implementation=kernel, return_residual=True)
    # A query that sees nothing: the kernels average the values; this interface says zeros, -inf.
    seen = mask.any(-1)[..., None]
    return jnp.where(seen[..., None], out.astype(jnp.float32), 0.0), jnp.where(seen, lse.astype(jnp.float32), -jnp.inf)


def _xla_block(q, k, v, mask, backend: Backend):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    grouped = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    if backend.heads_as_rows:
        scores = xla_cpu.scores(grouped, k)
    else:
        scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * head_dim**-0.5, -jnp.inf)
    top = scores.max(-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # nothing visible: exp(-inf - 0) = 0, no NaN
    p = jnp.exp(scores - top)
    total = p.sum(-1, keepdims=True)
    # In v's dtype (a bf16 x bf16 -> f32 dot of this shape fails on XLA:CPU), then float32.
    p = p.astype(v.dtype)
    # Normalised after the values (T x D divisions, not T x S).
    divisor = jnp.where(total > 0, total, 1.0)
    if backend.heads_as_rows:
        out = xla_cpu.weighted_values(p, v, divisor)
    elif groups * q_len <= xla_gpu.DECODE_ROWS:
        out = xla_gpu.decode_weighted_values(p, v, divisor)
    else:
        out = jnp.einsum("bkgts,bksd->btkgd", p, v).astype(jnp.float32) / divisor.transpose(0, 3, 1, 2, 4)
    lse = (top + jnp.log(total))[..., 0]  # [B, KV, G, T]; log(0) = -inf where nothing is visible
    return (out.reshape(batch, q_len, heads, head_dim), lse.transpose(0, 3, 1, 2).reshape(batch, q_len, heads))


def merge(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Two `attend_block` results of the same queries over disjoint key blocks -> the result over both."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # neither block visible: both weights exp(-inf) = 0
    weight = lambda x: jnp.exp(x - safe)[..., None]  # noqa: E731
    return out_a * weight(lse_a) + out_b * weight(lse_b), lse


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str = "xla",
           backend: Backend = Backend("cpu"), mesh: Mesh | None = None) -> jax.Array:
    """Softmax attention over all of `k`/`v` (arguments as in `attend_block`), in q's dtype."""
    if implementation == "splash" and tpu_attention.splash_serves(q.shape[1]):
        # Without the log-sum-exp, which nothing here reads: the kernel differentiates only so.
        splash = functools.partial(_splash_block, interpret=backend.platform == "cpu", with_lse=False)
        return per_device(mesh, splash, q, k, v, mask, with_lse=False)[0].astype(q.dtype)
    return attend_block(q, k, v, mask, implementation, backend, mesh)[0].astype(q.dtype)


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str = "xla",
                  backend: Backend = Backend("cpu"), mesh: Mesh | None = None) -> jax.Array:
    """`attend` of queries that are the last of the keys, in position order (query i is key
    `offset + i`, offset = keys - queries: a prompt over itself, or a piece over the cache before
    it): the queries in blocks of CAUSAL_BLOCK, each over the keys up to its last query only, which
    skips the part of the score matrix above the diagonal (about half of a long prompt's attention
    work). The kernels ("cudnn", "splash") take the whole mask as it is (splash skips those blocks)."""
    length, offset = q.shape[1], k.shape[2] - q.shape[1]
    if length <= CAUSAL_BLOCK or implementation != "xla":
        return attend(q, k, v, mask, implementation, backend, mesh)
    mask = dense(mask)
    blocks = []
    for start in range(0, length, CAUSAL_BLOCK):
        end = offset + min(start + CAUSAL_BLOCK, length)
        blocks.append(attend(q[:, start:end - offset], k[:, :, :end], v[:, :, :end], mask[:, start:end - offset, :end],
                             implementation, backend, mesh))
    return jnp.concatenate(blocks, axis=1)


# Which path a layer's attention takes: a static choice (hashable, part of the jit key) per call.
@dataclasses.dataclass(frozen=True)
class Dense:
    """Attention on the devices as jit lays it out. The new tokens' keys/values go into the cache at
    slots = positions (contiguous in each row); the queries attend over the cache's first `slots`
    slots, or, with `slots` None, over the new tokens alone (a prompt from position 0 in one piece).
    `ordered`: the new tokens are the last of the keys attended, in position order (from position 0
    with `slots` None; else ending at slot `slots`), so attention may skip the keys past each block
    of queries (`attend_causal`)."""

    slots: int | None = None
    ordered: bool = False


@dataclasses.dataclass(frozen=True)
class Ring:
    """A new sequence split over `mesh`'s seq axis (laid out as given, zig-zag for balance): ring
    attention, the cache (if any) split over seq in contiguous shards and filled as blocks pass.
    `ordered`: each device's block is in position order (zig-zag's are), so each query's keys in a
    block are a prefix of it (`Causal`)."""

    mesh: Mesh
    ordered: bool = False


@dataclasses.dataclass(frozen=True)
class SplitCache:
    """New tokens (the same on every device) against a cache split over `mesh`'s seq axis."""

    mesh: Mesh


Path = Dense | Ring | SplitCache
