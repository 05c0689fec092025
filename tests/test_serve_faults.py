"""The server under load and faults, in this process (uvicorn on a loopback port, the demo model): a
client gone mid-stream frees its slots, a full queue answers 503 and the server serves on, /metrics
counts what happened, /health says whether the engine takes requests (503 while loading, draining
or failed), and injected faults (a step, a delivery, an allocation that raises; an engine that cannot
go on) end the touched requests with OpenAI's error JSON at once: no client waits past its timeout."""

import dataclasses
import http.client
import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import listening, serving

import phi4_jax
from phi4_jax import SamplingParams
from phi4_jax.engine import async_engine
from phi4_jax.engine.runner import Generation

TIMEOUT = 120  # seconds any wait here may take
FAULT_TIMEOUT = 30  # seconds a client of an injected fault may wait for its error
MAX_QUEUE = 20


@pytest.fixture(scope="module")
def demo():
    return phi4_jax.load("demo", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(demo):
    # One step per device call: a stream of 200 tokens spans 200 calls, so a client that leaves
    # early leaves while its rows still run.
    with serving(*demo, max_context=256, default_max_tokens=16, max_batch=4, max_queue=MAX_QUEUE,
                 steps_per_call=1) as (port, served):
        yield port, served


def post(port, body: dict, headers: dict | None = None, timeout: float = TIMEOUT) -> http.client.HTTPResponse:
    """An open response to a POST of `body` (the caller reads and closes it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    response.connection = connection
    return response


def metrics(port) -> dict:
    """Every sample of /metrics by (name, labels)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_until_idle(served):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        load = served.engine.load()
        if (load.running, load.waiting, load.slots) == (0, 0, 0):
            return
        time.sleep(0.01)
    pytest.fail(f"still busy: {served.engine.load()}")


LONG = {"model": "demo", "prompt": "What is 1+1?", "max_tokens": 200, "ignore_eos": True, "n": 16, "stream": True}


def test_a_client_gone_mid_stream_frees_its_slots(server):
    port, served = server
    before = metrics(port)
    response = post(port, LONG)
    assert response.status == 200 and response.readline().startswith(b"data: ")
    deadline = time.monotonic() + TIMEOUT
    while served.engine.load().running < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert served.engine.load().running == 4  # its rows fill every slot; twelve wait
    response.connection.close()  # the client goes
    wait_until_idle(served)
    after = metrics(port)
    key = ("phi4_jax_rows_finished_total", (("reason", "abort"),))
    assert after[key] - before.get(key, 0) == 16  # every row ended early: none ran out its 200 tokens
    assert after.get(("phi4_jax_rows_finished_total", (("reason", "length"),)), 0) == \
        before.get(("phi4_jax_rows_finished_total", (("reason", "length"),)), 0)


def test_a_full_queue_answers_503_and_the_server_serves_on(server, demo):
    port, served = server
    first = post(port, LONG)  # 4 rows run, 12 wait
    assert first.status == 200 and first.readline().startswith(b"data: ")
    refused = post(port, {**LONG, "stream": False})  # 16 more would exceed the 20 that may wait
    assert refused.status == 503
    error = json.loads(refused.read())["error"]
    assert error["code"] == "server_busy" and "waiting" in error["message"]
    first.connection.close()
    wait_until_idle(served)
    answer = post(port, {"model": "demo", "prompt": "What is 12+30?", "max_tokens": 8})
    model, tokenizer = demo
    want = phi4_jax.generate(model, tokenizer, "What is 12+30?", SamplingParams(max_tokens=8))
    assert answer.status == 200 and json.loads(answer.read())["choices"][0]["text"] == want


def test_metrics_count_requests_tokens_and_latencies(server):
    port, served = server
    wait_until_idle(served)
    before = metrics(port)
    usages = []
    for i, max_tokens in enumerate((3, 9, 5)):
        response = post(port, {"model": "demo", "prompt": f"What is {i}+{i}?", "max_tokens": max_tokens})
        usages.append(json.loads(response.read())["usage"])
    post(port, {"model": "nope", "prompt": "hi"}).read()
    after = metrics(port)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("phi4_jax_requests_total", endpoint="/v1/completions", status="200") == 3
    assert delta("phi4_jax_requests_total", endpoint="/v1/completions", status="404") == 1
    assert delta("phi4_jax_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("phi4_jax_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("phi4_jax_time_to_first_token_seconds_count") == 3
    assert delta("phi4_jax_e2e_request_latency_seconds_count") == 3
    # Every token after a row's first has an inter-token latency.
    assert delta("phi4_jax_inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usages)
    assert after[("phi4_jax_slots_max", ())] == 4 and after[("phi4_jax_rows_running", ())] == 0
    assert delta("phi4_jax_scheduler_seconds_total", kind="prefill") > 0
    assert delta("phi4_jax_scheduler_seconds_total", kind="decode") > 0
    # The same under vLLM's names, with its model_name label (finished_reason for our reason).
    vllm = {"phi4_jax_prompt_tokens_total": "vllm:prompt_tokens_total",
            "phi4_jax_generation_tokens_total": "vllm:generation_tokens_total",
            "phi4_jax_time_to_first_token_seconds_count": "vllm:time_to_first_token_seconds_count",
            "phi4_jax_inter_token_latency_seconds_count": "vllm:inter_token_latency_seconds_count",
            "phi4_jax_e2e_request_latency_seconds_count": "vllm:e2e_request_latency_seconds_count"}
    for ours, theirs in vllm.items():
        assert delta(theirs, model_name="demo") == delta(ours) > 0, theirs
    finished = {r: delta("phi4_jax_rows_finished_total", reason=r) for r in ("stop", "length")}
    assert sum(finished.values()) == 3
    assert {r: delta("vllm:request_success_total", model_name="demo", finished_reason=r) for r in finished} == finished
    assert after[("vllm:num_requests_running", (("model_name", "demo"),))] == 0
    assert after[("vllm:kv_cache_usage_perc", (("model_name", "demo"),))] == 0


def test_an_api_key_guards_v1_and_nothing_else(server):
    _, served = server
    with listening(dataclasses.replace(served, api_key="s3cret"), TIMEOUT) as port:
        body = {"model": "demo", "prompt": "What is 2+2?", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = post(port, body, headers)
            error = json.loads(refused.read())["error"]
            assert (refused.status, error["code"]) == (401, "invalid_api_key"), headers
        assert post(port, body, {"Authorization": "Bearer s3cret"}).status == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        assert metrics(port)[("phi4_jax_requests_total", (("endpoint", "/v1/completions"), ("status", "401")))] == 3


def health(port) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("GET", "/health")
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def events(response) -> list:
    """The decoded `data:` events of a streamed response, to its end ("[DONE]" kept as a string)."""
    out = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def served_answer(port, demo, question="What is 12+30?", max_tokens=6):
    """A request after a fault gets the lone `generate` text."""
    answer = post(port, {"model": "demo", "prompt": question, "max_tokens": max_tokens})
    model, tokenizer = demo
    assert answer.status == 200
    assert json.loads(answer.read())["choices"][0]["text"] == \
        phi4_jax.generate(model, tokenizer, question, SamplingParams(max_tokens=max_tokens))


def test_health_is_503_while_loading_then_ok(demo):
    release = threading.Event()
    with serving(*demo, warm_up=lambda engine: release.wait(TIMEOUT)) as (port, _):
        assert health(port) == (503, {"status": "loading"})
        refused = post(port, {"model": "demo", "prompt": "hi", "max_tokens": 2})
        assert refused.status == 503 and json.loads(refused.read())["error"]["code"] == "server_unavailable"
        release.set()
        deadline = time.monotonic() + TIMEOUT
        while health(port)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health(port) == (200, {"status": "ok"})
        served_answer(port, demo)


def test_a_step_that_raises_fails_its_requests_and_the_server_serves_on(server, demo, monkeypatch):
    port, served = server
    wait_until_idle(served)
    engine, broken = served.engine.engine, threading.Event()
    step = engine.step

    def faulty():
        if broken.is_set():
            raise RuntimeError("injected step fault")
        return step()

    monkeypatch.setattr(engine, "step", faulty)
    stream = post(port, {**LONG, "n": 1}, timeout=FAULT_TIMEOUT)
    assert stream.status == 200 and stream.readline().startswith(b"data: ")
    broken.set()
    got = events(stream)
    assert got[-1] == "[DONE]" and "injected step fault" in got[-2]["error"]["message"]
    whole = post(port, {"model": "demo", "prompt": "What is 1+1?", "max_tokens": 4}, timeout=FAULT_TIMEOUT)
    error = json.loads(whole.read())["error"]
    assert whole.status == 500 and error["code"] == "generation_failed" and "injected" in error["message"]
    broken.clear()
    wait_until_idle(served)
    assert health(port) == (200, {"status": "ok"})
    served_answer(port, demo)


def test_a_delivery_that_raises_fails_that_client_and_the_server_serves_on(server, demo, monkeypatch):
    port, served = server
    wait_until_idle(served)
    put = async_engine.Stream.put

    def faulty(stream, output):
        if stream.request_ids[0].startswith("broken-"):
            raise RuntimeError("injected delivery fault")
        return put(stream, output)

    submit = served.engine.submit

    def tagged(requests):  # the next submission's requests are the broken ones
        return submit([(f"broken-{r[0]}", *r[1:]) for r in requests])

    monkeypatch.setattr(async_engine.Stream, "put", faulty)
    monkeypatch.setattr(served.engine, "submit", tagged)
    started = time.monotonic()
    refused = post(port, {"model": "demo", "prompt": "What is 1+1?", "max_tokens": 50, "ignore_eos": True},
                   timeout=FAULT_TIMEOUT)
    error = json.loads(refused.read())["error"]
    assert refused.status == 500 and "could not be delivered" in error["message"]
    assert time.monotonic() - started < FAULT_TIMEOUT
    monkeypatch.undo()
    wait_until_idle(served)  # its request was aborted
    served_answer(port, demo)


def test_an_allocation_that_fails_fails_the_batch_it_touched_and_the_server_serves_on(server, demo, monkeypatch):
    port, served = server
    wait_until_idle(served)
    stream = post(port, {**LONG, "n": 1}, timeout=FAULT_TIMEOUT)  # running when the next one joins
    assert stream.status == 200 and stream.readline().startswith(b"data: ")

    def no_memory(*_, **__):
        raise MemoryError("injected: no memory for the joined batch")

    monkeypatch.setattr(Generation, "admit", no_memory)  # (a prompt prefilled afresh joins so,
    monkeypatch.setattr(Generation, "join", no_memory)  # one that continues a held prefix so)
    joining = post(port, {"model": "demo", "prompt": "What is 2+2?", "max_tokens": 30, "ignore_eos": True},
                   timeout=FAULT_TIMEOUT)
    error = json.loads(joining.read())["error"]
    assert joining.status == 500 and "MemoryError: injected" in error["message"]
    got = events(stream)
    assert got[-1] == "[DONE]" and "MemoryError: injected" in got[-2]["error"]["message"]
    monkeypatch.undo()
    wait_until_idle(served)
    served_answer(port, demo)


@pytest.mark.slow  # a server of its own (the quick loop keeps the shared server's faults)
def test_an_engine_that_cannot_go_on_answers_503_and_fails_every_waiting_client(demo):
    with serving(*demo, steps_per_call=1) as (port, served):
        served_answer(port, demo)
        engine, broken = served.engine.engine, threading.Event()
        step, fail_all = engine.step, engine.fail_all

        def faulty(real):
            def call(*args):
                if broken.is_set():
                    raise RuntimeError("injected: the device is gone")
                return real(*args)
            return call

        engine.step, engine.fail_all = faulty(step), faulty(fail_all)
        stream = post(port, {**LONG, "n": 2}, timeout=FAULT_TIMEOUT)
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        broken.set()
        got = events(stream)
        assert got[-1] == "[DONE]" and "the device is gone" in got[-2]["error"]["message"]
        status, body = health(port)
        assert (status, body["status"]) == (503, "dead") and "the device is gone" in body["error"]
        refused = post(port, {"model": "demo", "prompt": "hi", "max_tokens": 2})
        error = json.loads(refused.read())["error"]
        assert refused.status == 503 and error["code"] == "server_unavailable" and "cannot go on" in error["message"]


@pytest.mark.slow  # a server of its own (the quick loop keeps the shared server's faults)
def test_draining_finishes_what_runs_within_the_timeout_and_ends_the_rest(demo, monkeypatch):
    with serving(*demo, steps_per_call=1) as (port, served):
        served_answer(port, demo)
        step = served.engine.engine.step

        def slow():  # 50 ms a step: the long request needs seconds past the drain's timeout
            time.sleep(0.05)
            return step()

        monkeypatch.setattr(served.engine.engine, "step", slow)
        short = post(port, {"model": "demo", "prompt": "What is 3+4?", "max_tokens": 3, "ignore_eos": True,
                            "stream": True})
        long = post(port, {**LONG, "n": 1, "max_tokens": 230})
        for response in (short, long):
            assert response.status == 200 and response.readline().startswith(b"data: ")
        drained = threading.Thread(target=served.engine.drain, args=(5.0,))
        drained.start()
        deadline = time.monotonic() + TIMEOUT
        while served.engine.state != "draining" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health(port) == (503, {"status": "draining"})
        refused = post(port, {"model": "demo", "prompt": "hi", "max_tokens": 2})
        assert refused.status == 503 and "shutting down" in json.loads(refused.read())["error"]["message"]
        finished = events(short)
        assert finished[-1] == "[DONE]" and finished[-2]["choices"][0]["finish_reason"] == "length"
        ended = events(long)
        assert ended[-1] == "[DONE]" and "shut down before the request finished" in ended[-2]["error"]["message"]
        drained.join(TIMEOUT)
        assert not drained.is_alive() and served.engine.load().running == 0


def test_a_chats_next_turn_reuses_the_idle_cache_counted_in_metrics(server, demo):
    """The second turn extends the first's sequence while the server is idle: its prompt's start
    is not prefilled again (the prefix cache's hit tokens count it), and its text is the lone
    `generate`'s."""
    port, served = server
    model, tokenizer = demo
    turn1 = "<|user|>What is 5+7?<|end|><|assistant|>"
    wait_until_idle(served)
    first = json.loads(post(port, {"model": "demo", "prompt": turn1, "max_tokens": 6}).read())["choices"][0]["text"]
    wait_until_idle(served)
    before = metrics(port)
    turn2 = turn1 + first + "<|end|><|user|>And 5+8?<|end|><|assistant|>"
    second = json.loads(post(port, {"model": "demo", "prompt": turn2, "max_tokens": 6}).read())["choices"][0]["text"]
    after = metrics(port)
    hits = after[("phi4_jax_prefix_cache_hits_total", ())] - before.get(("phi4_jax_prefix_cache_hits_total", ()), 0)
    queried = after[("phi4_jax_prefix_cache_queries_total", ())] - before[("phi4_jax_prefix_cache_queries_total", ())]
    assert queried == len(tokenizer.encode(turn2)) and hits >= len(tokenizer.encode(turn1))
    assert second == phi4_jax.generate(model, tokenizer, turn2, SamplingParams(max_tokens=6))
