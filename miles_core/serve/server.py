"""Build and run `miles serve`: load the model, start the native engine behind the batching
worker, and serve the app with uvicorn (in the foreground, or in a thread for tests and benches)."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import uvicorn

from miles_core.checkpoint.loading import load_model
from miles_core.config import MilesConfig
from miles_core.config.tree import apply_overrides, build, load_recipe
from miles_core.engine import build_engine
from miles_core.errors import MilesError
from miles_core.serve.app import create_app
from miles_core.serve.state import ModelFacts, ServeOptions, ServeState
from miles_core.serve.worker import BatchingWorker


def serve_config(model: str, recipe: str | None, overrides: list[str]) -> MilesConfig:
    """The config `miles serve` runs: defaults (or `recipe`), `--set` overrides, `--model`."""
    raw = load_recipe(recipe) if recipe else {}
    raw = apply_overrides(raw, [*overrides, f"model.source={json.dumps(model)}"], MilesConfig)
    return build(MilesConfig, raw)


def build_state(cfg: MilesConfig, options: ServeOptions) -> ServeState:
    """Load `cfg.model`, build the native engine (`cfg.engine`) and its batching worker."""
    if cfg.engine.backend != "native":
        raise MilesError(f"miles serve runs the native engine; got engine.backend = '{cfg.engine.backend}'")
    loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode)
    engine = build_engine(cfg.engine, loaded)
    facts = ModelFacts(
        model_path=str(loaded.path),
        max_context_len=cfg.engine.max_context_len or loaded.max_position_embeddings,
        vocab_size=int(loaded.hf_config.get("vocab_size", 0)) or len(loaded.tokenizer),
        num_moe_layers=int(getattr(loaded.model, "num_moe_layers", 0)),
        hf_config=loaded.hf_config,
    )
    worker = BatchingWorker(engine, max_batch_size=cfg.engine.max_batch_size,
                            window_s=options.batch_window_ms / 1000)
    return ServeState(engine, worker, loaded.tokenizer, options, facts)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one); a port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is
    # IPPROTO_TCP, and accepted sockets inherit it; with proto 0 every answer waited ~40 ms for
    # the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise MilesError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(1024)
    return sock


def serve(state: ServeState, *, on_ready=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM stop uvicorn); the worker is closed after."""
    sock = bind(state.options.host, state.options.port)
    state.options = dataclasses.replace(state.options, port=sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=5))
    if on_ready is not None:
        threading.Thread(target=_notify_when_started, args=(server, state, on_ready), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        state.close()
        sock.close()


def _notify_when_started(server: uvicorn.Server, state: ServeState, on_ready) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        on_ready(f"http://{state.options.host}:{state.options.port}")


class ServerThread:
    """`miles serve` in a background thread of this process (tests, benches): `with
    ServerThread(state) as url: ...` starts it on a free port and always stops it."""

    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.sock = bind(state.options.host, state.options.port)
        state.options = dataclasses.replace(state.options, port=self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.state.options.host}:{self.state.options.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__(None, None, None)
                raise RuntimeError("miles serve did not start within 30 s")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.state.close()
        self.sock.close()
