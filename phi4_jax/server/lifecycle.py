"""Serving the app with uvicorn until a signal, then draining the engine before it stops listening.

uvicorn's own handler stops listening at once and cancels what runs after its graceful timeout;
this one first drains (`AsyncEngine.drain`): /health and new requests answer 503, running requests
finish for up to `shutdown_timeout` seconds, the rest end with an error; then uvicorn stops. A
second signal stops at once.
"""

from __future__ import annotations

import threading

import uvicorn

from phi4_jax.engine.async_engine import AsyncEngine


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose SIGTERM / SIGINT drains `engine` first."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        threading.Thread(target=self._drain, name="phi4_jax-drain", daemon=True).start()

    def _drain(self) -> None:
        try:
            self.engine.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True
