"""Text <-> token ids for a model folder: its tokenizer, chat template, stop tokens and streaming decode.

Everything here matches transformers (v5) token for token: `tokenizer.json` goes through the
`tokenizers` library exactly as transformers loads it, a lone SentencePiece `tokenizer.model` is
encoded the way transformers converts it, and chat templates are rendered in the same sandboxed
jinja2 environment with the same globals and variables.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from phi4_jax.errors import TokenizerError
from phi4_jax.hub import resolve

# The named special tokens transformers puts into the chat template's variables.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Turn-ending tokens of the Phi chat formats (phi-4, Phi-3.x / Phi-4-mini) and the end of a document.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|end|>", "<|endoftext|>")
# Where transformers finds a message's reasoning; templates read the first name, gpt-oss reads `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space


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
            self._backend = _SentencePieceBackend(spm_path, _added_tokens(self.folder, config, special_map),
                                                  legacy=config.get("legacy", True))
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
        if isinstance(self._backend, _SentencePieceBackend):  # transformers takes missing ones from the .model
            for key, piece in self._backend.default_special_tokens.items():
                self.special_tokens.setdefault(key, piece)

        self.chat_template: str | dict[str, str] | None = _read_chat_template(self.folder, config)
        self._compiled: dict[str, tuple] = {}

        self.vocab_size: int = self._backend.vocab_size
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        model_config = _read_json(self.folder, "config.json")
        generation_config = _read_json(self.folder, "generation_config.json")
        pad = self.token_to_id(self.special_tokens.get("pad_token"))
        for source in (generation_config, model_config):
            if pad is None and isinstance(source.get("pad_token_id"), int):
                pad = source["pad_token_id"]
        self.pad_token_id: int | None = pad
        stops = set()
        for source in (model_config, generation_config):
            eos = source.get("eos_token_id")
            stops.update(i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int))
        for name in (*_END_OF_TURN_TOKENS, self.special_tokens.get("eos_token")):
            if (token_id := self.token_to_id(name)) is not None:
                stops.add(token_id)
        self.eos_token_ids: frozenset[int] = frozenset(stops)

    def __repr__(self):
        spm = isinstance(self._backend, _SentencePieceBackend)
        kind = "SentencePiece tokenizer.model" if spm else "tokenizer.json"
        return (f"Tokenizer({self.folder!r}, {kind}, vocab_size={self.vocab_size}, "
                f"eos_token_ids={sorted(self.eos_token_ids)})")

    # Text <-> ids.
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added (transformers' `encode(add_special_tokens=False)`).
        Special tokens written in the text (`<|end|>`) become their ids."""
        return self._backend.encode(text)

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

    def stream(self, stop: tuple[str, ...] = (), skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer for one generated sequence; see `StreamDecoder`."""
        return StreamDecoder(lambda ids: self._backend.decode(ids, skip_special_tokens), stop)

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
        template, reads_only_message_tools = self._compile(self._template_source(tools))
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation; pass a message")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TokenizerError(f"chat messages must be dicts, got {message!r}")
            # transformers drops None values (APIs send `content=None`), then hands the template plain data.
            chat.append(_plain({key: value for key, value in message.items() if value is not None}))
        chat = [_alias_reasoning(message) for message in chat]
        if tools is not None:
            if not all(isinstance(tool, Mapping) for tool in tools):
                raise TokenizerError("tools must be JSON schemas (dicts); callables are not converted here")
            tools = _plain(list(tools))
            if tools and reads_only_message_tools:
                chat = _tools_into_system_message(chat, tools)
        try:
            return template.render(messages=chat, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as e:  # raise_exception() in the template, or a template bug (undefined, type error)
            raise TokenizerError(f"{self.folder}: the chat template failed: {e}") from e

    def _template_source(self, tools) -> str:
        templates = self.chat_template
        if templates is None:
            raise TokenizerError(f"{self.folder} has no chat template (tokenizer_config.json 'chat_template' or "
                                 "chat_template.jinja); pass plain text to encode() instead of messages")
        if isinstance(templates, str):
            return templates
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise TokenizerError(f"{self.folder}: the chat templates {sorted(templates)} include no 'default'")

    def _compile(self, source: str):
        """(compiled template, whether it reads tools only from messages), parsed once per template."""
        if source not in self._compiled:
            env = _jinja_environment()
            try:
                self._compiled[source] = (env.from_string(source), _reads_only_message_tools(env, source))
            except Exception as e:
                raise TokenizerError(f"{self.folder}: the chat template does not parse: {e}") from e
        return self._compiled[source]


class StreamDecoder:
    """Incremental detokenizer for one sequence.

    `add(token_id)` returns only text that is final: never part of a UTF-8 character still split
    across tokens (held while the decoded tail ends in U+FFFD), and never text that could be the start
    of a stop string (the longest such suffix is held). Once a stop string appears, `stopped` is set
    and nothing from the stop string on is ever emitted. Joined with `finish()`, the pieces equal
    `decode(all ids)` cut before the first stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Iterable[str] = ()):
        self._decode = decode
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
        if self.stopped:
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


def load_tokenizer(path: str | os.PathLike, revision: str | None = None, offline: bool | None = None) -> Tokenizer:
    """Loads the tokenizer of a model folder, or of an HF repo id (`microsoft/phi-4`) through the HF cache.

    Reads `tokenizer.json` (or, without it, SentencePiece `tokenizer.model`), tokenizer_config.json
    (chat template, special tokens, added tokens), chat_template.jinja when present (it wins over the
    config's template, as in transformers v5), and config.json / generation_config.json for the stop tokens.
    Nothing from the folder is ever executed (`auto_map` is ignored).

    Raises:
      ModelNotFoundError: no such folder, or a repo id that is not in the cache and cannot be downloaded.
      TokenizerError: no tokenizer.json / tokenizer.model in the folder, or one of its files is unreadable.
    """
    return Tokenizer(resolve(path, revision=revision, offline=offline).folder)


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


def _read_chat_template(folder: str, config: dict) -> str | dict[str, str] | None:
    """transformers v5's order: chat_template.jinja and chat_templates/*.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of {"name", "template"})."""
    files = {}
    if os.path.isfile(path := os.path.join(folder, "chat_template.jinja")):
        files["default"] = path
    if os.path.isdir(extra := os.path.join(folder, "chat_templates")):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                files[name.removesuffix(".jinja")] = os.path.join(extra, name)
    if files:
        templates = {}
        for name, path in files.items():
            with open(path, encoding="utf-8") as f:
                templates[name] = f.read()
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):
        try:
            return {entry["name"]: entry["template"] for entry in template}
        except (KeyError, TypeError):
            raise TokenizerError(f"{folder}/tokenizer_config.json: 'chat_template' must be a string or a list "
                                 "of {'name': ..., 'template': ...}") from None
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder}/tokenizer_config.json: 'chat_template' must be a string, "
                             f"got {type(template).__name__}")
    return template


@dataclasses.dataclass(frozen=True)
class _AddedToken:
    """A token matched whole in the text before the model splits it (`tokenizers.AddedToken`'s fields)."""

    id: int | None  # None: the backend gives it the vocabulary's id, or the next free one
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


def _added_tokens(folder: str, config: dict, special_map: dict) -> list[_AddedToken]:
    """Added tokens as transformers reads them: tokenizer_config.json's `added_tokens_decoder`, else
    (older folders) added_tokens.json, where a token is special iff it is a named special token; then
    every named special token (bos, eos, ...) that is not among them yet."""
    flags = {f.name for f in dataclasses.fields(_AddedToken)} - {"id", "content", "special"}
    named = []
    for source in (config, special_map):
        for key in _SPECIAL_TOKEN_KEYS:
            value = source.get(key)
            entry = value if isinstance(value, dict) else {"content": value} if isinstance(value, str) else None
            if entry and isinstance(entry.get("content"), str):
                named.append(_AddedToken(id=None, content=entry["content"], special=True,
                                         **{k: bool(v) for k, v in entry.items() if k in flags}))
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        tokens = [_AddedToken(id=int(i), content=entry["content"], special=bool(entry.get("special")),
                              **{k: bool(v) for k, v in entry.items() if k in flags})
                  for i, entry in sorted(decoder.items(), key=lambda item: int(item[0]))]
    else:
        names = {t.content for t in named}
        tokens = [_AddedToken(id=int(i), content=content, special=content in names, normalized=content not in names)
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

    def __init__(self, path: str, added: list[_AddedToken]):
        from tokenizers import AddedToken, Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a tokenizers file: {e}") from None
        self._tok.no_truncation()  # prompts are never cut silently
        self._tok.no_padding()
        # transformers adds config tokens the file lacks; the usual case is that there are none.
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                              normalized=t.normalized, special=t.special)
                   for t in added if t.content not in present]
        if missing:
            self._tok.add_tokens(missing)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _SentencePieceBackend:
    """A SentencePiece `tokenizer.model` (Llama style, as Phi-3.x ships it), encoded as transformers v5
    converts it when there is no tokenizer.json.

    That conversion keeps the model's normalizer and BPE, matches added tokens on the raw text first, and
    handles SentencePiece's dummy prefix like a `Metaspace` pre-tokenizer: with `legacy=False` (Phi-3.5's
    setting) only the piece of text at the very start gets "▁" prepended, and only if it does not already
    start with one; with `legacy` every piece between added tokens gets it. Decoding maps "▁" to spaces,
    joins byte pieces (`<0xE4>`) into UTF-8 and strips one leading space.
    """

    def __init__(self, path: str, added: list[_AddedToken], legacy: bool):
        import sentencepiece
        from tokenizers import decoders

        with open(path, "rb") as f:
            proto = f.read()
        try:
            original = sentencepiece.SentencePieceProcessor()
            original.LoadFromSerializedProto(proto)
            # Protobuf merges a repeated message field into the first, so this appended normalizer_spec
            # (field 3) holding add_dummy_prefix (its field 3) = false turns only the dummy prefix off:
            # it is added here, per the rule above, instead.
            self._sp = sentencepiece.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(proto + b"\x1a\x02\x18\x00")
        except Exception as e:
            raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from None
        self._dummy_prefix = original.normalize("a") != self._sp.normalize("a")
        self._legacy = bool(legacy)
        self._unk_id = self._sp.unk_id()
        pieces = self._sp.get_piece_size()
        self.default_special_tokens = {key: self._sp.id_to_piece(i) for key, i in
                                       (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                                        ("unk_token", self._unk_id)) if 0 <= i < pieces}

        self._added: dict[int, _AddedToken] = {}
        names = {token.content for token in added}
        for token in added:
            token_id = token.id
            if token_id is None:  # a named special token: its piece's id, else the next free one
                token_id = self._sp.piece_to_id(token.content)
                if token_id == self._unk_id and token.content != self._sp.id_to_piece(token_id):
                    token_id = max([pieces - 1, *self._added]) + 1
            self._added[token_id] = dataclasses.replace(token, id=token_id)
        for i in range(pieces):  # transformers makes SentencePiece's control pieces (<s>, </s>) special tokens
            if self._sp.is_control(i) and i not in self._added and self._sp.id_to_piece(i) not in names:
                self._added[i] = _AddedToken(id=i, content=self._sp.id_to_piece(i), special=True)
        self._added_ids = {t.content: i for i, t in self._added.items()}
        self.vocab_size = max([pieces, *(i + 1 for i in self._added)])
        # Leftmost-longest match of all added tokens, as the tokenizers library's Aho-Corasick does.
        contents = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, contents))) if contents else None

        steps = [decoders.Replace(_SPIECE_SPACE, " ")]
        if any(self._sp.is_byte(i) for i in range(pieces)):
            steps.append(decoders.ByteFallback())
        if self._dummy_prefix:  # Strip works per token, so fuse first to strip only the start of the text
            steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
        else:
            steps.append(decoders.Fuse())
        self._decoder = decoders.Sequence(steps)

    def _split(self, text: str):
        """(start, piece of text, added token id or None), like tokenizers' AddedVocabulary split."""
        done = 0
        for match in self._added_re.finditer(text) if self._added_re else ():
            start, stop = match.span()
            token = self._added[self._added_ids[match.group()]]
            if start < done:
                continue
            if token.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                      or (stop < len(text) and _is_word_char(text[stop]))):
                continue
            if token.lstrip:
                while start > done and text[start - 1].isspace():
                    start -= 1
            if token.rstrip:
                while stop < len(text) and text[stop].isspace():
                    stop += 1
            if done < start:
                yield done, text[done:start], None
            yield start, text[start:stop], token.id
            done = stop
        if done < len(text):
            yield done, text[done:], None

    def encode(self, text: str) -> list[int]:
        ids = []
        for start, piece, token_id in self._split(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            normalized = self._sp.normalize(piece)
            if self._dummy_prefix and (self._legacy or (start == 0 and not normalized.startswith(_SPIECE_SPACE))):
                normalized = _SPIECE_SPACE + normalized
            if normalized:  # normalizing is idempotent, so encoding the normalized text changes nothing else
                ids.extend(self._sp.encode(normalized))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        tokens = []
        for i in ids:
            if i in self._added:
                if not (skip_special_tokens and self._added[i].special):
                    tokens.append(self._added[i].content)
            elif 0 <= i < self._sp.get_piece_size():
                tokens.append(self._sp.id_to_piece(i))
        return self._decoder.decode(tokens)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._unk_id and token != self._sp.id_to_piece(token_id) else token_id


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


# Chat templates.
@functools.cache
def _jinja_environment():
    """transformers' chat-template environment: sandboxed, trim/lstrip blocks, loop controls, its
    `tojson` (no HTML escaping, non-ASCII kept), `raise_exception`, `strftime_now`, a `namespace` that
    refuses underscore names, and the `{% generation %}` tag (rendered as its body)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %}; the text is unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # Underscore attributes on a namespace are a sandbox escape route; transformers refuses them too.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _plain(value):
    """What the template may see: JSON-like data only (transformers rebuilds its inputs the same way, so a
    rich object's methods never reach the sandbox); anything else becomes a "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # numpy / jax scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _reads_only_message_tools(env, source: str) -> bool:
    """Whether a template reads `message['tools']` (Phi-4-mini) but never the `tools` variable."""
    from jinja2 import meta, nodes

    ast = env.parse(source)
    if "tools" in meta.find_undeclared_variables(ast):
        return False
    return (any(isinstance(n.arg, nodes.Const) and n.arg.value == "tools" for n in ast.find_all(nodes.Getitem))
            or any(n.attr == "tools" for n in ast.find_all(nodes.Getattr)))


def _tools_into_system_message(chat: list[dict], tools: list) -> list[dict]:
    text = json.dumps(tools, ensure_ascii=False)
    for i, message in enumerate(chat):
        if message.get("role") == "system":
            if "tools" in message:
                return chat
            return [*chat[:i], {**message, "tools": text}, *chat[i + 1:]]
    return [{"role": "system", "content": "", "tools": text}, *chat]
