"""Phi-4-mini tool calls: parsed from real token sequences of its tokenizer, whole and streamed
token by token, to the same calls and text; whatever does not parse stays text."""

import json

import pytest

from phi4_jax.text.tokenizer import Tokenizer
from phi4_jax.text.tool_calls import Call, Content, ToolCallParser, parse_tool_calls

WEATHER = {"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2], "metric": True}}
TIME = {"name": "get_time", "arguments": {"zone": "Europe/Paris"}}


def streamed(pieces) -> tuple[str, list[Call]]:
    """Feeds `pieces` one by one: (the text events joined, the calls in order)."""
    parser = ToolCallParser()
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    return "".join(e.text for e in events if isinstance(e, Content)), [e for e in events if isinstance(e, Call)]


def calls_of(*items) -> list[tuple[str, dict]]:
    return [(item["name"], item["arguments"]) for item in items]


def as_pairs(calls) -> list[tuple[str, dict]]:
    assert [c.index for c in calls] == list(range(len(calls)))
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.fixture(scope="module")
def phi4_mini(fixtures_dir):
    return Tokenizer(fixtures_dir / "phi-4-mini")


OUTPUTS = {  # model output -> (text outside the calls, the calls)
    "tokens": (f"<|tool_call|>{json.dumps([WEATHER])}<|/tool_call|>", "", calls_of(WEATHER)),
    "two calls after text": (f"Let me look.\n<|tool_call|>{json.dumps([WEATHER, TIME])}<|/tool_call|>",
                             "Let me look.\n", calls_of(WEATHER, TIME)),
    "functools": (f"functools{json.dumps([TIME, WEATHER], ensure_ascii=False)}", "", calls_of(TIME, WEATHER)),
    "one object, unclosed at the end": (f"<|tool_call|>{json.dumps(TIME)}", "", calls_of(TIME)),
    "two blocks and text between": (
        f"<|tool_call|>{json.dumps([TIME])}<|/tool_call|>then functools{json.dumps([WEATHER])} done",
        "then  done", calls_of(TIME, WEATHER)),  # (the tokenizer strips spaces after a special token)
}


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_real_token_sequences_give_the_calls_whole_and_streamed(phi4_mini, case):
    output, content, calls = OUTPUTS[case]
    ids = phi4_mini.encode(output)
    if "<|tool_call|>" in output:  # the markers are Phi-4-mini's own special tokens
        assert ids.count(phi4_mini.token_to_id("<|tool_call|>")) == output.count("<|tool_call|>")
    # What the server sees: the stream decoder's text, token by token (special tokens kept as text).
    decoder = phi4_mini.stream()
    pieces = [decoder.add(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == output
    whole = parse_tool_calls(output)
    assert (whole.content, as_pairs(whole.calls)) == (content, calls)
    text, streamed_calls = streamed(pieces)
    assert (text, streamed_calls) == (whole.content, list(whole.calls))


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_any_split_of_the_text_gives_the_whole_result(case):
    output, content, calls = OUTPUTS[case]
    for cut in range(len(output) + 1):
        assert streamed([output[:cut], output[cut:]]) == (content, list(parse_tool_calls(output).calls)), cut


UNPARSED = [
    "<|tool_call|>[{\"name\": \"f\", \"arguments\": {\"x\": 1}<|/tool_call|>",  # not JSON
    "<|tool_call|>[]<|/tool_call|>",  # no call
    "<|tool_call|>[{\"arguments\": {}}]<|/tool_call|>",  # no name
    "<|tool_call|>[{\"name\": \"f\", \"arguments\": [1]}]<|/tool_call|>",  # arguments not an object
    "<|tool_call|>[{\"name\": \"f\", \"arguments\": \"{oops\"}]<|/tool_call|>",  # arguments not JSON text
    "functools[{\"name\": \"f\", \"arguments\": {\"x\": ",  # cut off by max_tokens
    "import functools\nfunctools.partial(f)  # no list follows",
    "<|tool_call|",  # a marker's start, never finished
]


@pytest.mark.parametrize("output", UNPARSED)
def test_what_does_not_parse_stays_text(output):
    assert parse_tool_calls(output).content == output and parse_tool_calls(output).calls == ()
    assert streamed(list(output)) == (output, [])


def test_text_that_may_start_a_marker_is_held_back_until_known():
    parser = ToolCallParser()
    assert parser.feed("Sure. <|tool_") == [Content("Sure. ")]
    assert parser.feed("call|>[{\"name\": \"f\", ") == []
    assert parser.feed("\"arguments\": {\"x\": 1}}]<|/tool_call|>") == [Call(0, "f", '{"x": 1}')]
    assert parser.feed(" funct") == [Content(" ")]
    assert parser.feed("ion") == [Content("function")]


def test_arguments_may_be_json_text_or_under_parameters():
    calls = parse_tool_calls('functools[{"name": "f", "arguments": "{\\"x\\": 2}"}, '
                             '{"name": "g", "parameters": {"y": "ü"}}, {"name": "h"}]').calls
    assert calls == (Call(0, "f", '{"x": 2}'), Call(1, "g", '{"y": "ü"}'), Call(2, "h", "{}"))


@pytest.mark.parametrize("case", ["two calls after text", "functools"])
def test_the_servers_streamed_deltas_add_up_to_its_whole_message(phi4_mini, case):
    """The server's assembly of one choice from the engine's outputs (a few real token ids at a
    time with their text as the engine's detokenizer gives it, then the stop token): its streamed
    `delta`s carry the text and every call once, equal to the non-streamed message, and the finish
    reason is "tool_calls"."""
    from types import SimpleNamespace

    from phi4_jax.engine.engine import RequestOutput
    from phi4_jax.engine.sampling import SamplingParams
    from phi4_jax.engine.stats import RequestStats
    from phi4_jax.server.app import _Choice, _delta, _whole
    from phi4_jax.server.protocol import ChatCompletionRequest

    output, content, calls = OUTPUTS[case]
    end = phi4_mini.token_to_id("<|end|>")
    ids = phi4_mini.encode(output) + [end]
    decoder = phi4_mini.stream(stop_ids={end})
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    choice = _Choice(0, SimpleNamespace(tokenizer=phi4_mini), request, SamplingParams(), [1], tools=ToolCallParser())
    deltas = []
    for start in range(0, len(ids), 3):
        last = start + 3 >= len(ids)
        text = "".join(decoder.add(t) for t in ids[start:start + 3]) + (decoder.finish() if last else "")
        events = choice.add(RequestOutput("0", ids[start:start + 3], text, "stop" if last else None,
                                          RequestStats(0)))
        deltas += [_delta(choice, e, chat=True)["delta"] for e in events]
        assert (choice.finish_reason is not None) == last
    message = _whole(choice, chat=True)
    assert message["finish_reason"] == "tool_calls" == choice.finish_reason
    assert "".join(d.get("content", "") for d in deltas) == content == (message["message"]["content"] or "")
    streamed_calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in streamed_calls] == list(range(len(calls)))
    pairs = lambda cs: [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in cs]  # noqa: E731
    assert pairs(streamed_calls) == pairs(message["message"]["tool_calls"]) == calls
