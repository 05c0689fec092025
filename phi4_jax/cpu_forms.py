"""Whether to trace the forms XLA:CPU runs much faster than the plain ones: a few products written
another way for that compiler alone (`model.project`, `attention`'s products for one query).

On by default on a CPU backend; `accelerator_forms()` turns them off for what is traced inside it,
so the memory planner, which compiles on CPU devices, compiles the program a GPU or TPU would run.
"""

from __future__ import annotations

import contextlib

import jax

_planning = False


def enabled() -> bool:
    """True when tracing for XLA:CPU itself (a CPU backend, outside `accelerator_forms`)."""
    return not _planning and jax.default_backend() == "cpu"


@contextlib.contextmanager
def accelerator_forms():
    """Within it, trace the plain forms every backend shares. Only what is traced inside counts:
    a jitted function traced before with the same arguments keeps its earlier trace."""
    global _planning
    saved, _planning = _planning, True
    try:
        yield
    finally:
        _planning = saved
