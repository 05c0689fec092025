"""The persistent compilation cache: importing phi4_jax changes no JAX setting; `load()` turns the
cache on, in the user's cache folder by default, or the folder from the environment, or off; a
request's compile statistics count a load from it once."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, time
import jax, jax.numpy as jnp, phi4_jax
print(jax.config.jax_compilation_cache_dir)  # after the import
model, tokenizer = phi4_jax.load("demo", progress=False)
print(jax.config.jax_compilation_cache_dir)  # after load()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
start = time.perf_counter()
last = list(phi4_jax.stream_generate(model, tokenizer, "1+2", max_tokens=2))[-1]
print(json.dumps({"wall": time.perf_counter() - start, "compile": last.compile_seconds,
                  "cached": last.compile_cache_seconds, "prompt_tps": last.prompt_tps}))
"""


def run(env_value, home):
    """A fresh process's JAX cache folder after `import phi4_jax` and after `load()`, and the compile
    statistics of its first request."""
    env = {k: v for k, v in os.environ.items() if k not in ("PHI4_JAX_COMPILATION_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), XLA_FLAGS="")
    if env_value is not None:
        env["PHI4_JAX_COMPILATION_CACHE"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    imported, loaded, request = out.stdout.strip().splitlines()[-3:]
    return imported, loaded, json.loads(request)


@pytest.mark.slow  # a fresh process
def test_import_changes_nothing_and_load_turns_the_cache_on_in_the_user_cache_folder(tmp_path):
    assert run(None, tmp_path)[:2] == ("None", str(tmp_path / ".cache" / "phi4_jax" / "xla"))
    assert any((tmp_path / ".cache" / "phi4_jax" / "xla").iterdir())


@pytest.mark.slow  # three fresh processes
def test_cache_folder_from_environment_off_switch_and_a_warm_request_counting_its_loads_once(tmp_path):
    """The folder the environment names, then `off`; a second process on that folder is warm, and
    JAX's backend-compile event of a cache hit holds the load: counted twice, a warm request's
    compile time outgrew its wall time and its prefill rate came out as 1e9 tokens/s."""
    folder = tmp_path / "cache"
    imported, loaded, cold = run(str(folder), tmp_path)
    assert (imported, loaded) == ("None", str(folder))
    assert any(folder.iterdir())
    assert run("off", tmp_path)[:2] == ("None", "None")
    assert not (tmp_path / ".cache").exists()
    warm = run(str(folder), tmp_path)[2]
    assert cold["cached"] == 0 and 0 < cold["compile"] <= cold["wall"]
    assert 0 < warm["cached"] <= warm["compile"] <= warm["wall"]
    assert warm["prompt_tps"] < 1e6  # 3 tokens: a clamped (near-zero) prefill time gives 3e9
