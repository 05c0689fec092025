"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streamed or not, over the engine.

Each request is validated (`protocol.py`), tokenized off the event loop, and submitted to the
engine (`AsyncEngine`) as `n` requests per prompt; their outputs (text already detokenized and cut
at stop strings by the engine) come back to this event loop, where Phi-4-mini's tool calls are
parsed when the request gave tools. Every refusal is OpenAI's error JSON with its status; no
request can stop the server, and no client waits on an engine that failed. A client that goes
away ends its requests. GET /health is 200 only while the engine takes requests (503 while
loading, draining or failed); GET /metrics is Prometheus text (`metrics.py`). POST /tokenize and
/detokenize and GET /tokenizer_info are vLLM's tokenizer endpoints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse

from phi4_jax.engine.async_engine import AsyncEngine, EngineUnavailableError
from phi4_jax.engine.engine import RequestOutput
from phi4_jax.engine.scheduler import QueueFullError
from phi4_jax.errors import ConfigError, SamplingError, TokenizerError
from phi4_jax.server import protocol
from phi4_jax.server.metrics import CONTENT_TYPE, Metrics
from phi4_jax.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, RequestError,
                                      TokenizeRequest)
from phi4_jax.text.structured import FIELD
from phi4_jax.text.tokenizer import Tokenizer
from phi4_jax.text.tool_calls import Call, Content, ToolCallParser


@dataclasses.dataclass
class Served:
    """What the API serves: the model's name, its tokenizer and engine, and the limits."""

    name: str
    tokenizer: Tokenizer
    engine: AsyncEngine
    max_context: int
    default_max_tokens: int
    api_key: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: Metrics | None = None  # made by build_app


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info")
# vLLM's tokenizer endpoints (lm-evaluation-harness's `tokenizer_backend=remote` reads them), outside /v1
# as vLLM serves them; behind the API key as /v1 is.
TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


# Each POST endpoint's body, described in the OpenAPI schema (the handlers parse the raw JSON themselves,
# to answer a bad body with OpenAI's error JSON naming the field).
REQUEST_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
_REFUSALS = {status: {"model": protocol.ErrorResponse} for status in (400, 401, 404)}
_BUSY = {503: {"model": protocol.ErrorResponse, "description": "the queue is full, or the engine is not ready"}}


def _streamed(chunk) -> dict:
    """A streamed answer (`stream: true`): server-sent events whose data are `chunk`s (or an error
    body), then `[DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"anyOf": [data, {"const": "[DONE]"}]}}}}}


def build_app(served: Served, docs: bool = False) -> FastAPI:
    """The API of `served`; `docs`: the OpenAPI schema rendered at /docs (it is at /openapi.json always)."""
    app = FastAPI(title="phi4_jax", version=_version(), docs_url="/docs" if docs else None, redoc_url=None)
    app.openapi = lambda: _openapi(app)
    served.metrics = metrics = Metrics(served.engine.load, served.name)

    @app.exception_handler(RequestError)
    async def refused(_, error: RequestError):
        return JSONResponse(protocol.error_body(error), status_code=error.status)

    app.add_middleware(_Gate, api_key=served.api_key, metrics=metrics)

    @app.get("/health", responses={200: {"model": protocol.Health}, 503: {"model": protocol.Health}})
    async def health():
        engine = served.engine
        if engine.state == "ready":
            return {"status": "ok"}
        body = {"status": engine.state, **({"error": engine.error} if engine.error else {})}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def scrape():
        return Response(metrics.scrape(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses={200: {"model": protocol.ModelList}, **_REFUSALS})
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "phi4_jax"}]}

    @app.post("/tokenize", responses={200: {"model": protocol.TokenizeResponse}, **_REFUSALS})
    async def tokenize(request: Request):
        parsed = protocol.parse(TokenizeRequest, await _json(request))
        _check_model(served, parsed.model)
        ids = await asyncio.to_thread(_tokenized, served.tokenizer, parsed)
        strs = [served.tokenizer.id_to_token(i) for i in ids] if parsed.return_token_strs else None
        return {"count": len(ids), "max_model_len": served.max_context, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", responses={200: {"model": protocol.DetokenizeResponse}, **_REFUSALS})
    async def detokenize(request: Request):
        parsed = protocol.parse(DetokenizeRequest, await _json(request))
        _check_model(served, parsed.model)
        _check_ids(served.tokenizer, parsed.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(served.tokenizer.decode, parsed.tokens)}

    @app.get("/tokenizer_info", responses={200: {"model": protocol.TokenizerInfo}})
    async def tokenizer_info():
        tokenizer = served.tokenizer
        template = tokenizer.chat_template
        if isinstance(template, dict):  # (named templates: the default one, as transformers renders it)
            template = template.get("default")
        return {"tokenizer_class": tokenizer.tokenizer_class, **tokenizer.special_tokens, "chat_template": template,
                "model_max_length": served.max_context, "vocab_size": tokenizer.vocab_size}

    @app.post("/v1/chat/completions", responses={200: {"model": protocol.ChatCompletion,
                                                       "content": _streamed(protocol.ChatCompletionChunk)},
                                                 **_REFUSALS, **_BUSY})
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        parsed = protocol.parse(ChatCompletionRequest, await _json(request))
        try:
            ids = await asyncio.to_thread(served.tokenizer.apply_chat_template, parsed.conversation(),
                                          tools=parsed.tool_schemas())
        except TokenizerError as e:
            raise RequestError(str(e), "messages") from None
        return await _respond(served, request, arrived, parsed, [ids], chat=True)

    @app.post("/v1/completions", responses={200: {"model": protocol.Completion,
                                                  "content": _streamed(protocol.CompletionChunk)},
                                            **_REFUSALS, **_BUSY})
    async def completions(request: Request):
        arrived = time.perf_counter()
        parsed = protocol.parse(CompletionRequest, await _json(request))
        texts = parsed.prompts()
        prompts = await asyncio.to_thread(_encoded, served.tokenizer, texts)
        return await _respond(served, request, arrived, parsed, prompts, chat=False, texts=texts)

    return app


def _version() -> str:
    try:
        return importlib.metadata.version("phi4-jax")
    except importlib.metadata.PackageNotFoundError:  # (a checkout on the path, not installed)
        return "unknown"


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema of `app` with each POST endpoint's request body (REQUEST_BODIES)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (protocol.ChatCompletionChunk, protocol.CompletionChunk, *REQUEST_BODIES.values()):
            described = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(described.pop("$defs", {}))
            components[model.__name__] = described
        for path, model in REQUEST_BODIES.items():
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


class _Gate:
    """ASGI middleware: the API key check on /v1/ and the count of answers by endpoint and status.
    (Plain ASGI: Starlette's BaseHTTPMiddleware costs milliseconds a request and pipes streams.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.api_key is not None and (path.startswith("/v1/") or path in TOKENIZER_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = RequestError("a valid API key is needed: send 'Authorization: Bearer KEY'",
                                     status=401, code="invalid_api_key")
                await JSONResponse(protocol.error_body(error), status_code=401)(scope, receive, sending)
                return self._count(path, status[0])
        try:
            await self.app(scope, receive, sending)
        finally:
            self._count(path, status[0])

    def _count(self, path: str, status: int) -> None:
        if path in ENDPOINTS:
            self.metrics.requests.labels(path, str(status)).inc()


def _encoded(tokenizer: Tokenizer, prompts) -> list[list[int]]:
    """Token ids of a text completion's prompts (strings, or token ids checked against the vocabulary)."""
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("a prompt is empty: give at least one token", "prompt")
        _check_ids(tokenizer, ids, "prompt")
        encoded.append(ids)
    return encoded


def _check_ids(tokenizer: Tokenizer, ids: list[int], param: str) -> None:
    if any(not 0 <= i < tokenizer.vocab_size for i in ids):
        raise RequestError(f"{param} token ids must be in [0, {tokenizer.vocab_size})", param)


def _check_model(served: Served, model: str | None) -> None:
    if model is not None and model != served.name:
        raise RequestError(f"the model {model!r} does not exist: this server serves {served.name!r}",
                           "model", status=404, code="model_not_found")


def _tokenized(tokenizer: Tokenizer, request: TokenizeRequest) -> list[int]:
    """/tokenize's ids: of the text (special tokens added unless `add_special_tokens` is false), or of
    the rendered chat (none added unless it is true), as vLLM tokenizes them."""
    if request.prompt is not None:
        return tokenizer.encode(request.prompt, request.add_special_tokens is not False)
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    try:
        text = tokenizer.render_chat_template(protocol.conversation(request.messages), request.add_generation_prompt,
                                              tools)
    except TokenizerError as e:
        raise RequestError(str(e), "messages") from None
    return tokenizer.encode(text, request.add_special_tokens is True)


async def _json(request: Request):
    body = await request.body()
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body nests too deeply") from None


class _Choice:
    """One choice's text as it comes from the engine: its tool-call parser, log-probabilities and
    counts; for a text completion's `echo`, its prompt (`prompt`: the ids) first; with the request's
    `scores_only`, nothing generated (the prompt is only scored)."""

    def __init__(self, index: int, served: Served, request, params, prompt: list[int], tools,
                 chat: bool = True, prompt_text: str | None = None):
        self.index, self.tokenizer, self.prompt, self.prompt_text = index, served.tokenizer, prompt, prompt_text
        self.tools = tools  # (the choice's tool-call parser, or None)
        self.one_call = getattr(request, "parallel_tool_calls", None) is False  # (at most one call)
        self.tokens = 0
        self.finish_reason: str | None = None
        self.text, self.calls = "", []
        self.logprobs = None if params.logprobs is None else _Logprobs(served.tokenizer, chat)
        self.top = params.logprobs
        self.echo, self.scores_only = getattr(request, "echo", False), request.scores_only
        self.wants_prompt_logprobs = request.prompt_logprobs is not None
        self.prompt_logprobs: list | None = None  # vLLM's field, where the request asks for it

    def add(self, output: RequestOutput) -> list:
        """The choice's new events (Content / Call) from an output of its request."""
        events = []
        if output.prompt_logprobs is not None and self.wants_prompt_logprobs:
            self.prompt_logprobs = _prompt_logprobs(self.tokenizer, self.prompt, output.prompt_logprobs)
        if self.echo:  # (on its first output)
            self.echo = False
            if self.logprobs is not None:
                self.logprobs.add_prompt(self.prompt, output.prompt_logprobs, self.top)
            text = self.prompt_text if self.prompt_text is not None else self.tokenizer.decode(self.prompt)
            events += self._parse(text, final=False)
        if self.scores_only:  # (its one token is dropped)
            output = dataclasses.replace(output, token_ids=[], text="", logprobs=None,
                                         finish_reason=output.finish_reason and "length")
        self.tokens += len(output.token_ids)
        if self.logprobs is not None and output.logprobs is not None:
            for token, entry in zip(output.token_ids, output.logprobs):
                self.logprobs.add(token, *entry)
        self.finish_reason = output.finish_reason
        events += self._parse(output.text, final=output.finished)
        if self.finish_reason == "stop" and self.calls:
            self.finish_reason = "tool_calls"
        return events

    def _parse(self, text: str, final: bool) -> list:
        if self.tools is None:
            events = [Content(text)] if text else []
        else:
            events = self.tools.feed(text) + (self.tools.finish() if final else [])
        if self.one_call:
            events = [e for e in events if isinstance(e, Content) or e.index == 0]
        for e in events:
            if isinstance(e, Content):
                self.text += e.text
            else:
                self.calls.append(e)
        return events


class _ForcedCalls:
    """The tool calls of an answer constrained to be calls (`tool_choice` "required", or `forced` the
    named function): the JSON is gathered and made calls at its end, as vLLM makes them; cut short
    (its length reached), it stays text."""

    def __init__(self, forced: str):
        self.forced, self.text = forced, ""

    def feed(self, text: str) -> list:
        self.text += text
        return []

    def finish(self) -> list:
        try:
            value = json.loads(self.text)
        except json.JSONDecodeError:
            return [Content(self.text)] if self.text else []
        if self.forced != "required":
            return [Call(0, self.forced, self.text)]
        return [Call(i, c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for i, c in enumerate(value)]


class _Logprobs:
    """A choice's log-probabilities in OpenAI's shape: the chat's `content` entries, or the text
    completion's parallel lists; `take()` gives what came since the last take (a stream's chunk)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.entries: list = []
        self.taken = 0
        self.offset = 0  # text offset of the next token (text completions)

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        text = self.tokenizer.decode([token])
        top = None if top is None else [(self.tokenizer.decode([t]), v) for t, v in top]
        self.entries.append((text, logprob, top, self.offset))
        self.offset += len(text)

    def add_prompt(self, ids: list[int], entries: list | None, top: int) -> None:
        """An echoed prompt's tokens, before the generated ones (the `top` likeliest at each): the
        first without a log-probability."""
        for j, token in enumerate(ids):
            entry = entries[j] if entries is not None else None
            self.add(token, *((entry[0], entry[1][:top]) if entry is not None else (None, None)))

    def take(self) -> dict | None:
        new, self.taken = self.entries[self.taken:], len(self.entries)
        return self._shaped(new)

    def whole(self) -> dict:
        return self._shaped(self.entries)

    def _shaped(self, entries) -> dict:
        if self.chat:
            entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode())}  # noqa: E731
            return {"content": [{**entry(text, lp), "top_logprobs": [entry(t, v) for t, v in top]}
                                for text, lp, top, _ in entries]}
        # (as OpenAI's: each position's likeliest tokens and the chosen one)
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [None if e[2] is None else {**dict(e[2]), e[0]: e[1]} for e in entries],
                "text_offset": [e[3] for e in entries]}


def _prompt_logprobs(tokenizer: Tokenizer, prompt: list[int], entries: list) -> list:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, then {token id: {logprob, rank,
    decoded_token}} of that token and of the likeliest ones."""
    shaped = [None]
    for token, (logprob, top, rank) in zip(prompt[1:], entries[1:]):
        likeliest = {str(t): {"logprob": v, "rank": r, "decoded_token": tokenizer.decode([t])}
                     for r, (t, v) in enumerate(top, 1)}
        shaped.append({str(token): {"logprob": logprob, "rank": rank, "decoded_token": tokenizer.decode([token])},
                       **likeliest})
    return shaped


async def _respond(served: Served, http: Request, arrived: float, request, prompts: list[list[int]], chat: bool,
                   texts: list | None = None):
    """Runs a validated request's rows; `arrived`: its perf_counter time, for the latencies; `texts`:
    the prompts as the client gave them (text or ids), for `echo`."""
    for ids in prompts:
        if len(ids) >= served.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; this server's context holds {served.max_context} "
                               "(prompt + generated tokens)", "messages" if chat else "prompt",
                               code="context_length_exceeded")
    _check_model(served, request.model)
    params = protocol.sampling_params(request, served.default_max_tokens)
    try:  # (what the engine would refuse, refused here as the request's fault; a grammar compiles here)
        await asyncio.to_thread(lambda: [served.engine.check(ids, params) for ids in prompts])
    except SamplingError as e:
        fmt = request.response_format is not None and request.response_format.type != "text"
        raise RequestError(str(e), "response_format" if fmt and e.field == FIELD else e.field) from None
    except (ConfigError, TokenizerError) as e:
        raise RequestError(str(e), "messages" if chat else "prompt") from None
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
            "model": served.name}
    requests, choices = [], {}
    tools = chat and request.tool_schemas() is not None
    forced = request.forced_tool() if chat else None

    def parser():  # (a forced call's output is the calls' JSON: gathered, then made calls)
        return _ForcedCalls(forced) if forced is not None else ToolCallParser() if tools else None
    for p, ids in enumerate(prompts):
        for j in range(request.n):
            # Choices of one request differ: choice j samples with seed + j (choice 0 is the lone seeded output).
            seeded = params.seed is not None and j > 0
            choice_params = dataclasses.replace(params, seed=params.seed + j) if seeded else params
            index = p * request.n + j
            requests.append((f"{meta['id']}-{index}", ids, choice_params))
            text = texts[p] if texts is not None and isinstance(texts[p], str) else None
            choices[requests[-1][0]] = _Choice(index, served, request, choice_params, ids, parser(), chat, text)
    metrics = served.metrics
    try:
        outputs = served.engine.submit(requests)
    except QueueFullError as e:
        raise RequestError(f"the server is busy: {e}; try again later", status=503, code="server_busy") from None
    except EngineUnavailableError as e:
        raise RequestError(f"{e}; try again later" if e.state != "dead" else str(e), status=503,
                           code="server_unavailable") from None
    prompt_tokens = sum(len(ids) for ids in prompts) * request.n
    metrics.prompt_tokens.inc(prompt_tokens)

    async def events() -> AsyncIterator[tuple[_Choice, list]]:
        last: dict[str, float] = {}  # per request: when its latest tokens came
        async for out in outputs:
            when = time.perf_counter()
            if out.finish_reason == "error":
                raise RuntimeError(out.error)
            choice = choices[out.request_id]
            new = choice.add(out)
            if out.token_ids:
                metrics.generation_tokens.inc(len(out.token_ids))
                if not last:
                    metrics.time_to_first_token.observe(when - arrived)
                elif out.request_id in last:
                    for _ in out.token_ids:
                        metrics.inter_token_latency.observe((when - last[out.request_id]) / len(out.token_ids))
                last[out.request_id] = when
            yield choice, new
        metrics.e2e_latency.observe(time.perf_counter() - arrived)

    def usage():
        completion = sum(c.tokens for c in choices.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    if not request.stream:
        watcher = asyncio.create_task(_stop_on_disconnect(http, outputs))
        try:
            async for _ in events():
                pass  # the choices collect the text
        except RuntimeError as e:
            raise RequestError(str(e), status=500, code="generation_failed") from None
        finally:
            watcher.cancel()
            outputs.abort()  # (requests still running here: the client went, or the request failed)
        body = {**meta, "object": "chat.completion" if chat else "text_completion",
                "choices": [_whole(c, chat) for c in choices.values()], "usage": usage()}
        if chat and request.prompt_logprobs is not None:  # (vLLM's: of the one prompt, beside the choices)
            body["prompt_logprobs"] = next(iter(choices.values())).prompt_logprobs
        return body

    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    async def stream():
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices_, with_usage=None):
            body = {**meta, "object": kind, "choices": choices_}
            if include_usage:
                body["usage"] = with_usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                for c in choices.values():
                    yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            async for choice, new in events():
                for e in new:
                    yield chunk([_delta(choice, e, chat)])
                if choice.finish_reason is not None:
                    logprobs = choice.logprobs.take() if choice.logprobs else None  # (tokens whose text was held)
                    end = {"index": choice.index, "logprobs": logprobs, "finish_reason": choice.finish_reason}
                    yield chunk([{**end, "delta": {}} if chat else {**end, "text": ""}])
            if include_usage:
                yield chunk([], usage())
        except RuntimeError as e:
            error = RequestError(str(e), status=500, code="generation_failed")
            yield f"data: {json.dumps(protocol.error_body(error))}\n\n"
        finally:
            outputs.abort()  # a client gone mid-stream ends its requests
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def _stop_on_disconnect(http: Request, outputs, every: float = 0.25) -> None:
    """Ends a submission's requests once the client of a non-streamed request has gone (a stream
    notices on its next write)."""
    while not await http.is_disconnected():
        await asyncio.sleep(every)
    outputs.abort()


def _tool_call(call: Call) -> dict:
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _whole(choice: _Choice, chat: bool) -> dict:
    logprobs = choice.logprobs.whole() if choice.logprobs else None
    if not chat:
        whole = {"index": choice.index, "text": choice.text, "logprobs": logprobs,
                 "finish_reason": choice.finish_reason}
        return {**whole, "prompt_logprobs": choice.prompt_logprobs} if choice.wants_prompt_logprobs else whole
    message = {"role": "assistant", "content": choice.text if choice.text or not choice.calls else None}
    if choice.calls:
        message["tool_calls"] = [_tool_call(c) for c in choice.calls]
    return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def _delta(choice: _Choice, event, chat: bool) -> dict:
    base = {"index": choice.index, "logprobs": choice.logprobs.take() if choice.logprobs else None,
            "finish_reason": None}
    if not chat:
        return {**base, "text": event.text}
    if isinstance(event, Content):
        return {**base, "delta": {"content": event.text}}
    return {**base, "delta": {"tool_calls": [{"index": event.index, **_tool_call(event)}]}}
