"""Accelerators to compile for without one: TPU slices and NVIDIA GPUs, with each chip's published limits.

A target names a chip and how many: a TPU slice by libtpu's topology name (`v5e:2x4`, from the
`tpu` extra), NVIDIA GPUs as `h100:8` or `h200:8` (the `gpu-compile` extra: the CUDA plugin and
ptxas, no GPU or driver). `devices(target)` gives JAX devices that `jax.jit(...).lower(...)` over a
mesh of them then `.compile()` compiles the real program for, with its memory analysis and HLO.
On a machine without the accelerator the process must run JAX on the CPU platform (`phi4-jax plan`
does; elsewhere set JAX_PLATFORMS=cpu, or the CUDA plugin looks for a driver and stops).
"""

from __future__ import annotations

import dataclasses
import re

from phi4_jax.errors import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator as its maker documents it (dense bf16 peak, memory capacity and bandwidth)."""

    name: str
    bf16_flop_per_s: float
    hbm_bytes: int
    hbm_bytes_per_s: float
    source: str


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GIB, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    # SXM parts; dense (not 2:4 sparse) bf16 Tensor Core peak.
    "h100": Chip("NVIDIA H100 80GB HBM3", 989e12, 80 * 10**9, 3.35e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    "h200": Chip("NVIDIA H200 141GB HBM3e", 989e12, 141 * 10**9, 4.8e12,
                 "https://www.nvidia.com/en-us/data-center/h200/"),
}
TPU_EXAMPLES = "v5e:2x2, v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1"
EXAMPLES = f"{TPU_EXAMPLES}, h100:8, h200:8"
_TPU = re.compile(r"^(v5e|v6e|v5p|v4):\d+(x\d+){1,2}$")
_GPU = re.compile(r"^(h100|h200):(\d+)$")


def is_target(name: str) -> bool:
    """Whether `name` spells an accelerator target (`v5e:2x4`, `h200:8`), not a platform name."""
    return bool(_TPU.match(name) or _GPU.match(name))


def chip(target: str) -> Chip:
    """The chip of a target name (`v6e:2x4` -> TPU v6e, `h200:8` -> H200)."""
    if not is_target(target):
        raise ConfigError(f"{target!r} is not an accelerator target: give the chip and the slice's shape or "
                          f"the GPU count, e.g. {EXAMPLES}")
    return CHIPS[target.split(":")[0]]


def devices(target: str) -> list:
    """The devices of a target, to build a mesh from and compile for; no accelerator needed.

    Raises ConfigError when the compiler is missing (the `tpu` or `gpu-compile` extra) or the name
    is not a slice libtpu knows (a slice fills at least one host: `v5e:1x1` is refused,
    `v5e:2x2` is one host's 4 chips)."""
    chip(target)
    from jax.experimental import topologies

    gpu = _GPU.match(target)
    try:
        if gpu:
            return list(topologies.get_topology_desc(platform="cuda", target_config=_gpu_target_config(gpu.group(1)),
                                                     topology=f"1x1x{gpu.group(2)}").devices)
        return list(topologies.get_topology_desc(topology_name=target, platform="tpu").devices)
    except Exception as e:  # the plugins raise plain RuntimeErrors/XlaRuntimeErrors with their own text
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if gpu:
            raise ConfigError(f"compiling for {target} needs the CUDA plugin and ptxas: pip install "
                              f"'phi4-jax[gpu-compile]' (and JAX_PLATFORMS=cpu where the process started JAX "
                              f"itself, on a machine without GPUs); JAX said: {text}") from e
        lower = text.lower()
        if "libtpu" in lower or "unknown backend" in lower or "not installed" in lower or lower.strip() == "tpu":
            raise ConfigError(f"compiling for {target} needs libtpu: pip install 'phi4-jax[tpu]'; JAX said: "
                              f"{text}") from e
        raise ConfigError(f"libtpu does not know the TPU slice {target!r} ({text}); slices fill a host, "
                          f"e.g. {TPU_EXAMPLES}") from e


def devices_per_chip(devs: list) -> int:
    """JAX devices per chip (1 on GPUs, v5e, v6e and megacore v5p; v4 may show each core)."""
    if devs[0].platform != "tpu":
        return 1
    return max(1, len(devs) // len({tuple(d.coords) for d in devs}))


# The CUDA device properties XLA's GPU compiler reads (GpuTargetConfigProto, text format), from the
# chips' specifications: 132 SMs of compute capability 9.0 (sm_90a), 228 KiB of shared memory per
# SM, 50 MiB of L2. XLA tunes its kernels by them; no GPU is queried.
_HOPPER = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
           "shared_memory_per_core": 233472, "threads_per_core_limit": 2048, "core_count": 132,
           "fpus_per_core": 128, "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535,
           "block_dim_limit_z": 65535, "l2_cache_size": 52428800, "clock_rate_ghz": 1.98,
           "shared_memory_per_block_optin": 232448, "registers_per_core_limit": 65536,
           "registers_per_block_limit": 65536}


def _gpu_target_config(name: str) -> str:
    c = CHIPS[name]
    fields = {**_HOPPER, "memory_bandwidth": int(c.hbm_bytes_per_s), "device_memory_size": c.hbm_bytes}
    lines = [f"  {k}: {v}" for k, v in fields.items()]
    lines.append("  cuda_compute_capability { major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }")
    return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n"
            f'platform_name: "CUDA"\ndevice_description_str: "{c.name}"\n'
            "dnn_version_info { major: 9 minor: 8 }\nruntime_version { major: 12 minor: 8 }\n")
