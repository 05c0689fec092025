"""The API fuzzed from its own OpenAPI schema (schemathesis): requests built from every endpoint's
described body, valid and not (a few hundred, each answer a few tokens), get no 5xx and answers of
the shapes the schema describes; afterwards no slot is held, no request waits, the memory is what it
was, and the server answers as before."""

import http.client
import json
import os

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

import phi4_jax
from conftest import serving

EXAMPLES = 8  # requests per endpoint and mode (valid bodies, then invalid ones), beside schemathesis's boundary cases


def rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def api():
    """(port, Served): the demo model served a row at a time with a short context (every answer a few
    tokens)."""
    model, tokenizer = phi4_jax.load("demo", dtype="float32", progress=False)
    with serving(model, tokenizer, max_batch=1, max_context=64, default_max_tokens=8) as (port, served):
        yield port, served


def post(port: int, path: str, body: dict) -> tuple[int, dict | None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read()
    return response.status, None if body.get("stream") else json.loads(text)


def mixed_requests(count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Requests of every kind: completions (n, echo, logprobs, streamed), chats, tokenizing, refusals."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(count):
        question = f"What is {rng.integers(100)}+{rng.integers(100)}?"
        made.append([
            ("/v1/completions", {"prompt": question, "max_tokens": int(rng.integers(0, 9)), "echo": True,
                                 "n": int(rng.integers(1, 4)), "logprobs": int(rng.integers(0, 3))}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": question}], "stream": bool(i % 2),
                                      "max_tokens": int(rng.integers(1, 9)), "n": int(rng.integers(1, 3))}),
            ("/tokenize", {"prompt": question, "return_token_strs": True}),
            ("/v1/completions", {"prompt": [], "max_tokens": -1})][i % 4])
    return made


@pytest.fixture(scope="module")
def api_schema(api):
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{api[0]}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=EXAMPLES, deterministic=True)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@pytest.mark.xdist_group("fuzz")
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_from_the_schema_gets_a_server_error(case, api):
    response = case.call(timeout=60)
    case.validate_response(response, checks=(not_a_server_error, status_code_conformance,
                                            response_schema_conformance))


@pytest.mark.slow
@pytest.mark.xdist_group("fuzz")
def test_after_fuzzing_nothing_is_held_and_requests_leave_no_memory_behind(api):
    """(After the fuzzing, on its server.) Every slot is free and nothing waits; the same mixed
    requests sent twice leave the memory as the first time did (the programs they need made then),
    and a request gets its lone answer."""
    port, served = api
    load = served.engine.load()
    assert (load.running, load.waiting) == (0, 0)
    requests = mixed_requests(48)
    answered = []
    for _ in range(2):
        answered.append([post(port, path, body)[0] for path, body in requests])
        answered.append(rss())
    first, after_first, again, after_again = answered
    assert first == again and first.count(200) == 36 and first.count(400) == 12
    assert after_again - after_first < 16 * 2**20, (after_again - after_first) / 2**20
    load = served.engine.load()
    assert (load.running, load.waiting) == (0, 0)
    status, answer = post(port, "/v1/completions", {"prompt": "<|user|>What is 5+5?<|end|><|assistant|>",
                                                    "max_tokens": 4})
    assert (status, answer["choices"][0]["text"]) == (200, "10")
