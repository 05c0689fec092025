"""The backend a program is traced for, which chooses the forms of a few products.

XLA:CPU runs some products much faster written another way than the plain forms GPUs and TPUs
share (`model/xla_cpu.py`); XLA's GPU compiler wants the decode step's attention product written
its own way (`model/xla_gpu.py`), and its TPU compiler a one-token lookup (`model/xla_tpu.py`).
Which forms a program uses is this static, hashable value: the model carries it (so it is in the
graph definition, and with it in every jit cache key), built from the platform its arrays live
on, or given explicitly when compiling for another target (the memory planner).
"""

from __future__ import annotations

import dataclasses

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Backend:
    """The platform a program is traced for: "cpu", "gpu" or "tpu"."""

    platform: str

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform {self.platform!r} is not one of {', '.join(PLATFORMS)}")

    @classmethod
    def of(cls, devices=None) -> Backend:
        """The backend of these devices (default: JAX's default devices)."""
        devices = jax.devices() if devices is None else list(devices)
        return cls(devices[0].platform)

    # XLA:CPU's own forms; every accelerator program uses the plain ones.
    @property
    def weight_first_rows(self) -> int:
        """Products of 2 to this many rows put the weight first (`phi4.project`, `xla_cpu.weight_first`;
        0: never)."""
        return 64 if self.platform == "cpu" else 0

    @property
    def heads_as_rows(self) -> bool:
        """Attention products take each KV head's queries as the rows of plain batched matmuls
        (`xla_cpu.scores`, `xla_cpu.weighted_values`), rather than the grouped 5-D forms."""
        return self.platform == "cpu"

    @property
    def one_row_cache(self) -> bool:
        """A one-row decode carries its cache layers without their batch axis, and writes them with
        a plain update (`cache.write`, `xla_cpu.write_one_row`; the engine's decode loop)."""
        return self.platform == "cpu"

    @property
    def chunked_dequantize(self) -> bool:
        """int8 products convert their weight a block of output rows at a time (`int8.product`,
        `xla_cpu.chunked_product`): XLA:CPU writes a converted operand to memory before its matmul;
        accelerators fuse it."""
        return self.platform == "cpu"

    @property
    def speculative_rows(self) -> int:
        """Speculative decoding verifies drafts in batches of at most this many rows (`ModelRunner`'s
        default): a step of r rows verifying k drafts each is a product of r x (k + 1) rows, which
        XLA:CPU runs compute-bound from about 10 (at 4 rows of 5 it cost more than it gave, measured
        on SmolLM2); an accelerator's decode step stays bound by memory to hundreds of rows (H100,
        bfloat16: about 300), so speculating there is limited by nothing here."""
        return 2 if self.platform == "cpu" else 1 << 30

    # XLA's TPU compiler's own forms.
    @property
    def pinned_token_writes(self) -> bool:
        """A decode step's new keys/values are pinned to the cache's layout before their write
        (`xla_tpu.as_cache_layout`, in `cache.write`/`write_at`): left free, XLA's TPU compiler lays
        the decode loop's cache out token-major for that write, relaying every layer at each call."""
        return self.platform == "tpu"

    @property
    def two_row_lookup(self) -> bool:
        """A lookup of one id gathers a second row and drops it (`xla_tpu.rows`): XLA's TPU compiler
        relays an int8 table out of its tiling for a one-row gather."""
        return self.platform == "tpu"


ACCELERATOR = Backend("gpu")  # the plain forms (GPU and TPU programs are traced alike)
