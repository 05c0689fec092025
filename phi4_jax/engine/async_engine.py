"""The engine behind an asyncio server: one thread runs `Engine.step()`, outputs go to per-submission queues.

The event loop `submit`s requests and reads their outputs from a `Stream`; the thread applies
submissions and aborts between steps (the engine is not shared across threads) and delivers each
step's outputs with `call_soon_threadsafe`. It cannot leave a client waiting:
  - a step that raises fails every request the engine held ("error") and the engine goes on, empty;
    if even that fails, the engine is dead: every stream gets an error at once and `submit` refuses;
  - a delivery that raises fails that stream and aborts its requests;
  - a stream wakes up every `heartbeat` seconds to look for such an error, so a lost wake-up costs
    at most that long.
`state` is "loading" (warming up), "ready", "draining" (`drain`: no new requests; running ones
finish, up to a timeout) or "dead"; the server's /health reports it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from phi4_jax.engine import stats
from phi4_jax.engine.engine import Engine, RequestOutput
from phi4_jax.engine.scheduler import Load, QueueFullError
from phi4_jax.errors import Phi4Error

log = logging.getLogger("phi4_jax.engine")


class EngineUnavailableError(Phi4Error):
    """The engine takes no requests now: it is loading, draining, or dead (`state` says which)."""

    def __init__(self, message: str, state: str):
        super().__init__(message)
        self.state = state


class Stream:
    """The outputs of one submission's requests, in order, read on the event loop (`async for`)."""

    def __init__(self, front: AsyncEngine, request_ids: Sequence[str], loop: asyncio.AbstractEventLoop):
        self.front, self.request_ids, self.loop = front, list(request_ids), loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._unfinished = set(self.request_ids)
        self.error: str | None = None  # set (from any thread) when the stream cannot be delivered to

    def put(self, output: RequestOutput) -> None:
        """Called on the engine's thread."""
        self.loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def fail(self, message: str) -> None:
        """Ends the stream with an error (from any thread): its reader gets it at once, or within a
        heartbeat if the loop cannot be woken."""
        self.error = message
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, None)
        except RuntimeError:
            pass  # a closed loop: nobody reads

    def abort(self) -> None:
        """Ends the unfinished requests (the client went)."""
        self.front.abort(self._unfinished)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            try:
                output = await asyncio.wait_for(self._queue.get(), self.front.heartbeat)
            except TimeoutError:
                output = None
            if output is None:  # woken by `fail`, or a heartbeat: look for an error
                error = self.error or self.front.error or self.front.stopped()
                if error is None:
                    continue
                for request_id in sorted(self._unfinished):
                    yield RequestOutput(request_id, [], "", "error", stats.RequestStats(0), error=error)
                self._unfinished.clear()
                return
            if output.request_id not in self._unfinished:
                continue  # (what came after a request had ended: its engine-side abort)
            if output.finished:
                self._unfinished.discard(output.request_id)
            yield output


class AsyncEngine:
    """Runs `engine` on a thread of its own. `start(warm_up)` warms up on that thread, then takes requests."""

    def __init__(self, engine: Engine, heartbeat: float = 1.0):
        self.engine, self.heartbeat = engine, heartbeat
        self.state = "loading"
        self.error: str | None = None  # why the engine is dead
        self._wake = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", stream, requests) and ("abort", request ids, error)
        self._streams: dict[str, Stream] = {}
        self._load = engine.load()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="phi4_jax-engine", daemon=True)
        self._warm_up: Callable[[Engine], None] | None = None

    def start(self, warm_up: Callable[[Engine], None] | None = None) -> None:
        """Starts the thread: `warm_up(engine)` first (state "loading"), then "ready"."""
        self._warm_up = warm_up
        self._thread.start()

    def submit(self, requests: Sequence[tuple]) -> Stream:
        """Queues (request_id, prompt_ids, params) requests together; call on the event loop. Raises
        EngineUnavailableError unless ready, QueueFullError (nothing queued) when they do not fit."""
        stream = Stream(self, [r[0] for r in requests], asyncio.get_running_loop())
        with self._wake:
            if self.state != "ready" or self.stopped():
                raise EngineUnavailableError(self._why() if self.state != "ready" else self.stopped(), self.state)
            queued = self._load.waiting + sum(len(item[2]) for item in self._inbox if item[0] == "add")
            if queued + len(requests) > self.engine.scheduler.max_queue:
                raise QueueFullError(f"{queued} requests are waiting (at most {self.engine.scheduler.max_queue})")
            self._inbox.append(("add", stream, list(requests)))
            self._wake.notify()
        return stream

    def check(self, prompt_ids, params) -> None:
        """`Engine.check` (from any thread: it reads the config and compiles a grammar, nothing more)."""
        self.engine.check(prompt_ids, params)

    def abort(self, request_ids, error: str | None = None) -> None:
        """Ends these requests at the engine's next step (from any thread)."""
        with self._wake:
            self._inbox.append(("abort", list(request_ids), error))
            self._wake.notify()

    def load(self) -> Load:
        with self._wake:
            return self._load

    def drain(self, timeout: float) -> None:
        """Takes no new requests; lets the running ones finish for up to `timeout` seconds, then ends
        the rest with an error; stops the thread. Blocks; call from any thread but the loop's."""
        with self._wake:
            if self.state in ("ready", "loading"):
                self.state = "draining"
            deadline = time.monotonic() + timeout
            self._wake.wait_for(lambda: not self._streams and not self._inbox, max(timeout, 0))
            left = sorted(self._streams)
        if left:
            log.warning("ending %d request(s) still running after %.1f s", len(left), timeout)
            self.abort(left, "the server shut down before the request finished")
        self.shutdown(max(deadline - time.monotonic(), 0) + 5)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops the thread once the engine holds nothing (draining does that first)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def stopped(self) -> str | None:
        """Why no output can come any more although the engine did not fail: its thread has ended."""
        if self._thread.ident is not None and not self._thread.is_alive():
            return "the engine has stopped"
        return None

    def _why(self) -> str:
        return {"loading": "the model is still loading", "draining": "the server is shutting down",
                "dead": f"the engine failed and cannot go on: {self.error}"}.get(self.state, self.state)

    # The engine's thread.

    def _run(self) -> None:
        try:
            if self._warm_up is not None:
                self._warm_up(self.engine)
        except Exception as e:  # noqa: BLE001  reported by /health
            log.exception("the warm-up failed")
            self._die(e)
            return
        with self._wake:
            if self.state == "loading":
                self.state = "ready"
            self._wake.notify_all()
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001  a fault outside a step (a bug): nobody may wait on this engine
            log.exception("the engine's thread failed")
            self._die(e)

    def _serve(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._inbox or self.engine.has_unfinished_requests() or self._stopping)
                if self._stopping and not self._inbox and not self.engine.has_unfinished_requests():
                    return
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                self._apply(item)
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001  every request fails; the engine starts over empty
                log.exception("an engine step failed")
                try:
                    outputs = self.engine.fail_all(e)
                except Exception as again:  # noqa: BLE001
                    log.exception("the engine cannot go on")
                    self._die(again)
                    return
            for output in outputs:
                self._deliver(output)
            with self._wake:
                self._load = self.engine.load()
                self._wake.notify_all()  # (drain waits for the streams to end)

    def _apply(self, item: tuple) -> None:
        if item[0] == "abort":
            _, request_ids, error = item
            for request_id in request_ids:
                stream = self._streams.get(request_id)
                if error is not None and stream is not None:
                    self._deliver(RequestOutput(request_id, [], "", "error", stats.RequestStats(0), error=error))
                self.engine.abort(request_id)
            return
        _, stream, requests = item
        try:
            self.engine.add_requests(requests)
        except Exception as e:  # noqa: BLE001  a submission that cannot run fails alone
            message = str(e) if isinstance(e, Phi4Error) else f"{type(e).__name__}: {e}"
            for r in requests:
                self._deliver_to(stream, RequestOutput(r[0], [], "", "error", stats.RequestStats(len(r[1])),
                                                       error=message))
            return
        with self._wake:
            self._streams.update((r[0], stream) for r in requests)

    def _deliver(self, output: RequestOutput) -> None:
        with self._wake:
            stream = self._streams.get(output.request_id)
            if stream is not None and output.finished:
                del self._streams[output.request_id]
        if stream is not None:
            self._deliver_to(stream, output)

    def _deliver_to(self, stream: Stream, output: RequestOutput) -> None:
        try:
            stream.put(output)
        except Exception as e:  # noqa: BLE001  the stream fails (its heartbeat sees it); its requests end
            stream.fail(f"the output could not be delivered: {type(e).__name__}: {e}")
            with self._wake:
                gone = [i for i, s in self._streams.items() if s is stream]
                for i in gone:
                    del self._streams[i]
            for i in gone:
                self.engine.abort(i)

    def _die(self, error: BaseException) -> None:
        with self._wake:
            self.error = str(error) if isinstance(error, Phi4Error) else f"{type(error).__name__}: {error}"
            self.state = "dead"
            streams, self._streams = set(self._streams.values()), {}
            inbox, self._inbox = self._inbox, []
            self._wake.notify_all()
        streams |= {item[1] for item in inbox if item[0] == "add"}
        for stream in streams:
            stream.fail(self.error)
