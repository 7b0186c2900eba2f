"""`AsyncEngine`: many coroutines generating token-in/token-out through one `RolloutEngine`.

Multi-turn rollouts are many small conversations that wait on tools between turns; each is a
coroutine, and their requests must still reach the engine together so it batches them. An
engine with `submit` and a background loop (the native engine) gets each request at once and
steps over all of them (continuous batching); the coroutine awaits the request handle through
a done-callback, so no thread waits per request. Any other engine (the HTTP client) is called
with one request per worker thread and batches on the server side.

`abort(rid)` finishes a request's sequences in the engine (KV blocks freed at once); cancelling a
`generate` coroutine (a timeout) aborts its request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from miles_core.engine.protocol import GenerateRequest, Generation, RolloutEngine


class AsyncEngine:
    """Awaitable `generate(request)` over a `RolloutEngine`; use inside `running()`."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.streaming = callable(getattr(engine, "submit", None)) and callable(getattr(engine, "start", None))

    @contextmanager
    def running(self) -> Iterator[AsyncEngine]:
        """The engine's background loop runs inside the block (and is stopped after it, unless it
        already ran before: a server's engine keeps serving)."""
        started = self.streaming and not getattr(self.engine, "is_running", False)
        if started:
            self.engine.start()
        try:
            yield self
        finally:
            if started:
                self.engine.stop()

    async def generate(self, request: GenerateRequest) -> list[Generation]:
        """The request's n generations; cancellation aborts it in the engine."""
        if not self.streaming:
            return (await asyncio.to_thread(self.engine.generate, [request]))[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        handle = self.engine.submit(request)
        handle.add_done_callback(lambda h: loop.call_soon_threadsafe(_settle, future, h.generations))
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request.rid)
            raise

    def abort(self, rid: str) -> None:
        """Finish every sequence of the requests with this rid (finish reason `abort`)."""
        abort = getattr(self.engine, "abort", None)
        if abort is not None:
            abort(rid)


def _settle(future: asyncio.Future, generations: list[Generation]) -> None:
    if not future.done():  # a cancelled waiter has gone
        future.set_result(generations)
