"""lm-evaluation-harness, a client nobody here wrote, against the server (where it is installed:
`pip install 'phi4-jax[eval]'`), beside lm-eval's own `hf` backend on the same demo folder."""

import pytest

import phi4_jax
from conftest import serving
from phi4_jax.checkpoints.hub import DEMO_FOLDER
from test_bench import bench_module

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'phi4-jax[eval]')")


@pytest.mark.slow
def test_lm_eval_scores_and_answers_as_its_hf_backend_does(tmp_path):
    """A multiple-choice task through `local-completions` (echo + logprobs, token-id prompts, the
    remote tokenizer endpoints) gives each choice transformers' log-likelihood within 1e-4 and the
    same accuracy; a generation task through `local-chat-completions` gives the same answers."""
    evals = bench_module("eval")
    tasks = evals.write_tasks(str(tmp_path), "demo", 8, 8)
    with serving(*phi4_jax.load("demo", dtype="float32", progress=False), max_batch=4) as (port, _):
        ours = evals.served(f"http://127.0.0.1:{port}", "demo", tasks, str(tmp_path))
    got = evals.record("demo", tasks, ours, evals.hf(DEMO_FOLDER, tasks, str(tmp_path)))
    assert got["docs"] == got["generated"] == 8 and got["choices"] == 32
    assert got["max_loglikelihood_difference"] <= 1e-4
    assert got["accuracy_served"] == got["accuracy_hf"] and got["same_choices"] == 8
    assert got["same_answers"] == 8 and got["exact_match_served"] == got["exact_match_hf"]
