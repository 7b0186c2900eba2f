"""`engine.launch = true`: start SGLang servers (`python -m sglang.launch_server`) for the run.

One server per `engine.urls` entry (its host and port), or one on 127.0.0.1 at a free port when
none is given. The command is built by `launch_command` (tested without SGLang); starting needs
the `sglang` package in this environment. Servers are stopped when the run ends.
"""

from __future__ import annotations

import atexit
import importlib.util
import socket
import subprocess
import sys
from urllib.parse import urlsplit

from miles_core.config import EngineConfig
from miles_core.errors import MilesError


def launch_command(cfg: EngineConfig, model_path: str, host: str, port: int) -> list[str]:
    """The `sglang.launch_server` command line of one server."""
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", host, "--port", str(port)]
    if cfg.api_key:
        command += ["--api-key", cfg.api_key]
    if cfg.return_routed_experts:
        command.append("--enable-return-routed-experts")
    if cfg.max_context_len:
        command += ["--context-length", str(cfg.max_context_len)]
    return command + list(cfg.sglang_args)


def server_addresses(cfg: EngineConfig) -> list[tuple[str, int]]:
    if not cfg.urls:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return [("127.0.0.1", sock.getsockname()[1])]
    addresses = []
    for url in cfg.urls:
        parts = urlsplit(url)
        addresses.append((parts.hostname or "127.0.0.1", parts.port or 30000))
    return addresses


def launch_servers(cfg: EngineConfig, model_path: str) -> list[str]:
    """Start the servers; returns their URLs (the HTTP engine then waits until they are healthy)."""
    if importlib.util.find_spec("sglang") is None:
        raise MilesError("engine.launch = true needs the 'sglang' package (pip install sglang); "
                         "or start the servers yourself and set engine.urls")
    urls = []
    for host, port in server_addresses(cfg):
        process = subprocess.Popen(launch_command(cfg, model_path, host, port))
        atexit.register(_stop, process)
        urls.append(f"http://{host}:{port}")
    return urls


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
