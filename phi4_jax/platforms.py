"""Which JAX platform a process starts: the CPU where libtpu is installed but no TPU chip is.

The `tpu` extra installs libtpu so that TPU slices can be planned from any machine. JAX then tries
libtpu's runtime on its first device call, also where no TPU is, and libtpu prints its start-up
errors ("Failed to find host bounds", "unexpected worker hostname", a source-location trace) on
every command. `quiet_without_tpu` stops that, and changes nothing where JAX_PLATFORMS is set,
where JAX found TPU chips itself (it then asked for 'tpu,cpu' at import), or where a GPU's device
files exist (JAX picks the GPU there).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax


def quiet_without_tpu() -> bool:
    """Starts the CPU platform where libtpu is installed and no TPU chip is present; call it before
    the first device call (later, JAX keeps the platforms it started). Returns whether it did."""
    if jax.config.jax_platforms is not None:  # JAX_PLATFORMS was given, or JAX saw TPU chips on PCI
        return False
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        return False  # no libtpu: nothing to quiet, and JAX's own hints stay
    # TPU device nodes (v2-v4: /dev/accel*, v5e and later: /dev/vfio) where sysfs hid the chips, or a GPU.
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"):
        return False
    jax.config.update("jax_platforms", "cpu")
    # libtpu still starts to describe a slice for planning (`planner.targets`); these are the values it
    # would otherwise ask a TPU VM's metadata server for, and warn without. They change no topology.
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return True
