"""The persistent compilation cache: importing phi4_jax changes no JAX setting; `load()` turns the
cache on, in the user's cache folder by default, or the folder from the environment, or off."""

import os
import subprocess
import sys

SCRIPT = """
import jax, jax.numpy as jnp, phi4_jax
print(jax.config.jax_compilation_cache_dir)  # after the import
phi4_jax.load("demo", progress=False)
print(jax.config.jax_compilation_cache_dir)  # after load()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
"""


def run(env_value, home) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PHI4_JAX_COMPILATION_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), XLA_FLAGS="")
    if env_value is not None:
        env["PHI4_JAX_COMPILATION_CACHE"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    imported, loaded = out.stdout.strip().splitlines()[-2:]
    return imported, loaded


def test_import_changes_nothing_and_load_turns_the_cache_on_in_the_user_cache_folder(tmp_path):
    assert run(None, tmp_path) == ("None", str(tmp_path / ".cache" / "phi4_jax" / "xla"))
    assert any((tmp_path / ".cache" / "phi4_jax" / "xla").iterdir())


def test_cache_folder_from_environment_and_off_switch(tmp_path):
    folder = tmp_path / "cache"
    assert run(str(folder), tmp_path) == ("None", str(folder))
    assert any(folder.iterdir())
    assert run("off", tmp_path) == ("None", "None")
    assert not (tmp_path / ".cache").exists()
