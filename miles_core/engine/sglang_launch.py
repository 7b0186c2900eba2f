"""The command line of one SGLang server (`python -m sglang.launch_server`) for `engine.launch`.

Built here and tested without SGLang; `servers.py` places and starts the servers (`engine.server =
"sglang"`) and stops them when the run ends.
"""

from __future__ import annotations

import socket
import sys
from urllib.parse import urlsplit

from miles_core.config import EngineConfig


def launch_command(cfg: EngineConfig, model_path: str, host: str, port: int, *, dtype: str | None = None) -> list[str]:
    """The `sglang.launch_server` command line of one server."""
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", host, "--port", str(port)]
    if dtype:
        command += ["--dtype", dtype]
    if cfg.num_gpus_per_engine > 1:
        command += ["--tp-size", str(cfg.num_gpus_per_engine)]
    if cfg.colocate:  # /release_memory_occupation needs SGLang's memory saver
        command.append("--enable-memory-saver")
        if cfg.weights_cpu_backup:  # else SGLang drops the weights at a release, as the native engine
            command.append("--enable-weights-cpu-backup")
    if cfg.api_key:
        command += ["--api-key", cfg.api_key]
    if cfg.return_routed_experts:
        command.append("--enable-return-routed-experts")
    if cfg.max_context_len:
        command += ["--context-length", str(cfg.max_context_len)]
    return command + list(cfg.sglang_args)


def server_addresses(cfg: EngineConfig) -> list[tuple[str, int]]:
    """(host, port) of every `engine.urls` entry, or one free port of 127.0.0.1 when none is given."""
    if not cfg.urls:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return [("127.0.0.1", sock.getsockname()[1])]
    addresses = []
    for url in cfg.urls:
        parts = urlsplit(url)
        addresses.append((parts.hostname or "127.0.0.1", parts.port or 30000))
    return addresses
