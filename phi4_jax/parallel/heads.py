"""Grouped-query attention on `tensor`: how many times each KV head is repeated, and the repeat.

The KV heads are split over `tensor`. When `tensor` does not divide them (phi-4: 10 KV heads on
tensor=4), each KV head is repeated r times at load time, r the smallest value for which `n_kv * r`
is divisible by `tensor` and divides the query heads (`kv_repeat`). Repeated head j is stored head
j // r, so query head h still reads the values of stored KV head h // (n_h / n_kv).
"""

from __future__ import annotations

from phi4_jax.config import Phi4Config
from phi4_jax.errors import MeshError


def kv_repeat(config: Phi4Config, tensor: int) -> int:
    """How many times each KV head is repeated so that `tensor` splits the heads evenly (1: no
    repeat). Raises MeshError, listing the tensor sizes that work, when no repeat does."""
    n, kv = config.num_attention_heads, config.num_key_value_heads
    r = _repeat_or_none(n, kv, tensor)
    if r is not None:
        return r
    works = [t for t in range(1, n + 1) if _repeat_or_none(n, kv, t) is not None]
    raise MeshError(f"tensor={tensor} cannot split this model's {n} query / {kv} KV heads (even with "
                    f"KV heads repeated); tensor sizes that work: {', '.join(map(str, works))}. Put the "
                    "other devices on data or fsdp")


def _repeat_or_none(n: int, kv: int, tensor: int) -> int | None:
    return next((r for r in range(1, n // kv + 1) if (kv * r) % tensor == 0 and n % (kv * r) == 0), None)


def config_for_mesh(config: Phi4Config, mesh) -> Phi4Config:
    """The config the model has on `mesh`: the KV heads repeated as `kv_repeat` says."""
    r = kv_repeat(config, mesh.shape["tensor"])
    return config if r == 1 else config.replace(num_key_value_heads=config.num_key_value_heads * r)


def stored_heads(heads: slice, repeat: int) -> slice:
    """The stored KV heads that repeated heads `heads` (a `slice(start, stop)`) are copies of."""
    return slice(heads.start // repeat, (heads.stop - 1) // repeat + 1)


def repeat_kv_heads(x, repeat: int, heads: slice | None = None):
    """Stored KV heads `x` (a NumPy or JAX array, heads on axis 0) repeated `repeat` times each, in
    a row; `heads`: only those of the repeated heads, when `x` holds `stored_heads(heads, repeat)`."""
    out = x.repeat(repeat, axis=0)
    if heads is None:
        return out
    skip = heads.start - stored_heads(heads, repeat).start * repeat
    return out[skip:skip + heads.stop - heads.start]
