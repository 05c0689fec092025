"""Continuous batching through `Engine.step()`, without threads: requests that join and leave a
running batch get exactly the tokens they get alone (greedy and seeded, stops, limits, LongRoPE
crossings, prompts prefilled together or in pieces, a reused prefix), slots grow and shrink, aborts
free them, a full queue refuses without queueing anything, and a failed device call fails only the
requests it touched."""

import numpy as np
import pytest

from phi4_jax.engine import runner as runner_module
from phi4_jax.engine import stats
from phi4_jax.engine.engine import Engine
from phi4_jax.engine.runner import ModelRunner
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.engine.scheduler import QueueFullError, Request
from phi4_jax.engine.speculative import Speculation

MAX_STEPS = 2000  # steps any loop here may take


@pytest.fixture(scope="module")
def runner(tiny_model):
    # Phi-4-mini's shape: LongRoPE with an original context of 16, so rows cross it in the batch.
    return ModelRunner(tiny_model("phi-4-mini")[0])


def alone(runner, request: Request, steps_per_call=8, logprobs=False):
    """(tokens, finish reason) of `request` generated alone; with `logprobs`, also its log-probabilities."""
    gen = runner.start([request.ids], request.params, [sorted(request.stop_ids)])
    out, lps = gen.advance(0)[0], gen.new_logprobs[0] or []
    while not gen.finished:
        out += gen.advance(steps_per_call)[0]
        lps += gen.new_logprobs[0] or []
    return (out, gen.finish_reasons()[0], lps) if logprobs else (out, gen.finish_reasons()[0])


class Collected:
    """Tokens, log-probabilities, output counts and finish reasons by request id, from `step()`s."""

    def __init__(self):
        self.tokens, self.logprobs, self.outputs, self.reasons, self.errors = {}, {}, {}, {}, {}

    def take(self, outputs):
        for out in outputs:
            key = out.request_id
            assert key not in self.reasons, f"{key} got an output after it finished"
            self.tokens.setdefault(key, []).extend(out.token_ids)
            self.logprobs.setdefault(key, []).extend(out.logprobs or [])
            self.outputs[key] = self.outputs.get(key, 0) + 1
            if out.finished:
                self.reasons[key] = out.finish_reason
                self.errors[key] = out.error
        return outputs


def run(engine, got, until=None):
    """Steps `engine` until it holds nothing (or `until()`), collecting into `got`."""
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests() or (until is not None and until()):
            return
        got.take(engine.step())
    pytest.fail("the engine did not finish")


def requests_of(runner, count, seed=0):
    rng = np.random.default_rng(seed)
    made = []
    for i in range(count):
        ids = rng.integers(3, 256, int(rng.integers(2, 24))).tolist()
        limit = int(rng.integers(1, 40))
        params = [SamplingParams(max_tokens=limit),
                  SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=limit),
                  SamplingParams(temperature=1.2, top_k=20, repetition_penalty=1.3, seed=100 + i, max_tokens=30),
                  SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, max_tokens=limit,
                                 logprobs=2 * (i % 8 == 3))
                  ][i % 4]  # (log-probabilities of the likeliest 2 or the chosen token alone: the slots widen for them)
        made.append(Request(str(i), ids, params, frozenset()))
    # Stop ids for some: a token their lone greedy output reaches.
    for i in range(0, count, 4):
        out, _ = alone(runner, made[i])
        if len(out) > 3:
            made[i] = Request(str(i), made[i].ids, made[i].params, frozenset({out[3]}))
    return made


def add(engine, request: Request):
    engine.add_request(request.request_id, request.ids, request.params, request.stop_ids)


@pytest.mark.slow  # the quick loop keeps joins through the server (test_serve: 32 requests on 4 slots)
def test_requests_joining_a_running_batch_get_their_lone_tokens(runner):
    requests = requests_of(runner, 16)
    want = [alone(runner, r, logprobs=True) for r in requests]
    engine = Engine(runner, max_batch=4, steps_per_call=2)
    got, slots_seen = Collected(), []
    # One, then a second while it runs, then a burst of four (two fit), then one per second output.
    arrivals = {0: [0], 2: [1], 3: [2, 3, 4, 5]}
    follow = iter(range(6, len(requests)))
    for step in range(MAX_STEPS):
        for i in arrivals.get(step, []):
            add(engine, requests[i])
        if not engine.has_unfinished_requests():
            break
        for out in got.take(engine.step()):
            if got.outputs[out.request_id] == 2 or out.finished:
                j = next(follow, None)
                if j is not None:
                    add(engine, requests[j])
        slots_seen.append(engine.load().slots)
    assert [(got.tokens[r.request_id], got.reasons[r.request_id]) for r in requests] == [w[:2] for w in want]
    for r, (_, _, logprobs) in zip(requests, want):  # equal to float noise: batch sizes sum apart
        assert len(got.logprobs[r.request_id]) == len(logprobs) == (len(got.tokens[r.request_id])
                                                                    if r.params.logprobs is not None else 0)
        for (value, top), (lone_value, lone_top) in zip(got.logprobs[r.request_id], logprobs):
            assert value == pytest.approx(lone_value, abs=1e-5) and [t for t, _ in top] == [t for t, _ in lone_top]
    assert set(slots_seen) <= {0, 1, 2, 4} and {1, 4} <= set(slots_seen)  # powers of two up to max_batch
    load = engine.load()  # freed once the last row finished
    assert (load.running, load.waiting, load.slots, load.max_batch) == (0, 0, 0, 4)
    assert load.prefill_seconds > 0 and load.decode_seconds > 0
    assert sum(load.finished.values()) == len(requests)


def test_waiting_prompts_are_prefilled_together_and_get_their_lone_tokens(runner, monkeypatch):
    requests = requests_of(runner, 5, seed=3)
    want = [alone(runner, r) for r in requests]
    calls, widths = [], []
    pack = runner.prefill_packed

    def counted(prompts, *args, **kwargs):
        calls.append(len(prompts))
        packed = pack(prompts, *args, **kwargs)
        widths.append(packed.width)
        return packed

    monkeypatch.setattr(runner, "prefill_packed", counted)
    monkeypatch.setattr(runner, "start", None)  # (no prompt goes through the row-per-prompt prefill)
    engine = Engine(runner, max_batch=8, steps_per_call=4)
    for r in requests:
        add(engine, r)
    got = Collected()
    run(engine, got)
    assert calls == [5]  # all five in one prefill, end to end in one row of their bucket's width
    assert widths == [runner_module.prompt_bucket(sum(len(r.ids) for r in requests))]
    assert [(got.tokens[r.request_id], got.reasons[r.request_id]) for r in requests] == want


@pytest.mark.slow  # its warm-up compiles every program (19 s); the quick loop keeps the packed admission's test
def test_after_warm_up_a_fixed_length_engine_compiles_nothing_and_rows_get_their_lone_tokens(runner):
    """Prompts packed together, rows joining and leaving, batches growing and shrinking, speculating in
    batches of up to 2 rows: once `warm_up` ran, none of it makes a program, and every request gets
    its lone tokens (without speculation)."""
    requests = requests_of(runner, 12, seed=5)  # (log-probabilities and penalties among them)
    want = [alone(runner, r) for r in requests]
    engine = Engine(runner.speculating(Speculation(3, 1, 2), rows=2), max_batch=4, steps_per_call=3,
                    prefill_tokens=32, fixed_length=64)
    engine.warm_up([1], 4)
    compiled, got = stats.CLOCK.total, Collected()
    arrivals = iter(requests)
    for step in range(MAX_STEPS):
        if step % 3 == 0:  # one or two requests every third step
            for r in [next(arrivals, None) for _ in range(1 + step % 2)]:
                if r is not None:
                    add(engine, r)
        if not engine.has_unfinished_requests() and step > 3 * len(requests):
            break
        got.take(engine.step())
    assert [(got.tokens[r.request_id], got.reasons[r.request_id]) for r in requests] == want
    assert stats.CLOCK.total == compiled
    assert engine.load().spec_draft_tokens > 0


def test_penalty_state_lives_only_while_a_penalised_row_runs(runner):
    """The batch holds the [rows, vocabulary] penalty state only while a row asking for penalties is
    seated: added when it joins, dropped when it leaves; both rows get their lone tokens."""
    plain = Request("plain", [5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), frozenset())
    penalised = Request("penalised", [9, 10, 9, 9], SamplingParams(max_tokens=6, repetition_penalty=1.5,
                                                                   frequency_penalty=0.5, ignore_eos=True), frozenset())
    want = [alone(runner, r) for r in (plain, penalised)]
    engine = Engine(runner, max_batch=4, steps_per_call=2)
    add(engine, plain)
    got, held = Collected(), {True: set(), False: set()}  # penalty state held, by whether the row is seated
    for step in range(MAX_STEPS):
        if step == 2:
            add(engine, penalised)
        if not engine.has_unfinished_requests():
            break
        got.take(engine.step())
        if engine._gen is not None:
            seated = any(r is not None and r.request_id == "penalised" for r in engine.scheduler.slots)
            held[seated].add(engine._gen.penalties)
    assert [(got.tokens[r.request_id], got.reasons[r.request_id]) for r in (plain, penalised)] == want
    assert held == {True: {True}, False: {False}}


def test_an_aborted_request_frees_its_slot_and_the_others_run_on(runner):
    requests = [Request("long", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), frozenset()),
                Request("short", [9, 10], SamplingParams(max_tokens=30, ignore_eos=True), frozenset())]
    engine = Engine(runner, max_batch=2, steps_per_call=2)
    for r in requests:
        add(engine, r)
    got = Collected()
    run(engine, got, until=lambda: got.outputs.get("long", 0) >= 3)
    engine.abort("long")
    run(engine, got)
    assert got.reasons["long"] == "abort" and len(got.tokens["long"]) < 200
    assert (got.tokens["short"], got.reasons["short"]) == alone(runner, requests[1])
    assert engine.load().running == 0 and engine.load().finished == {"abort": 1, "length": 1}


def test_a_full_queue_refuses_the_whole_submission_and_waiting_requests_abort_at_once(runner):
    engine = Engine(runner, max_batch=1, max_queue=3)
    params = SamplingParams(max_tokens=4)
    engine.add_requests([("a", [1, 2, 3], params), ("b", [1, 2, 3], params)])
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        engine.add_requests([("c", [1, 2, 3], params), ("d", [1, 2, 3], params)])
    assert engine.load().waiting == 2 and engine.request_ids() == ["a", "b"]
    engine.abort("a")
    engine.abort("b")
    outputs = engine.step()  # (no device call: nothing runs)
    assert [(o.request_id, o.finish_reason, o.token_ids) for o in outputs] == [("a", "abort", []), ("b", "abort", [])]
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("length", [7, 33, 40])  # one piece; pieces across LongRoPE's threshold of 16
def test_a_prompt_prefilled_in_pieces_gets_the_tokens_of_one_call(runner, length):
    prompt = np.random.default_rng(length).integers(3, 256, length).tolist()
    for params in (SamplingParams(max_tokens=20), SamplingParams(temperature=1.0, seed=3, max_tokens=20)):
        pieces = list(runner.start_in_pieces(prompt, params, [], piece=16))
        assert pieces[:-1] == [None] * (-(-length // 16) - 1)
        gen, out = pieces[-1], pieces[-1].advance(0)[0]
        while not gen.finished:
            out += gen.advance(8)[0]
        assert (out, gen.finish_reasons()[0]) == alone(runner, Request("x", prompt, params, frozenset()))


def test_a_long_prompt_is_read_in_pieces_while_a_stream_flows(runner):
    stream = Request("stream", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), frozenset())
    long = Request("long", np.random.default_rng(9).integers(3, 256, 60).tolist(), SamplingParams(max_tokens=10),
                   frozenset())
    engine = Engine(runner, max_batch=2, steps_per_call=1, prefill_tokens=8)
    add(engine, stream)
    got, order = Collected(), []
    run(engine, got, until=lambda: got.outputs.get("stream", 0) >= 2)
    add(engine, long)
    for _ in range(MAX_STEPS):
        if "long" in got.reasons:
            break
        order += [o.request_id for o in got.take(engine.step())]
    assert (got.tokens["long"], got.reasons["long"]) == alone(runner, long)
    between = order[:order.index("long")].count("stream")  # stream outputs while the prompt was read
    assert between >= -(-60 // 8) - 1  # a decode call of the stream after every piece but the last
    engine.abort("stream")
    run(engine, got)


def test_a_prompt_extending_the_idle_sequence_reuses_its_cache_with_the_same_tokens(runner):
    first = Request("1", [5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True), frozenset())
    engines = {caching: Engine(runner, enable_prefix_caching=caching) for caching in (True, False)}
    results = {}
    for caching, engine in engines.items():
        got = Collected()
        add(engine, first)
        run(engine, got)
        extended = Request("2", first.ids + got.tokens["1"] + [9, 10], SamplingParams(max_tokens=12), frozenset())
        add(engine, extended)
        outputs = []
        for _ in range(MAX_STEPS):
            if not engine.has_unfinished_requests():
                break
            outputs += got.take(engine.step())
        results[caching] = (got.tokens["2"], got.reasons["2"], outputs[-1].stats.cached_tokens)
    assert results[True][:2] == results[False][:2] == alone(runner, extended)
    assert results[True][2] == len(first.ids) + 6 - 1 and results[False][2] == 0  # (the last token: not yet cached)


def test_prompts_continue_what_rows_of_the_running_batch_hold_and_get_their_lone_tokens(runner):
    """A shared system prompt (a running row holds it) and a chat's next turn (its finished row holds
    the first turn, while another request runs): each prefills only what no row holds, with its lone
    tokens; a prompt sharing a few tokens by chance is prefilled whole."""
    rng = np.random.default_rng(7)
    system = rng.integers(3, 256, 40).tolist()
    other = Request("other", [4] + rng.integers(3, 256, 8).tolist(), SamplingParams(max_tokens=60, ignore_eos=True),
                    frozenset())
    turn1 = Request("turn1", system + [5, 6], SamplingParams(max_tokens=8, ignore_eos=True), frozenset())
    sibling = Request("sibling", system + [7, 8, 9], SamplingParams(temperature=0.8, seed=3, max_tokens=12,
                                                                    ignore_eos=True), frozenset())
    reply, _ = alone(runner, turn1)
    turn2 = Request("turn2", turn1.ids + reply + [11, 12], SamplingParams(max_tokens=10, ignore_eos=True), frozenset())
    chance = Request("chance", [4] + rng.integers(3, 256, 30).tolist(), SamplingParams(max_tokens=4), frozenset())
    requests = [other, turn1, sibling, turn2, chance]
    want = {r.request_id: alone(runner, r) for r in requests}
    engine = Engine(runner, max_batch=4, steps_per_call=2)
    add(engine, other)
    add(engine, turn1)
    got, cached, later = Collected(), {}, {"sibling": sibling, "turn2": turn2, "chance": chance}
    for step in range(MAX_STEPS):
        if step == 3:  # while turn1 runs
            add(engine, later.pop("sibling"))
        if "turn1" in got.reasons and "turn2" in later:  # while "other" runs
            add(engine, later.pop("turn2"))
            add(engine, later.pop("chance"))
        if not engine.has_unfinished_requests():
            break
        for out in got.take(engine.step()):
            cached[out.request_id] = out.stats.cached_tokens
    assert not later
    assert {r.request_id: (got.tokens[r.request_id], got.reasons[r.request_id]) for r in requests} == want
    assert cached == {"other": 0, "turn1": 0, "sibling": len(system), "turn2": len(turn1.ids) + len(reply) - 1,
                      "chance": 0}
    assert engine.load().prefix_hit_tokens == sum(cached.values())


def test_siblings_admitted_together_prefill_their_prompt_once(runner):
    """`n > 1` siblings (one prompt, their own seeds) arriving together: one is prefilled, the others
    continue its row, each with its lone tokens; a stranger beside them is packed with the first."""
    rng = np.random.default_rng(8)
    twin = rng.integers(3, 256, 40).tolist()
    stranger = Request("stranger", rng.integers(3, 256, 12).tolist(), SamplingParams(max_tokens=5), frozenset())
    requests = [Request(f"twin{i}", twin, SamplingParams(temperature=0.9, seed=i, max_tokens=6), frozenset())
                for i in range(3)] + [stranger]
    want = {r.request_id: alone(runner, r) for r in requests}
    engine = Engine(runner, max_batch=4, steps_per_call=2)
    for r in requests:
        add(engine, r)
    got, cached = Collected(), {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            break
        for out in got.take(engine.step()):
            cached[out.request_id] = out.stats.cached_tokens
    assert {r.request_id: (got.tokens[r.request_id], got.reasons[r.request_id]) for r in requests} == want
    assert cached == {"twin0": 0, "twin1": len(twin) - 1, "twin2": len(twin) - 1, "stranger": 0}


@pytest.mark.parametrize("fault", ["prefill", "decode", "admit"])
def test_a_failed_device_call_fails_the_requests_it_touched_and_the_engine_goes_on(runner, monkeypatch, fault):
    """A prefill that raises fails the prompts it held; a decode call or an allocation (growing the
    batch for the new row) that raises fails the running batch; the engine then serves the next
    request with its lone tokens."""
    running = Request("running", [5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), frozenset())
    joining = Request("joining", [8, 9], SamplingParams(max_tokens=5, ignore_eos=True), frozenset())
    engine = Engine(runner, max_batch=4, steps_per_call=2)
    add(engine, running)
    got = Collected()
    run(engine, got, until=lambda: got.outputs.get("running", 0) >= 2)

    def broken(*_, **__):
        raise RuntimeError("injected")

    target = {"prefill": (runner_module, "_prefill_packed"), "decode": (runner_module.Generation, "advance"),
              "admit": (runner_module.Generation, "admit")}[fault]
    failed = {"prefill": {"joining"}, "decode": {"running", "joining"}, "admit": {"running", "joining"}}[fault]
    with monkeypatch.context() as patch:
        patch.setattr(*target, broken)
        add(engine, joining)
        run(engine, got, until=lambda: failed <= set(got.reasons))
    assert {k for k, reason in got.reasons.items() if reason == "error"} == failed
    assert all(got.errors[k] == "RuntimeError: injected" for k in failed)
    run(engine, got)
    after = Request("after", [11, 12, 13], SamplingParams(max_tokens=7), frozenset())
    add(engine, after)
    run(engine, got)
    assert (got.tokens["after"], got.reasons["after"]) == alone(runner, after)
