"""Structured outputs: what a request's text must match, and the token masks that keep it there.

The constraint is a JSON schema, any JSON object, a regex, one of some choices, or a Lark grammar.

llguidance (Microsoft's grammar engine, the one vLLM and SGLang also offer) turns the constraint
into a matcher over the model's own tokenizer and computes, token by token, which next tokens keep
the text inside the grammar: a bitmask of the vocabulary (32 tokens an int32), about 50 µs a
token on the host. The engine hands these masks to the sampler on the device (`runner.py`) and
feeds each sampled token back (`Grammar.advance`). When the text is complete only the end tokens
are allowed, so a constrained row ends like any other.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from phi4_jax.errors import SamplingError

FIELD = "structured_outputs"


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """vLLM's `StructuredOutputsParams`: exactly one of `json` (a JSON schema, as a dict or its
    JSON text), `json_object` (any JSON object), `regex`, `choice` (one of these strings) or
    `grammar` (a Lark grammar, llguidance's dialect)."""

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise SamplingError(f"{FIELD} takes exactly one of json, json_object, regex, choice, grammar; got "
                                f"{', '.join(given) or 'none'}", FIELD)
        if isinstance(self.json, dict):  # (kept as canonical text: the params stay hashable)
            object.__setattr__(self, "json", _json_text(self.json))
        elif self.json is not None:
            try:
                schema = json.loads(self.json)
            except (TypeError, json.JSONDecodeError) as e:
                raise SamplingError(f"{FIELD}.json must be a JSON schema: {e}", FIELD) from None
            if not isinstance(schema, (dict, bool)):
                raise SamplingError(f"{FIELD}.json must be a JSON schema (an object), got {self.json[:40]!r}", FIELD)
            object.__setattr__(self, "json", _json_text(schema))
        if self.choice is not None:
            choice = tuple(self.choice) if isinstance(self.choice, (list, tuple)) else None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise SamplingError(f"{FIELD}.choice must be a list of non-empty strings, got {self.choice!r}", FIELD)
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingError(f"{FIELD}.{name} must be a non-empty string, got {value!r}", FIELD)

    def lark(self) -> str:
        """The constraint as an llguidance grammar."""
        from llguidance import LLMatcher

        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults={"whitespace_flexible": False})
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # (property order kept: it is the order generated)


class Grammars:
    """The grammar engine of one tokenizer and vocabulary: `matcher(constraint)` for each request
    (its tokenizer is built once, on first use: about a second for a 200K vocabulary)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids):
        self._source, self.vocab_size, self._eos = tokenizer_json, vocab_size, sorted(eos_ids)
        self._tokenizer = None
        self.width = (vocab_size + 31) // 32  # int32 words of a mask

    def matcher(self, constraint: StructuredOutputs) -> Grammar:
        """A fresh matcher of `constraint`; raises SamplingError (naming `structured_outputs`) for a
        constraint llguidance cannot compile."""
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._source, n_vocab=self.vocab_size, eos_token=self._eos)
        try:
            grammar = constraint.lark()
        except (ValueError, TypeError) as e:
            raise SamplingError(f"{FIELD}: {e}", FIELD) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SamplingError(f"{FIELD}: {matcher.get_error()}", FIELD)
        return Grammar(matcher, self.width)


class Grammar:
    """One request's matcher: `mask()` the tokens it allows next, `advance(tokens)` what was sampled."""

    def __init__(self, matcher, width: int):
        self._matcher, self.width = matcher, width

    def fill(self, masks: np.ndarray, row: int) -> None:
        """Writes the next token's mask into `masks[row]` (`[B, width]` int32, C-contiguous)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, masks, row)

    def mask(self) -> np.ndarray:
        masks = np.zeros((1, self.width), np.int32)
        self.fill(masks, 0)
        return masks[0]

    def advance(self, tokens) -> None:
        """Feeds the sampled tokens (each one the mask allowed; an end token ends the text)."""
        for token in tokens:
            if self._matcher.is_stopped():
                return
            self._matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
