"""Rooflines measured on this device: the rate at which it reads memory and its matmul peak.

What a step of the model must do (bytes a decode step reads, FLOPs a prefill computes) is counted
by `phi4_jax.planner.roofline`; utilisation is that work / time / the peak measured here.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


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
    for kind, rate, method in (("read", "read_bytes_per_s", "read_method"),
                               ("matmul", "matmul_flop_per_s", "matmul_size")):
        if f"{kind}_rates" in combined:
            rates = {m: statistics.median(r[f"{kind}_rates"][m] for r in readings) for m in combined[f"{kind}_rates"]}
            best = max(rates, key=rates.get)
            combined.update({rate: rates[best], method: best if kind == "read" else int(best),
                             f"{kind}_rates": rates, f"{kind}_readings": len(readings)})
    return combined
