"""Text <-> token ids for a model folder: its tokenizer, chat template and stop tokens.

Everything here matches transformers (v5) token for token: `tokenizer.json` goes through the
`tokenizers` library exactly as transformers loads it, a lone SentencePiece `tokenizer.model` is
encoded the way transformers converts it (`sentencepiece_tokenizer`), and chat templates are rendered
in the same sandboxed jinja2 environment with the same globals and variables (`chat_template`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

from phi4_jax.errors import TokenizerError
from phi4_jax.text.chat_template import ChatRenderer, read_chat_template
from phi4_jax.text.sentencepiece import AddedToken, SentencePieceBackend
from phi4_jax.text.stops import StreamDecoder, model_stop_ids
from phi4_jax.text.structured import Grammars

# The named special tokens transformers puts into the chat template's variables.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A model's tokenizer, chat template and stop tokens, loaded from its folder."""

    def __init__(self, folder: str | os.PathLike):
        """Reads the tokenizer files of `folder` (see `load_tokenizer`); no weights are needed."""
        self.folder = os.fspath(folder)
        config = _read_json(self.folder, "tokenizer_config.json")
        special_map = _read_json(self.folder, "special_tokens_map.json")
        json_path = os.path.join(self.folder, "tokenizer.json")
        spm_path = os.path.join(self.folder, "tokenizer.model")
        if os.path.isfile(json_path):
            self._backend = _HFBackend(json_path, _added_tokens(self.folder, config, special_map))
        elif os.path.isfile(spm_path):
            self._backend = SentencePieceBackend(spm_path, _added_tokens(self.folder, config, special_map),
                                                 legacy=config.get("legacy", True),
                                                 # (LlamaTokenizer's defaults)
                                                 add_bos=config.get("add_bos_token", True) is not False,
                                                 add_eos=config.get("add_eos_token", False) is True)
        else:
            raise TokenizerError(f"{self.folder} has no tokenizer: looked for tokenizer.json and tokenizer.model; "
                                 "pass the model's folder as downloaded from Hugging Face")

        # The template's variables: transformers' `special_tokens_map` (named tokens, then any model-specific
        # `*_token` entry of tokenizer_config.json), as plain strings.
        self.special_tokens: dict[str, str] = {}
        for source in (special_map, config):
            for key, value in source.items():
                content = value.get("content") if isinstance(value, dict) else value
                if key.endswith("_token") and isinstance(content, str):
                    self.special_tokens[key] = content
        if isinstance(self._backend, SentencePieceBackend):  # transformers takes missing ones from the .model
            for key, piece in self._backend.default_special_tokens.items():
                self.special_tokens.setdefault(key, piece)

        self.tokenizer_class: str | None = config.get("tokenizer_class")  # (as tokenizer_config.json names it)
        self.chat_template: str | dict[str, str] | None = read_chat_template(self.folder, config)
        self._grammars: Grammars | None = None
        self._chat = ChatRenderer(self.folder)

        self.vocab_size: int = self._backend.vocab_size
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        model_config = _read_json(self.folder, "config.json")
        generation_config = _read_json(self.folder, "generation_config.json")
        pad = self.token_to_id(self.special_tokens.get("pad_token"))
        for source in (generation_config, model_config):
            if pad is None and isinstance(source.get("pad_token_id"), int):
                pad = source["pad_token_id"]
        self.pad_token_id: int | None = pad
        self.eos_token_ids: frozenset[int] = model_stop_ids(
            model_config, generation_config, self.chat_template, self.special_tokens.get("eos_token"),
            self.token_to_id)

    def __repr__(self):
        spm = isinstance(self._backend, SentencePieceBackend)
        kind = "SentencePiece tokenizer.model" if spm else "tokenizer.json"
        return (f"Tokenizer({self.folder!r}, {kind}, vocab_size={self.vocab_size}, "
                f"eos_token_ids={sorted(self.eos_token_ids)})")

    # Text <-> ids.
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, as transformers' `encode(text, add_special_tokens=...)`: by default
        with no BOS/EOS added; with `add_special_tokens`, those the tokenizer adds to a text (none for
        the Phi models). Special tokens written in the text (`<|end|>`) become their ids."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (a list, tuple or 1-D array); unknown ids are dropped, as transformers does."""
        try:
            ids = [int(i) for i in ids]
        except TypeError:  # one id (an int or a numpy/jax scalar)
            ids = [int(ids)]
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        """The id of one token string (`"<|end|>"`), or None when the vocabulary lacks it."""
        return None if token is None else self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's string of one id (`"Ġthe"`, transformers' `convert_ids_to_tokens`), or None."""
        return self._backend.id_to_token(int(token_id))

    def grammars(self, vocab_size: int) -> Grammars:
        """The grammar engine of this tokenizer for a model of `vocab_size` tokens (structured
        outputs; made once). Raises TokenizerError where the tokenizer is SentencePiece's alone."""
        if self._grammars is None or self._grammars.vocab_size != vocab_size:
            if not isinstance(self._backend, _HFBackend):
                raise TokenizerError(f"structured outputs need a tokenizer.json; {self.folder} has only "
                                     "tokenizer.model")
            self._grammars = Grammars(self._backend.to_str(), vocab_size, self.eos_token_ids)
        return self._grammars

    def stream(self, stop: tuple[str, ...] = (), stop_ids: Iterable[int] = (),
               skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer for one generated sequence, cut at the first of the `stop`
        strings; the `stop_ids` tokens add no text (see `stops.StreamDecoder`)."""
        return StreamDecoder(lambda ids: self._backend.decode(ids, skip_special_tokens), stop, stop_ids)

    # Chat.
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """The prompt ids of a conversation, as transformers' `apply_chat_template(..., tokenize=True)`.

        Args:
          messages: `[{"role": "system" | "user" | "assistant" | ..., "content": str, ...}, ...]`.
          add_generation_prompt: end with the header of an assistant turn, for the model to continue.
          tools: JSON schemas of functions the model may call, passed to the template as `tools`. When the
            template only reads tools from the system message (Phi-4-mini), see `render_chat_template`.
        Raises:
          TokenizerError: the model has no chat template, or the template raised.
        """
        return self.encode(self.render_chat_template(messages, add_generation_prompt, tools))

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                             tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation (what `apply_chat_template` encodes).

        Phi-4-mini's template ignores the `tools` variable and reads a JSON string from the system
        message's "tools" key instead (`<|system|>…<|tool|>[…]<|/tool|><|end|>`), so transformers drops
        `tools=` for it silently. Here, for any template that reads `message['tools']` and not `tools`,
        `tools=` is written into the first system message lacking a "tools" key, as
        `json.dumps(tools, ensure_ascii=False)` (an empty system message is put first when there is none);
        a "tools" string already in the system message is left as it is.
        """
        return self._chat.render(self.chat_template, messages, add_generation_prompt, tools, self.special_tokens)


# Files.
def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _added_tokens(folder: str, config: dict, special_map: dict) -> list[AddedToken]:
    """Added tokens as transformers reads them: tokenizer_config.json's `added_tokens_decoder`, else
    (older folders) added_tokens.json, where a token is special iff it is a named special token; then
    every named special token (bos, eos, ...) that is not among them yet."""
    flags = {f.name for f in dataclasses.fields(AddedToken)} - {"id", "content", "special"}
    named = []
    for source in (config, special_map):
        for key in _SPECIAL_TOKEN_KEYS:
            value = source.get(key)
            entry = value if isinstance(value, dict) else {"content": value} if isinstance(value, str) else None
            if entry and isinstance(entry.get("content"), str):
                named.append(AddedToken(id=None, content=entry["content"], special=True,
                                        **{k: bool(v) for k, v in entry.items() if k in flags}))
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        tokens = [AddedToken(id=int(i), content=entry["content"], special=bool(entry.get("special")),
                             **{k: bool(v) for k, v in entry.items() if k in flags})
                  for i, entry in sorted(decoder.items(), key=lambda item: int(item[0]))]
    else:
        names = {t.content for t in named}
        tokens = [AddedToken(id=int(i), content=content, special=content in names, normalized=content not in names)
                  for content, i in _read_json(folder, "added_tokens.json").items()]
    have = {t.content for t in tokens}
    for token in named:
        if token.content not in have:
            tokens.append(token)
            have.add(token.content)
    return tokens


# Backends: the same small interface over `tokenizers` and SentencePiece.
class _HFBackend:
    """`tokenizer.json` through the `tokenizers` library, as transformers' TokenizersBackend uses it."""

    def __init__(self, path: str, added: list[AddedToken]):
        from tokenizers import AddedToken as HFAddedToken, Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001  (tokenizers raises plain errors of several kinds)
            raise TokenizerError(f"{path} is not a tokenizers file: {e}") from None
        self._tok.no_truncation()  # prompts are never cut silently
        self._tok.no_padding()
        # transformers adds config tokens the file lacks; the usual case is that there are none.
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [HFAddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                normalized=t.normalized, special=t.special)
                   for t in added if t.content not in present]
        if missing:
            self._tok.add_tokens(missing)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids  # (its post-processor adds them)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_str(self) -> str:
        """The tokenizer as tokenizer.json holds it, with the added tokens of the config files."""
        return self._tok.to_str()
