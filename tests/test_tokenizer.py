"""Tokenizer: ids, text, chat prompts and stop tokens equal transformers' on the real tokenizers;
streaming decode never splits a character or leaks a stop string."""

import json
import shutil

import numpy as np
import pytest

from phi4_jax.errors import ModelNotFoundError, Phi4Error, TokenizerError
from phi4_jax import load_tokenizer
from phi4_jax.text.stops import StreamDecoder, request_stop_ids
from phi4_jax.text.tokenizer import Tokenizer

# The three real tokenizers, plus Phi-3.5 from its SentencePiece tokenizer.model alone.
MODELS = ("phi-4", "phi-4-mini", "phi-3.5-mini", "phi-3.5-mini-spm")

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?",
    "code": "def f(x):\n    return {'a': x ** 2, \"b\": [i for i in range(10)]}\n\n\tprint(f(3))  # done\n",
    "cjk": "中文测试：你好，世界！日本語のテキストと한국어 문장。",
    "emoji": "emoji 🤖👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 ✨",
    "burmese": "မြန်မာဘာသာစကား သည် မြန်မာနိုင်ငံ၏ ရုံးသုံးဘာသာ ဖြစ်သည်။",
    "mixed": "  Mixed: αβγ ✓ café\tTab\r\nCRLF ▁spiece▁ naïve Ωmega — “quotes” 1234567890",
    "json": '{"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2.5, null], "ok": true}}',
}
# Text that holds special tokens and whitespace around them (their lstrip/rstrip flags matter here).
SPECIAL_TEXTS = ["<|end|>hi<|user|>\nthere <|endoftext|>  x", "<s>a</s> b", "a  <|end|>\n\n b<|im_end|>",
                 "<|im_start|>user<|im_sep|>hi<|im_end|>", " ", "", "\n\nfoo  "]


@pytest.fixture(scope="module")
def folders(fixtures_dir, tmp_path_factory):
    spm = tmp_path_factory.mktemp("phi-3.5-mini-spm")
    for f in (fixtures_dir / "phi-3.5-mini").iterdir():
        if f.name != "tokenizer.json":
            shutil.copyfile(f, spm / f.name)
    return {**{name: fixtures_dir / name for name in MODELS[:3]}, "phi-3.5-mini-spm": spm}


@pytest.fixture(scope="module")
def pair(folders):
    """`pair(name)` -> (our Tokenizer, transformers' AutoTokenizer), each loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            from transformers import AutoTokenizer
            folder = folders[name]
            cache[name] = (load_tokenizer(folder), AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
        return cache[name]

    return get


def hf_chat(hf, messages, **kwargs):
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return text, list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # v5 returns a BatchEncoding


CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "How do I reverse a list in Python? 🐍"}],
    "multi_turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hi there"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Translate 'cat' to 日本語.\n"},
                   {"role": "assistant", "content": "猫 (neko)"},
                   {"role": "user", "content": "Thanks"}],
}


# Chat templates.
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompt_equals_transformers(pair, name, conversation, add_generation_prompt):
    ours, hf = pair(name)
    messages = CONVERSATIONS[conversation]
    text, ids = hf_chat(hf, messages, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat_template(messages, add_generation_prompt=add_generation_prompt) == text
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ids


def test_chat_formats(pair):
    messages = CONVERSATIONS["system_user"]
    assert pair("phi-4")[0].render_chat_template(messages) == (
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>How do I reverse a list in Python? 🐍<|im_end|><|im_start|>assistant<|im_sep|>")
    assert pair("phi-4-mini")[0].render_chat_template(messages) == (
        "<|system|>You are a helpful assistant.<|end|><|user|>How do I reverse a list in Python? 🐍<|end|>"
        "<|assistant|>")


TOOLS = [{"name": "get_weather", "description": "Current weather of a city — météo.",
          "parameters": {"city": {"description": "The city", "type": "str", "default": "London"}}}]


def test_phi4_mini_tools_go_into_the_system_message(pair):
    # Phi-4-mini's template reads a JSON string from the system message, not the `tools` variable:
    # transformers drops `tools=` for it, so `tools=` here equals transformers given that string.
    ours, hf = pair("phi-4-mini")
    messages = CONVERSATIONS["system_user"]
    tools_json = json.dumps(TOOLS, ensure_ascii=False)
    official = [{**messages[0], "tools": tools_json}, *messages[1:]]
    text, ids = hf_chat(hf, official, tools=TOOLS, add_generation_prompt=True)
    system = f"<|system|>You are a helpful assistant.<|tool|>{tools_json}<|/tool|><|end|><|user|>"
    assert text.startswith(system)
    assert ours.render_chat_template(messages, tools=TOOLS) == text
    assert ours.apply_chat_template(messages, tools=TOOLS) == ids
    assert ours.apply_chat_template(official, tools=TOOLS) == ids  # a tools string already there is kept
    assert ours.apply_chat_template(official) == hf_chat(hf, official, add_generation_prompt=True)[1]
    # Without a system message, an empty one carries the tools.
    assert ours.render_chat_template(messages[1:], tools=TOOLS).startswith(
        f"<|system|><|tool|>{tools_json}<|/tool|><|end|><|user|>How do I")
    assert messages == CONVERSATIONS["system_user"]  # the caller's messages are not modified


@pytest.mark.parametrize("name", ["phi-4", "phi-3.5-mini"])
def test_templates_without_tools_ignore_them_like_transformers(pair, name):
    ours, hf = pair(name)
    messages = CONVERSATIONS["system_user"]
    text, ids = hf_chat(hf, messages, tools=TOOLS, add_generation_prompt=True)
    assert (ours.render_chat_template(messages, tools=TOOLS), ours.apply_chat_template(messages, tools=TOOLS)) == (
        text, ids)


# Encode / decode.
@pytest.mark.parametrize("kind", TEXTS)
@pytest.mark.parametrize("name", MODELS)
def test_encode_decode_equal_transformers(pair, name, kind):
    ours, hf = pair(name)
    text = TEXTS[kind]
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(np.asarray(ids), skip_special_tokens=True) == ours.decode(ids)
    assert ours.decode(np.int64(ids[0])) == hf.decode([ids[0]])
    if not (name.startswith("phi-3.5") and kind == "mixed"):  # SentencePiece reads "▁" as " ", drops a lead " "
        assert ours.decode(ids) == text


@pytest.mark.parametrize("name", MODELS)
def test_special_tokens_in_text_equal_transformers(pair, name):
    ours, hf = pair(name)
    for text in SPECIAL_TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_sentencepiece_path_is_used_without_tokenizer_json(pair):
    spm, json_backed = pair("phi-3.5-mini-spm")[0], pair("phi-3.5-mini")[0]
    assert "SentencePiece" in repr(spm) and "tokenizer.json" in repr(json_backed)
    # transformers (and so this) prefixes "▁" only at the start of the text from the .model (legacy=False),
    # but before every piece between added tokens from Phi-3.5's tokenizer.json.
    assert spm.encode("<|user|>hi") == [32010, 2918] != json_backed.encode("<|user|>hi")


@pytest.mark.parametrize("variant", ["added_tokens.json", "legacy"])
def test_sentencepiece_variants_equal_transformers(folders, tmp_path, variant):
    # Older folders list added tokens only in added_tokens.json; `legacy` prefixes "▁" after every added token.
    from transformers import AutoTokenizer

    for f in folders["phi-3.5-mini-spm"].iterdir():
        shutil.copyfile(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if variant == "legacy":
        config["legacy"] = True
    else:
        del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in [*SPECIAL_TEXTS, TEXTS["code"], TEXTS["mixed"]]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize("name", MODELS)
def test_stop_tokens_pad_and_vocab(pair, name):
    ours, hf = pair(name)
    # DESIGN §4: config's and generation_config's eos_token_id, and the chat template's end of turn.
    expected = {"phi-4": {100265}, "phi-4-mini": {200020, 199999}}.get(name, {32007, 32001, 32000})
    assert ours.eos_token_ids == expected and isinstance(ours.eos_token_ids, frozenset)
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.vocab_size == len(hf)
    assert ours.token_to_id("<|im_end|>" if name == "phi-4" else "<|end|>") in ours.eos_token_ids
    assert ours.token_to_id("<|no such token|>") is None


# Streaming.
def stream_all(tokenizer, ids, stop=()):
    decoder = tokenizer.stream(stop=stop)
    pieces = [decoder.add(i) for i in ids]
    return decoder, pieces, decoder.finish()


@pytest.mark.parametrize("kind", ["cjk", "emoji", "burmese", "json", "mixed"])
@pytest.mark.parametrize("name", MODELS)
def test_stream_pieces_join_to_the_full_decode(pair, name, kind):
    ours, _ = pair(name)
    ids = ours.encode(TEXTS[kind])
    decoder, pieces, rest = stream_all(ours, ids)
    assert "".join(pieces) + rest == ours.decode(ids) == decoder.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert not decoder.stopped and rest == ""


def test_stream_holds_a_character_split_across_tokens(pair):
    ours, _ = pair("phi-4")
    ids = ours.encode("🤖")
    assert len(ids) > 1  # byte-level BPE splits the emoji's four bytes
    assert stream_all(ours, ids)[1] == [""] * (len(ids) - 1) + ["🤖"]
    decoder = ours.stream()
    assert decoder.add(ids[0]) == "" and decoder.finish() == "\ufffd"  # an unfinished character, at the end


def test_a_request_stops_at_the_model_tokens_unless_ignored_and_at_its_own(pair):
    ours, _ = pair("phi-4-mini")
    assert request_stop_ids(ours.eos_token_ids, False, (7,)) == {200020, 199999, 7}
    assert request_stop_ids(ours.eos_token_ids, True, (7,)) == {7}
    assert request_stop_ids(ours.eos_token_ids, True, ()) == frozenset()


def test_stop_tokens_add_no_text_to_the_stream(pair):
    ours, _ = pair("phi-4-mini")
    ids = ours.encode("Hello world")
    end = ours.token_to_id("<|end|>")
    decoder = ours.stream(stop_ids={end})
    pieces = [decoder.add(i) for i in [*ids[:1], end, *ids[1:]]] + [decoder.finish()]
    assert "".join(pieces) == decoder.text == "Hello world"
    _, plain, rest = stream_all(ours, [*ids, end])  # without stop_ids the token's text shows
    assert "".join(plain) + rest == "Hello world<|end|>"


@pytest.mark.parametrize("name", MODELS)
def test_stop_string_across_tokens(pair, name):
    ours, _ = pair(name)
    text, stop = "The answer is 42.\nUser: what else? 🤖", "\nUser:"
    ids = ours.encode(text)
    assert not any(stop in ours.decode([i]) for i in ids)  # the stop string spans several tokens
    decoder, pieces, rest = stream_all(ours, ids, stop=(stop, "never"))
    assert "".join(pieces) + rest == decoder.text == "The answer is 42."
    assert decoder.stopped and decoder.stop_string == stop and rest == ""
    assert decoder.add(ids[0]) == "" and decoder.text == "The answer is 42."


def test_stop_string_inside_a_token_and_earliest_stop_wins(pair):
    ours, _ = pair("phi-4")
    ids = ours.encode("The answer is 42")
    assert ours.decode(ids[1:2]) == " answer"
    assert stream_all(ours, ids, stop=("swer",))[0].text == "The an"
    decoder = stream_all(ours, ids, stop=("42", "ans", "is"))[0]
    assert (decoder.text, decoder.stop_string) == ("The ", "ans")
    emoji = stream_all(ours, ours.encode("go 🤖 now"), stop=("🤖",))[0]  # the stop is bytes of three tokens
    assert (emoji.text, emoji.stopped) == ("go ", True)


def test_partial_stop_string_is_held_then_flushed(pair):
    ours, _ = pair("phi-4-mini")
    ids = ours.encode("Hello wor")
    decoder = ours.stream(stop=("world!",))
    emitted = "".join(decoder.add(i) for i in ids)
    assert emitted == decoder.text == "Hello "  # "wor" may begin the stop string
    assert decoder.finish() == "wor" and decoder.text == "Hello wor" and not decoder.stopped
    assert decoder.finish() == ""


def test_stream_decoder_on_its_own():
    # Any decode function works; here one character per id, so stop logic is seen in isolation.
    decoder = StreamDecoder(lambda ids: "".join(map(chr, ids)), stop=("abc", "bd", ""))
    assert [decoder.add(ord(c)) for c in "xab"] == ["x", "", ""]
    assert decoder.add(ord("d")) == "a" and decoder.stopped and decoder.text == "xa"


# Loading and errors.
def tiny_folder(path, chat_template=None, template_file=None, **config):
    """A folder with a word-level tokenizer.json that transformers can load too."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<|end|>", "hello", "world", "[", "]", "user", "assistant", "system", ":"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", **config}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file)
    return path


FEATURES = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}:{{ m.role }}] {{ m.content }}{{ eos_token }}
  {% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}
  {% if m.extra is defined %}EXTRA{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}
{{ messages[-1] | tojson }} {{ strftime_now('%Y') }} {{ unk_token }} {{ (documents is none) }}
{% generation %}gen{% endgeneration %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_template_features_render_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_folder(tmp_path, chat_template=FEATURES)
    messages = [{"role": "system", "content": "Zürich “quotes” <b>", "extra": None},
                {"role": "skip", "content": "hidden"},
                {"role": "assistant", "content": "ok", "reasoning": "because"}]
    hf = AutoTokenizer.from_pretrained(folder)
    for tools in (None, TOOLS):
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
            assert load_tokenizer(folder).render_chat_template(messages, gen, tools) == expected
    assert "Zürich" in expected and "EXTRA" not in expected and "<think>because|because</think>" in expected


def test_template_sources_and_selection(tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    both = tiny_folder(tmp_path / "a", chat_template="CONFIG", template_file="FILE {{ messages[0].content }}")
    assert load_tokenizer(both).render_chat_template([{"role": "user", "content": "hi"}]) == "FILE hi"
    named = [{"name": "default", "template": "D{{ tools is none }}"}, {"name": "tool_use", "template": "T"}]
    listed = tiny_folder(tmp_path / "b", chat_template=named)
    ours, hf = load_tokenizer(listed), AutoTokenizer.from_pretrained(listed)
    msg = [{"role": "user", "content": "hi"}]
    assert ours.render_chat_template(msg) == hf.apply_chat_template(msg, tokenize=False) == "DTrue"
    assert ours.render_chat_template(msg, tools=TOOLS) == hf.apply_chat_template(msg, tools=TOOLS, tokenize=False)


def test_template_errors_are_typed(tmp_path):
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user "
                "message') }}{% endif %}{{ messages[0].content }}")
    tok = load_tokenizer(tiny_folder(tmp_path, chat_template=template))
    with pytest.raises(TokenizerError, match="must start with a user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(TokenizerError, match="empty conversation"):
        tok.apply_chat_template([])
    assert tok.apply_chat_template([{"role": "user", "content": "hello world"}]) == [4, 5]


def test_no_chat_template_says_to_pass_plain_text(tmp_path):
    tok = load_tokenizer(tiny_folder(tmp_path))
    with pytest.raises(TokenizerError, match="no chat template.*plain text"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert tok.encode("hello world") == [4, 5] and tok.eos_token_ids == {2, 3}  # </s>, <|end|>
    assert tok.pad_token_id is None and tok.vocab_size == 12


def test_missing_tokenizer_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=rf"{tmp_path}.*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelNotFoundError):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    assert issubclass(TokenizerError, Phi4Error) and issubclass(TokenizerError, ValueError)
