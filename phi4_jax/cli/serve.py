"""`phi4-jax serve`: an OpenAI-compatible HTTP server for a Phi-4 family model.

Needs the serve extra (pip install 'phi4-jax[serve]'). It loads the model, starts listening, and
compiles the first programs with warm-up requests (GET /health answers 503 until they are done),
then answers POST /v1/chat/completions and /v1/completions (streamed with server-sent events or
not), GET /v1/models, GET /health and GET /metrics (Prometheus). Requests join and leave the
running batch between device calls (continuous batching), each getting the tokens it would get
alone. On SIGTERM or Ctrl-C it takes no new requests (503), lets the running ones finish for up to
--shutdown-timeout seconds, ends the rest with an error, and exits 0; a second signal exits at once.
`python -m phi4_jax.serve` is `phi4-jax serve`.

examples:
  phi4-jax serve                                   # the built-in demo model on 127.0.0.1:8000
  phi4-jax serve --model ~/models/Phi-4-mini-instruct --port 8080 --api-key SECRET
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "demo", "messages": [{"role": "user", "content": "What is 482+37?"}]}'
"""

from __future__ import annotations

import argparse
import logging

from phi4_jax.cli import common as cli
from phi4_jax.errors import ConfigError

HELP = "serve a model over HTTP with OpenAI's API (the serve extra)"
# What `serve` imports beyond the base install: the serve extra's packages, by their import names.
EXTRA = ("fastapi", "uvicorn", "pydantic", "prometheus_client")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="HF folder, folder from `phi4-jax convert`, repo id in the local HF cache, or 'demo'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(*cli.flag("--served-model-name"), default=None,
                   help="the model name clients give and /v1/models lists (default: --model as given)")
    p.add_argument(*cli.flag("--api-key"), default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: no key, so keep the "
                        "default loopback --host)")
    p.add_argument(*cli.flag("--max-batch"), type=int, default=16,
                   help="decode slots: rows decoded together on the device (allocated in powers of two as they fill)")
    p.add_argument(*cli.flag("--max-queue"), type=int, default=256,
                   help="rows that may wait for a slot; a request beyond it gets status 503")
    p.add_argument(*cli.flag("--max-tokens"), type=int, default=256,
                   help="tokens a request generates when it does not say (max_tokens)")
    p.add_argument(*cli.flag("--enable-prefix-caching"), action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the keys and values of a prompt's start that a row of the engine still holds "
                        "(a chat's previous turn, a shared system prompt, a sibling): only the rest is prefilled")
    p.add_argument(*cli.flag("--shutdown-timeout"), type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM or Ctrl-C; then they end with an "
                        "error")
    cli.add_model_flags(p, multihost=False)
    p.add_argument(*cli.flag("--log-level"), default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="how much the server logs")
    p.add_argument("--docs", action="store_true",
                   help="serve the API's interactive documentation at /docs (the OpenAPI schema is at /openapi.json "
                        "always)")


def run(args) -> int:
    """Serves until SIGTERM or Ctrl-C, then drains (--shutdown-timeout); returns the exit code."""
    cli.require_extra("serve", "serve", EXTRA)
    for name in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65536), got {args.port}")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be at least 0, got {args.shutdown_timeout}")
    import uvicorn

    from phi4_jax.api import load
    from phi4_jax.engine.async_engine import AsyncEngine
    from phi4_jax.engine.engine import Engine
    from phi4_jax.engine.runner import ModelRunner
    from phi4_jax.server.app import Served, build_app
    from phi4_jax.server.lifecycle import DrainingServer

    speculation = cli.speculation_from(args)  # (refused before the model is read)
    log = logging.getLogger("phi4_jax.serve")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    model, tokenizer = load(args.model, dtype=args.dtype, mesh=cli.mesh_from(args), progress=False,
                            attention=args.attention, quantize=args.quantize)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer files (tokenizer.json or tokenizer.model)")
    runner = ModelRunner(model, max_context=args.max_context, speculative=speculation,
                         speculative_rows=args.speculative_rows)
    fixed = runner.fixed_length(args.max_batch)
    if fixed is None:
        log.warning("--max-batch %d rows of the %d-token context would take over a quarter of the memory: caches "
                    "grow with the requests, and a request may compile programs while others stream (lower "
                    "--max-context or --max-batch to compile every program before serving)",
                    args.max_batch, runner.max_context)
    engine = AsyncEngine(Engine(runner, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                                enable_prefix_caching=args.enable_prefix_caching, fixed_length=fixed))
    name = args.served_model_name or str(args.model)
    served = Served(name=name, tokenizer=tokenizer, engine=engine, max_context=runner.max_context,
                    default_max_tokens=args.max_tokens, api_key=args.api_key)
    # Compile before reporting healthy: every program a request can need (with a fixed cache length).
    log.info("compiling; /health answers 503 until done")
    engine.start(lambda e: e.warm_up(tokenizer.encode("Hello") or [0], args.max_tokens))
    log.info("serving %s as %r on http://%s:%d", args.model, name, args.host, args.port)
    server = DrainingServer(uvicorn.Config(build_app(served, docs=args.docs), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5),
                            engine, args.shutdown_timeout)
    try:
        server.run()
    finally:
        engine.shutdown(timeout=5)
    if engine.state == "dead":
        log.error("the engine failed: %s", engine.error)
        return cli.EXIT_FAILED
    return cli.EXIT_OK
