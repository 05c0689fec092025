"""Benchmark records: where a measurement was taken (versions, device, machine, commit), and writing them."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess


def describe_run() -> dict:
    """A flat dict to merge into every benchmark record."""
    import jax
    import jaxlib

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "git_commit": commit}


def write_record(path: str, record: dict) -> None:
    """Writes one benchmark record as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def append_record(path: str, record: dict) -> None:
    """Appends one benchmark record as a line of a JSON-lines file, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
