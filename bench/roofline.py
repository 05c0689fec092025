"""Rooflines: what the device can do (measured read bandwidth and matmul peak), and what a step of
the model must do (bytes a decode step reads, FLOPs a prefill computes).

Utilisation is then work / time / peak: model-bandwidth utilisation (MBU) for decode, which is
bound by reading the weights and the KV cache once per step, and model-FLOP utilisation (MFU)
for prefill, which is bound by its matmuls.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.config import Phi4Config


def _best_seconds(run, repeats: int) -> float:
    run()  # compile, fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


class ReadBandwidth:
    """Measures the bytes/s at which the default device reads a float32 buffer of `nbytes` (default
    1 GiB on a CPU, far beyond its caches; 4 GiB on accelerators), as often as asked. Three readers,
    each on every core: a jitted sum, a jitted matrix-vector product (what decode does), and, on a
    CPU, NumPy sums of the same buffer on one thread per core. `read_bytes_per_s` is the fastest of
    them: the strictest denominator.

    The buffer is held until `close()`: freed and allocated again between a benchmark's timed runs,
    it slowed the decode runs that followed it by about 8% on XLA:CPU.
    """

    def __init__(self, nbytes: int | None = None):
        on_cpu = jax.default_backend() == "cpu"
        nbytes = nbytes or (2**30 if on_cpu else 2**32)
        # Long rows: XLA:CPU's matrix-vector product read 16384-wide rows faster than 4096-wide ones.
        self._matrix = jnp.ones((nbytes // 4 // 16384, 16384), jnp.float32)
        self._vector = jnp.ones((16384,), jnp.float32)
        self._sum, self._gemv = jax.jit(jnp.sum), jax.jit(jnp.matmul)
        # On a CPU the device buffer is host memory: NumPy reads the same bytes.
        self._parts = np.array_split(np.asarray(self._matrix).reshape(-1), os.cpu_count() or 1) if on_cpu else None

    def measure(self, repeats: int = 5) -> dict:
        size = self._matrix.nbytes
        rates = {"jitted_sum": size / _best_seconds(lambda: self._sum(self._matrix).block_until_ready(), repeats),
                 "jitted_matvec": size / _best_seconds(
                     lambda: self._gemv(self._matrix, self._vector).block_until_ready(), repeats)}
        if self._parts is not None:
            def threaded_sum():  # NumPy releases the GIL inside the reduction
                threads = [threading.Thread(target=np.sum, args=(p,)) for p in self._parts]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

            rates[f"numpy_sum_{len(self._parts)}_threads"] = size / _best_seconds(threaded_sum, repeats)
        best = max(rates, key=rates.get)
        return {"read_bytes_per_s": rates[best], "read_method": best, "read_buffer_bytes": size,
                "read_rates": rates}

    def close(self) -> None:
        self._parts = None
        self._matrix.delete()


class MatmulPeak:
    """Measures the FLOP/s of the fastest square matmul (float32 on a CPU, bfloat16 elsewhere,
    unless `dtype`; of `sizes`, by default 1024-4096 on a CPU, 4096-16384 elsewhere) as often as
    asked; holds its operands until `close()` (see `ReadBandwidth`)."""

    def __init__(self, dtype=None, sizes: tuple[int, ...] | None = None):
        on_cpu = jax.default_backend() == "cpu"
        self.dtype = jnp.dtype(dtype or (jnp.float32 if on_cpu else jnp.bfloat16))
        sizes = sizes or ((1024, 2048, 4096) if on_cpu else (4096, 8192, 16384))
        self._operands = {n: jnp.ones((n, n), self.dtype) for n in sizes}
        self._matmul = jax.jit(jnp.matmul)

    def measure(self, repeats: int = 5) -> dict:
        rates = {str(n): 2 * n**3 / _best_seconds(lambda a=a: self._matmul(a, a).block_until_ready(), repeats)
                 for n, a in self._operands.items()}
        best = max(rates, key=rates.get)
        return {"matmul_flop_per_s": rates[best], "matmul_dtype": self.dtype.name, "matmul_size": int(best),
                "matmul_rates": rates}

    def close(self) -> None:
        for a in self._operands.values():
            a.delete()
        self._operands = {}


def median_reading(readings: list[dict]) -> dict:
    """Several readings of the rooflines (`ReadBandwidth.measure` and/or `MatmulPeak.measure`
    results, taken at different times) as one of the same form: each method's median rate, and the
    fastest of those. A machine whose speed drifts is best compared with readings taken beside the work."""
    combined = dict(readings[0])
    for kind, rate, method in (("read", "read_bytes_per_s", "read_method"), ("matmul", "matmul_flop_per_s", "matmul_size")):
        if f"{kind}_rates" in combined:
            rates = {m: statistics.median(r[f"{kind}_rates"][m] for r in readings) for m in combined[f"{kind}_rates"]}
            best = max(rates, key=rates.get)
            combined.update({rate: rates[best], method: best if kind == "read" else int(best),
                             f"{kind}_rates": rates, f"{kind}_readings": len(readings)})
    return combined


def decode_step_bytes(config: Phi4Config, batch: int, context: float, weight_bytes: int,
                      cache_bytes: int | None = None) -> float:
    """Bytes one decode step must move: every weight once (the input embedding one row per
    sequence; the head, or the tied table, whole), each sequence's `context` cached keys and
    values read (no more than its sliding window) and its new ones written."""
    e = config.hidden_size
    if config.window is not None:
        context = min(context, config.window - 1)
    # Every parameter, but of an untied input table only the rows looked up.
    weights = config.num_parameters - (0 if config.tie_word_embeddings else (config.vocab_size - batch) * e)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return weights * weight_bytes + batch * (context + 1) * kv_per_token * (cache_bytes or weight_bytes)


def prefill_flops(config: Phi4Config, batch: int, length: int) -> float:
    """Matmul FLOPs of prefilling `batch` prompts of `length` tokens from position 0 (causal
    attention counts only the scores it keeps; logits only at each row's last token)."""
    e, n, d = config.hidden_size, config.num_attention_heads, config.head_dim
    projections = 2 * (config.layer_parameters - 2 * e)  # the norms are no matmul
    pairs = length * (length + 1) / 2  # (query, key) pairs a causal prompt scores
    if config.window is not None and config.window < length:
        w = config.window
        pairs = w * (w + 1) / 2 + (length - w) * w
    attention = 2 * 2 * n * d * pairs  # scores and the weighted sum of values
    per_row = config.num_hidden_layers * (projections * length + attention) + 2 * e * config.vocab_size
    return batch * per_row


def decode_step_flops(config: Phi4Config, batch: int, context: float) -> float:
    """Matmul FLOPs of one decode step of `batch` rows, each with `context` cached tokens (no more
    than its sliding window) plus the new one: the projections, the scores and weighted values,
    and the logits."""
    e, n, d = config.hidden_size, config.num_attention_heads, config.head_dim
    keys = context + 1 if config.window is None else min(context + 1, config.window)
    projections = 2 * (config.layer_parameters - 2 * e)
    per_row = config.num_hidden_layers * (projections + 2 * 2 * n * d * keys) + 2 * e * config.vocab_size
    return batch * per_row
