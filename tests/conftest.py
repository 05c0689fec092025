"""Shared fixtures: simulated devices, the real model files, tiny HF checkpoints written by transformers."""

import contextlib
import fcntl
import os
import shutil
import sys
import sysconfig
import tempfile

# The test command installs without compiling bytecode (`pip install --no-compile`: most of torch's
# and transformers' modules are never imported here); the first process to import a module writes
# its bytecode, for the other workers and the processes tests start, also where the machine sets
# PYTHONDONTWRITEBYTECODE (every process would compile them again).
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Meshes are simulated with 8 CPU devices; this must happen before jax is imported. The tests' programs
# are tiny and many, so compiling them is half the suite's time: XLA:CPU's LLVM backend at -O0 compiles
# them in about half that, to the same HLO. Its arithmetic differs from -O2's by rounding (float32
# logits within 1e-6 of each other, measured; the tests' tolerances are 1e-5 and wider), and most tests
# that start the commands in fresh processes run them as users do, at XLA's default level, against
# tokens and text computed here (BUILD.md, "Tests"). Flags of the user's own are kept beside them.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
# The CPU only, also where libtpu is installed (the test extra has it, to compile for TPU slices):
# JAX would otherwise look for TPU chips first, and libtpu warns on every process start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a lockfile per host so that two processes never drive the same chips; compiling for a
# described slice drives none, and xdist's workers each load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One compilation cache per test run, shared by its xdist workers (they inherit the controller's
# environment) and the processes tests start: the same tiny programs compile in many tests. A fresh
# folder, so no run reads another's; the controller removes it at the end (not a folder the user named).
_MADE_HERE = [name for name in ("PHI4_JAX_COMPILATION_CACHE", "PHI4_JAX_TEST_CHECKPOINTS") if name not in os.environ]
os.environ.setdefault("PHI4_JAX_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), f"phi4_jax-tests-{os.getpid()}"))
# The tiny checkpoints, likewise: each is written once per run, by whichever worker needs it first.
os.environ.setdefault("PHI4_JAX_TEST_CHECKPOINTS",
                      os.path.join(tempfile.gettempdir(), f"phi4_jax-tests-{os.getpid()}-checkpoints"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

from phi4_jax import compilation_cache  # noqa: E402
from tiny_models import TINY_SHAPES, hf_config, make_hf_model  # noqa: E402,F401  (also the tests' imports)

compilation_cache.enable()  # for programs compiled without phi4_jax.load too


def pytest_collection_modifyitems(config, items):
    """The slow tests first: xdist's workers then start on the longest ones and the quick ones fill
    in after them, rather than one long test running alone at the end. (A module's fixtures may
    then be made twice on a worker; what they compile stays in the process's caches.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without workers)
        for shared in _MADE_HERE:
            shutil.rmtree(os.environ[shared], ignore_errors=True)


FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REAL_MODELS = ("phi-4", "phi-4-mini", "phi-3.5-mini")
# Where else the real files may be: the released models' repositories in the local Hugging Face cache.
HUB_REPOS = {"phi-4": "microsoft/phi-4", "phi-4-mini": "microsoft/Phi-4-mini-instruct",
             "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct"}
# The files the tests read of each model (no weights); Phi-3.5-mini's SentencePiece model too.
REAL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json")
EXTRA_FILES = {"phi-3.5-mini": ("tokenizer.model",)}
MISSING_FIXTURES = "the real models' files are missing"  # how such a skip's reason begins


def real_model_folders() -> tuple[dict[str, pathlib.Path], list[str]]:
    """Each real model's folder of config, tokenizer and index files: `../shared/fixtures/NAME`, else
    its repository's snapshot in the local HF cache (nothing is downloaded). Returns (found, where
    each missing one was looked for)."""
    found, looked = {}, []
    for name in REAL_MODELS:
        candidates = [FIXTURES / name]
        try:
            from huggingface_hub import snapshot_download

            candidates.append(pathlib.Path(snapshot_download(HUB_REPOS[name], local_files_only=True)))
        except Exception:  # noqa: BLE001  (not in the cache, or no usable cache: nothing to find there)
            pass
        needed = REAL_FILES + EXTRA_FILES.get(name, ())
        folder = next((c for c in candidates if all((c / f).is_file() for f in needed)), None)
        if folder is None:
            looked.append(f"{name} ({FIXTURES / name}, {HUB_REPOS[name]} in the HF cache)")
        else:
            found[name] = folder
    return found, looked


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    """A folder with one sub-folder per real model (`phi-4`, `phi-4-mini`, `phi-3.5-mini`) holding its
    config, tokenizer and index files (no weights), found by `real_model_folders`. Where some are
    missing the test is skipped with `MISSING_FIXTURES`, and fails under CI=true: CI never passes
    without them."""
    found, looked = real_model_folders()
    if looked:
        reason = f"{MISSING_FIXTURES}: {'; '.join(looked)}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason} (CI=true: a missing fixture fails)", pytrace=False)
        pytest.skip(reason)
    if all(folder == FIXTURES / name for name, folder in found.items()):
        return FIXTURES
    folder = tmp_path_factory.mktemp("real-models")
    for name, source in found.items():
        (folder / name).symlink_to(source, target_is_directory=True)
    return folder


def pytest_terminal_summary(terminalreporter):
    """One line naming how many tests skipped for want of the real models' files, and why."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if MISSING_FIXTURES in str(getattr(r, "longrepr", ""))]
    if skipped:
        reason = str(skipped[0].longrepr[-1]) if isinstance(skipped[0].longrepr, tuple) else str(skipped[0].longrepr)
        terminalreporter.write_line(f"{len(skipped)} tests skipped because {reason.removeprefix('Skipped: ')}; "
                                    "under CI=true they fail", yellow=True, bold=True)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """Holds an exclusive lock on `path` (created): one xdist worker at a time passes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def written_once(name: str, write) -> pathlib.Path:
    """The shared folder `name` of this test run, which `write(folder)` fills: the first worker to ask
    writes it (elsewhere, renamed when complete), the others wait for it and read it."""
    root = pathlib.Path(os.environ["PHI4_JAX_TEST_CHECKPOINTS"])
    folder = root / name
    with _locked(root / "locks" / name):
        if not folder.is_dir():
            partial = root / "partial" / name
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            write(partial)
            partial.rename(folder)
    return folder


def shared_checkpoint(shape: str) -> pathlib.Path:
    """The folder `save_pretrained` wrote for `make_hf_model(shape)`, written once per test run
    (`written_once`). Shared and read only: a test that changes files works on a copy."""
    return written_once(f"tiny-{shape}", lambda folder: make_hf_model(shape).save_pretrained(folder))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """`tiny_checkpoint(shape)` -> (the shared folder of `shared_checkpoint`, transformers' model of
    it: float32, eager attention), each read once per worker."""
    made = {}

    def get(shape: str):
        if shape not in made:
            import torch
            from transformers import Phi3ForCausalLM

            folder = shared_checkpoint(shape)
            made[shape] = (folder, Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                                   dtype=torch.float32).eval())
        return made[shape]

    return get


CHAT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "generation_config.json")


@pytest.fixture(scope="session")
def chat_checkpoint(fixtures_dir):
    """A tiny phi-4-shaped model (40 query / 10 KV heads, so meshes repeat its KV heads) with
    Phi-3.5-mini's real vocabulary of 32064, tokenizer and chat template: an HF folder written once
    per test run (`written_once`), for the tests that need text in and out."""
    def write(folder):
        import torch
        from transformers import Phi3ForCausalLM

        config = hf_config("phi-4", vocab_size=32064, eos_token_id=32000, pad_token_id=32000,
                           max_position_embeddings=256, original_max_position_embeddings=256)
        torch.manual_seed(0)
        Phi3ForCausalLM(config).save_pretrained(folder)
        for name in CHAT_TOKENIZER_FILES:
            shutil.copyfile(fixtures_dir / "phi-3.5-mini" / name, folder / name)

    return written_once("chat", write)


@pytest.fixture(scope="session")
def chat_model(chat_checkpoint):
    """(folder, model, tokenizer) of `chat_checkpoint`, loaded once per worker (float32, one device)."""
    import phi4_jax

    model, tokenizer = phi4_jax.load(chat_checkpoint, dtype="float32", progress=False)
    return chat_checkpoint, model, tokenizer


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """`tiny_model(shape)` -> (phi4_jax's model of the shared tiny checkpoint, float32, one device;
    transformers' model of it), loaded once per worker: tests only read it."""
    made = {}

    def get(shape: str):
        if shape not in made:
            import phi4_jax

            folder, hf = tiny_checkpoint(shape)
            made[shape] = (phi4_jax.load(folder, dtype="float32", progress=False)[0], hf)
        return made[shape]

    return get


def greedy_run(engine, prompts, max_tokens=24, steps_per_call=8):
    """Greedy generation of a batch through `ModelRunner.start` / `advance`: (tokens per row, Generation)."""
    from phi4_jax.engine.sampling import SamplingParams

    gen = engine.start(prompts, SamplingParams(max_tokens=max_tokens), [[] for _ in prompts])
    out = [[] for _ in prompts]
    while not gen.finished:
        for row, new in zip(out, gen.advance(steps_per_call)):
            row += new
    return out, gen


PHI4_JAX = os.path.join(sysconfig.get_path("scripts"), "phi4-jax")  # the installed console script


def user_environment(**changes) -> dict:
    """The environment a user runs the commands in: none of this run's JAX settings (XLA's default
    compile, libtpu's own lock, JAX choosing the platform), with `changes`. Where an NVIDIA GPU is
    the platform stays the CPU, so that tokens compare with this process's."""
    import glob

    dropped = {"XLA_FLAGS", "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    if not glob.glob("/dev/nvidia[0-9]*"):
        dropped.add("JAX_PLATFORMS")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, **changes}


@contextlib.contextmanager
def serving(model, tokenizer, timeout: float = 120, warm_up=None, max_context=None, default_max_tokens=256,
            speculative=None, **engine_options):
    """(port, Served) of `model` behind the OpenAI API in this process, as `phi4-jax serve` serves
    it (`engine_options`: the Engine's, such as max_batch; `speculative`: the runner's): an AsyncEngine
    started with `warm_up` (default none), uvicorn on a free loopback port (`listening`); stopped on exit."""
    from phi4_jax.engine.async_engine import AsyncEngine
    from phi4_jax.engine.engine import Engine
    from phi4_jax.engine.runner import ModelRunner
    from phi4_jax.server.app import Served

    runner = ModelRunner(model, max_context=max_context, speculative=speculative)
    engine = AsyncEngine(Engine(runner, tokenizer, **engine_options), heartbeat=0.5)
    engine.start(warm_up)
    served = Served(name="demo", tokenizer=tokenizer, engine=engine, max_context=runner.max_context,
                    default_max_tokens=default_max_tokens)
    try:
        with listening(served, timeout) as port:
            yield port, served
    finally:
        engine.shutdown(timeout)


@contextlib.contextmanager
def listening(served, timeout: float = 120):
    """uvicorn serving `served` (`phi4_jax.server.app.Served`) on a free loopback port, in a thread of
    this process: yields the port; stopped on exit."""
    import socket
    import threading
    import time

    import uvicorn

    from phi4_jax.server.app import build_app

    listener = socket.socket()  # bound here and handed over, so no other process takes the port between
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    http_server = uvicorn.Server(uvicorn.Config(build_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http_server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not http_server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert http_server.started, "the in-process server did not start"
    try:
        yield port
    finally:
        http_server.should_exit = True
        thread.join(timeout)
        listener.close()
