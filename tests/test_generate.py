"""Text generation: the Python API (generate / stream_generate) and `python -m phi4_jax.generate`."""

import json
import subprocess
import sys

import pytest

import phi4_jax
from conftest import PHI4_JAX, user_environment
from phi4_jax.cli import common as cli
from phi4_jax.engine.runner import ModelRunner
from phi4_jax.engine.sampling import SamplingParams

def greedy_ids(model, ids, n):
    engine = ModelRunner(model)
    gen = engine.start([ids], SamplingParams(max_tokens=n, ignore_eos=True), [[]])
    out = []
    while not gen.finished:
        out += gen.advance(n)[0]
    return out


def test_generate_is_the_decoded_greedy_tokens(chat_model):
    _, model, tokenizer = chat_model
    text = phi4_jax.generate(model, tokenizer, "Hello there", SamplingParams(max_tokens=12, ignore_eos=True))
    assert text == tokenizer.decode(greedy_ids(model, tokenizer.encode("Hello there"), 12))


def test_generate_batch_and_chat_messages(chat_model):
    _, model, tokenizer = chat_model
    messages = [{"role": "user", "content": "What is 2+2?"}]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    single = phi4_jax.generate(model, tokenizer, messages, params)
    assert single == tokenizer.decode(greedy_ids(model, tokenizer.apply_chat_template(messages), 8))
    batch = phi4_jax.generate(model, tokenizer, [messages, "Hello there", "x"], params)
    assert isinstance(batch, list) and batch[0] == single
    assert batch[1] == phi4_jax.generate(model, tokenizer, "Hello there", params)


def test_generate_module_is_callable_after_importing_it(chat_model):
    """`phi4_jax.generate` is the function and the CLI module; both spellings generate."""
    import phi4_jax.generate  # noqa: F401  (rebinds the package attribute to the module)

    _, model, tokenizer = chat_model
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert phi4_jax.generate(model, tokenizer, "hi", params) == \
        phi4_jax.generate(model, tokenizer, "hi", params)


def test_stream_pieces_add_up_and_report(chat_model):
    _, model, tokenizer = chat_model
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    responses = list(phi4_jax.stream_generate(model, tokenizer, "Hello there", params))
    assert "".join(r.text for r in responses) == phi4_jax.generate(model, tokenizer, "Hello there", params)
    last = responses[-1]
    assert last.finish_reason == "length" and last.token is None
    assert [r.finish_reason for r in responses[:-1]] == [None] * 10
    assert last.generation_tokens == 10 and last.prompt_tokens == len(tokenizer.encode("Hello there"))
    assert last.prompt_tps > 0 and last.generation_tps > 0


def test_stream_rates_leave_compiling_out(chat_model):
    """A first request's rates are of its prefill and decode steps, not of its compiles; the second
    request of the same shapes compiles nothing."""
    import time

    _, model, tokenizer = chat_model
    params = SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=0.1)  # (penalty state: shapes no
    # other test here compiles)
    engine = ModelRunner(model)
    start = time.perf_counter()
    first = list(phi4_jax.stream_generate(engine, tokenizer, "Fresh shapes", params))[-1]
    wall = time.perf_counter() - start
    assert first.compile_seconds > 0 and first.compile_cache_seconds <= first.compile_seconds
    # Decoding is only part of the wall time left once every compile is taken out.
    assert first.generation_tps >= (first.generation_tokens - 1) / (wall - first.compile_seconds)
    again = list(phi4_jax.stream_generate(engine, tokenizer, "Fresh shapes", params))[-1]
    assert again.compile_seconds == 0 and again.generation_tokens == first.generation_tokens == 12


def test_stop_string_spanning_tokens(chat_model):
    _, model, tokenizer = chat_model
    ids = greedy_ids(model, tokenizer.encode("Hello there"), 16)
    full = tokenizer.decode(ids)
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    # A stop string starting inside one token's text and ending in a later one.
    start = next(i for i in range(1, len(ids) - 2) if len(pieces[i]) > len(pieces[i - 1]) + 1)
    stop = full[len(pieces[start]) - 1: len(pieces[start + 1]) + 1]
    assert stop and stop in full
    text = phi4_jax.generate(model, tokenizer, "Hello there",
                             SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]))
    assert text == full[:full.index(stop)]
    responses = list(phi4_jax.stream_generate(model, tokenizer, "Hello there",
                                              SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,))))
    assert "".join(r.text for r in responses) == text and responses[-1].finish_reason == "stop"


# --- the command line -----------------------------------------------------------------------------

def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    from phi4_jax.generate import main

    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(chat_model, capsys):
    folder, model, tokenizer = chat_model
    code, out, err = run_cli(capsys, "--model", folder, "--prompt", "What is 2+2?", "--max-tokens", 6,
                             "--ignore-eos", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"text", "tokens", "prompt_tokens", "finish_reason", "stats"}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert result["prompt_tokens"] == len(prompt) and result["finish_reason"] == "length"
    assert result["tokens"] == greedy_ids(model, prompt, 6)
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert {"prompt_tps", "generation_tps", "compile_seconds", "compile_cache_seconds"} <= set(result["stats"])
    assert "Prompt: " in err and "tokens-per-sec" in err and "Generation: 6 tokens" in err


def test_cli_streams_text_and_reads_stdin(chat_model, capsys, monkeypatch):
    folder, _, _ = chat_model
    code, out, err = run_cli(capsys, "--model", folder, "-p", "-", "-m", 5, "--ignore-eos",
                             "--ignore-chat-template", stdin="Hello there", monkeypatch=monkeypatch)
    assert code == 0
    assert out.rstrip("\n") == phi4_jax.generate(*phi4_jax.load(folder, dtype="float32"), "Hello there",
                                                 SamplingParams(max_tokens=5, ignore_eos=True))
    assert "Generation: 5 tokens" in err


@pytest.mark.parametrize("argv,needle", [
    (["--temp", "-1"], "--temp"),
    (["--top-p", "0"], "--top-p"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-context", "8"], "context"),
    (["--prompt", "   "], "empty"),
    (["--extra-eos-token", "<|nope|>"], "--extra-eos-token"),
    (["--attention", "cudnn"], "--attention xla"),  # cuDNN needs an NVIDIA GPU; this is a CPU
])
def test_cli_errors_exit_2_naming_the_problem(chat_model, capsys, argv, needle):
    folder, _, _ = chat_model
    args = ["--model", folder, *argv] if "--prompt" in argv else ["--model", folder, "-p", "What is 2+2?", *argv]
    code, _, err = run_cli(capsys, *args)
    assert code == cli.EXIT_USAGE and needle in err, err


def test_cli_missing_model_and_missing_prompt(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tmp_path / "nothing", "-p", "hi")
    assert code == cli.EXIT_USAGE and "nothing" in err
    code, _, err = run_cli(capsys, "--model", tmp_path)
    assert code == cli.EXIT_USAGE and "--prompt" in err


def test_cli_in_a_real_process(chat_model):
    """The installed `phi4-jax` console script, and `python -m phi4_jax.generate`, in fresh processes
    with the user's environment (no JAX_PLATFORMS: libtpu of the tpu extra is installed here, and
    no TPU): the tokens, the statistics, and not one line of libtpu's start-up errors or warnings."""
    import importlib.util

    folder, model, tokenizer = chat_model
    assert importlib.util.find_spec("libtpu") is not None  # the test extra installs the tpu extra
    env = user_environment(PHI4_JAX_COMPILATION_CACHE="off")
    out = subprocess.run([PHI4_JAX, "generate", "--model", str(folder), "--prompt", "Hi", "--max-tokens", "3",
                          "--ignore-eos", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert result["tokens"] == greedy_ids(model, prompt, 3)
    lines = out.stderr.splitlines()
    assert lines[0] == "==========" and lines[1].startswith("Prompt: ") and lines[2].startswith("Generation: 3 tokens")
    assert len(lines) == 4 and lines[3].startswith("Compile: "), out.stderr  # nothing else: no warning
    code = subprocess.run([sys.executable, "-m", "phi4_jax.generate", "--model", str(folder), "--temp", "-2",
                           "-p", "x"], capture_output=True, text=True, env=env, timeout=300)
    assert code.returncode == cli.EXIT_USAGE
    assert code.stderr == "error: --temp: temperature must be a number >= 0 (0 = greedy), got -2.0\n"


def test_cli_chat_reuses_the_cache_across_turns(chat_model, capsys, monkeypatch):
    folder, model, tokenizer = chat_model
    code, out, err = run_cli(capsys, "--model", folder, "--chat", "-m", 6, "--ignore-eos", "--quiet",
                             stdin="What is 2+2?\nAnd 3+3?\nq\n", monkeypatch=monkeypatch)
    assert code == 0, err
    first, second = out.splitlines()[:2]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    turn1 = [{"role": "user", "content": "What is 2+2?"}]
    assert first == phi4_jax.generate(model, tokenizer, turn1, params)
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "And 3+3?"}]
    assert second == phi4_jax.generate(model, tokenizer, turn2, params)


def test_prompt_cache_reports_reuse(chat_model):
    _, model, tokenizer = chat_model
    engine = ModelRunner(model)
    cache = phi4_jax.PromptCache()
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    turn1 = [{"role": "user", "content": "Hello"}]
    reply = "".join(r.text for r in phi4_jax.stream_generate(engine, tokenizer, turn1, params, prompt_cache=cache))
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]
    responses = list(phi4_jax.stream_generate(engine, tokenizer, turn2, params, prompt_cache=cache))
    assert responses[-1].cached_tokens >= len(tokenizer.apply_chat_template(turn1))
    assert "".join(r.text for r in responses) == phi4_jax.generate(model, tokenizer, turn2, params)
