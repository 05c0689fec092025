"""The `phi4-jax` command: its subcommands, their help, usage errors and the planner's command line,
through `phi4_jax.cli.main.main`, the function the console script calls."""

import json
import re

import pytest

from phi4_jax.cli import common as cli
from phi4_jax.cli.main import COMMANDS, build_parser, main

EXIT_CODES = (cli.EXIT_OK, cli.EXIT_USAGE, cli.EXIT_CORRUPT, cli.EXIT_RESOURCES, cli.EXIT_INTERRUPTED)


def subcommand_parser(name: str):
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices[name]


def test_the_command_lists_every_subcommand_and_its_version(capsys):
    assert main(["--help"]) == cli.EXIT_OK
    text = capsys.readouterr().out
    for name, (summary, *_) in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(summary[:20])}", text, re.M), name
    assert set(COMMANDS) == {"generate", "chat", "serve", "convert", "export", "plan"}
    import phi4_jax

    assert main(["--version"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == f"phi4-jax {phi4_jax.__version__}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_explains_every_flag_and_names_every_exit_code(name, capsys):
    assert main([name, "--help"]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert text.startswith(f"usage: phi4-jax {name} ")
    for code in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+\w", text, re.M), code
    actions = [a for a in subcommand_parser(name)._actions if a.option_strings and a.dest != "help"]
    assert actions
    for action in actions:
        assert action.help and len(action.help) > 10, action.option_strings  # each flag is explained
        for spelling in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", text), spelling


@pytest.mark.parametrize("argv, needle", [
    ([], "COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["generate", "--temp"], "--temp: expected one argument"),
    (["chat", "--prompt", "hi"], "unrecognized arguments: --prompt hi"),
    (["plan"], "--model"),
    (["plan", "--model", "phi-4", "--target", "v9x:1"], "--target: 'v9x:1'"),
    (["plan", "--model", "phi-4", "--context", "lots"], "--context: 'lots' is not a token count"),
    (["export", "--model", "a", "--output", "b", "--max-shard-size", "5 parsecs"], "is not a size such as 5GB"),
    (["generate", "--prompt", "hi", "--speculative", "ngram:0"], "speculative K (ngram:K) must be in [1, 15]"),
    (["generate", "--prompt", "hi", "--speculative", "ngram", "--speculative-rows", "0"], "--speculative-rows must"),
    (["serve", "--speculative", "draft"], "--speculative takes ngram, ngram:K or ngram:K:MIN_N:MAX_N"),
    (["plan", "--model", "tiny-phi-4", "--speculative", "ngram:4:3:2"], "need 1 <= MIN_N <= MAX_N"),
])
def test_usage_errors_exit_2_naming_the_flag(argv, needle, capsys):
    assert main(argv) == cli.EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_chat_is_generate_reading_stdin():
    args = build_parser().parse_args(["chat", "--model", "demo", "-m", "5"])
    assert args.chat and args.prompt is None and args.max_tokens == 5
    assert args.run is COMMANDS["generate"][3]


def test_plan_prints_a_summary_or_the_records_as_json(capsys, tmp_path):
    """`phi4-jax plan` on a test shape over two fake devices: the summary a person reads, or JSON that
    holds the same plan, also written to --output."""
    flags = ["plan", "--model", "tiny-phi-4", "--mesh", "tensor=2", "--context", "64", "--batch", "2",
             "--dtype", "float32"]
    assert main(flags) == cli.EXIT_OK
    summary = capsys.readouterr().out
    assert summary.startswith("tiny-phi-4 on tensor=2 (2 devices), context 64, batch 2, float32:")
    assert re.search(r"^  decode: temporaries .*collectives: all-reduce \d+", summary, re.M)
    assert main([*flags, "--json", "--output", str(tmp_path / "plan.json")]) == cli.EXIT_OK
    records = json.loads(capsys.readouterr().out)
    assert records == json.loads((tmp_path / "plan.json").read_text())
    (record,) = records
    assert (record["name"], record["mesh_spec"], record["devices"], record["context"], record["batch"]) == (
        "tiny-phi-4", "tensor=2", 2, 64, 2)
    assert record["model"]["kv_heads_on_mesh"] == 10 and record["fits_on"]
    per_device = record["per_device"]
    assert f"KV cache {per_device['kv_cache_bytes'] / 1e9:.2f} GB" in summary


def test_plan_refuses_what_it_cannot_plan(capsys):
    assert main(["plan", "--model", "tiny-phi-4", "--batch", "0"]) == cli.EXIT_USAGE
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert main(["plan", "--model", "no-such-model"]) == cli.EXIT_USAGE
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize("alias, command", [("convert/hf_to_orbax.py", "convert"), ("convert/orbax_to_hf.py", "export"),
                                            ("bench/plan.py", "plan")])
def test_the_scripts_in_a_checkout_are_aliases_of_their_subcommands(alias, command, capsys, monkeypatch):
    """`python convert/hf_to_orbax.py ...` (and the others) parse the subcommand's flags and say so."""
    import pathlib
    import runpy

    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))  # as a script in bench/ finds its neighbours
    monkeypatch.setattr("sys.argv", [alias, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(root / alias), run_name="__main__")
    assert done.value.code in (0, None)
    text = capsys.readouterr().out
    own = subcommand_parser(command)
    flags = {s for a in own._actions for s in a.option_strings if a.dest != "help"}
    assert flags and all(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) for flag in flags)


@pytest.mark.parametrize("module, command", [("generate", "generate"), ("serve", "serve")])
def test_python_m_aliases_run_their_subcommand(module, command, capsys):
    """`python -m phi4_jax.generate` / `.serve` call `main`, which is `phi4-jax generate` / `serve`."""
    import importlib

    assert importlib.import_module(f"phi4_jax.{module}").main(["--help"]) == cli.EXIT_OK
    assert capsys.readouterr().out.startswith(f"usage: phi4-jax {command} ")
