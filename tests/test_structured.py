"""Structured outputs (llguidance): JSON schemas, any JSON object, regexes, choices and grammars
constrain what the sampler may draw; the text parses and validates, on the demo model (never trained
on JSON) in the engine and through the server's `response_format` and `structured_outputs`. A
constrained row takes one step a device call beside rows that take many, and every row, constrained
or not, gets the tokens it gets alone."""

import json
import re

import jsonschema_rs  # (schemathesis brings it)
import numpy as np
import pytest

import phi4_jax
from phi4_jax import SamplingParams
from phi4_jax.engine.engine import Engine
from phi4_jax.errors import SamplingError
from phi4_jax.text.structured import StructuredOutputs

QUESTIONS = ["What is 482+37?", "What is 904-317?", "What is 5+5?", "What is 71-9?", "What is 300+45?",
             "What is 12-3?"]
# Bounded, so that a model that never saw JSON still closes it within the tokens it is given.
SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "integer", "minimum": 0, "maximum": 2000}, "op": {"enum": ["plus", "minus"]},
    "note": {"type": "string", "maxLength": 6}, "steps": {"type": "array", "items": {"type": "boolean"},
                                                           "maxItems": 2}},
    "required": ["answer", "op", "note", "steps"], "additionalProperties": False}


@pytest.fixture(scope="module")
def demo():
    return phi4_jax.load("demo", dtype="float32", progress=False)


def run(engine, requests) -> dict:
    """{request id: (text, finish reason, tokens)} of (id, prompt ids, params) run together."""
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    out = {}
    for o in engine.outputs():
        text, _, tokens = out.get(o.request_id, ("", None, []))
        out[o.request_id] = (text + o.text, o.finish_reason, tokens + o.token_ids)
    return out


def prompt(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}])


def test_json_schema_outputs_validate_and_every_row_gets_its_lone_tokens(demo):
    """Constrained rows (a JSON schema, a regex, choices) beside an unconstrained one, greedy and
    sampled, in one batch: each text matches its constraint, and each row's tokens are those it gets
    alone."""
    model, tokenizer = demo
    kinds = [StructuredOutputs(json=SCHEMA), None, StructuredOutputs(regex=r"[0-9]{2,4} (plus|minus) [a-z]{1,5}"),
             StructuredOutputs(choice=("yes", "no", "five hundred"))]  # (json_object: the server's test)
    requests = [(str(i), prompt(tokenizer, q), SamplingParams(max_tokens=96, structured_outputs=kind,
                                                               temperature=0.8 * (i % 2), seed=i))
                for i, (q, kind) in enumerate(zip(QUESTIONS, kinds))]
    together = run(Engine(model, tokenizer, max_batch=8), requests)
    for request, kind in zip(requests, kinds):
        text, reason, tokens = together[request[0]]
        assert (text, reason, tokens) == run(Engine(model, tokenizer, max_batch=1), [request])[request[0]]
        if kind is None:
            continue
        assert reason == "stop", (request[0], text)
        if kind.json is not None:
            jsonschema_rs.validate(SCHEMA, json.loads(text))
        elif kind.json_object:
            assert isinstance(json.loads(text), dict)
        elif kind.regex is not None:
            assert re.fullmatch(kind.regex, text), text
        else:
            assert text in kind.choice


def test_a_constrained_row_takes_one_step_a_call_beside_rows_that_take_many(demo):
    """With steps_per_call 8, an unconstrained row gets its tokens 8 a call while a constrained one
    beside it gets one a call (its mask computed between calls)."""
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch=2, steps_per_call=8)
    engine.add_request("free", prompt(tokenizer, QUESTIONS[0]), SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("json", prompt(tokenizer, QUESTIONS[1]),
                       SamplingParams(max_tokens=40, structured_outputs={"json": SCHEMA}))
    counts = {"free": [], "json": []}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            counts[o.request_id].append(len(o.token_ids))
    assert max(counts["json"]) == 1 and max(counts["free"]) == 8


def test_a_constraint_that_cannot_compile_is_refused_naming_the_field(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer)
    with pytest.raises(SamplingError, match="structured_outputs"):
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs={"regex": "(unclosed"}))
    with pytest.raises(SamplingError, match="exactly one"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
    assert not engine.has_unfinished_requests()
    mask = tokenizer.grammars(model.config.vocab_size).matcher(StructuredOutputs(choice=("yes",))).mask()
    allowed = [i for i in range(model.config.vocab_size) if (int(mask[i // 32]) >> (i % 32)) & 1]
    assert allowed and all("yes".startswith(tokenizer.decode([i])) for i in allowed)
    assert np.asarray(mask).dtype == np.int32


def test_the_server_constrains_response_format_and_structured_outputs(demo):
    """The `openai` client's `response_format` (`json_schema`, `json_object`) and vLLM's
    `structured_outputs` (`choice`, `regex`): parsed, validated, equal to the engine's text; a schema
    or regex that cannot compile is a 400 naming the field, and the server serves on."""
    import openai

    from conftest import serving

    model, tokenizer = demo
    with serving(model, tokenizer, max_batch=4) as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTIONS[2]}]
        fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": SCHEMA, "strict": True}}
        answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=96, response_format=fmt)
        text = answer.choices[0].message.content
        jsonschema_rs.validate(SCHEMA, json.loads(text))
        alone = run(Engine(model, tokenizer), [("x", prompt(tokenizer, QUESTIONS[2]),
                                                 SamplingParams(max_tokens=96, structured_outputs={"json": SCHEMA}))])
        assert text == alone["x"][0]
        streamed = client.chat.completions.create(model="demo", messages=messages, max_tokens=96, response_format=fmt,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
        obj = client.chat.completions.create(model="demo", messages=messages, max_tokens=96,
                                             response_format={"type": "json_object"})
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
        picked = client.completions.create(model="demo", prompt=prompt(tokenizer, QUESTIONS[3]), max_tokens=20,
                                           extra_body={"structured_outputs": {"choice": ["sixty-two", "62", "no"]}})
        assert picked.choices[0].text in ("sixty-two", "62", "no")
        for body, param in [({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                             "response_format"),
                            ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
                            ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
                            ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
                             "structured_outputs")]:
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="demo", messages=messages, max_tokens=8, extra_body=body)
            assert refused.value.body["param"] == param, body
        again = client.chat.completions.create(model="demo", messages=messages, max_tokens=96, response_format=fmt)
        assert again.choices[0].message.content == text


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 999}},
             "required": ["a", "b"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "say", "parameters": {
             "type": "object", "properties": {"word": {"enum": ["hi", "bye"]}}, "required": ["word"],
             "additionalProperties": False}}}]


def test_tool_choice_required_or_named_answers_with_calls_of_the_tools_schemas(chat_model):
    """`tool_choice` naming a function: one call of it, its arguments valid for its parameters (a
    model with Phi-3.5-mini's template, which has no tool-call format: the server makes the call);
    "required": calls of the tools, one at most with `parallel_tool_calls: false`; the streamed
    deltas carry the same calls; a named function that is not among the tools is a 400."""
    import openai

    from conftest import serving

    _, model, tokenizer = chat_model
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    with serving(model, tokenizer, max_batch=4) as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        named = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=96,
                                               tool_choice={"type": "function", "function": {"name": "add"}})
        (call,) = named.choices[0].message.tool_calls
        assert call.function.name == "add" and named.choices[0].finish_reason == "tool_calls"
        jsonschema_rs.validate(parameters["add"], json.loads(call.function.arguments))
        chunks = list(client.chat.completions.create(
            model="demo", messages=messages, tools=TOOLS, max_tokens=96, stream=True,
            tool_choice={"type": "function", "function": {"name": "add"}}))
        streamed = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
        assert [(c.function.name, c.function.arguments) for c in streamed] == [("add", call.function.arguments)]
        for parallel in (None, False):
            extra = {} if parallel is None else {"parallel_tool_calls": parallel}
            required = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=200,
                                                      tool_choice="required", **extra)
            calls = required.choices[0].message.tool_calls
            assert calls and (parallel is None or len(calls) == 1)
            for c in calls:
                jsonschema_rs.validate(parameters[c.function.name], json.loads(c.function.arguments))
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=8,
                                           tool_choice={"type": "function", "function": {"name": "mul"}})
        assert refused.value.body["param"] == "tool_choice"
