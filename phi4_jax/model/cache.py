"""The KV cache: preallocated per layer as `[batch, kv_heads, length, head_dim]`, keys after RoPE.

Slot j of a row holds the token at position j of that row, so rows of different lengths share one
cache without padding bookkeeping: a query at position p sees slots <= p (within the sliding
window), and a slot past a row's length is either never read or overwritten before it is.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from phi4_jax.config import Phi4Config
from phi4_jax.model import xla_cpu, xla_tpu
from phi4_jax.model.backend import Backend


class KVCache(NamedTuple):
    keys: tuple[jax.Array, ...]  # per layer [batch, kv_heads, length, head_dim]
    values: tuple[jax.Array, ...]

    @classmethod
    def create(cls, config: Phi4Config, batch: int, length: int, dtype, sharding=None) -> KVCache:
        """Zeros; `sharding` (one for every layer's keys and values) lays them out on a mesh."""
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype, device=sharding)  # noqa: E731
                              for _ in range(config.num_hidden_layers))
        return cls(zeros(), zeros())

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


def write(cache_layer: jax.Array, new: jax.Array, starts: jax.Array, backend: Backend | None = None) -> jax.Array:
    """Writes `new` `[batch, kv_heads, T, head_dim]` into each row's slots `starts[b] .. + T`.
    `backend` (None: the plain form) picks a compiler's own forms: a one-row cache on XLA:CPU, written
    with a plain update of it (`Backend.one_row_cache`); one token on a TPU (`Backend.pinned_token_writes`)."""
    if _pinned(new, backend):
        new = xla_tpu.as_cache_layout(new)
    if backend is not None and backend.one_row_cache and cache_layer.shape[0] == 1:  # the engine's one-row loop
        return xla_cpu.write_one_row(cache_layer, new, starts[0])

    def one_row(row, piece, start):
        return jax.lax.dynamic_update_slice(row, piece.astype(row.dtype), (0, start, 0))

    return jax.vmap(one_row)(cache_layer, new, starts)


def write_at(cache_layer: jax.Array, new: jax.Array, slots: jax.Array, backend: Backend | None = None) -> jax.Array:
    """Writes `new` `[batch, kv_heads, T, head_dim]` at `slots[b, t]` (any order, as in a zig-zagged
    ring prefill); a slot past the cache's end is dropped. `backend`: as in `write`."""
    if _pinned(new, backend):  # (its scatter of [KV, D] windows would want the cache token-major)
        return xla_tpu.write_token_at(cache_layer, new, slots)
    rows = jnp.arange(new.shape[0])[:, None]
    return cache_layer.at[rows, :, slots].set(new.transpose(0, 2, 1, 3).astype(cache_layer.dtype), mode="drop")


def _pinned(new: jax.Array, backend: Backend | None) -> bool:
    """Whether `new` is one token a row written in the TPU's form (`Backend.pinned_token_writes`)."""
    return backend is not None and backend.pinned_token_writes and new.shape[2] == 1
