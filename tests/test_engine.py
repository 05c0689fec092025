"""The decode engine against transformers' generate(do_sample=False), batches, LongRoPE crossing, stops."""

import jax
import numpy as np
import pytest
import torch

from phi4_jax.engine.runner import RING, ModelRunner, Generation
from phi4_jax.errors import ConfigError
from phi4_jax.engine.sampling import SamplingParams

NEW = 32
LENGTHS = (5, 11, 3)  # different lengths in one batch; with 32 new tokens all cross 16


@pytest.fixture(scope="module")
def engines(tiny_model):
    """`engines(shape)` -> (an ModelRunner of the shared tiny model, transformers' model)."""
    made = {}

    def get(shape):
        if shape not in made:
            model, hf = tiny_model(shape)
            made[shape] = (ModelRunner(model), hf)
        return made[shape]

    return get


def prompts(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in lengths]


def run(engine, batch, params=SamplingParams(max_tokens=NEW), stop_ids=None, steps_per_call=8):
    gen = engine.start(batch, params, stop_ids or [[] for _ in batch])
    out = [[] for _ in batch]
    while not gen.finished:
        for row, new in zip(out, gen.advance(steps_per_call)):
            row += new
    return out, gen.finish_reasons()


def hf_greedy(hf, prompt, drop_cache_at_crossing=True):
    """transformers alone on one prompt, no EOS (so exactly NEW tokens)."""
    kwargs = dict(do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if drop_cache_at_crossing:
            out = hf.generate(torch.tensor([prompt]), **kwargs)
        else:  # the generic path, which keeps short-table keys in the cache past the threshold
            from transformers import GenerationMixin
            cls = type(hf)
            own = cls.prepare_inputs_for_generation
            cls.prepare_inputs_for_generation = GenerationMixin.prepare_inputs_for_generation
            try:
                out = hf.generate(torch.tensor([prompt]), **kwargs)
            finally:
                cls.prepare_inputs_for_generation = own
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("shape", [pytest.param("phi-4", marks=pytest.mark.slow), "phi-4-mini",
                                   pytest.param("phi-3-mini-4k", marks=pytest.mark.slow)])
def test_greedy_batch_equals_transformers_per_prompt(engines, shape):
    """phi-4: GQA 4:1; Phi-4-mini: LongRoPE crossing original_max_position_embeddings (16)
    during generation; Phi-3-mini-4k: sliding window (7) shorter than the sequences."""
    engine, hf = engines(shape)
    batch = prompts()
    got, reasons = run(engine, batch)
    assert reasons == ["length"] * len(batch)
    for prompt, tokens in zip(batch, got):
        assert tokens == hf_greedy(hf, prompt)
        assert run(engine, [prompt])[0][0] == tokens  # alone == in the batch


@pytest.mark.parametrize("shape, prefill_piece", [
    ("phi-4-mini", 6), pytest.param("phi-3-mini-4k", 3, marks=pytest.mark.slow)])
def test_prefill_in_pieces_equals_transformers(tiny_model, shape, prefill_piece):
    """Prompts (and Phi-4-mini's re-encode at the threshold) prefilled `prefill_piece` tokens at a
    time, each piece attending over the cache; 6 and 3 leave a shorter last piece of the bucket."""
    model, hf = tiny_model(shape)
    engine = ModelRunner(model, prefill_piece=prefill_piece)
    batch = prompts(seed=5)
    got, _ = run(engine, batch)
    assert got == [hf_greedy(hf, p) for p in batch]


def test_long_prompts_attend_in_causal_blocks_as_transformers(tmp_path):
    """A prompt longer than `attention.CAUSAL_BLOCK`, in one piece (its queries in blocks, each over
    the keys up to it) and in pieces of 512 over the cache (each piece's blocks over the slots it
    reaches), gives transformers' greedy tokens, alone and beside a short prompt."""
    import phi4_jax
    from phi4_jax.model import attention
    from tiny_models import make_hf_model

    hf = make_hf_model("phi-4", max_position_embeddings=2048, original_max_position_embeddings=2048)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    runner = ModelRunner(phi4_jax.load(str(tmp_path), dtype="float32", progress=False)[0])
    long, short = prompts(seed=8, lengths=(1100, 9))
    assert len(long) > 4 * attention.CAUSAL_BLOCK
    want = hf_greedy(hf, long)
    assert run(runner, [long])[0] == [want]
    assert run(runner, [short, long])[0] == [hf_greedy(hf, short), want]
    pieces = list(runner.start_in_pieces(long, SamplingParams(max_tokens=NEW), [], piece=512))
    gen, out = pieces[-1], pieces[-1].advance(0)[0]
    while not gen.finished:
        out += gen.advance(8)[0]
    assert len(pieces) == 3 and out == want


@pytest.mark.parametrize("shape", ["phi-4", pytest.param("phi-4-mini", marks=pytest.mark.slow)])
def test_repetition_penalty_equals_transformers_generate(engines, shape):
    """Greedy with HF's repetition penalty (tokens of the prompt and the output so far), per row in
    one batch, against transformers' `generate(repetition_penalty=1.3)` on each prompt alone."""
    engine, hf = engines(shape)
    batch = prompts(seed=11)
    params = [SamplingParams(max_tokens=NEW, repetition_penalty=1.3), SamplingParams(max_tokens=NEW),
              SamplingParams(max_tokens=NEW, repetition_penalty=1.3)]
    got, _ = run(engine, batch, params)
    for prompt, tokens, p in zip(batch, got, params):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                              pad_token_id=0, repetition_penalty=p.repetition_penalty)
        assert tokens == out[0, len(prompt):].tolist()
    assert got[0] != run(engine, batch[:1])[0][0]  # the penalty changes the tokens: the test can fail


def test_crossing_matters(engines):
    """Without transformers' re-encoding at the threshold the tokens differ: the test can fail."""
    engine, hf = engines("phi-4-mini")
    batch = prompts()
    got, _ = run(engine, batch)
    stale = [hf_greedy(hf, p, drop_cache_at_crossing=False) for p in batch]
    assert any(g != s for g, s in zip(got, stale))


def test_a_prompt_past_the_threshold_needs_no_crossing(engines):
    engine, hf = engines("phi-4-mini")
    batch = prompts(seed=1, lengths=(20, 17))
    got, _ = run(engine, batch)
    assert got == [hf_greedy(hf, p) for p in batch]


def test_steps_per_call_do_not_change_tokens(engines):
    engine, _ = engines("phi-4-mini")
    batch = prompts(seed=2)
    assert run(engine, batch, steps_per_call=1)[0] == run(engine, batch, steps_per_call=NEW)[0]


def test_the_host_reads_new_tokens_only_whatever_the_cache_length(engines, monkeypatch):
    """Each call copies a few numbers and the newest tokens per row to the host, nothing as long as
    the cache: a cache four times longer reads the same bytes, call for call, and gives the same tokens."""
    engine, _ = engines("phi-4-mini")
    real, read = jax.device_get, []
    monkeypatch.setattr(jax, "device_get", lambda tree: read.append(
        sum(x.nbytes for x in jax.tree.leaves(tree))) or real(tree))
    runs = {}
    for length in (64, 256):
        read.clear()
        gen = engine.empty(len(LENGTHS), length)
        out = gen.admit(range(len(LENGTHS)), engine.prefill_packed(
            prompts(), [SamplingParams(max_tokens=NEW)] * len(LENGTHS), [[]] * len(LENGTHS)))
        while not gen.finished:
            out = [a + b for a, b in zip(out, gen.advance(NEW))]
        runs[length] = (out, list(read))
    assert runs[64] == runs[256]


@pytest.mark.slow  # 150 tokens across the 128-slot boundary, against transformers
def test_decode_attending_over_the_reached_slots_equals_transformers(engines, monkeypatch):
    """Each decode call attends over the first 128 or 256 slots its rows can reach (the cache holds
    256): the tokens are transformers', and a call ends where its rows would pass them."""
    engine, hf = engines("phi-4-mini")
    batch, new = prompts(seed=4, lengths=(100, 40, 3)), 150
    attended = []
    spy = Generation._attended
    monkeypatch.setattr(Generation, "_attended", lambda g, *a: attended.append(spy(g, *a)) or attended[-1])
    got, _ = run(engine, batch, SamplingParams(max_tokens=new), steps_per_call=64)
    assert {a for a, _ in attended} == {128, 256}
    # Calls of at most RING steps (the first: row 0 from slot 100 could run 28 within 128 slots).
    assert attended[0] == (128, RING) and max(steps for _, steps in attended) == RING
    for prompt, tokens in zip(batch, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == want


def test_stop_tokens_and_limits_per_row(engines):
    engine, _ = engines("phi-4")
    batch = prompts(seed=3)
    free, _ = run(engine, batch)
    stop = free[0][5]
    first = free[0].index(stop)  # the stop token may occur earlier than step 5
    params = [SamplingParams(max_tokens=NEW), SamplingParams(max_tokens=4), SamplingParams(max_tokens=NEW)]
    got, reasons = run(engine, batch, params, stop_ids=[[stop], [], []])
    assert got[0] == free[0][:first + 1] and reasons[0] == "stop"  # the stop token ends the row, included
    assert got[1] == free[1][:4] and reasons[1] == "length"
    assert got[2] == free[2] and reasons[2] == "length"


def test_host_stop_ends_rows(engines):
    engine, _ = engines("phi-4")
    batch = prompts(seed=4)
    gen = engine.start(batch, SamplingParams(max_tokens=NEW), [[] for _ in batch])
    first = gen.advance(3)
    gen.stop([1])
    rest = gen.advance(NEW)
    assert rest[1] == [] and len(first[1]) == 4  # the prefill's token plus three steps
    assert gen.finish_reasons()[1] == "stop"
    while not gen.finished:
        gen.advance(NEW)
    assert gen.finish_reasons()[0] == "length"


def test_seeded_sampling_reproduces_and_rows_are_independent(engines):
    engine, _ = engines("phi-4-mini")
    batch = prompts(seed=5)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=NEW),
              SamplingParams(temperature=0.8, top_k=20, seed=8, max_tokens=NEW),
              SamplingParams(max_tokens=NEW)]
    first, _ = run(engine, batch, params)
    assert run(engine, batch, params)[0] == first
    assert run(engine, batch[:1], params[:1])[0][0] == first[0]
    other = [SamplingParams(temperature=1.0, top_p=0.9, seed=9, max_tokens=NEW)]
    assert run(engine, batch[:1], other)[0][0] != first[0]


def test_context_limits(engines):
    engine, _ = engines("phi-4")  # max_position_embeddings 64
    with pytest.raises(ConfigError, match="64 tokens.*64"):
        engine.start([[5] * 64], SamplingParams(), [[]])
    with pytest.raises(ConfigError, match="empty"):
        engine.start([[]], SamplingParams(), [[]])
    # Generation stops at the end of the context: 60 + 4 = 64.
    got, reasons = run(engine, [[5] * 60], SamplingParams(max_tokens=NEW))
    assert len(got[0]) == 4 and reasons == ["length"]


def test_prompt_bucket_wider_than_a_capped_context(tiny_model):
    """A 40-token prompt is padded to 64, past a 50-token context: the prompt still fits."""
    model, hf = tiny_model("phi-4")
    engine = ModelRunner(model, max_context=50)
    prompt = prompts(seed=6, lengths=(40,))[0]
    got, reasons = run(engine, [prompt], SamplingParams(max_tokens=NEW))
    assert len(got[0]) == 10 and reasons == ["length"]
    assert got[0] == hf_greedy(hf, prompt)[:10]


@pytest.mark.parametrize("shape,first,second", [
    ("phi-4", 6, 5),  # the next turn extends the cached sequence
    ("phi-4-mini", 5, 4),  # stays under original_max_position_embeddings (16): reused
    ("phi-4-mini", 10, 9),  # crosses it: transformers re-encodes, so no reuse
])
def test_next_turn_reuses_the_cache_and_gives_the_same_tokens(engines, shape, first, second):
    engine, _ = engines(shape)
    turn1 = prompts(seed=7, lengths=(first,))[0]
    params = SamplingParams(max_tokens=4)
    gen = engine.start([turn1], params, [[]])
    reply = []
    while not gen.finished:
        reply += gen.advance(4)[0]
    turn2 = turn1 + reply + prompts(seed=8, lengths=(second,))[0]
    fresh = engine.start([turn2], params, [[]])
    want = fresh.advance(4)[0]
    again = engine.start([turn2], params, [[]], continuing=gen)
    assert again.advance(4)[0] == want
    crosses = len(turn2) > 16 and shape == "phi-4-mini"
    # The reply's last token was never fed to the model, so the cache holds one token less.
    assert again.reused_tokens == (0 if crosses else len(turn1) + len(reply) - 1)


@pytest.mark.parametrize("shape", ["phi-4", pytest.param("phi-3-mini-4k", marks=pytest.mark.slow)])
def test_next_turn_prefilled_in_pieces_gives_the_fresh_tokens(tiny_model, shape):
    """A chat's next turn (starts > 0) prefilled 3 tokens at a time over the cached sequence."""
    model, _ = tiny_model(shape)
    engine, whole = ModelRunner(model, prefill_piece=3), ModelRunner(model)
    turn1 = prompts(seed=9, lengths=(7,))[0]
    params = SamplingParams(max_tokens=4)
    gen = engine.start([turn1], params, [[]])
    reply = []
    while not gen.finished:
        reply += gen.advance(4)[0]
    turn2 = turn1 + reply + prompts(seed=10, lengths=(9,))[0]
    again = engine.start([turn2], SamplingParams(max_tokens=8), [[]], continuing=gen)
    assert again.reused_tokens == len(turn1) + len(reply) - 1
    assert again.advance(8)[0] == whole.start([turn2], SamplingParams(max_tokens=8), [[]]).advance(8)[0]


@pytest.mark.parametrize("batch", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_decode_updates_the_cache_in_place_and_reads_it_as_it_lies(engines, batch):
    """The compiled decode loop makes one in-place update per layer's keys and values a step, and
    no copy of a cache layer (at batch 1 XLA:CPU once copied every layer several times a step) nor
    a transposed one (once made for the values' product)."""
    import re

    import jax.numpy as jnp

    from phi4_jax.engine.runner import _decode

    engine, _ = engines("phi-3.5-mini")  # one query head per KV head: the shape that was copied
    gen = engine.start(prompts(lengths=(3,) * batch), SamplingParams(max_tokens=200), [[]] * batch)
    c = engine.config
    layers, kv, slots, d = c.num_hidden_layers, c.num_key_value_heads, gen.state.cache.length, c.head_dim
    hlo = _decode.lower(engine.graphdef, engine.params, gen.state, jnp.int32(4)).compile().as_text()

    def made(dims):  # top-level ops that produce an array of these dims (batch axis optional)
        shape = rf"f32\[(?:{batch},)?{','.join(map(str, dims))}\]"
        return [m.group(1) for m in re.finditer(rf"\n  %\S+ = {shape}\{{[0-9,]+\}} ([a-z-]+)\(", hlo)]

    assert made((kv, slots, d)).count("fusion") == 2 * layers
    assert "copy" not in made((kv, slots, d))
    assert made((kv, d, slots)) == []


def test_prompt_logprobs_are_transformers_log_softmax_over_each_prompt(tiny_model):
    """`SamplingParams.prompt_logprobs`: prompts packed together (one across LongRoPE's threshold,
    one asking nothing, one again once its tokens are held, which is scored all the same) get each
    prompt token's log-probability and the likeliest ones: transformers' log-softmax of the prompt's
    logits (float32, eager); the generated tokens are unchanged."""
    from phi4_jax.engine.engine import Engine

    model, hf = tiny_model("phi-4-mini")
    engine = Engine(ModelRunner(model), max_batch=4, prefill_tokens=64)
    batch = prompts(seed=21, lengths=(5, 23, 9))
    asks = [3, None, 0]
    for i, (prompt, k) in enumerate(zip(batch, asks)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, prompt_logprobs=k))
    outputs = list(engine.outputs())
    engine.add_request("again", batch[0], SamplingParams(max_tokens=4, prompt_logprobs=3))  # (its prefix is held)
    outputs += list(engine.outputs())
    scored = {o.request_id: o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None}
    assert sorted(scored) == ["0", "2", "again"]
    # (packed alone at another width: the same numbers but for rounding)
    assert [[t for t, _ in e[1]] for e in scored["again"][1:]] == [[t for t, _ in e[1]] for e in scored["0"][1:]]
    np.testing.assert_allclose([e[0] for e in scored["again"][1:]], [e[0] for e in scored["0"][1:]], atol=1e-6)
    for key, prompt, k in [("0", batch[0], 3), ("2", batch[2], 0)]:
        with torch.no_grad():
            want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1).numpy()
        entries = scored[key]
        assert len(entries) == len(prompt) and entries[0] is None
        got = [e[0] for e in entries[1:]]
        np.testing.assert_allclose(got, want[np.arange(len(prompt) - 1), prompt[1:]], rtol=0, atol=1e-5)
        for (_, top, rank), row, token in zip(entries[1:], want, prompt[1:]):
            assert rank == 1 + (row > row[token]).sum()
            assert [t for t, _ in top] == np.argsort(-row)[:k].tolist()
            np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:k], rtol=0, atol=1e-5)
    tokens = {}
    for o in outputs:
        tokens.setdefault(o.request_id, []).extend(o.token_ids)
    for key, prompt in [("0", batch[0]), ("1", batch[1]), ("2", batch[2])]:
        assert tokens[key] == run(engine.runner, [prompt], SamplingParams(max_tokens=4))[0][0]
    with pytest.raises(ConfigError, match="prompt_logprobs needs a prompt of at most 64 tokens"):
        engine.add_request("long", list(range(3, 70)), SamplingParams(prompt_logprobs=1))
