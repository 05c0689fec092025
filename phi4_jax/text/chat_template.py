"""Chat templates: read from a model folder and rendered exactly as transformers renders them."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from datetime import datetime

from phi4_jax.errors import TokenizerError

# Where transformers finds a message's reasoning; templates read the first name, gpt-oss reads `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def read_chat_template(folder: str, config: dict) -> str | dict[str, str] | None:
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


class ChatRenderer:
    """Renders a folder's chat templates as transformers does, parsing each template once."""

    def __init__(self, folder: str):
        self.folder = folder
        self._compiled: dict[str, tuple] = {}

    def render(self, templates: str | dict[str, str] | None, messages: list[dict], add_generation_prompt: bool,
               tools: list[dict] | None, variables: Mapping[str, str]) -> str:
        """The prompt text of a conversation; see `Tokenizer.render_chat_template`.

        Args:
          templates: the folder's chat template, or its templates by name (`read_chat_template`).
          variables: the named special tokens (`bos_token`, ...) the template sees.
        """
        template, reads_only_message_tools = self._compile(self._template_source(templates, tools))
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
                                   add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # raise_exception() in the template, or a template bug (undefined, type error)
            raise TokenizerError(f"{self.folder}: the chat template failed: {e}") from e

    def _template_source(self, templates, tools) -> str:
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
