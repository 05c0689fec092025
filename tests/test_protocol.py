"""The server's request shapes: OpenAI's fields become the engine's SamplingParams and the chat
template's messages; every bad request is a 400 RequestError naming its field, never a crash."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.server import protocol
from phi4_jax.server.protocol import ChatCompletionRequest, CompletionRequest, RequestError, error_body, parse
from phi4_jax.text.tokenizer import Tokenizer

USER = [{"role": "user", "content": "What is 2+2?"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}


def chat(**fields):
    return parse(ChatCompletionRequest, {"model": "m", "messages": USER, **fields})


def test_sampling_fields_become_the_engines_params():
    request = chat(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
                   repetition_penalty=1.3, seed=7, stop=["\n\n", "END"], stop_token_ids=[5], ignore_eos=True,
                   max_tokens=12)
    assert protocol.sampling_params(request, default_max_tokens=99) == SamplingParams(
        temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.3, seed=7, stop=("\n\n", "END"), stop_token_ids=(5,), ignore_eos=True, max_tokens=12)
    # Unset fields keep the engine's defaults; the token limit falls back to the server's.
    assert protocol.sampling_params(chat(), default_max_tokens=99) == SamplingParams(max_tokens=99)
    assert protocol.sampling_params(chat(stop="x"), 5).stop == ("x",)
    # The newer name wins, as in OpenAI's API.
    assert protocol.sampling_params(chat(max_tokens=3, max_completion_tokens=8), 99).max_tokens == 8
    # Log-probabilities: the chat's flag and count, the text completion's count (vLLM's `logprobs`).
    assert [protocol.sampling_params(chat(**f), 9).logprobs for f in (
        {}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 3})] == [None, 0, 3]
    text = parse(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 2})
    assert protocol.sampling_params(text, 9).logprobs == 2


def test_messages_become_the_chat_templates_conversation(fixtures_dir):
    request = chat(messages=[{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Weather in "},
                                                          {"type": "text", "text": "Paris?"}]}],
                   tools=[WEATHER_TOOL], tool_choice="auto", user="someone", logit_bias={})
    assert request.conversation() == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Weather in Paris?"}]
    # Through Phi-4-mini's own template: tools as a JSON string in the system message (DESIGN's format).
    tokenizer = Tokenizer(fixtures_dir / "phi-4-mini")
    prompt = tokenizer.render_chat_template(request.conversation(), tools=request.tool_schemas())
    tools = json.dumps([WEATHER_TOOL], ensure_ascii=False)
    assert prompt == f"<|system|>Be brief.<|tool|>{tools}<|/tool|><|end|><|user|>Weather in Paris?<|end|><|assistant|>"
    assert chat(tools=[WEATHER_TOOL], tool_choice="none").tool_schemas() is None


def test_an_assistant_turn_with_tool_calls_and_the_tool_reply_keep_them():
    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    request = chat(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}])
    assert request.conversation()[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_0"}]


@pytest.mark.parametrize("prompt,prompts", [("Once", ["Once"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]),
                                            ([[1, 2], [3]], [[1, 2], [3]])])
def test_completion_prompts_in_every_form(prompt, prompts):
    assert parse(CompletionRequest, {"prompt": prompt}).prompts() == prompts


BAD_CHAT = [  # (fields replacing a valid chat request's, the field named)
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": 2**70}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop": 3}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"n": 0}, "n"),
    ({"n": protocol.MAX_N + 1}, "n"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # (without logprobs: true)
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),  # (no tools)
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # (no schema)
    ({"response_format": {"type": "xml"}}, "response_format.type"),
]


@pytest.mark.parametrize("fields,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_a_bad_chat_request_is_refused_naming_the_field(fields, param):
    with pytest.raises(RequestError) as refused:
        protocol.sampling_params(chat(**fields), 16)
    error = refused.value
    assert (error.status, error.param) == (400, param) and param.split(".")[0] in error.message
    body = error_body(error)
    assert body == {"error": {"message": error.message, "type": "invalid_request_error", "param": param, "code": None}}


@pytest.mark.parametrize("body,param", [([], None), ("text", None), ({"prompt": ""}, "prompt"), ({}, "prompt"),
                                        ({"prompt": []}, "prompt"), ({"prompt": [[1], []]}, "prompt"),
                                        ({"prompt": [1, "a"]}, "prompt"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
                                        ({"prompt": "x", "suffix": "y"}, "suffix")])
def test_a_bad_completion_request_is_refused_naming_the_field(body, param):
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, body)
    assert refused.value.param == param and refused.value.status == 400


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
KINDS = [ChatCompletionRequest, CompletionRequest, protocol.TokenizeRequest, protocol.DetokenizeRequest]
FIELDS = sorted({name for kind in KINDS for name in kind.model_fields} | {"logit_bias"})


@settings(max_examples=300, deadline=None, derandomize=True)
@given(kind=st.sampled_from(KINDS), body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON)
def test_any_json_body_is_a_request_or_a_request_error(kind, body):
    try:
        request = parse(kind, body)
        if kind in (ChatCompletionRequest, CompletionRequest):
            protocol.sampling_params(request, 16)
    except RequestError as e:
        assert e.status == 400 and isinstance(e.message, str) and e.message
        json.dumps(error_body(e))  # always serialisable
