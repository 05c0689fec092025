"""The demo model's data: synthetic arithmetic chats, their tokenizer, the model's config, and its score.

The built-in demo model is a tiny Phi-4-mini-architecture model that does arithmetic in
Phi-4-mini's chat format; `train/demo.py` trains it from this, and the result ships in
`phi4_jax/demo_model/`.

A problem is `<|user|>What is 482+37?<|end|><|assistant|>519<|end|>`: addition or subtraction of
whole numbers of 1 to 3 digits (subtraction never goes below zero). The tokenizer is a byte-level
BPE with every digit its own token, Phi-4-mini's special tokens and its chat template.
"""

from __future__ import annotations

import json

import numpy as np

from phi4_jax.checkpoints.hub import DEMO_FOLDER
from phi4_jax.config import PRESETS

FOLDER = DEMO_FOLDER  # where the demo model ships

# Phi-4-mini's special tokens (ids 0..11 here) and chat template.
SPECIAL_TOKENS = ("<|endoftext|>", "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>",
                  "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
VOCAB_SIZE = 320  # at most: 256 bytes, 12 special tokens, merges for the words of the questions
LENGTH = 20  # tokens of the longest problem (3 + 3 digits, a 4-digit answer) and a pad


def problem(rng: np.random.Generator) -> tuple[str, str]:
    """A random question and its answer: ("What is 482+37?", "519")."""
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, 4)))) for _ in range(2))
    if rng.random() < 0.5:
        return f"What is {a}+{b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a}-{b}?", str(a - b)


def held_out(n: int = 500, seed: int = 1234) -> list[tuple[str, str]]:
    """`n` distinct problems that training never sees (training skips them)."""
    rng, seen = np.random.default_rng(seed), {}
    while len(seen) < n:
        question, answer = problem(rng)
        seen.setdefault(question, answer)
    return list(seen.items())


def chat_text(question: str, answer: str | None = None) -> str:
    """The chat-formatted problem (rendered as the chat template renders one user turn)."""
    prompt = f"<|user|>{question}<|end|><|assistant|>"
    return prompt if answer is None else f"{prompt}{answer}<|end|>"


def train_tokenizer(seed: int = 0):
    """A byte-level BPE `tokenizers.Tokenizer` over the questions' text, digits split one by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = np.random.default_rng(seed)
    texts = [" ".join(problem(rng)) for _ in range(2000)] + ["What is the answer?"]
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def config(vocab_size: int) -> dict:
    """config.json of the demo model: the `demo` preset (Phi-4-mini's architecture, scaled down) with
    the trained tokenizer's vocabulary."""
    return {"architectures": ["Phi3ForCausalLM"], **PRESETS["demo"], "vocab_size": vocab_size, "torch_dtype": "float32"}


def tokenizer_files(tokenizer) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json, as text."""
    end = SPECIAL_TOKENS.index("<|end|>")
    eot = SPECIAL_TOKENS.index("<|endoftext|>")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
                        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                        "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 256,
                        "chat_template": CHAT_TEMPLATE}
    generation_config = {"bos_token_id": eot, "eos_token_id": [end, eot], "pad_token_id": eot}
    return {"tokenizer.json": tokenizer.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
            "generation_config.json": json.dumps(generation_config, indent=2) + "\n"}


def batches(tokenizer, batch: int, length: int, seed: int, skip: set[str]):
    """Endless training batches `(ids [batch, length], weights)`; weights mark the answer and its
    closing <|end|>, the tokens the model learns to produce."""
    rng = np.random.default_rng(seed)
    while True:
        problems = []
        while len(problems) < batch:
            question, answer = problem(rng)
            if question not in skip:
                problems.append((question, answer))
        yield encode(tokenizer, problems, length)


def encode(tokenizer, problems: list[tuple[str, str]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Chat-formatted problems as `(ids [len(problems), length], weights)`, padded; weights mark the
    answer and its closing <|end|>."""
    pad = SPECIAL_TOKENS.index("<|endoftext|>")
    prompts = tokenizer.encode_batch([chat_text(q) for q, _ in problems])
    answers = tokenizer.encode_batch([a + "<|end|>" for _, a in problems])
    ids = np.full((len(problems), length), pad, np.int32)
    weights = np.zeros((len(problems), length), np.float32)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        full = prompt.ids + answer.ids
        ids[row, :len(full)] = full
        weights[row, len(prompt.ids):len(full)] = 1.0
    return ids, weights


def accuracy(model, tokenizer, problems: list[tuple[str, str]], batch: int = 100) -> float:
    """Exact-match share of greedy answers through the chat template (`phi4_jax.generate`)."""
    from phi4_jax import ModelRunner, SamplingParams, generate

    engine = ModelRunner(model, max_context=64)
    params = SamplingParams(max_tokens=6)  # answers have at most 4 digits, then <|end|>
    right = 0
    for start in range(0, len(problems), batch):
        group = problems[start:start + batch]
        answers = generate(engine, tokenizer, [[{"role": "user", "content": q}] for q, _ in group], params)
        right += sum(got.strip() == want for got, (_, want) in zip(answers, group))
    return right / len(problems)
