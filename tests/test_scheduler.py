"""Continuous batching: rows that join and leave a running batch get exactly the tokens they get
alone (greedy and seeded, stops, limits, LongRoPE crossings), slots grow and shrink, stops free
them, and a full queue refuses without queueing anything."""

import threading
import time

import numpy as np
import pytest

from phi4_jax.engine.engine import Engine
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.engine.scheduler import QueueFullError, Row, RowOutput, Scheduler

TIMEOUT = 300  # seconds any wait in this module may take


@pytest.fixture(scope="module")
def engine(tiny_model):
    # Phi-4-mini's shape: LongRoPE with an original context of 16, so rows cross it in the batch.
    return Engine(tiny_model("phi-4-mini")[0])


def alone(engine, row: Row, steps_per_call=8, logprobs=False):
    """(tokens, finish reason) of `row` generated alone; with `logprobs`, also its log-probabilities."""
    gen = engine.start([row.ids], row.params, [sorted(row.stop_ids)])
    out, lps = gen.advance(0)[0], gen.new_logprobs[0] or []
    while not gen.finished:
        out += gen.advance(steps_per_call)[0]
        lps += gen.new_logprobs[0] or []
    return (out, gen.finish_reasons()[0], lps) if logprobs else (out, gen.finish_reasons()[0])


class Collector:
    """Tokens, outputs and finish reasons by (job key, row), as the scheduler delivers them."""

    def __init__(self):
        self.tokens, self.reasons, self.outputs, self.logprobs = {}, {}, {}, {}
        self.lock, self.done = threading.Lock(), threading.Condition()

    def deliver(self, key):
        def take(out: RowOutput):
            with self.done:
                row = (key, out.row)
                self.tokens.setdefault(row, []).extend(out.tokens)
                self.logprobs.setdefault(row, []).extend(out.logprobs or [])
                self.outputs[row] = self.outputs.get(row, 0) + 1
                if out.finish_reason is not None:
                    assert row not in self.reasons, f"{row} finished twice"
                    self.reasons[row] = out.finish_reason
                self.done.notify_all()
        return take

    def wait(self, count):
        with self.done:
            assert self.done.wait_for(lambda: len(self.reasons) >= count, TIMEOUT), self.reasons


def rows_of(engine, count, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        ids = rng.integers(3, 256, int(rng.integers(2, 24))).tolist()
        limit = int(rng.integers(1, 40))
        params = [SamplingParams(max_tokens=limit),
                  SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=limit),
                  SamplingParams(temperature=1.2, top_k=20, repetition_penalty=1.3, seed=100 + i, max_tokens=30),
                  SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, max_tokens=limit,
                                 logprobs=2 * (i % 8 == 3))
                  ][i % 4]  # (log-probabilities of the likeliest 2 or the chosen token alone: the slots widen for them)
        rows.append(Row(ids, params, frozenset()))
    # Stop ids for some rows: a token their lone greedy output reaches.
    for i in range(0, count, 4):
        out, _ = alone(engine, rows[i])
        if len(out) > 3:
            rows[i] = Row(rows[i].ids, rows[i].params, frozenset({out[3]}))
    return rows


@pytest.mark.slow  # the quick loop keeps joins through the server (test_serve: 32 requests on 4 slots)
def test_rows_joining_a_running_batch_get_their_lone_tokens(engine):
    rows = rows_of(engine, 16)
    want = [alone(engine, row, logprobs=True) for row in rows]
    scheduler = Scheduler(engine, max_batch=4, steps_per_call=2)
    scheduler.start()
    got = Collector()
    seen_slots = set()
    follow = iter(range(6, len(rows)))  # after a burst of six, each row's second output sends the next

    def deliver(i):
        take = got.deliver(i)

        def chained(out):
            take(out)
            seen_slots.add(scheduler.load().slots)
            if got.outputs[i, 0] == 2 or out.finish_reason is not None:
                j = next(follow, None)
                if j is not None:
                    scheduler.submit([rows[j]], deliver(j))
        return chained

    try:
        for i in range(6):
            scheduler.submit([rows[i]], deliver(i))
        got.wait(len(rows))
        assert [(got.tokens[i, 0], got.reasons[i, 0]) for i in range(len(rows))] == [w[:2] for w in want]
        for i, (_, _, logprobs) in enumerate(want):  # equal to float noise: batch sizes sum apart
            assert len(got.logprobs[i, 0]) == len(logprobs) == (len(want[i][0]) if rows[i].params.logprobs is not None
                                                                 else 0)
            for (value, top), (lone_value, lone_top) in zip(got.logprobs[i, 0], logprobs):
                assert value == pytest.approx(lone_value, abs=1e-5) and [t for t, _ in top] == [t for t, _ in lone_top]
        assert {1, 2, 4} <= seen_slots and max(seen_slots) == 4  # grown in powers of two up to max_batch
        deadline = time.monotonic() + TIMEOUT
        while scheduler.load().slots and time.monotonic() < deadline:  # freed once the last row finished
            time.sleep(0.01)
        load = scheduler.load()
        assert (load.running, load.waiting, load.slots, load.max_batch) == (0, 0, 0, 4)
        assert load.prefill_seconds > 0 and load.decode_seconds > 0
    finally:
        scheduler.shutdown(TIMEOUT)


def test_a_stopped_row_frees_its_slot_and_the_others_run_on(engine):
    rows = [Row([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), frozenset()),
            Row([9, 10], SamplingParams(max_tokens=30, ignore_eos=True), frozenset())]
    scheduler = Scheduler(engine, max_batch=2, steps_per_call=2)
    scheduler.start()
    got = Collector()
    try:
        long_job = scheduler.submit([rows[0]], got.deliver(0))
        scheduler.submit([rows[1]], got.deliver(1))
        with got.done:
            assert got.done.wait_for(lambda: got.outputs.get((0, 0), 0) >= 3, TIMEOUT)
        long_job.stop()
        got.wait(2)
        assert got.reasons[0, 0] == "stop" and len(got.tokens[0, 0]) < 200
        assert (got.tokens[1, 0], got.reasons[1, 0]) == alone(engine, rows[1])
        assert scheduler.load().running == 0
    finally:
        scheduler.shutdown(TIMEOUT)


def test_a_full_queue_refuses_the_whole_job_and_shutdown_aborts_the_waiting(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=3)  # not started: rows only wait
    got = Collector()
    row = Row([1, 2, 3], SamplingParams(max_tokens=4), frozenset())
    scheduler.submit([row, row], got.deliver("first"))
    with pytest.raises(QueueFullError, match="2 rows are waiting"):
        scheduler.submit([row, row], got.deliver("second"))
    assert scheduler.load().waiting == 2
    scheduler.shutdown()
    assert got.reasons == {("first", 0): "abort", ("first", 1): "abort"}
    with pytest.raises(QueueFullError, match="shutting down"):
        scheduler.submit([row], got.deliver("third"))


@pytest.mark.parametrize("length", [7, 33, 40])  # one piece; pieces across LongRoPE's threshold of 16
def test_a_prompt_prefilled_in_pieces_gets_the_tokens_of_one_call(engine, length):
    prompt = np.random.default_rng(length).integers(3, 256, length).tolist()
    for params in (SamplingParams(max_tokens=20), SamplingParams(temperature=1.0, seed=3, max_tokens=20)):
        pieces = list(engine.start_in_pieces(prompt, params, [], piece=16))
        assert pieces[:-1] == [None] * (-(-length // 16) - 1)
        gen, out = pieces[-1], pieces[-1].advance(0)[0]
        while not gen.finished:
            out += gen.advance(8)[0]
        assert (out, gen.finish_reasons()[0]) == alone(engine, Row(prompt, params, frozenset()))


def test_a_long_prompt_is_read_in_pieces_while_a_stream_flows(engine):
    stream = Row([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), frozenset())
    long = Row(np.random.default_rng(9).integers(3, 256, 60).tolist(), SamplingParams(max_tokens=10), frozenset())
    scheduler = Scheduler(engine, max_batch=2, steps_per_call=1, prefill_tokens=8)
    scheduler.start()
    got, order = Collector(), []

    def recorded(key):
        take = got.deliver(key)
        def both(out):
            with got.done:
                order.append(key)
                take(out)
        return both

    try:
        scheduler.submit([stream], recorded("stream"))
        with got.done:
            assert got.done.wait_for(lambda: got.outputs.get(("stream", 0), 0) >= 2, TIMEOUT)
        with got.done:
            mark = len(order)  # (outputs are recorded under this lock)
            scheduler.submit([long], recorded("long"))
        got.wait(2)
        assert (got.tokens["long", 0], got.reasons["long", 0]) == alone(engine, long)
        between = order[mark:order.index("long")].count("stream")  # stream outputs while the prompt was read
        assert between >= -(-60 // 8) - 1  # a decode call of the stream after every piece but the last
    finally:
        scheduler.shutdown(TIMEOUT)
