"""Weight-only int8: symmetric per-output-channel quantization, and the products that dequantize inside.

A weight `[out..., in...]` becomes int8 values `q` and one float32 `scale` per output channel
(`scale = max|w| / 127` over the channel's inputs), with `w ≈ q * scale` to within `scale / 2`.
Activations stay in the compute dtype: a product converts the int8 weight to it inside the jitted
matmul and scales the output channels after it (`x @ (q * s)ᵀ = (x @ qᵀ) * s`), so the weight is
read from memory as int8. The embedding table is int8 too, one scale per token row: a row's scale
serves both its lookup and, for a tied LM head, its output channel.

Why not Qwix: BUILD.md, "Weight-only int8".
"""

from __future__ import annotations

import math

import jax
import numpy as np

from phi4_jax.errors import ConfigError
from phi4_jax.model import xla_cpu

KINDS = ("int8",)
QMAX = 127  # symmetric: -127..127, so that q and -q both exist


def check_kind(kind: str | None) -> str | None:
    """`kind` if phi4_jax can quantize to it (None: the checkpoint's own weights), else ConfigError."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"quantize={kind!r} is not a kind phi4_jax quantizes to; use {' or '.join(KINDS)} "
                          "(or none, for the checkpoint's own weights)")
    return kind


def quantize(w, outputs: int, xp=np) -> tuple:
    """`w` `[out..., in...]` (its first `outputs` axes are the output channels) as int8 values of its
    shape and float32 scales `[out...]`. `xp`: numpy (host arrays) or jax.numpy; both round halves to even."""
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=tuple(range(outputs, w.ndim)), keepdims=True)
    scale = amax * xp.float32(1 / QMAX)  # a product: XLA would rewrite a division by a constant as one
    q = xp.clip(xp.rint(w32 / xp.where(scale > 0, scale, 1)), -QMAX, QMAX).astype(xp.int8)
    return q, scale.reshape(w.shape[:outputs])


def quantize_rows(w: np.ndarray, outputs: int, chunk_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` of a host array a block of output channels at a time, so that no float32 copy of
    the whole tensor is made (a tensor streamed from a checkpoint is held once, in its own dtype)."""
    per_row = math.prod(w.shape[1:]) * 4
    step = max(1, chunk_bytes // per_row)
    q, scale = np.empty(w.shape, np.int8), np.empty(w.shape[:outputs], np.float32)
    for start in range(0, w.shape[0], step):
        q[start:start + step], scale[start:start + step] = quantize(w[start:start + step], outputs)
    return q, scale


def dequantize(q, scale, xp=np):
    """The float32 weight `q * scale` (what `phi4-jax export --dequantize` writes)."""
    return q.astype(xp.float32) * scale.reshape(*scale.shape, *(1,) * (q.ndim - scale.ndim))


def product(x: jax.Array, q: jax.Array, scale: jax.Array, dtype, dense, chunk_rows: bool) -> jax.Array:
    """`x` `[..., in]` times the int8 weight `q` `[out, in]` with `scale` `[out]`: `[..., out]` in `dtype`.

    `dense(x, w)` is the float product. GPU and TPU compilers fuse the int8 -> `dtype` conversion into
    the matmul's operand reads; XLA:CPU does not (`chunk_rows`, `Backend.chunked_dequantize`: it
    converts a block of output rows at a time, `xla_cpu.chunked_product`).
    """
    y = xla_cpu.chunked_product(x, q, dtype, dense) if chunk_rows else dense(x, q.astype(dtype))
    return (y * scale).astype(dtype)  # scales in float32: y promotes, then the compute dtype
