"""When generation stops: the stop tokens of a model and of a request, and text cut at a stop string.

Stop tokens end a row on the device (the engine compares each sampled token with its row's set);
stop strings are found by the host in the streamed text (`StreamDecoder`), which then ends the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

# Turn-ending tokens of the Phi chat formats (phi-4, Phi-3.x / Phi-4-mini) and the end of a document.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|end|>", "<|endoftext|>")


def model_stop_ids(config: Mapping, generation_config: Mapping, chat_template: str | Mapping | None,
                   eos_token: str | None, token_to_id: Callable[[str], int | None]) -> frozenset[int]:
    """The tokens that end a model's turn: config.json's and generation_config.json's
    `eos_token_id` (an id or a list), the tokenizer's `eos_token`, and the end-of-turn tokens its
    chat template writes (any in the vocabulary when it has no template)."""
    stops = set()
    for source in (config, generation_config):
        eos = source.get("eos_token_id")
        stops.update(i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int))
    template = " ".join(chat_template.values()) if isinstance(chat_template, Mapping) else chat_template
    ends = [t for t in END_OF_TURN_TOKENS if template is None or t in template]
    for name in (*ends, eos_token):
        if name is not None and (token_id := token_to_id(name)) is not None:
            stops.add(token_id)
    return frozenset(stops)


def request_stop_ids(model_ids: Iterable[int], ignore_eos: bool, extra_ids: Iterable[int]) -> frozenset[int]:
    """The tokens that end one request's rows: the model's (unless `ignore_eos`) and its own."""
    return frozenset(() if ignore_eos else model_ids) | frozenset(extra_ids)


class StreamDecoder:
    """Incremental detokenizer for one sequence.

    `add(token_id)` returns only text that is final: never part of a UTF-8 character still split
    across tokens (held while the decoded tail ends in U+FFFD), and never text that could be the start
    of a stop string (the longest such suffix is held). Once a stop string appears, `stopped` is set
    and nothing from the stop string on is ever emitted. A token of `stop_ids` adds no text. Joined
    with `finish()`, the pieces equal `decode(all other ids)` cut before the first stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Iterable[str] = (), stop_ids: Iterable[int] = ()):
        self._decode = decode
        self._stop_ids = frozenset(stop_ids)  # stop tokens end a sequence without text of their own
        self._stops = tuple(s for s in stop if s)  # an empty stop string would stop before any text
        self._longest_stop = max(map(len, self._stops), default=0)
        self._ids: list[int] = []
        # Decoding restarts at `_prefix`, a token boundary where the text was whole; `_read` is where the
        # emitted text ends. Decoding a short window keeps a step cheap, and diffing two decodes of the same
        # start keeps start-of-text effects (SentencePiece's stripped leading space) out of the diff.
        self._prefix = 0
        self._read = 0
        self._held = ""  # decoded text kept back because a stop string may begin in it
        self.stopped = False
        self.stop_string: str | None = None  # which stop string ended the text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Feeds one generated token; returns the new text that is now safe to show (often "")."""
        if self.stopped or token_id in self._stop_ids:
            return ""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible) so far
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(after[len(before):], final=False)

    def finish(self) -> str:
        """Flushes what is held back at the end of generation: an unfinished character decodes as U+FFFD,
        and a partial stop string is real text, so both are emitted."""
        if self.stopped:
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return self._release(after[len(before):], final=True)

    def _release(self, new: str, final: bool) -> str:
        text = self._held + new
        hits = [(text.find(s), s) for s in self._stops if s in text]
        if hits:
            at, self.stop_string = min(hits)
            self.stopped = True
            out, self._held = text[:at], ""
        elif final:
            out, self._held = text, ""
        else:
            keep = next((k for k in range(min(len(text), self._longest_stop - 1), 0, -1)
                         if any(s.startswith(text[-k:]) for s in self._stops)), 0)
            out, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self.text += out
        return out
