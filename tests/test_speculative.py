"""Prompt-lookup speculation: the proposer against a plain search, and the same tokens as plain decoding."""

import numpy as np
import pytest

from phi4_jax.engine import speculative
from phi4_jax.engine.engine import Engine
from phi4_jax.engine.runner import ModelRunner
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.engine.speculative import Speculation
from phi4_jax.errors import ConfigError

NEW = 40


def reference_proposal(tokens, spec):
    """The drafts by a plain search: the longest n-gram (max_n down to min_n) ending the tokens that
    occurred before, at its latest occurrence, and the (at most k) known tokens after it."""
    p = len(tokens) - 1
    for n in range(spec.max_n, spec.min_n - 1, -1):
        if n > p + 1:
            continue
        suffix = tokens[p - n + 1:]
        for end in range(p - 1, n - 2, -1):
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + spec.k]
    return []


@pytest.mark.parametrize("spec", [Speculation(4, 2, 4), Speculation(3, 1, 3), Speculation(6, 3, 5)])
def test_proposals_are_the_longest_latest_ngram_match(spec):
    rng = np.random.default_rng(0)
    rows, slots = 64, 48
    history = rng.integers(0, 5, (rows, slots)).astype(np.int32)  # few distinct tokens: many matches
    history[::3, 20:40] = history[::3, 0:20]  # and long repeats
    positions = rng.integers(0, slots, rows).astype(np.int32)
    drafts, count = map(np.asarray, speculative.propose(history, positions, spec))
    matched = 0
    for b in range(rows):
        want = reference_proposal(history[b, :positions[b] + 1].tolist(), spec)
        assert count[b] == len(want), b
        assert drafts[b, :count[b]].tolist() == want, b
        matched += bool(want)
    assert 0 < matched < rows  # both cases are checked


def test_failing_rows_rest_longer_each_time_and_an_accepted_draft_clears_it():
    misses, rest = np.zeros(3, np.int32), np.zeros(3, np.int32)
    proposed, running = np.array([True, True, False]), np.ones(3, bool)
    rests = []
    for _ in range(4):
        misses, rest = speculative.backed_off(misses, rest, proposed, np.array([0, 2, 0]), running)
        rests.append(np.asarray(rest).tolist())
    assert [r[0] for r in rests] == [1, 3, 7, 15]  # row 0 fails on and on
    assert [r[1] for r in rests] == [0, 0, 0, 0]  # row 1's drafts are accepted
    misses, rest = speculative.backed_off(misses, rest, np.zeros(3, bool), np.zeros(3, np.int32), running)
    assert np.asarray(rest).tolist() == [14, 0, 0]  # resting rows count down
    misses, rest = speculative.backed_off(misses, rest, np.array([True, False, False]), np.array([1, 0, 0]), running)
    assert np.asarray(misses)[0] == 0


@pytest.mark.parametrize("text, want", [("ngram", Speculation()), ("ngram:3", Speculation(3)),
                                        ("ngram:5:1:3", Speculation(5, 1, 3)), ("off", None), (None, None)])
def test_the_switch_reads_as_documented(text, want):
    assert Speculation.parse(text) == want


@pytest.mark.parametrize("text", ["ngram:0", "ngram:16", "ngram:4:3:2", "draft", "ngram:x", "ngram:4:2"])
def test_a_bad_switch_names_its_form(text):
    with pytest.raises(ConfigError, match="speculative"):
        Speculation.parse(text)


def repetitive_prompts(seed, lengths, vocab=256):
    """Prompts made of a short random phrase repeated (with a random head): input-grounded text."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        phrase = rng.integers(3, vocab, rng.integers(3, 7)).tolist()
        out.append((rng.integers(3, vocab, 2).tolist() + phrase * n)[:n])
    return out


def run(runner, prompts, params, steps_per_call=8):
    gen = runner.start(prompts, params, [[] for _ in prompts])
    out, tally = [[] for _ in prompts], np.zeros(3, np.int64)
    logprobs = [[] for _ in prompts]
    while not gen.finished:
        for b, new in enumerate(gen.advance(steps_per_call)):
            out[b] += new
            logprobs[b] += gen.new_logprobs[b] or []
        tally += gen.drafted.sum(axis=0)
    return out, logprobs, gen.finish_reasons(), tally


@pytest.fixture(scope="module")
def runners(tiny_model):
    """`runners(shape, spec)` -> (plain ModelRunner, speculating one) over the shared tiny model."""
    made = {}

    def get(shape, spec=Speculation(4)):
        if shape not in made:
            made[shape] = ModelRunner(tiny_model(shape)[0])
        plain = made[shape]
        return plain, ModelRunner(tiny_model(shape)[0], speculative=spec, speculative_rows=8)

    return get


# phi-4-mini's tiny preset is LongRoPE with an original context of 16: every row here crosses it.
@pytest.mark.parametrize("shape", ["phi-4-mini", "phi-4", "phi-3.5-mini", "phi-3-mini-4k"])
def test_greedy_tokens_equal_plain_decoding_with_rows_accepting_different_counts(runners, shape):
    plain, spec = runners(shape)  # (plain decoding's tokens are transformers': test_engine.py)
    prompts = repetitive_prompts(1, (5, 13, 9, 24))
    params = SamplingParams(max_tokens=NEW)
    want, _, reasons, none = run(plain, prompts, params)
    got, _, got_reasons, tally = run(spec, prompts, params)
    assert got == want and got_reasons == reasons
    assert none.sum() == 0 and tally[2] > 0  # drafts were accepted: the test can fail
    assert tally[2] < tally[1]  # and rejected


def test_seeded_sampling_penalties_logprobs_and_stops_equal_plain_decoding(runners):
    plain, spec = runners("phi-4", Speculation(5, 1, 3))
    prompts = repetitive_prompts(3, (9, 17, 6, 11))
    params = [SamplingParams(max_tokens=NEW, temperature=0.6, seed=7, top_k=5),
              SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.8, seed=1, logprobs=3),
              SamplingParams(max_tokens=NEW, repetition_penalty=1.3, presence_penalty=0.2, logprobs=2),
              SamplingParams(max_tokens=NEW - 11, stop_token_ids=(7, 9))]
    stops = [[], [], [], [7, 9]]

    def go(runner):
        gen = runner.start(prompts, params, stops)
        out, probs, tally = [[] for _ in prompts], [[] for _ in prompts], np.zeros(3, np.int64)
        while not gen.finished:
            for b, new in enumerate(gen.advance(8)):
                out[b] += new
                probs[b] += gen.new_logprobs[b] or []
            tally += gen.drafted.sum(axis=0)
        return out, probs, gen.finish_reasons(), tally

    want, want_probs, reasons, _ = go(plain)
    got, got_probs, got_reasons, tally = go(spec)
    assert got == want and got_reasons == reasons
    assert tally[2] > 0
    for a, b in zip(got_probs, want_probs):
        assert len(a) == len(b)
        for (x, top_x), (y, top_y) in zip(a, b):
            assert x == pytest.approx(y, abs=1e-4)
            assert [t for t, _ in top_x] == [t for t, _ in top_y]


def test_rows_in_a_continuous_batch_get_their_lone_tokens(runners, tiny_model):
    """Through the engine (rows joining a running batch, a stop string's host stop), against each
    request alone without speculation."""
    plain, spec = runners("phi-4-mini")
    prompts = repetitive_prompts(4, (10, 25, 7, 14, 19))
    params = [SamplingParams(max_tokens=NEW - 3 * i) for i in range(len(prompts))]
    alone = [run(plain, [p], q)[0][0] for p, q in zip(prompts, params)]
    engine = Engine(spec, max_batch=2, steps_per_call=6)
    engine.add_requests([(str(i), p, q) for i, (p, q) in enumerate(zip(prompts, params))])
    got = {str(i): [] for i in range(len(prompts))}
    for out in engine.outputs():
        got[out.request_id] += out.token_ids
    assert [got[str(i)] for i in range(len(prompts))] == alone
    load = engine.load()
    assert 0 < load.spec_accepted_tokens < load.spec_draft_tokens and load.spec_drafts > 0


def test_speculation_only_in_batches_of_its_row_count(tiny_model):
    model = tiny_model("phi-4-mini")[0]
    spec = ModelRunner(model, speculative="ngram:4", speculative_rows=2)
    prompts = repetitive_prompts(1, (5, 13, 9, 24))
    assert run(spec, prompts[:2], SamplingParams(max_tokens=NEW))[3][1] > 0
    assert run(spec, prompts, SamplingParams(max_tokens=NEW))[3][1] == 0  # (plain steps: tokens checked above)


def test_the_server_answers_as_plain_decoding_and_counts_the_drafts():
    """Through `phi4-jax serve`'s app and the `openai` client: each completion equals plain
    decoding's (`phi4_jax.generate`, no speculation), and /metrics counts drafts in ours and vLLM's names."""
    import urllib.request

    import openai

    import phi4_jax
    from conftest import serving

    model, tokenizer = phi4_jax.load("demo", dtype="float32", progress=False)
    prompts = ["<|user|>Say 12 34 12 34 12 34 12 34<|end|><|assistant|>", "one two three one two three one two",
               "<|user|>What is 64+64? What is 64+64?<|end|><|assistant|>"]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = [phi4_jax.generate(model, tokenizer, p, params) for p in prompts]
    with serving(model, tokenizer, max_batch=2, speculative="ngram:4:1:3") as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        got = [client.completions.create(model="demo", prompt=p, max_tokens=24, extra_body={"ignore_eos": True})
               .choices[0].text for p in prompts]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            metrics = r.read().decode()
    assert got == want

    def value(name):
        return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))

    assert 0 < value("phi4_jax_spec_decode_accepted_tokens_total") < value("phi4_jax_spec_decode_draft_tokens_total")
    assert value("vllm:spec_decode_num_accepted_tokens_total") == value("phi4_jax_spec_decode_accepted_tokens_total")


def test_drafts_stop_at_longropes_switch(runners):
    """Prompts ending just before the tiny Phi-4-mini's original context (16): drafts accepted across
    it would be keys of the short table where transformers re-encodes with the long one (each of
    these rows' tokens differs without the stop)."""
    plain, spec = runners("phi-4-mini", Speculation(4, 1, 3))
    prompts = [repetitive_prompts(seed, (9, 11, 12, 13, 14))[row] for seed, row in ((3, 0), (10, 4), (14, 1))]
    params = SamplingParams(max_tokens=20)
    got, _, _, tally = run(spec, prompts, params)
    assert got == run(plain, prompts, params)[0] and tally[2] > 0
