"""`AsyncEngine`: many coroutines generating token-in/token-out through one `RolloutEngine`.

Multi-turn rollouts are many small conversations that wait on tools between turns; each is a
coroutine, and their requests must still reach the engine together so it batches them. An
engine with `submit` and a background loop (the native engine) gets each request at once and
steps over all of them (continuous batching); the coroutine awaits the request handle through
a done-callback, so no thread waits per request. Any other engine (the HTTP client) is called
with one request per thread (`in_thread`) and batches on the server side.

`abort(rid)` finishes a request's sequences in the engine (KV blocks freed at once); cancelling a
`generate` coroutine (a timeout) aborts its request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from miles_core.engine.protocol import GenerateRequest, Generation, RolloutEngine

T = TypeVar("T")


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
            return (await in_thread(self.engine.generate, [request]))[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        handle = self.engine.submit(request)
        handle.add_done_callback(lambda h: _hand_over(loop, future, h.generations))
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


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a daemon thread of its own. Unlike `asyncio.to_thread`, a call that
    never returns (a stuck tool) holds no pool slot and does not keep `asyncio.run` or the
    interpreter from finishing; awaiting it can be cancelled or timed out as usual."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            outcome = (fn(*args, **kwargs), None)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, err)
        _hand_over(loop, future, *outcome)

    threading.Thread(target=work, name="miles-call", daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None = None) -> None:
    if future.done():  # a cancelled waiter has gone
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _hand_over(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any,
               error: BaseException | None = None) -> None:
    """Runs on another thread: wake the waiting coroutine (gone if its loop has closed)."""
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop closed: an aborted request finishing after its rollout ended
        pass
