"""The package people install: the wheel built from this tree, in a fresh virtualenv outside the
checkout with nothing but the wheel and its tpu extra, runs the installed `phi4-jax` commands quietly."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from conftest import user_environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What libtpu prints when it starts on a machine without a TPU, and what a library prints when we use
# a deprecated spelling of it: never on a command's stderr where nothing is wrong.
NOISE = re.compile(r"host bounds|worker hostname|Source Location|InitGoogle|libtpu|[Dd]eprecat|Traceback|Warning")


def step(command: list) -> None:
    """A set-up command that must succeed; its output is shown where it does not."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command[:3]}... failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def run(command: list, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert not NOISE.search(done.stderr), done.stderr
    return done


@pytest.mark.slow
def test_the_wheel_in_a_fresh_virtualenv_runs_every_command(tmp_path):
    """Build the wheel, install it with its tpu extra (pinned as CI pins everything) into a new
    virtualenv, then from a folder outside the checkout: generate with the demo model, convert to
    Orbax and export back bit for bit, plan for fake GPUs and for a TPU slice, and `serve` without its
    extra (exit 2, naming the install command). No stderr holds libtpu's start-up errors or a
    deprecation warning; none of it imports the checkout."""
    # The source without what a checkout gathers (.gitignore's entries), built apart, so that nothing a
    # build leaves in the checkout goes into the wheel or stays behind.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"))
    step([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source])
    (wheel,) = (tmp_path / "dist").glob("phi4_jax-*.whl")
    venv = tmp_path / "venv"
    step([sys.executable, "-m", "venv", venv])
    # Its dependencies come from pip's index (and cache), pinned as CI pins them.
    step([venv / "bin" / "pip", "install", "-q", "-c", ROOT / ".ci" / "constraints.txt", f"{wheel}[tpu]"])
    work = tmp_path / "work"
    work.mkdir()
    # The user's environment: none of the test run's JAX settings, no checkout on the path.
    env = user_environment(PHI4_JAX_COMPILATION_CACHE=str(tmp_path / "xla"))
    env.pop("PYTHONPATH", None)
    phi4_jax = venv / "bin" / "phi4-jax"

    where = run([venv / "bin" / "python", "-c", "import phi4_jax; print(phi4_jax.__file__)"], work, env)
    assert where.stdout.startswith(str(venv)) and (pathlib.Path(where.stdout.strip()).parent / "py.typed").exists()

    answer = run([phi4_jax, "generate", "--prompt", "What is 482+37?", "--json", "--quiet"], work, env)
    assert answer.returncode == 0 and json.loads(answer.stdout)["text"] == "519" and answer.stderr == ""

    converted = run([phi4_jax, "convert", "--model", "demo", "--output", "orbax", "--quiet"], work, env)
    assert converted.returncode == 0 and converted.stderr == f"wrote {work / 'orbax'} (26 tensors, float32)\n"
    exported = run([phi4_jax, "export", "--model", "orbax", "--output", "hf", "--quiet"], work, env)
    assert exported.returncode == 0 and exported.stderr == f"wrote {work / 'hf'}\n"
    shipped = load_file(ROOT / "phi4_jax" / "demo_model" / "model.safetensors")
    back = load_file(work / "hf" / "model.safetensors")
    assert shipped.keys() == back.keys() and all((shipped[k] == back[k]).all() for k in shipped)

    gpu = run([phi4_jax, "plan", "--model", "tiny", "--mesh", "tensor=2", "--context", "256", "--dtype", "float32",
               "--json"], work, env)  # (float32: one compile a step, where bfloat16 adds a float32 bound)
    (record,) = json.loads(gpu.stdout)
    assert gpu.returncode == 0 and record["devices"] == 2 and record["per_device"]["needed_bytes"] > 0
    tpu = run([phi4_jax, "plan", "--model", "tiny", "--target", "v5e:2x2", "--mesh", "tensor=4", "--context", "256"],
              work, env)
    assert tpu.returncode == 0 and "decode on one TPU v5e:" in tpu.stdout, tpu.stdout

    serve = run([venv / "bin" / "python", "-m", "phi4_jax.serve"], work, env)
    assert serve.returncode == 2
    assert serve.stderr.startswith("error: phi4-jax serve needs ") and "pip install 'phi4-jax[serve]'" in serve.stderr
