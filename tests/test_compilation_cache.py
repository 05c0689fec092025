"""The persistent compilation cache: on by default, folder from the environment, switchable off."""

import os
import subprocess
import sys

SCRIPT = """
import jax, jax.numpy as jnp, phi4_jax
print(jax.config.jax_compilation_cache_dir)
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
"""


def run(env_value, home):
    env = {k: v for k, v in os.environ.items() if k not in ("PHI4_JAX_COMPILATION_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), XLA_FLAGS="")
    if env_value is not None:
        env["PHI4_JAX_COMPILATION_CACHE"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_cache_is_on_by_default_in_the_user_cache_folder(tmp_path):
    assert run(None, tmp_path) == str(tmp_path / ".cache" / "phi4_jax" / "xla")
    assert any((tmp_path / ".cache" / "phi4_jax" / "xla").iterdir())


def test_cache_folder_from_environment_and_off_switch(tmp_path):
    folder = tmp_path / "cache"
    assert run(str(folder), tmp_path) == str(folder)
    assert any(folder.iterdir())
    assert run("off", tmp_path) == "None"
    assert not (tmp_path / ".cache").exists()
