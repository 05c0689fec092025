"""lm-evaluation-harness against phi4_jax's server and against lm-eval's own `hf` backend, on one folder.

Two tasks per model, made here from local data (lm-eval downloads nothing): multiple choice scored
by log-likelihood (lm-eval's `local-completions` against `phi4-jax serve`: `echo` with `logprobs`,
token-id prompts, the remote tokenizer endpoints; against `hf`: transformers' forward in float32),
and a short-answer generation task (`local-chat-completions` with the chat template against the
server; `hf` with `apply_chat_template`). Per model: each choice's log-likelihood on both sides
(the largest difference), both accuracies, and how many generated answers are the same.

The demo model's tasks are arithmetic in its chat format (held-out problems); SmolLM2-135M-Instruct
(`bench/smollm2.py`, a real trained checkpoint) answers general-knowledge questions.

  python bench/eval.py                      # both models: records in bench/results/eval.jsonl
  python bench/eval.py --model demo --limit 20
Needs lm-eval (`pip install 'phi4-jax[eval]'`) beside the test extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "eval.jsonl")
SCHEMA = "phi4_jax.bench.eval/1"
# (question, answer, three wrong answers): what a 135M-parameter instruct model may know.
FACTS = [
    ("What is the capital of France?", "Paris", ["London", "Berlin", "Madrid"]),
    ("What is the capital of Japan?", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("What is the capital of Italy?", "Rome", ["Paris", "Vienna", "Athens"]),
    ("What color is the sky on a clear day?", "blue", ["green", "red", "yellow"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "salt"]),
    ("Which animal is known as the king of the jungle?", "lion", ["mouse", "cow", "frog"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("How many days are in a week?", "seven", ["five", "ten", "twelve"]),
    ("What gas do plants take in from the air?", "carbon dioxide", ["helium", "neon", "argon"]),
    ("What is the opposite of hot?", "cold", ["warm", "loud", "fast"]),
    ("Which star is at the center of our solar system?", "the Sun", ["the Moon", "Sirius", "Polaris"]),
    ("What is the chemical symbol for water?", "H2O", ["CO2", "NaCl", "O3"]),
    ("How many continents are there on Earth?", "seven", ["three", "nine", "twelve"]),
    ("What language is spoken in Spain?", "Spanish", ["German", "Dutch", "Swedish"]),
]


def demo_problems(count: int) -> list[tuple[str, str]]:
    """Held-out arithmetic problems of the demo model (train/demo_data.py: never trained on)."""
    spec = importlib.util.spec_from_file_location("demo_data", os.path.join(ROOT, "train", "demo_data.py"))
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    return data.held_out(count)


def wrong_answers(answer: str, rng: np.random.Generator) -> list[str]:
    n, wrong = int(answer), set()
    while len(wrong) < 3:
        guess = n + int(rng.choice([-10, -2, -1, 1, 2, 10, 100]))
        if guess >= 0 and guess != n:
            wrong.add(str(guess))
    return sorted(wrong)


def task_docs(model: str, count: int) -> tuple[list[dict], list[dict], str]:
    """(multiple-choice docs, generation docs, the choices' delimiter) of `model`'s tasks."""
    rng = np.random.default_rng(0)
    mc, gen = [], []
    if model == "demo":
        for question, answer in demo_problems(count):
            choices = [answer, *wrong_answers(answer, rng)]
            order = rng.permutation(4)
            # (the chat format written out: the server's tokenizer reads the special tokens in it)
            mc.append({"prompt": f"<|user|>{question}<|end|><|assistant|>",
                       "choices": [choices[i] + "<|end|>" for i in order], "label": int(np.argmax(order == 0))})
            gen.append({"prompt": question, "answer": answer})
        return mc, gen, ""
    for question, answer, wrong in FACTS[:count]:
        choices = [answer, *wrong]
        order = rng.permutation(4)
        mc.append({"prompt": f"Question: {question}\nAnswer:", "choices": [choices[i] for i in order],
                   "label": int(np.argmax(order == 0))})
        gen.append({"prompt": f"{question} Answer in a few words.", "answer": answer})
    return mc, gen, " "


def write_tasks(folder: str, model: str, count: int, max_tokens: int) -> tuple[str, str]:
    """lm-eval task configs (and their JSON-lines data) in `folder`: (multiple-choice task, generation task)."""
    mc, gen, delimiter = task_docs(model, count)
    names = (f"phi4_jax_{model}_mc", f"phi4_jax_{model}_gen")
    for name, docs in zip(names, (mc, gen)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{{name}}.jsonl\n"
              "test_split: test\ndoc_to_text: '{{{{prompt}}}}'\n")
    with open(os.path.join(folder, f"{names[0]}.yaml"), "w") as f:
        f.write(f"task: {names[0]}\n" + common.format(name=names[0])
                + f"output_type: multiple_choice\ndoc_to_choice: '{{{{choices}}}}'\ndoc_to_target: label\n"
                  f"target_delimiter: {json.dumps(delimiter)}\nmetric_list:\n  - metric: acc\n")
    with open(os.path.join(folder, f"{names[1]}.yaml"), "w") as f:
        f.write(f"task: {names[1]}\n" + common.format(name=names[1])
                + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
                  f"generation_kwargs:\n  until: []\n  max_gen_toks: {max_tokens}\n  do_sample: false\n"
                  "  temperature: 0\nmetric_list:\n  - metric: exact_match\n")
    return names


def evaluate(model: str, model_args: str, tasks: list[str], folder: str, chat: bool) -> dict:
    """lm-eval's results for `tasks` (with each sample), as `lm_eval.simple_evaluate` gives them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=folder), apply_chat_template=chat,
                                   batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0)


def by_doc(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


def served(url: str, model: str, tasks: tuple[str, str], folder: str) -> tuple[dict, dict]:
    """lm-eval's results of the multiple-choice and the generation task against the server at `url`
    (serving `model`): token-id prompts tokenized by its remote tokenizer endpoints; chats as messages."""
    def args(path, **more):
        return ",".join(f"{k}={v}" for k, v in dict(model=model, base_url=url + path, num_concurrent=1,
                                                     max_retries=1, timeout=300, **more).items())

    mc, gen = tasks
    return (evaluate("local-completions", args("/v1/completions", tokenizer_backend="remote", tokenized_requests=True),
                     [mc], folder, chat=False),
            evaluate("local-chat-completions", args("/v1/chat/completions", tokenizer_backend="none",
                                                    tokenized_requests=False), [gen], folder, chat=True))


def hf(model_folder: str, tasks: tuple[str, str], folder: str) -> tuple[dict, dict]:
    """The same with lm-eval's own `hf` backend (transformers, float32) on the model's folder."""
    args = f"pretrained={model_folder},dtype=float32,device=cpu"
    return evaluate("hf", args, [tasks[0]], folder, chat=False), evaluate("hf", args, [tasks[1]], folder, chat=True)


def record(name: str, tasks: tuple[str, str], ours: tuple[dict, dict], theirs: tuple[dict, dict]) -> dict:
    """One model's comparison: log-likelihoods, accuracies and generated answers of both sides."""
    mc, gen = tasks
    ll, hf_ll = by_doc(ours[0], mc), by_doc(theirs[0], mc)
    differences = [abs(a[0] - b[0]) for d in ll for a, b in zip(ll[d], hf_ll[d])]
    answers, hf_answers = by_doc(ours[1], gen), by_doc(theirs[1], gen)
    best = lambda choices: int(np.argmax([c[0] for c in choices]))  # noqa: E731
    return {"schema": SCHEMA, "model": name, "docs": len(ll), "choices": len(differences),
            "max_loglikelihood_difference": max(differences),
            "accuracy_served": ours[0]["results"][mc]["acc,none"], "accuracy_hf": theirs[0]["results"][mc]["acc,none"],
            "same_choices": sum(best(ll[d]) == best(hf_ll[d]) for d in ll),
            "generated": len(answers), "same_answers": sum(answers[d] == hf_answers[d] for d in answers),
            "exact_match_served": ours[1]["results"][gen]["exact_match,none"],
            "exact_match_hf": theirs[1]["results"][gen]["exact_match,none"]}


def compare(name: str, folder: str, count: int, max_tokens: int) -> dict:
    """Both backends on `folder`'s model (`phi4-jax serve` started here): the record of one model."""
    from serve import start_server, stop_server

    with tempfile.TemporaryDirectory() as tasks_folder:
        tasks = write_tasks(tasks_folder, name, count, max_tokens)
        process, url = start_server(folder, max_batch=4, max_context=2048, mesh=None)
        try:
            ours = served(url, "bench", tasks, tasks_folder)
        finally:
            stop_server(process)
        return record(name, tasks, ours, hf(folder, tasks, tasks_folder))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["demo", "smollm2"], choices=["demo", "smollm2"],
                        help="the demo model and/or SmolLM2-135M-Instruct (built by bench/smollm2.py)")
    parser.add_argument("--limit", type=int, default=len(FACTS), help="documents per task (at most 16 for smollm2)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per answer")
    parser.add_argument("--output", default=RESULTS, help="JSON-lines file the records are appended to")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from runinfo import append_record, describe_run

    from phi4_jax import platforms
    from phi4_jax.checkpoints.hub import DEMO_FOLDER

    platforms.quiet_without_tpu()  # (libtpu, installed to plan TPU slices, would print its errors here)

    for name in args.model:
        if name == "demo":
            folder = DEMO_FOLDER
        else:
            import smollm2

            folder = smollm2.folder()
        record = {**compare(name, folder, args.limit, args.max_tokens), **describe_run()}
        append_record(args.output, record)
        print(f"| {name} | {record['docs']} ({record['choices']} choices) | "
              f"{record['max_loglikelihood_difference']:.1e} | {record['accuracy_served']:.2f} / "
              f"{record['accuracy_hf']:.2f} | {record['same_answers']} of {record['generated']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
