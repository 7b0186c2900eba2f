"""`engine.launch = true`: the run's rollout servers, each on GPUs of its own, for as long as it runs.

Placement (`server_gpus`): `engine.num_gpus / engine.num_gpus_per_engine` servers (with
`num_gpus = 0`: one per `engine.urls` entry, or one). The trainer ranks take GPUs 0..N-1 (N
trainer ranks); server i takes the next `num_gpus_per_engine` GPUs after them, or, colocated
(`engine.colocate`), GPUs from 0 on, shared with the trainer. Each server process sees only its
GPUs (`CUDA_VISIBLE_DEVICES`, mapped through this process's own list when it has one). Without
CUDA, `miles` servers run on CPU and no GPU is counted (CPU tests launch several).

Servers: `sglang` (`python -m sglang.launch_server`, `sglang_launch.py`; `--tp-size` above one GPU,
`--enable-memory-saver` when colocated, `--enable-weights-cpu-backup` with
`engine.weights_cpu_backup`) or `miles` (`miles serve`: the native engine on the run's model
folder, dtype, device and alignment mode and the engine section's sizes; a fresh api key when none
is configured, and the run's weight-sync folder as an allowed model root).

Lifetime: start-up waits until every server answers `GET /health`, and fails with one line naming
the server that exited (its exit code and the last line of its log) or did not answer within
`engine.launch_timeout_s`. Each server starts in a session of its own (Ctrl-C in the terminal
reaches only the run, which finishes its step and then stops them), dies with the process that
started it (Linux parent-death signal; that thread must live as long as the run, as the main
thread does), and its whole process group is terminated, then killed, by `ServerFleet.stop`: when
the engine closes, when start-up fails, and at exit. Their logs go to a temporary folder, removed
then unless a server failed (the error names the log).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from miles_core.config import EngineConfig
from miles_core.engine.sglang_launch import launch_command, server_addresses
from miles_core.errors import MilesError
from miles_core.utils.http import client as http_client

_PR_SET_PDEATHSIG = 1
STOP_WAIT_S = 10.0
"""How long stopped servers get to exit after SIGTERM before they are killed."""


@dataclasses.dataclass(frozen=True)
class LaunchContext:
    """What the servers need from the run beyond the engine section (runtime, not user config)."""

    trainer_gpus: int = 1
    """GPUs the trainer ranks of this machine take (0..N-1); the servers go after them."""
    weight_roots: tuple[str, ...] = ()
    """Folders the servers may load weights from (the disk weight sync's folder)."""
    alignment_mode: str = "fast"


@dataclasses.dataclass
class LaunchedServer:
    url: str
    process: subprocess.Popen
    gpus: list[int]
    log_path: Path

    def describe(self, index: int) -> str:
        where = f"GPUs {','.join(map(str, self.gpus))}" if self.gpus else "CPU"
        return f"engine server {index} ({self.url}, {where}, pid {self.process.pid})"

    def last_log_line(self) -> str:
        try:
            lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "(no log)"
        return lines[-1][:300] if lines else "(empty log)"


@dataclasses.dataclass
class ServerFleet:
    """The launched servers of one run."""

    servers: list[LaunchedServer] = dataclasses.field(default_factory=list)
    log_dir: Path | None = None
    """The servers' logs: removed by `stop` unless a server failed (an error names its log)."""
    keep_logs: bool = False

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def wait_healthy(self, timeout_s: float, headers: dict[str, str]) -> None:
        """Return once every server answers `GET /health` with 200; one clear error otherwise."""
        deadline, waiting = time.monotonic() + timeout_s, dict(enumerate(self.servers))
        with http_client(timeout=2.0, headers=headers) as client:
            while waiting:
                for index, server in list(waiting.items()):
                    code = server.process.poll()
                    if code is not None:
                        raise MilesError(f"{server.describe(index)} exited with code {code} during start-up: "
                                         f"{server.last_log_line()} (log: {server.log_path})")
                    if _healthy(client, server.url):
                        del waiting[index]
                if waiting and time.monotonic() > deadline:
                    index, server = next(iter(waiting.items()))
                    self.keep_logs = True
                    raise MilesError(f"{server.describe(index)} did not answer GET /health within {timeout_s:g} s "
                                     f"(engine.launch_timeout_s); last log line: {server.last_log_line()} "
                                     f"(log: {server.log_path})")
                time.sleep(0.2)

    def stop(self) -> None:
        """Terminate every server's process group, wait, kill what is left; reap all. Once."""
        servers, self.servers = self.servers, []
        for server in servers:
            self.keep_logs |= server.process.poll() is not None  # it died before it was stopped
            _signal_group(server.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for server in servers:
            try:
                server.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(server.process, signal.SIGKILL)
            server.process.wait()
        atexit.unregister(self.stop)
        if self.log_dir is not None and not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def server_gpus(cfg: EngineConfig, *, trainer_gpus: int, available: int | None) -> list[list[int]]:
    """Each server's GPU ids (empty lists when `available` is None: CPU servers)."""
    per = cfg.num_gpus_per_engine
    count = cfg.num_gpus // per if cfg.num_gpus else max(len(cfg.urls), 1)
    if available is None:
        return [[] for _ in range(count)]
    first = 0 if cfg.colocate else trainer_gpus
    need = first + count * per
    if need > available:
        after = "on the trainer's GPUs (engine.colocate)" if cfg.colocate else f"after the trainer's {trainer_gpus} GPUs"
        raise MilesError(f"engine servers: {count} x {per} GPUs (engine.num_gpus = {cfg.num_gpus or count * per}, "
                         f"num_gpus_per_engine = {per}) {after} need {need} GPUs; this machine has {available}")
    return [list(range(first + i * per, first + (i + 1) * per)) for i in range(count)]


def launch_servers(cfg: EngineConfig, model_path: str, *, dtype: str, on_gpu: bool,
                   context: LaunchContext) -> tuple[EngineConfig, ServerFleet]:
    """Start the servers and wait until all are healthy; returns the engine config the client
    must use (with the generated api key of `miles` servers) and the fleet to stop later."""
    if cfg.server == "miles" and not cfg.api_key:  # their weight and memory routes need one
        cfg = dataclasses.replace(cfg, api_key=secrets.token_hex(16))
    if cfg.server == "sglang" and importlib.util.find_spec("sglang") is None:
        raise MilesError("engine.server = 'sglang' needs the 'sglang' package (pip install sglang); or set "
                         "engine.server = 'miles', or start the servers yourself and set engine.urls")
    available = torch.cuda.device_count() if on_gpu else None
    gpus = server_gpus(cfg, trainer_gpus=context.trainer_gpus, available=available)
    addresses = _addresses(cfg, len(gpus))
    logs = Path(tempfile.mkdtemp(prefix="miles-engines-"))
    fleet = ServerFleet(log_dir=logs)
    atexit.register(fleet.stop)
    try:
        for index, ((host, port), ids) in enumerate(zip(addresses, gpus)):
            command = (launch_command(cfg, model_path, host, port, dtype=dtype) if cfg.server == "sglang" else
                       miles_command(cfg, model_path, host, port, dtype=dtype, on_gpu=on_gpu, context=context))
            fleet.servers.append(_start(command, host, port, ids, on_gpu, logs / f"engine_{index}.log"))
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        fleet.wait_healthy(cfg.launch_timeout_s, headers)
    except BaseException:
        fleet.stop()
        raise
    return cfg, fleet


def miles_command(cfg: EngineConfig, model_path: str, host: str, port: int, *, dtype: str, on_gpu: bool,
                  context: LaunchContext) -> list[str]:
    """The `miles serve` command line of one server: the run's model and engine settings."""
    settings = {"model.dtype": dtype, "model.device": "cuda" if on_gpu else "cpu",
                "alignment.mode": context.alignment_mode, **{f"engine.{name}": getattr(cfg, name) for name in (
                    "max_batch_size", "max_context_len", "mem_fraction", "num_kv_blocks", "block_size",
                    "max_num_batched_tokens", "weights", "cuda_graphs", "overlap", "return_routed_experts")}}
    command = [sys.executable, "-m", "miles_cli.app", "serve", "--model", str(model_path), "--host", host,
               "--port", str(port), "--api-key", cfg.api_key]
    for root in context.weight_roots:
        command += ["--allowed-model-root", root]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command + list(cfg.sglang_args)


def _start(command: list[str], host: str, port: int, gpus: list[int], on_gpu: bool, log_path: Path) -> LaunchedServer:
    env = dict(os.environ)
    if on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(_physical(gpus))
    with log_path.open("wb") as log:  # the child keeps its own handle
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_die_with_parent)
    return LaunchedServer(f"http://{host}:{port}", process, gpus, log_path)


def _physical(gpus: list[int]) -> list[str]:
    """GPU ids as the child must name them: through this process's CUDA_VISIBLE_DEVICES, if set."""
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return [visible[g] if visible else str(g) for g in gpus]


def _addresses(cfg: EngineConfig, count: int) -> list[tuple[str, int]]:
    """`engine.urls`' hosts and ports, or `count` free ports of 127.0.0.1 (all probed at once, so
    no two servers are handed the same one)."""
    if cfg.urls:
        return server_addresses(cfg)
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [("127.0.0.1", probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is not None and sig == signal.SIGTERM:
        return
    try:
        os.killpg(process.pid, sig)  # the server and any process it started (SGLang's schedulers)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


