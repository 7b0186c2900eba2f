"""`miles serve` subprocesses for the sync tests: a tiny model on 127.0.0.1 at a free port, weight
updates allowed, always stopped; plus the trainer-side weights and digests the tests compare."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from miles_core.config import EngineConfig
from miles_core.engine.http import SGLangHttpEngine
from miles_core.launch.local import free_port
from tests.child_env import child_env


class ServeProcess:
    """`miles serve --model MODEL` in a subprocess (`start`, then `wait_ready`; `stop` always)."""

    def __init__(self, model: str = "tiny-qwen3", device: str = "cpu", allowed_root: str = "") -> None:
        self.port, self.allowed_root = free_port(), allowed_root
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on a full pipe
        env = child_env(OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "miles_cli.app", "serve", "--model", model, "--port", str(self.port),
             "--allow-unauthenticated-weight-updates", "--set", f'model.device="{device}"',
             *(["--allowed-model-root", allowed_root] if allowed_root else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 120) -> ServeProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"miles serve did not start: {self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a test may have stopped it
            self.process.kill()
        self.process.wait(timeout=30)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def client_engine(*servers: ServeProcess, request_timeout_s: float = 60) -> SGLangHttpEngine:
    urls = tuple(s.url for s in servers)
    return SGLangHttpEngine(EngineConfig(backend="sglang", urls=urls, request_timeout_s=request_timeout_s),
                            urls=list(urls))


def digests(url: str, names: list[str]) -> dict[str, dict]:
    answer = httpx.post(url + "/weights_checksum", json={"names": names}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["tensors"]


def version_of(url: str) -> str:
    return httpx.get(url + "/get_model_info", timeout=10).json()["weight_version"]


def trained(model: torch.nn.Module, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The model's weights moved by seeded noise: what a training step hands the sync."""
    generator = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + torch.randn(p.shape, generator=generator, dtype=p.dtype))
            for n, p in model.named_parameters()]
