"""A lone SentencePiece `tokenizer.model`, encoded and decoded as transformers v5 converts it."""

from __future__ import annotations

import dataclasses
import re

from phi4_jax.errors import TokenizerError

_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched whole in the text before the model splits it (`tokenizers.AddedToken`'s fields)."""

    id: int | None  # None: the backend gives it the vocabulary's id, or the next free one
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


class SentencePieceBackend:
    """A SentencePiece `tokenizer.model` (Llama style, as Phi-3.x ships it), encoded as transformers v5
    converts it when there is no tokenizer.json.

    That conversion keeps the model's normalizer and BPE, matches added tokens on the raw text first, and
    handles SentencePiece's dummy prefix like a `Metaspace` pre-tokenizer: with `legacy=False` (Phi-3.5's
    setting) only the piece of text at the very start gets "▁" prepended, and only if it does not already
    start with one; with `legacy` every piece between added tokens gets it. Decoding maps "▁" to spaces,
    joins byte pieces (`<0xE4>`) into UTF-8 and strips one leading space.
    """

    def __init__(self, path: str, added: list[AddedToken], legacy: bool, add_bos: bool = True, add_eos: bool = False):
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
        except Exception as e:  # noqa: BLE001  (sentencepiece raises plain errors of several kinds)
            raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from None
        self._dummy_prefix = original.normalize("a") != self._sp.normalize("a")
        self._legacy = bool(legacy)
        self._add_bos, self._add_eos = add_bos, add_eos  # (with add_special_tokens)
        self._unk_id = self._sp.unk_id()
        pieces = self._sp.get_piece_size()
        self.default_special_tokens = {key: self._sp.id_to_piece(i) for key, i in
                                       (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                                        ("unk_token", self._unk_id)) if 0 <= i < pieces}

        self._added: dict[int, AddedToken] = {}
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
                self._added[i] = AddedToken(id=i, content=self._sp.id_to_piece(i), special=True)
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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self._sp.bos_id()] if add_special_tokens and self._add_bos and self._sp.bos_id() >= 0 else []
        for start, piece, token_id in self._split(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            normalized = self._sp.normalize(piece)
            if self._dummy_prefix and (self._legacy or (start == 0 and not normalized.startswith(_SPIECE_SPACE))):
                normalized = _SPIECE_SPACE + normalized
            if normalized:  # normalizing is idempotent, so encoding the normalized text changes nothing else
                ids.extend(self._sp.encode(normalized))
        if add_special_tokens and self._add_eos and self._sp.eos_id() >= 0:
            ids.append(self._sp.eos_id())
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

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id].content
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"
