"""Joining a multi-host run: one process per host, the same program on each.

JAX's multi-controller runtime: after `initialize`, `jax.devices()` lists every host's devices and
a mesh spans them."""

from __future__ import annotations

import os

import jax

from phi4_jax.errors import ConfigError

# Read when the arguments are not given; JAX itself reads JAX_COORDINATOR_ADDRESS too.
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
    """Calls `jax.distributed.initialize` before anything else touches the devices.

    On TPU pod slices, Slurm and Open MPI every argument may be left out (JAX detects them). Else
    give all three, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID: the
    coordinator is process 0's "host:port", reachable from every host.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for name, var in ENV.items():
        if given[name] is None and os.environ.get(var):
            given[name] = os.environ[var] if name == "coordinator_address" else _int(var, os.environ[var])
    if given["process_id"] is not None and given["num_processes"] is not None and \
            not 0 <= given["process_id"] < given["num_processes"]:
        raise ConfigError(f"process id {given['process_id']} is not in 0..{given['num_processes'] - 1} "
                          f"(--num-processes {given['num_processes']})")
    try:
        jax.distributed.initialize(**given, initialization_timeout=timeout_s)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot join the multi-host run: {e}. Give --coordinator-address HOST:PORT "
                          "(process 0's), --num-processes and --process-id on every host, or run where "
                          "JAX detects them (TPU pod slice, Slurm, Open MPI)") from None


def is_main_process() -> bool:
    """True on the one process that prints (process 0; the only one when not multi-host)."""
    return jax.process_index() == 0


def _int(var: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${var}={value!r} is not an integer") from None
