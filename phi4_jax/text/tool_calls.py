"""Tool calls in Phi-4-mini's output, parsed into names and JSON arguments, whole or as text streams in.

Phi-4-mini writes its calls as a JSON list of `{"name", "arguments"}` between its `<|tool_call|>`
and `<|/tool_call|>` tokens, and is known to write the same list after `functools` too
(`functools[{...}]`). `ToolCallParser` takes the output text as it streams (special tokens kept
as text, as the stream decoder gives them) and returns events in order: `Content` for text to
show, `Call` for each call of a block that parsed. A block that does not parse (not JSON, not a
list of named calls, cut off) stays text: parsing never fails. `parse_tool_calls(text)` is the
same parser fed the whole text, so a streamed output gives exactly the non-streamed result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

OPEN, CLOSE = "<|tool_call|>", "<|/tool_call|>"
FUNCTOOLS = "functools["
MARKERS = (OPEN, FUNCTOOLS)


@dataclass(frozen=True)
class Content:
    """Text that is not a tool call."""

    text: str


@dataclass(frozen=True)
class Call:
    """One tool call: `index` counts the calls of the output from 0; `arguments` is JSON text."""

    index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    """A whole output: its text outside the parsed calls, and the calls."""

    content: str
    calls: tuple[Call, ...]


class ToolCallParser:
    """Splits one output's text, fed in pieces, into `Content` and `Call` events.

    Text that may begin a call marker is held back until it is known; a block's calls come out
    when its closing marker (or, for `functools[`, its closing bracket) arrives, or at `finish()`.
    """

    def __init__(self):
        self._text = ""  # fed, not yet returned
        self._calls = 0

    def feed(self, text: str) -> list[Content | Call]:
        """Feeds the next piece of output text; returns what is now known."""
        self._text += text
        return self._drain(final=False)

    def finish(self) -> list[Content | Call]:
        """Returns everything still held: the output ended (an unclosed block that parses is a call)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Content | Call]:
        events = []
        while self._text:
            starts = [(self._text.find(m), m) for m in MARKERS if m in self._text]
            if not starts:
                keep = 0 if final else _partial_marker(self._text)
                events.append(Content(self._text[:len(self._text) - keep]))
                self._text = self._text[len(self._text) - keep:]
                break
            at, marker = min(starts)
            if at:
                events.append(Content(self._text[:at]))
                self._text = self._text[at:]
            block = _block_end(self._text, marker, final)
            if block is None:
                break  # the block is not complete yet
            end, body = block
            calls = _calls_in(body)
            if calls is None:
                events.append(Content(self._text[:end]))
            else:
                events += [Call(self._calls + i, name, arguments) for i, (name, arguments) in enumerate(calls)]
                self._calls += len(calls)
            self._text = self._text[end:]
        return [e for e in events if not isinstance(e, Content) or e.text]


def parse_tool_calls(text: str) -> ParsedOutput:
    """The calls in a whole output, and its text outside them."""
    parser = ToolCallParser()
    events = parser.feed(text) + parser.finish()
    return ParsedOutput(content="".join(e.text for e in events if isinstance(e, Content)),
                        calls=tuple(e for e in events if isinstance(e, Call)))


def _partial_marker(text: str) -> int:
    """The length of the longest end of `text` that a marker begins with (0: none)."""
    longest = max(map(len, MARKERS)) - 1
    return next((k for k in range(min(len(text), longest), 0, -1)
                 if any(m.startswith(text[-k:]) for m in MARKERS)), 0)


def _block_end(text: str, marker: str, final: bool) -> tuple[int, str] | None:
    """For `text` starting with `marker`: (where the block ends, its JSON body), or None while it
    may still grow. At the output's end an unclosed block runs to the end of the text."""
    if marker == OPEN:
        close = text.find(CLOSE, len(OPEN))
        if close >= 0:
            return close + len(CLOSE), text[len(OPEN):close]
        return (len(text), text[len(OPEN):]) if final else None
    try:  # functools[ ... ]: the block ends where its JSON list does
        _, end = json.JSONDecoder().raw_decode(text, len(FUNCTOOLS) - 1)
    except json.JSONDecodeError:
        return (len(text), text[len(FUNCTOOLS) - 1:]) if final else None
    return end, text[len(FUNCTOOLS) - 1:end]


def _calls_in(body: str) -> list[tuple[str, str]] | None:
    """(name, JSON arguments) of each call in a block's JSON, or None if it is not a list of calls."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                json.loads(arguments)
            except json.JSONDecodeError:
                return None
        elif isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        else:
            return None
        calls.append((item["name"], arguments))
    return calls
