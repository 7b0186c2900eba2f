"""A call on a daemon thread whose result is a future: for calls that wait on other processes
(a server's answer while this thread broadcasts), where a stuck peer must never hold up the
caller's own error (an executor's `with` block would wait for it)."""

from __future__ import annotations

import threading
from concurrent.futures import Future


def background(fn, **kwargs) -> Future:
    """`fn(**kwargs)` in a daemon thread; its result or error lands in the future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(**kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name=f"sync-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future
