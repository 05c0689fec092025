"""The server under load and faults, in this process (uvicorn on a loopback port, the demo model): a
client gone mid-stream frees its slots, a full queue answers 503 and the server serves on, and
/metrics counts what happened."""

import dataclasses
import http.client
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import listening

import phi4_jax
from phi4_jax import SamplingParams
from phi4_jax.engine.engine import Engine
from phi4_jax.engine.scheduler import Scheduler
from phi4_jax.server.app import Served

TIMEOUT = 120  # seconds any wait here may take
MAX_QUEUE = 20


@pytest.fixture(scope="module")
def demo():
    return phi4_jax.load("demo", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(demo):
    model, tokenizer = demo
    # One step per device call: a stream of 200 tokens spans 200 calls, so a client that leaves
    # early leaves while its rows still run.
    scheduler = Scheduler(Engine(model), max_batch=4, max_queue=MAX_QUEUE, steps_per_call=1)
    scheduler.start()
    served = Served(name="demo", tokenizer=tokenizer, scheduler=scheduler, max_context=256, default_max_tokens=16)
    try:
        with listening(served, TIMEOUT) as port:
            yield port, served
    finally:
        scheduler.shutdown(TIMEOUT)


def post(port, body: dict, headers: dict | None = None) -> http.client.HTTPResponse:
    """An open response to a POST of `body` (the caller reads and closes it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
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
        load = served.scheduler.load()
        if (load.running, load.waiting, load.slots) == (0, 0, 0):
            return
        time.sleep(0.01)
    pytest.fail(f"still busy: {served.scheduler.load()}")


LONG = {"model": "demo", "prompt": "What is 1+1?", "max_tokens": 200, "ignore_eos": True, "n": 16, "stream": True}


def test_a_client_gone_mid_stream_frees_its_slots(server):
    port, served = server
    before = metrics(port)
    response = post(port, LONG)
    assert response.status == 200 and response.readline().startswith(b"data: ")
    deadline = time.monotonic() + TIMEOUT
    while served.scheduler.load().running < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert served.scheduler.load().running == 4  # its rows fill every slot; twelve wait
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
