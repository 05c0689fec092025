"""JAX's persistent compilation cache in a per-user folder, turned on by `load()` and the command lines.

Unrolled layers make the first compile of a 40-layer model take seconds; the cache makes every
later process start in a fraction of that. `PHI4_JAX_COMPILATION_CACHE=off` turns it off, any
other value names the folder. A folder the user already gave JAX is left alone.
"""

from __future__ import annotations

import os

import jax

ENV = "PHI4_JAX_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no", "")


def default_dir() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "phi4_jax", "xla")


def enable(cache_dir: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir` (default: `$PHI4_JAX_COMPILATION_CACHE`
    or ~/.cache/phi4_jax/xla) and caches every compile, however quick. Returns the folder in
    use, or None when the cache is off."""
    if cache_dir is None:
        if jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir
        cache_dir = os.environ.get(ENV, default_dir())
    if cache_dir.strip().lower() in OFF:
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # The default (1 s) would skip the small compiles that still add up at start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return cache_dir
