"""The sampler against NumPy references and transformers' logits processors; seeds, per-row
parameters, the drawn distribution, and SamplingParams validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from phi4_jax.errors import SamplingError
from phi4_jax.engine.sampling import (SamplingParams, process_logits, sample, sampler_state,
                               update_history)

BATCH, VOCAB = 9, 64  # most tests use this one shape, so each function compiles about once
TRACES = []  # one entry per trace of sample_jit: recompiles are visible


def _counted_sample(*args):
    TRACES.append(args[0].shape)
    return sample(*args)


# Jitted once here: eager op-by-op dispatch compiles every primitive per shape, which is slow.
sample_jit, process_jit = jax.jit(_counted_sample), jax.jit(process_logits)


def random_logits(batch=BATCH, vocab=VOCAB, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale


def no_history(batch=BATCH, vocab=VOCAB):
    return jnp.zeros((batch, vocab), bool), jnp.zeros((batch, vocab), jnp.int32)


# NumPy references, one row at a time, in float64, written from HF's warpers.
def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_top_k(x, k):
    if k <= 0:
        return x
    return np.where(x < np.sort(x)[-min(k, x.size)], -np.inf, x)


def np_top_p(x, p):
    if p >= 1:
        return x
    order = np.argsort(x, kind="stable")
    remove = np.cumsum(np_softmax(x[order])) <= 1 - p
    remove[-1] = False
    out = x.copy()
    out[order[remove]] = -np.inf
    return out


def np_min_p(x, m):
    probs = np_softmax(x)
    remove = probs < m * probs.max()
    remove[np.argmax(probs)] = False
    return np.where(remove, -np.inf, x)


def np_filter(x, p: SamplingParams):
    x = x.astype(np.float64) / p.temperature
    return np_min_p(np_top_p(np_top_k(x, p.top_k), p.top_p), p.min_p)


def hf_filter(x, p: SamplingParams):
    """The warpers HF's generate() builds for these parameters (it skips the ones left at default)."""
    warpers = [TemperatureLogitsWarper(float(p.temperature))]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        warpers.append(MinPLogitsWarper(p.min_p))
    scores = torch.from_numpy(x[None].copy())
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0].numpy()


FILTER_ROWS = {
    "top_k": [dict(top_k=k) for k in (1, 2, 5, 17, VOCAB - 1, VOCAB, VOCAB + 10, 0, -1)],
    "top_p": [dict(top_p=p) for p in (0.01, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0)],
    "min_p": [dict(min_p=m) for m in (1.0, 0.5, 0.2, 0.05, 0.01, 1e-4, 0.0)],
    "all": [dict(top_k=10, top_p=0.8, min_p=0.1, temperature=0.7), dict(top_k=30, top_p=0.95, min_p=0.02),
            dict(top_k=3, top_p=0.5, temperature=2.0), dict(top_p=0.6, min_p=0.3, temperature=1.5),
            dict(top_k=40, min_p=0.05, temperature=0.5), dict(temperature=3.0), dict(top_k=1, top_p=0.01)],
}


@pytest.mark.parametrize("kind", FILTER_ROWS)
def test_filters_match_numpy_and_transformers(kind):
    rows = FILTER_ROWS[kind] + [{}] * (BATCH - len(FILTER_ROWS[kind]))  # padded with unfiltered rows
    params = [SamplingParams(**{"temperature": 1.0, **row}) for row in rows]
    logits = random_logits(seed=len(kind))
    ours = np.asarray(process_jit(jnp.asarray(logits), sampler_state(params, BATCH), *no_history()))
    kept_counts = []
    for row, p in enumerate(params):
        reference, hf = np_filter(logits[row], p), hf_filter(logits[row], p)
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(reference), err_msg=f"{p}")
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(hf), err_msg=f"{p}")
        kept = np.isfinite(reference)
        np.testing.assert_allclose(ours[row][kept], reference[kept], rtol=1e-6)
        np.testing.assert_allclose(ours[row][kept], hf[kept], rtol=1e-6)
        kept_counts.append(kept.sum())
    # The rows span from one kept token to the whole vocabulary, so the masks really differ.
    assert min(kept_counts) == 1 and max(kept_counts) == VOCAB and len(set(kept_counts)) >= 4


def test_top_k_keeps_ties_with_the_kth_value_like_hf():
    logits = np.zeros((BATCH, VOCAB), np.float32)
    logits[:, :6] = [3.0, 1.0, 2.0, 2.0, 0.5, 2.0]
    state = sampler_state(SamplingParams(temperature=1.0, top_k=2), BATCH)
    ours = np.asarray(process_jit(jnp.asarray(logits), state, *no_history()))
    hf = TopKLogitsWarper(2)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(ours, hf)
    assert np.isfinite(ours[0]).sum() == 4  # 3.0 and all three 2.0s


def test_penalties_match_formulas_and_transformers():
    batch = BATCH
    rng = np.random.default_rng(1)
    logits = random_logits(seed=2)
    seen = rng.random((batch, VOCAB)) < 0.3
    counts = np.where(seen & (rng.random((batch, VOCAB)) < 0.7), rng.integers(1, 5, (batch, VOCAB)), 0)
    top = np.argmax(logits, axis=-1)
    seen[np.arange(batch), top], counts[np.arange(batch), top] = True, 2  # so greedy can move
    rows = [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7, presence_penalty=0.5),
            dict(frequency_penalty=0.4),
            dict(repetition_penalty=2.0, presence_penalty=-1.0, frequency_penalty=1.5),
            dict(), dict(presence_penalty=2.0), dict(frequency_penalty=-0.5), dict(repetition_penalty=1.05),
            dict(repetition_penalty=1.5, frequency_penalty=0.1)]
    params = [SamplingParams(**row) for row in rows]  # greedy: process_logits only penalises
    seen_j, counts_j = jnp.asarray(seen), jnp.asarray(counts, jnp.int32)
    ours = np.asarray(process_jit(jnp.asarray(logits), sampler_state(params, batch), seen_j, counts_j))
    # The repetition penalty alone (no counts), for transformers' processor.
    only_rep = np.asarray(process_jit(
        jnp.asarray(logits), sampler_state([SamplingParams(repetition_penalty=p.repetition_penalty)
                                            for p in params], batch), seen_j, jnp.zeros_like(counts_j)))
    for row, p in enumerate(params):
        x = logits[row].astype(np.float64)
        rep = p.repetition_penalty
        x = np.where(seen[row], np.where(x > 0, x / rep, x * rep), x)
        x = x - p.presence_penalty * (counts[row] > 0) - p.frequency_penalty * counts[row]
        np.testing.assert_allclose(ours[row], x, rtol=1e-6, atol=1e-6)
        if rep != 1.0:
            input_ids = torch.from_numpy(np.flatnonzero(seen[row])[None])
            scores = torch.from_numpy(logits[row:row + 1].copy())
            hf = RepetitionPenaltyLogitsProcessor(rep)(input_ids, scores)
            np.testing.assert_allclose(only_rep[row], hf[0].numpy(), rtol=1e-6)
    # Temperature 0 picks the argmax of the penalised logits, which the penalties moved.
    tokens = np.asarray(sample_jit(jnp.asarray(logits), sampler_state(params, batch), jnp.int32(0),
                                   seen_j, counts_j))
    np.testing.assert_array_equal(tokens, np.argmax(ours, axis=-1))
    assert (np.argmax(ours, -1) != np.argmax(logits, -1)).any()


def test_update_history_counts_and_ignores_out_of_range():
    seen, counts = no_history(3, 8)
    for tokens in ([1, 7, 0], [1, -1, 0], [1, 2, 8], [5, 2, 0]):
        seen, counts = jax.jit(update_history)(seen, counts, jnp.array(tokens, jnp.int32))
    expected = np.zeros((3, 8), np.int32)
    expected[0, 1], expected[0, 5] = 3, 1
    expected[1, 7], expected[1, 2] = 1, 2  # the -1 counted nowhere
    expected[2, 0] = 3  # the 8 (= V) counted nowhere
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(seen, expected > 0)


def test_greedy_is_argmax_and_ignores_filters_keys_and_steps():
    logits = random_logits(seed=3)
    assert all(len(set(row)) == VOCAB for row in logits)  # no ties: the argmax is unique
    params = [SamplingParams(top_k=k, top_p=p, min_p=m, seed=s)
              for k, p, m, s in [(0, 1.0, 0.0, None), (1, 0.5, 0.9, 1), (5, 0.1, 0.0, 2),
                                 (0, 0.9, 0.5, None), (-1, 1.0, 1.0, 3), (2, 0.2, 0.2, 4),
                                 (40, 0.3, 0.0, None), (0, 1.0, 0.1, 5), (3, 1.0, 0.0, None)]]
    state = sampler_state(params, BATCH)
    for step in (0, 7):
        tokens = sample_jit(jnp.asarray(logits), state, jnp.int32(step), *no_history())
        assert tokens.dtype == jnp.int32 and tokens.shape == (BATCH,)
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    # Greedy rows are only penalised (HF applies no warper without sampling): nothing is cut.
    np.testing.assert_array_equal(process_jit(jnp.asarray(logits), state, *no_history()), logits)
    # With ties the first maximal index wins, as np.argmax.
    tied = np.zeros((BATCH, VOCAB), np.float32)
    for row in range(BATCH - 1):
        tied[row, [row + 2, row + 5, 60]] = 1.0
    tokens = sample_jit(jnp.asarray(tied), state, jnp.int32(0), *no_history())
    np.testing.assert_array_equal(tokens, [*range(2, BATCH + 1), 0])


def test_seed_reproduces_eager_and_jitted_and_seeds_steps_differ():
    batch, steps = BATCH, 6
    logits = jnp.zeros((batch, VOCAB))  # uniform: a repeat of a 6-token sequence by chance is ~1e-11
    seen, counts = no_history()

    def run(fn, params, default_seed=0):
        state = sampler_state(params, batch, default_seed=default_seed)
        return np.stack([fn(logits, state, jnp.int32(t), seen, counts) for t in range(steps)], axis=1)

    seeded = [SamplingParams(temperature=1.0, seed=s) for s in (123, 123, 7, 8, 9, 10, 11, 12, 13)]
    eager = run(sample, seeded)
    np.testing.assert_array_equal(eager, run(sample, seeded))
    np.testing.assert_array_equal(eager, run(sample_jit, seeded))
    assert (eager[0] == eager[1]).all() and (eager[0] != eager[2]).any()  # the seed, not the row
    assert len(set(eager[0])) > steps // 2  # steps differ
    # A seed's key is PRNGKey(seed); seeds past 32 bits keep their high bits instead of colliding.
    keys = sampler_state([SamplingParams(seed=s) for s in (5, 2**32 + 5, -1)], 3).keys
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.random.PRNGKey(5)))
    np.testing.assert_array_equal(keys[1:], [[1, 5], [2**32 - 1, 2**32 - 1]])  # x64 PRNGKey's keys
    # Unseeded rows differ from each other and follow default_seed.
    unseeded = [SamplingParams(temperature=1.0)] * batch
    a, b = run(sample_jit, unseeded, 0), run(sample_jit, unseeded, 1)
    np.testing.assert_array_equal(a, run(sample_jit, unseeded, 0))
    assert (a[0] != a[1]).any() and (a != b).any(axis=1).all()


def test_per_row_parameters_behave_like_each_row_alone_and_do_not_recompile():
    rows = [dict(), dict(temperature=0.8, top_k=5, seed=1), dict(temperature=1.3, top_p=0.7, seed=2),
            dict(temperature=1.0, min_p=0.1, repetition_penalty=1.2, seed=3),
            dict(temperature=0.6, presence_penalty=1.0, frequency_penalty=0.5, top_k=20, top_p=0.9, seed=4),
            dict(temperature=2.0, seed=5), dict(repetition_penalty=1.5, frequency_penalty=1.0),
            dict(temperature=1.0, top_k=2, min_p=0.5, seed=6), dict(temperature=0.9, top_p=0.3, seed=7)]
    params = [SamplingParams(**row) for row in rows]
    batch = len(params)
    rng = np.random.default_rng(4)
    logits = jnp.asarray(random_logits(seed=5, scale=1.0))
    seen = jnp.asarray(rng.random((batch, VOCAB)) < 0.2)
    counts = jnp.asarray(rng.integers(0, 3, (batch, VOCAB)), jnp.int32) * seen

    together = np.stack([sample_jit(logits, sampler_state(params, batch), jnp.int32(t), seen, counts)
                         for t in range(6)], axis=1)
    processed = process_jit(logits, sampler_state(params, batch), seen, counts)
    for row, p in enumerate(params):
        one = slice(row, row + 1)
        alone = np.stack([sample_jit(logits[one], sampler_state(p, 1), jnp.int32(t), seen[one], counts[one])
                          for t in range(6)], axis=1)
        np.testing.assert_array_equal(together[row], alone[0], err_msg=f"{p}")
        np.testing.assert_array_equal(processed[row], process_jit(logits[one], sampler_state(p, 1),
                                                                     seen[one], counts[one])[0])
    # Other values of every parameter reuse the compiled step.
    traces = len(TRACES)
    others = [SamplingParams(temperature=2.0, top_k=3, top_p=0.5, min_p=0.3, repetition_penalty=0.5,
                             presence_penalty=-2, frequency_penalty=2, seed=9)] * batch
    sample_jit(logits, sampler_state(others, batch), jnp.int32(0), seen, counts)
    assert len(TRACES) == traces


def chi_square(draws, probs):
    observed = np.bincount(draws, minlength=probs.size)
    expected = probs * draws.size
    assert (observed[expected == 0] == 0).all(), "a removed token was drawn"
    kept = expected > 0
    return (((observed - expected)[kept] ** 2) / expected[kept]).sum(), kept.sum() - 1


# The chi-square 0.999 quantiles by degrees of freedom: a correct sampler fails 1 seed in 1000.
CHI2_999 = {3: 16.27, 5: 20.52}


def test_draws_follow_softmax():
    """4000 steps of a 6-token vocabulary, vmapped: an unseeded row at temperature 1 and a seeded
    row at temperature 0.7 with top-k 4 (the renormalised softmax of the top 4)."""
    n = 4000
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 2.0], np.float32)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, seed=5)]
    many_steps = jax.jit(jax.vmap(sample, in_axes=(None, None, 0, None, None)))
    state = sampler_state(params, 2, default_seed=11)
    draws = np.asarray(many_steps(jnp.asarray(np.stack([logits, logits])), state,
                                  jnp.arange(n, dtype=jnp.int32), *no_history(2, 6)))
    for row, p in enumerate(params):
        statistic, dof = chi_square(draws[:, row], np_softmax(np_filter(logits, p)))
        assert statistic < CHI2_999[dof], (p, statistic)
    # The test can fail: the draws at temperature 0.7 do not look like temperature 1.
    statistic, dof = chi_square(draws[:, 1], np_softmax(np_top_k(logits.astype(np.float64), 4)))
    assert statistic > CHI2_999[dof]


def test_low_precision_logits_are_computed_in_float32():
    logits = jnp.asarray(random_logits(seed=6), jnp.bfloat16)
    state = sampler_state(SamplingParams(temperature=0.9, top_p=0.8, seed=1), BATCH)
    args = (state, jnp.int32(3), *no_history())
    np.testing.assert_array_equal(sample_jit(logits, *args), sample_jit(logits.astype(jnp.float32), *args))
    assert process_jit(logits, state, *no_history()).dtype == jnp.float32


@pytest.mark.parametrize("bad,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=2**31), "top_k"),  # (an int32 array holds it)
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(temperature=1e39), "temperature"),  # (past float32: the sampler holds it as one)
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10.0), "max_tokens"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(stop=("ok", "")), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop_token_ids=(1, "2")), "stop_token_ids"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=(2**31,)), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
])
def test_invalid_params_raise_sampling_error_naming_the_field(bad, field):
    with pytest.raises(SamplingError, match=rf"^{field} must be"):
        SamplingParams(**bad)


def test_params_normalise_and_are_frozen_and_hashable():
    p = SamplingParams(stop="###", stop_token_ids=[2, 3], seed=2**63, temperature=1)
    assert p.stop == ("###",) and p.stop_token_ids == (2, 3)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(p) == hash(SamplingParams(stop=("###",), stop_token_ids=(2, 3), seed=2**63, temperature=1.0))
    with pytest.raises(AttributeError):
        p.temperature = 0.5
    with pytest.raises(ValueError, match="temperature"):  # callers that catch ValueError catch it too
        SamplingParams(temperature=-1.0)


def test_sampler_state_shapes_and_batch_check():
    state = sampler_state(SamplingParams(top_k=-1), 3)
    assert state.keys.shape == (3, 2) and state.keys.dtype == jnp.uint32
    assert state.top_k.dtype == jnp.int32 and (np.asarray(state.top_k) == 0).all()
    assert all(a.shape == (3,) and a.dtype == jnp.float32 for a in state[:7] if a is not state.top_k)
    with pytest.raises(SamplingError, match="batch=3"):
        sampler_state([SamplingParams()] * 2, 3)
    with pytest.raises(SamplingError, match="default_seed"):
        sampler_state(SamplingParams(), 3, default_seed=None)
