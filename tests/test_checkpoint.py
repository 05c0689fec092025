"""The converters for real, on disk: HF -> Orbax -> HF is bit-exact, the output folder describes
itself, dry runs write nothing, failures and kills leave no partial output (or the previous one
intact), corrupt inputs get the documented exit codes, and repo ids resolve through the HF cache."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import TINY_SHAPES

import phi4_jax
from phi4_jax.checkpoints import convert, orbax
from phi4_jax.checkpoints.hub import ModelSource
from phi4_jax.cli import common as cli
from phi4_jax.cli.main import build_parser
from phi4_jax.cli.main import main as phi4_jax_main
from phi4_jax.errors import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[1]
UNTIED, TIED = "phi-4", "phi-4-mini"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NORM = "model.norm.weight"
SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def to_orbax(source, output, *flags):
    """`phi4-jax convert`, as the console script runs it."""
    return phi4_jax_main(["convert", "--model", str(source), "--output", str(output), "--quiet", *flags])


def to_hf(source, output, *flags):
    """`phi4-jax export`, as the console script runs it."""
    return phi4_jax_main(["export", "--model", str(source), "--output", str(output), "--quiet", *flags])


def plan_for(folder, dtype="auto"):
    return convert.plan_conversion(ModelSource(folder=str(folder)), dtype)


def leftovers(output) -> list[str]:
    """Hidden siblings a conversion into `output` writes while it runs (`.NAME.tmp-PID`, `.NAME.old-PID`)."""
    output = pathlib.Path(output)
    if not output.parent.is_dir():
        return []
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def snapshot(folder) -> dict:
    """Every file under `folder`, by relative path, with its bytes."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hf_tensors_of(folder) -> dict:
    """All tensors of an HF folder (single file or shards), by name."""
    folder = pathlib.Path(folder)
    files = ([folder / s for s in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))]
             if (folder / INDEX).exists() else [folder / WEIGHTS])
    tensors = {}
    for path in files:
        loaded = load_file(path)
        assert not set(loaded) & set(tensors)
        tensors.update(loaded)
    return tensors


def params_of(folder, dtype) -> dict:
    """Every leaf of `nnx.state(load(folder))` as a host array, by path."""
    model, _ = phi4_jax.load(folder, dtype=dtype)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    return {".".join(map(str, k)): np.asarray(v) for k, v in flat.items()}


def assert_bit_identical(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def random_ids(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(2, 12))


# --- shared conversions (read only) --------------------------------------------------------------

@pytest.fixture(scope="module")
def orbax_of(tiny_checkpoint, tmp_path_factory):
    """`orbax_of(shape, dtype="auto")` -> the tiny checkpoint converted by the CLI; shared, read only."""
    made = {}

    def get(shape, dtype="auto"):
        if (shape, dtype) not in made:
            output = tmp_path_factory.mktemp(f"orbax-{shape}-{dtype}") / "orbax"
            assert to_orbax(tiny_checkpoint(shape)[0], output, "--dtype", dtype) == cli.EXIT_OK
            made[shape, dtype] = output
        return made[shape, dtype]

    return get


@pytest.fixture(scope="module")
def hf_params(tiny_checkpoint):
    """`hf_params(shape, dtype)` -> `params_of` the HF source folder, cached."""
    made = {}

    def get(shape, dtype):
        if (shape, dtype) not in made:
            made[shape, dtype] = params_of(tiny_checkpoint(shape)[0], dtype)
        return made[shape, dtype]

    return get


@pytest.fixture
def copy_of(tiny_checkpoint, tmp_path):
    """`copy_of(shape)` -> a private copy of the shared tiny checkpoint folder, free to change."""
    def make(shape=UNTIED):
        return shutil.copytree(tiny_checkpoint(shape)[0], tmp_path / "model")
    return make


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """UNTIED saved by transformers in many shards (+ index); shared, so tests copy it."""
    folder = tmp_path_factory.mktemp(f"sharded-{UNTIED}")
    tiny_checkpoint(UNTIED)[1].save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and not (folder / WEIGHTS).exists()
    return folder


def rewrite_tensors(folder, change):
    """Rewrites `folder`/model.safetensors with the tensor dict that `change(tensors)` leaves."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


# --- 1: HF -> Orbax -> HF is bit-exact -----------------------------------------------------------

@pytest.mark.parametrize("shape,shard_flags", [(UNTIED, ["--max-shard-size", "20KB"]), (TIED, [])],
                         ids=["untied-sharded", "tied-single-file"])
def test_round_trip_is_bit_exact(tiny_checkpoint, orbax_of, tmp_path, shape, shard_flags):
    source, hf_model = tiny_checkpoint(shape)
    export = tmp_path / "export"
    assert to_hf(orbax_of(shape), export, *shard_flags) == cli.EXIT_OK

    want = load_file(source / WEIGHTS)
    got = hf_tensors_of(export)
    assert_bit_identical(got, want)
    assert ("lm_head.weight" in got) == (shape == UNTIED)  # tied: the head is the embedding

    if shard_flags:
        index = json.loads((export / INDEX).read_text())
        shards = sorted(p.name for p in export.glob("*.safetensors"))
        assert not (export / WEIGHTS).exists()
        numbers = [SHARD_NAME.match(s).groups() for s in shards]
        assert [int(i) for i, _ in numbers] == list(range(1, len(shards) + 1))
        assert {int(n) for _, n in numbers} == {len(shards)} and len(shards) > 2
        assert set(index["weight_map"]) == set(want)
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())
        for shard in shards:
            with safe_open(export / shard, framework="numpy") as f:
                names = set(f.keys())
                assert names == {n for n, s in index["weight_map"].items() if s == shard}
                assert len(names) == 1 or sum(want[n].nbytes for n in names) <= 20_000, shard
    else:
        assert sorted(p.name for p in export.glob("*.safetensors")) == [WEIGHTS]
        assert not (export / INDEX).exists()

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    ids = torch.from_numpy(random_ids()).long()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


def test_export_in_another_dtype(tiny_checkpoint, orbax_of, tmp_path):
    export = tmp_path / "export"
    assert to_hf(orbax_of(UNTIED), export, "--dtype", "bfloat16") == cli.EXIT_OK
    want = {k: v.astype("bfloat16") for k, v in load_file(tiny_checkpoint(UNTIED)[0] / WEIGHTS).items()}
    assert_bit_identical(hf_tensors_of(export), want)


# --- 2: loading the Orbax folder gives the HF folder's parameters --------------------------------

@pytest.mark.parametrize("shape", [UNTIED, TIED])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_loads_like_the_source(orbax_of, hf_params, shape, dtype):
    got = params_of(orbax_of(shape), dtype)
    assert_bit_identical(got, hf_params(shape, dtype))
    assert {a.dtype.name for a in got.values()} == {dtype}


def test_conversion_to_bfloat16(orbax_of, hf_params):
    folder = orbax_of(UNTIED, "bfloat16")
    manifest = json.loads((folder / orbax.MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16"
    # Stored as bf16: half the bytes of the float32 conversion's parameters.
    size = lambda f: sum(p.stat().st_size for p in (f / orbax.PARAMS).rglob("*") if p.is_file())  # noqa: E731
    assert size(folder) < 0.6 * size(orbax_of(UNTIED))
    want = {k: v.astype(np.float32) for k, v in hf_params(UNTIED, "bfloat16").items()}
    assert_bit_identical(params_of(folder, "float32"), want)


def test_sharded_source_converts_like_the_single_file(sharded_checkpoint, hf_params, tmp_path, capsys):
    output = tmp_path / "orbax"
    assert to_orbax(sharded_checkpoint, output, "--verify") == cli.EXIT_OK
    assert "logits verified equal" in capsys.readouterr().err
    manifest = json.loads((output / orbax.MANIFEST).read_text())
    shards = {p.name for p in sharded_checkpoint.glob("model-*.safetensors")}
    assert shards | {INDEX, "config.json", "generation_config.json"} == set(manifest["source_files"])
    assert_bit_identical(params_of(output, "float32"), hf_params(UNTIED, "float32"))


# --- 3: the output folder describes itself -------------------------------------------------------

SIDE_TEXT = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
             "tokenizer_config.json": '{"model_max_length": 64, "eos_token": "<|end|>"}\n',
             "chat_template.jinja": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"}


def test_output_is_self_describing(tiny_checkpoint, orbax_of):
    source = tiny_checkpoint(UNTIED)[0]
    folder = orbax_of(UNTIED)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json",
                                                        orbax.MANIFEST, orbax.PARAMS]
    manifest = json.loads((folder / orbax.MANIFEST).read_text())
    assert manifest["format"] == orbax.FORMAT and orbax.is_orbax_folder(str(folder))
    assert manifest["tool_version"] == phi4_jax.__version__
    assert manifest["source"] == {"path": str(source), "repo_id": None, "revision": None}
    assert manifest["dtype"] == "float32"
    assert set(manifest["source_files"]) == {WEIGHTS, "config.json", "generation_config.json"}
    for name, described in manifest["source_files"].items():
        data = (source / name).read_bytes()
        assert described == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    for name in ("config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (source / name).read_bytes()


def test_tokenizer_files_are_copied(copy_of, tmp_path):
    source = copy_of()
    for name, text in SIDE_TEXT.items():
        (source / name).write_text(text)
    output = tmp_path / "orbax"
    assert to_orbax(source, output) == cli.EXIT_OK
    manifest = json.loads((output / orbax.MANIFEST).read_text())
    for name in SIDE_TEXT:
        assert (output / name).read_bytes() == (source / name).read_bytes(), name
        assert manifest["source_files"][name]["sha256"] == hashlib.sha256((source / name).read_bytes()).hexdigest()
    # ... and carried on to the HF export.
    export = tmp_path / "export"
    assert to_hf(output, export) == cli.EXIT_OK
    for name in [*SIDE_TEXT, "config.json", "generation_config.json"]:
        assert (export / name).read_bytes() == (source / name).read_bytes(), name


# --- 4: dry runs write nothing -------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["--dry-run", "--dry_run"])
def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, spelling):
    source = tiny_checkpoint(UNTIED)[0]
    output = tmp_path / "orbax"
    assert to_orbax(source, output, spelling) == cli.EXIT_OK
    plan = capsys.readouterr().out
    tensors = load_file(source / WEIGHTS)
    for name, tensor in tensors.items():
        assert re.search(rf"^{re.escape(name)} +{'x'.join(map(str, tensor.shape))} +float32 -> float32 *$",
                         plan, re.M), name
    total = sum(t.nbytes for t in tensors.values())
    assert f"{len(tensors)} tensors, {total / 1e6:.2f} MB read" in plan
    assert "peak RAM" in plan
    assert not output.exists() and leftovers(output) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_names_the_target_dtype(tiny_checkpoint, tmp_path, capsys):
    assert to_orbax(tiny_checkpoint(TIED)[0], tmp_path / "orbax", "--dry-run", "--dtype", "bfloat16") == 0
    plan = capsys.readouterr().out
    assert "model.embed_tokens.weight" in plan and "float32 -> bfloat16" in plan
    assert "lm_head.weight" not in plan
    assert list(tmp_path.iterdir()) == []


# --- 5: an existing output -----------------------------------------------------------------------

def test_existing_output_is_refused_then_overwritten(tiny_checkpoint, orbax_of, tmp_path, capsys):
    output = tmp_path / "orbax"
    shutil.copytree(orbax_of(TIED), output)
    (output / "stale.txt").write_text("from an earlier run")
    before = snapshot(output)
    capsys.readouterr()
    assert to_orbax(tiny_checkpoint(UNTIED)[0], output) == cli.EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(output) == before and leftovers(output) == []

    assert to_orbax(tiny_checkpoint(UNTIED)[0], output, "--overwrite") == cli.EXIT_OK
    assert not (output / "stale.txt").exists() and leftovers(output) == []
    manifest = json.loads((output / orbax.MANIFEST).read_text())
    assert manifest["source"]["path"] == str(tiny_checkpoint(UNTIED)[0])
    assert "lm_head.weight" in params_of(output, "float32")  # the untied model now


def test_dry_run_refuses_what_the_real_run_would(tiny_checkpoint, orbax_of, tmp_path, capsys):
    output = tmp_path / "orbax"
    shutil.copytree(orbax_of(TIED), output)
    capsys.readouterr()
    assert to_orbax(tiny_checkpoint(TIED)[0], output, "--dry-run") == cli.EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert to_orbax(tiny_checkpoint(TIED)[0], tmp_path / "no" / "such", "--dry-run") == cli.EXIT_USAGE


@pytest.mark.parametrize("where", ["the source", "a parent of the source", "inside the source"])
def test_output_may_not_replace_the_source(copy_of, capsys, where):
    source = copy_of(UNTIED)
    before = snapshot(source)
    output = {"the source": source, "a parent of the source": source.parent,
              "inside the source": source / "orbax"}[where]
    capsys.readouterr()
    assert to_orbax(source, output, "--overwrite") == cli.EXIT_USAGE
    assert "source" in capsys.readouterr().err
    assert snapshot(source) == before


def test_export_refuses_an_existing_output(orbax_of, tmp_path):
    output = tmp_path / "export"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert to_hf(orbax_of(TIED), output) == cli.EXIT_USAGE
    assert snapshot(output) == {"keep.txt": b"mine"} and leftovers(output) == []
    assert to_hf(orbax_of(TIED), output, "--overwrite") == cli.EXIT_OK
    assert not (output / "keep.txt").exists() and (output / WEIGHTS).exists()


def test_an_older_format_version_is_refused_with_the_command_that_converts_again(orbax_of, tiny_checkpoint,
                                                                                 tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(orbax_of(UNTIED), folder)
    manifest = json.loads((folder / orbax.MANIFEST).read_text())
    (folder / orbax.MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(CheckpointError, match=f"format version 1 .* reads version {orbax.FORMAT_VERSION}") as e:
        phi4_jax.load(folder, progress=False)
    assert f"phi4-jax convert --model {tiny_checkpoint(UNTIED)[0]} --output {folder}" in str(e.value)
    capsys.readouterr()
    assert to_hf(folder, tmp_path / "export") == cli.EXIT_CORRUPT
    assert "format version 1" in capsys.readouterr().err and not (tmp_path / "export").exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_of_a_file_or_a_link(tiny_checkpoint, orbax_of, tmp_path, kind):
    source = tiny_checkpoint(UNTIED)[0]
    output, target = tmp_path / "orbax", tmp_path / "elsewhere"
    if kind == "file":
        output.write_text("not a folder")
    else:
        shutil.copytree(orbax_of(TIED), target)
        output.symlink_to(target)
    before = snapshot(target) if kind == "symlink" else None
    assert to_orbax(source, output) == cli.EXIT_USAGE
    for _ in range(2):  # twice in one process: nothing of the first is left to trip the second
        assert to_orbax(source, output, "--overwrite") == cli.EXIT_OK
        assert output.is_dir() and not output.is_symlink() and orbax.is_orbax_folder(str(output))
        assert leftovers(output) == []
    if kind == "symlink":  # the link was replaced; what it pointed to is untouched
        assert snapshot(target) == before


class Boom(RuntimeError):
    pass


def fail_after(k):
    """An `on_tensor` callback that raises after the k-th tensor."""
    seen = []

    def on_tensor(name):
        seen.append(name)
        if len(seen) == k:
            raise Boom(f"stopped after {name}")
    return on_tensor


def test_failed_overwrite_keeps_the_old_output(tiny_checkpoint, orbax_of, tmp_path):
    output = tmp_path / "orbax"
    shutil.copytree(orbax_of(TIED), output)
    before = snapshot(output)
    with pytest.raises(Boom):
        convert.convert(plan_for(tiny_checkpoint(UNTIED)[0]), str(output), overwrite=True,
                           progress=False, on_tensor=fail_after(3))
    assert snapshot(output) == before and leftovers(output) == []


# --- 6: interrupted runs leave nothing -----------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 15])  # 15: the last tensor of UNTIED, before the manifest
def test_interrupted_conversion_leaves_nothing(tiny_checkpoint, tmp_path, k):
    plan = plan_for(tiny_checkpoint(UNTIED)[0])
    assert len(plan.tensors) == 15
    output = tmp_path / "orbax"
    with pytest.raises(Boom):
        convert.convert(plan, str(output), progress=False, on_tensor=fail_after(k))
    assert not output.exists() and leftovers(output) == []
    seen = []
    assert convert.convert(plan, str(output), progress=False, on_tensor=seen.append) == str(output)
    assert seen == [s.name for s in plan.tensors]
    assert orbax.is_orbax_folder(str(output)) and leftovers(output) == []


def test_out_of_memory_exits_4_and_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    plan = plan_for(tiny_checkpoint(UNTIED)[0])
    output = tmp_path / "orbax"

    def on_tensor(name):
        raise MemoryError()  # as numpy raises it: no message

    def body():
        convert.convert(plan, str(output), progress=False, on_tensor=on_tensor)

    assert cli.run(body) == cli.EXIT_RESOURCES
    assert capsys.readouterr().err == "error: out of memory\n"
    assert not output.exists() and leftovers(output) == []


SIGNAL_SCRIPT = """
import signal, sys
from phi4_jax.cli import common as cli
from phi4_jax.checkpoints import convert, orbax
from phi4_jax.checkpoints.hub import resolve

source, output, after, signame = sys.argv[1:]
seen = []
# As at a terminal: a background job of a non-interactive shell (a CI runner's, say) starts with
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

def on_tensor(name):
    seen.append(name)
    if len(seen) == int(after):
        signal.raise_signal(getattr(signal, signame))  # in this thread, now

def body():
    plan = convert.plan_conversion(resolve(source))
    convert.convert(plan, output, progress=False, on_tensor=on_tensor)
    print("converted", file=sys.stderr)

sys.exit(cli.run(body))
"""


def run_signalled(tmp_path, source, output, after, signame):
    script = tmp_path / "convert_and_signal.py"
    script.write_text(SIGNAL_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="", PHI4_JAX_COMPILATION_CACHE="off")
    proc = subprocess.Popen([sys.executable, str(script), str(source), str(output), str(after), signame],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=180)
    return proc, err


def test_killed_conversion_is_cleaned_up_by_the_next(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(UNTIED)[0]
    output = tmp_path / "orbax"
    proc, err = run_signalled(tmp_path, source, output, 3, "SIGKILL")
    assert proc.returncode == -signal.SIGKILL, err
    assert not output.exists()
    assert leftovers(output) == [f".orbax.tmp-{proc.pid}"]
    partial = tmp_path / f".orbax.tmp-{proc.pid}"  # killed mid-way: some parameters, no manifest
    assert (partial / "config.json").exists() and list(partial.glob(f"{orbax.PARAMS}*"))
    assert not (partial / orbax.MANIFEST).exists()
    assert to_orbax(source, output) == cli.EXIT_OK
    assert leftovers(output) == [] and orbax.is_orbax_folder(str(output))


def test_ctrl_c_exits_130_and_leaves_nothing(tiny_checkpoint, tmp_path):
    output = tmp_path / "orbax"
    proc, err = run_signalled(tmp_path, tiny_checkpoint(UNTIED)[0], output, 2, "SIGINT")
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert "interrupted" in err and "converted" not in err and "Traceback" not in err
    assert not output.exists() and leftovers(output) == []


def test_leftover_of_a_run_killed_between_the_renames_is_restored(orbax_of, tiny_checkpoint, tmp_path):
    """Killed after moving the old output aside, before renaming the new one: the next run puts the
    old one back before deciding whether the output exists."""
    dead = _dead_pid()
    old = tmp_path / f".orbax.old-{dead}"
    shutil.copytree(orbax_of(TIED), old)
    shutil.copytree(orbax_of(UNTIED), tmp_path / f".orbax.tmp-{dead}")
    before = snapshot(old)
    output = tmp_path / "orbax"
    assert to_orbax(tiny_checkpoint(UNTIED)[0], output) == cli.EXIT_USAGE  # the restored one exists
    assert snapshot(output) == before and leftovers(output) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 7: corrupt inputs, through the command line -------------------------------------------------

def convert_fails(source, output, code, capsys, *names, flags=()):
    """Asserts the CLI exits with `code`, says why on stderr (naming each of `names`), and leaves
    neither the output nor a hidden sibling."""
    capsys.readouterr()
    assert to_orbax(source, output, *flags) == code
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for name in names:
        assert str(name) in err, (name, err)
    assert not pathlib.Path(output).exists() and leftovers(output) == []
    return err


def _weight_map(folder) -> dict:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def _edit_config(folder, change):
    raw = json.loads((folder / "config.json").read_text())
    change(raw)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def _truncated_shard(folder):
    shard = folder / _weight_map(folder)[NORM]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return [shard.name]


def _huge_header_length(folder):
    path = folder / WEIGHTS
    path.write_bytes((2**63 + 12345).to_bytes(8, "little") + path.read_bytes()[8:])
    return [WEIGHTS]


def _missing_shard(folder):
    shard = _weight_map(folder)[NORM]
    (folder / shard).unlink()
    return [shard, INDEX]


def _missing_tensor(folder):
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    return ["model.layers.1.mlp.down_proj.weight", "missing 1 tensor"]


def _unexpected_tensor(folder):
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.qkv_proj.bias": np.ones(4, np.float32)}))
    return ["model.layers.0.self_attn.qkv_proj.bias", "unexpected 1 tensor"]


def _wrong_shape(folder):
    hidden = TINY_SHAPES[UNTIED]["hidden_size"]
    rewrite_tensors(folder, lambda t: t.update({NORM: t[NORM][:-1].copy()}))
    return [NORM, f"({hidden - 1},)", f"({hidden},)"]


def _pickle_only(folder):
    state = {k: torch.from_numpy(v) for k, v in load_file(folder / WEIGHTS).items()}
    (folder / WEIGHTS).unlink()
    (folder / "generation_config.json").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return ["pytorch_model.bin", "never unpickles"]


def _dynamic_rope(folder):
    _edit_config(folder, lambda raw: raw["rope_parameters"].update(rope_type="dynamic", factor=2.0))
    return ["'dynamic'", "config.json"]


def _llama(folder):
    _edit_config(folder, lambda raw: raw.update(model_type="llama"))
    return ["'llama'", "config.json"]


@pytest.mark.parametrize("corrupt,sharded,code", [
    (_truncated_shard, True, cli.EXIT_CORRUPT),
    (_huge_header_length, False, cli.EXIT_CORRUPT),
    (_missing_shard, True, cli.EXIT_USAGE),  # a file not found is an input error
    (_missing_tensor, False, cli.EXIT_CORRUPT),
    (_unexpected_tensor, False, cli.EXIT_CORRUPT),
    (_wrong_shape, False, cli.EXIT_CORRUPT),
    (_pickle_only, False, cli.EXIT_CORRUPT),
    (_dynamic_rope, False, cli.EXIT_USAGE),
    (_llama, False, cli.EXIT_USAGE),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_corrupt_input(tiny_checkpoint, sharded_checkpoint, tmp_path, capsys, corrupt, sharded, code):
    source = shutil.copytree(sharded_checkpoint if sharded else tiny_checkpoint(UNTIED)[0], tmp_path / "model")
    names = corrupt(source)
    convert_fails(source, tmp_path / "orbax", code, capsys, *names)


def test_missing_source_and_missing_output_parent(tiny_checkpoint, tmp_path, capsys):
    convert_fails(tmp_path / "nowhere", tmp_path / "orbax", cli.EXIT_USAGE, capsys, tmp_path / "nowhere")
    output = tmp_path / "no" / "such" / "parent"
    convert_fails(tiny_checkpoint(UNTIED)[0], output, cli.EXIT_USAGE, capsys, output.parent)


def test_auto_map_is_ignored_and_never_imported(copy_of, tmp_path):
    source = copy_of()
    marker = tmp_path / "remote-code-ran"
    for module in ("configuration_evil", "modeling_evil"):
        (source / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_config(source, lambda raw: raw.update(auto_map={
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    output = tmp_path / "orbax"
    with pytest.warns(UserWarning, match="auto_map"):
        assert to_orbax(source, output) == cli.EXIT_OK
    assert not marker.exists()
    assert "configuration_evil" not in sys.modules and "modeling_evil" not in sys.modules
    assert not list(output.glob("*.py"))
    assert (output / "config.json").read_bytes() == (source / "config.json").read_bytes()


# --- 8: repo ids through the Hugging Face cache (no network) -------------------------------------

REPO = "acme/tiny-phi"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """A Hugging Face hub cache holding REPO at COMMIT (refs/main), laid out as huggingface_hub does:
    snapshot files are relative symlinks to blobs, LFS blobs named by their sha256, others by their
    git blob sha1."""
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    (repo / "blobs").mkdir()
    snapshot_dir = repo / "snapshots" / COMMIT
    snapshot_dir.mkdir(parents=True)
    for path in sorted(tiny_checkpoint(UNTIED)[0].iterdir()):
        data = path.read_bytes()
        blob = (hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else
                hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot_dir / path.name).symlink_to(f"../../blobs/{blob}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so that `acme/...` is never a relative path
    return snapshot_dir


def test_repo_id_from_the_hf_cache(tiny_checkpoint, hf_cache, tmp_path):
    output = tmp_path / "orbax"
    assert to_orbax(REPO, output, "--offline") == cli.EXIT_OK
    manifest = json.loads((output / orbax.MANIFEST).read_text())
    assert manifest["source"] == {"path": str(hf_cache), "repo_id": REPO, "revision": COMMIT}
    data = (hf_cache / WEIGHTS).read_bytes()
    assert manifest["source_files"][WEIGHTS]["sha256"] == os.path.basename(os.path.realpath(hf_cache / WEIGHTS))
    assert manifest["source_files"][WEIGHTS]["size"] == len(data)
    for name in ("config.json", "generation_config.json"):  # copied as files, not as links
        assert not (output / name).is_symlink()
        assert (output / name).read_bytes() == (tiny_checkpoint(UNTIED)[0] / name).read_bytes()
    # A commit hash as --revision names the same snapshot.
    pinned = tmp_path / "pinned"
    assert to_orbax(REPO, pinned, "--offline", "--revision", COMMIT) == cli.EXIT_OK
    assert json.loads((pinned / orbax.MANIFEST).read_text())["source"]["revision"] == COMMIT


def test_repo_id_not_in_the_cache(hf_cache, tmp_path, capsys):
    convert_fails("acme/nothing", tmp_path / "orbax", cli.EXIT_USAGE, capsys, "acme/nothing", "--offline",
                  flags=["--offline"])


def test_corrupt_blob_in_the_cache(hf_cache, tmp_path, capsys):
    blob = pathlib.Path(os.path.realpath(hf_cache / WEIGHTS))
    data = bytearray(blob.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 1000] ^= 0x01  # a bit of the first tensor's data; the header stays valid
    blob.write_bytes(bytes(data))
    assert re.fullmatch(r"[0-9a-f]{64}", blob.name) and blob.name != hashlib.sha256(data).hexdigest()
    convert_fails(REPO, tmp_path / "orbax", cli.EXIT_CORRUPT, capsys, blob.name,
                  hashlib.sha256(data).hexdigest(), "download it again", flags=["--offline"])


# --- 9, 10: orbax_to_hf input, --help -------------------------------------------------------------

def test_export_of_a_folder_that_is_not_orbax(tiny_checkpoint, tmp_path, capsys):
    source = tiny_checkpoint(UNTIED)[0]
    output = tmp_path / "export"
    assert to_hf(source, output) == cli.EXIT_USAGE
    assert str(source) in capsys.readouterr().err
    assert not output.exists() and leftovers(output) == []


@pytest.mark.parametrize("command", ["convert", "export"])
def test_help_names_every_exit_code_and_flag(command, capsys):
    assert phi4_jax_main([command, "--help"]) == cli.EXIT_OK
    text = capsys.readouterr().out
    for code in (cli.EXIT_OK, cli.EXIT_USAGE, cli.EXIT_CORRUPT, cli.EXIT_RESOURCES, cli.EXIT_INTERRUPTED):
        assert re.search(rf"^\s+{code}\s+\w", text, re.M), code
    subcommands = next(a for a in build_parser()._actions if a.dest == "command")
    flags = [s for action in subcommands.choices[command]._actions for s in action.option_strings]
    assert "--quiet" in flags and "--overwrite" in flags
    for name in flags:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


def test_shared_checkpoints_are_untouched(tiny_checkpoint):
    """The tests above changed copies only: the shared folders hold what save_pretrained wrote."""
    for shape in (UNTIED, TIED):
        folder = tiny_checkpoint(shape)[0]
        assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", WEIGHTS]
        assert leftovers(folder) == []
