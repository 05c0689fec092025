"""The built-in demo model: it answers arithmetic in Phi-4-mini's chat format, transformers agrees
with us on it, and retraining is deterministic."""

import hashlib
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

import phi4_jax
from phi4_jax.cli import common as cli
from phi4_jax.generate import main as generate_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import demo_data as demo  # noqa: E402  (train/demo_data.py)

FOLDER = pathlib.Path(demo.FOLDER)


@pytest.fixture(scope="module")
def shipped():
    return phi4_jax.load("demo", dtype="float32", progress=False)


def test_the_readme_command_answers(capsys):
    """`python -m phi4_jax.generate --prompt "What is 482+37?"`: the demo model is the default."""
    assert generate_main(["--prompt", "What is 482+37?", "--quiet"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "519"


def test_held_out_accuracy_is_at_least_90_percent(shipped):
    model, tokenizer = shipped
    problems = demo.held_out()
    assert len(problems) == 500 and len({q for q, _ in problems}) == 500
    score = demo.accuracy(model, tokenizer, problems)
    print(f"demo model: {score:.1%} exact match on {len(problems)} held-out problems")
    assert score >= 0.9
    record = json.loads((FOLDER / "training.json").read_text())
    assert score == pytest.approx(record["held_out_accuracy"], abs=0.01)  # what training reported


def test_recorded_sha256_is_the_shipped_weights():
    record = json.loads((FOLDER / "training.json").read_text())
    digest = hashlib.sha256((FOLDER / "model.safetensors").read_bytes()).hexdigest()
    assert digest == record["model_safetensors_sha256"]
    assert (FOLDER / "model.safetensors").stat().st_size < 10 * 2**20


@pytest.mark.slow  # transformers generates 48 answers one by one
def test_transformers_gives_our_greedy_answers(shipped):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = shipped
    hf = AutoModelForCausalLM.from_pretrained(FOLDER, attn_implementation="eager").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    problems = demo.held_out()[:48]
    messages = [[{"role": "user", "content": q}] for q, _ in problems]
    ours = phi4_jax.generate(model, tokenizer, messages, phi4_jax.SamplingParams(max_tokens=6))
    for (question, _), message, answer in zip(problems, messages, ours):
        ids = hf_tokenizer.apply_chat_template(message, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ids[0].tolist() == tokenizer.apply_chat_template(message)  # same prompt ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=6, do_sample=False)
        assert hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == answer, question


def test_tokenizer_splits_digits_and_speaks_phi4_mini_chat(shipped):
    _, tokenizer = shipped
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 482+37?"}])
    assert ids == tokenizer.encode(demo.chat_text("What is 482+37?"))
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("482+37")]
    assert pieces == ["4", "8", "2", "+", "3", "7"]
    for i, token in enumerate(demo.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i


def test_training_never_sees_the_held_out_problems():
    tokenizer = demo.train_tokenizer()
    held = dict(demo.held_out())
    data = demo.batches(tokenizer, 64, demo.LENGTH, seed=0, skip=set(held))
    seen = 0
    for _ in range(30):
        ids, weights = next(data)
        assert ids.shape == weights.shape == (64, demo.LENGTH)
        for row, w in zip(ids, weights):
            text = tokenizer.decode(row[:np.argmax(w > 0)].tolist())  # the prompt
            question = text.removeprefix("<|user|>").split("<|end|>")[0]
            assert question.startswith("What is ") and question not in held
            seen += 1
    assert seen == 30 * 64


@pytest.mark.slow
def test_retraining_with_the_same_seed_gives_the_same_weights(tmp_path):
    """The script is deterministic for a seed (here 8 steps and 4 held-out problems; the shipped model is the command in
    its training.json, on this machine kind)."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "train" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    digests = []
    for name in ("a", "b"):
        assert (script.main(["--output", str(tmp_path / name), "--steps", "8", "--held-out", "4", "--quiet"])
                == cli.EXIT_OK)
        digests.append(json.loads((tmp_path / name / "training.json").read_text())["model_safetensors_sha256"])
    assert digests[0] == digests[1]
    assert script.main(["--output", str(tmp_path / "a"), "--steps", "20", "--quiet"]) == cli.EXIT_USAGE  # exists
