"""OpenAI's request and answer shapes, and the sampling parameters a request asks the engine for.

Requests are validated as OpenAI validates them: a wrong type is refused, not coerced ("1" is not
a number), an unknown field is ignored (clients send fields of other servers). Every refusal is a
`RequestError` naming the field (`param`), which the server answers with status 400 and
`error_body`. Field names are OpenAI's, plus vLLM's extras (`top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`, `prompt_logprobs`, `structured_outputs`).
The answers' models (`ChatCompletion`, ...) only describe them in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.errors import SamplingError
from phi4_jax.text.structured import StructuredOutputs

# OpenAI fields this server does not honour: refused rather than ignored, except at these values.
UNSUPPORTED = {"logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, "")}
MAX_N = 16  # rows one request may ask for (`n`)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class RequestError(ValueError):
    """A request the server refuses: `status` (400 unless said), the message, the field it names."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               429: "rate_limit_exceeded", 503: "service_unavailable", 500: "internal_error"}


def error_body(error: RequestError) -> dict:
    """OpenAI's error JSON for a refusal."""
    return {"error": {"message": error.message, "type": ERROR_TYPES.get(error.status, "invalid_request_error"),
                      "param": error.param, "code": error.code}}


# An integer as JSON Schema means it: 3 or 3.0 (what `json.dumps(3.0)` sends), never 3.5 or "3".
Int = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]


Text = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Function(_Request):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Request):
    type: Literal["function"]
    function: Function


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: free text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, any JSON object, a regex, one of some
    choices, or a Lark grammar (llguidance's)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: str | None = None


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """`tool_choice` naming the one function to call."""

    type: Literal["function"]
    function: NamedFunction


class _Sampling(_Request):
    """The fields chat and completion requests share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    # (The bounds SamplingParams checks, here too so that the schema describes them.)
    max_tokens: Annotated[Int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=-1, lt=2**31)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[Int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[Int, Field(ge=0, lt=2**31)]] | None = None
    ignore_eos: bool = False
    prompt_logprobs: Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def constraint(self) -> StructuredOutputs | None:
        """What the text must match (`response_format` or `structured_outputs`), or None."""
        fmt = self.response_format if self.response_format is not None and self.response_format.type != "text" \
            else None
        if fmt is not None and self.structured_outputs is not None:
            raise RequestError("give response_format or structured_outputs, not both", "structured_outputs")
        if fmt is not None:
            if fmt.type == "json_object":
                return StructuredOutputs(json_object=True)
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise RequestError("response_format json_schema needs json_schema.schema", "response_format")
            try:
                return StructuredOutputs(json=fmt.json_schema.schema_)
            except SamplingError as e:
                raise RequestError(str(e).replace("structured_outputs.json", "response_format.json_schema.schema"),
                                   "response_format") from None
        if self.structured_outputs is None:
            return None
        s = self.structured_outputs
        try:
            return StructuredOutputs(json=s.json_, json_object=s.json_object is True, regex=s.regex,
                                     choice=None if s.choice is None else tuple(s.choice), grammar=s.grammar)
        except SamplingError as e:
            raise RequestError(str(e), "structured_outputs") from None

    @property
    def scores_only(self) -> bool:
        """Nothing to generate: the prompt is only scored (a text completion's echo with max_tokens 0)."""
        return False


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them."""
        return conversation(self.messages)

    def forced_tool(self) -> str | None:
        """A call the answer must be (`tool_choice` "required" or a named function): "required" or the
        function's name; None where the model chooses."""
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise RequestError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                                   f"tools ({', '.join(names) or 'none given'})", "tool_choice")
            return self.tool_choice.function.name
        if self.tool_choice == "required":
            if not self.tools:
                raise RequestError("tool_choice 'required' needs tools", "tool_choice")
            return "required"
        return None

    def constraint(self) -> StructuredOutputs | None:
        """`_Sampling.constraint`, or where a call is forced (`forced_tool`), the JSON of it: the named
        function's arguments, or (`required`) a list of `{"name", "parameters"}` calls of the tools,
        one at most without `parallel_tool_calls` (vLLM's forms)."""
        forced = self.forced_tool()
        if forced is None:
            return super().constraint()
        if self.structured_outputs is not None or (self.response_format and self.response_format.type != "text"):
            raise RequestError("a forced tool call (tool_choice) cannot take response_format or structured_outputs "
                               "too", "tool_choice")
        schemas = {tool.function.name: tool.function.parameters or {"type": "object"} for tool in self.tools}
        if forced != "required":
            return StructuredOutputs(json=schemas[forced])
        call = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for name, schema in schemas.items()]
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
        return StructuredOutputs(json=calls if self.parallel_tool_calls is not False else {**calls, "maxItems": 1})

    def tool_schemas(self) -> list[dict] | None:
        """The tools as the chat template takes them (none when `tool_choice` is "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


def conversation(messages: list[Message]) -> list[dict]:
    """Messages as the chat template takes them."""
    out = []
    for m in messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [{"type": "function", "id": c.id, "function": {
                "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | Annotated[list[Int], Field(min_length=1)] \
        | Annotated[list[Annotated[list[Int], Field(min_length=1)]], Field(min_length=1)]
    logprobs: Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # (OpenAI's bound is 5; vLLM's 20)
    echo: bool = False

    @property
    def scores_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a text `prompt` (`add_special_tokens`: those the tokenizer adds to a text), or
    chat `messages` rendered by the chat template (then nothing is added by default)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    """vLLM's /detokenize: the text of token ids."""

    model: str | None = None
    tokens: list[Int]


def parse(kind: type[_Request], body: Any) -> _Request:
    """The request `body` (decoded JSON) as `kind`, or a RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, honoured in UNSUPPORTED.items():
        if name in body and body[name] not in honoured:
            raise RequestError(f"{name} is not supported by this server (got {_shown(body[name])})", name)
    try:
        request = kind.model_validate(body)
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False)[0]
        # The field's path, without pydantic's names of union members ("str", "list[int]", ...).
        path = [part for part in first["loc"] if isinstance(part, int) or part in _FIELDS]
        param = ".".join(map(str, path)) or None
        if first["type"] == "missing":
            raise RequestError(f"{param} is required", param) from None
        name = next((part for part in reversed(path) if isinstance(part, str)), None)
        if len(path) < len(first["loc"]) and name in _UNIONS:
            raise RequestError(f"{param} must be {_UNIONS[name]} (got {_shown(first.get('input'))})", param) from None
        raise RequestError(f"{param}: {first['msg']} (got {_shown(first.get('input'))})", param) from None
    if isinstance(request, ChatCompletionRequest) and not any(m.text() or m.tool_calls for m in request.messages):
        raise RequestError("messages hold no content", "messages")
    if isinstance(request, CompletionRequest) and request.prompt == "":
        raise RequestError("prompt is empty", "prompt")
    if isinstance(request, _Sampling) and request.stream and request.prompt_logprobs is not None:
        raise RequestError("prompt_logprobs is not available when stream is true", "prompt_logprobs")
    if isinstance(request, TokenizeRequest) and (request.prompt is None) == (request.messages is None):
        raise RequestError("give either prompt (a text) or messages (a chat), not both", "prompt")
    return request


_FIELDS = {field.alias or name for model in (ChatCompletionRequest, CompletionRequest, Message, Tool, Function,
                                             ToolCall, FunctionCall, TextPart, StreamOptions, TokenizeRequest,
                                             DetokenizeRequest, ResponseFormat, JsonSchemaFormat,
                                             StructuredOutputsRequest, NamedToolChoice, NamedFunction)
           for name, field in model.model_fields.items()}
_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids, none empty",
           "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


def sampling_params(request: _Sampling, default_max_tokens: int) -> SamplingParams:
    """The engine's SamplingParams for one row of `request`; unset fields take vLLM's defaults."""
    fields = {name: getattr(request, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "seed", "stop", "stop_token_ids") if getattr(request, name) is not None}
    limit = request.token_limit()
    fields["max_tokens"] = default_max_tokens if limit is None else limit
    if request.scores_only:
        fields["max_tokens"] = 1  # (its token is not returned)
    elif fields["max_tokens"] == 0 and isinstance(request, CompletionRequest):
        raise RequestError("max_tokens 0 returns nothing without echo: true (which scores the prompt)", "max_tokens")
    fields["prompt_logprobs"] = request.prompt_logprobs
    fields["structured_outputs"] = request.constraint()
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        fields["logprobs"] = (request.top_logprobs or 0) if request.logprobs else None
    else:
        fields["logprobs"] = request.logprobs
        if request.echo and request.logprobs is not None:  # (the prompt's tokens come first, with theirs)
            fields["prompt_logprobs"] = max(request.logprobs, request.prompt_logprobs or 0)
    try:
        return SamplingParams(**fields, ignore_eos=request.ignore_eos)
    except SamplingError as e:
        param = e.field
        if param == "max_tokens" and isinstance(request, ChatCompletionRequest) \
                and request.max_completion_tokens is not None:
            param = "max_completion_tokens"  # the field the client set
        message = str(e) if param == e.field else param + str(e)[len(e.field):]
        raise RequestError(message, param) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# The answers' shapes: what the OpenAPI schema (`/openapi.json`) describes (the handlers build plain dicts).
class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    """OpenAI's error JSON: every refusal and failure."""

    error: ErrorDetail


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob]


class PromptLogprob(_Response):
    logprob: float
    rank: int
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token, None for the first, then by token id (a string).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None


class ChatCompletion(_Response):
    """A chat completion; streamed (`stream: true`) as server-sent `chat.completion.chunk` events."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(_Response):
    """A text completion; streamed (`stream: true`) as server-sent `text_completion` events."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None


class DetokenizeResponse(_Response):
    prompt: str


class TokenizerInfo(_Response):
    tokenizer_class: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: str
    error: str | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion (`data: {...}`; the last is `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Response):
    """One server-sent event of a streamed text completion (`data: {...}`; the last is `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
