"""The batching worker (concurrent jobs batched, a bad job isolated, waiting jobs aborted), the
`disk` sync transport with the native engine, the `miles serve` command in a subprocess, and the
throughput bench's CPU smoke run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from miles_core.config import SamplingConfig, SyncConfig, load_config
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.errors import MilesError
from miles_core.launch.local import free_port
from miles_core.serve.worker import Aborted, BatchingWorker
from miles_core.sync import SyncContext, build_weight_sync
from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[2]


class EchoEngine:
    """Answers each request with its own prompt; refuses prompts starting with 0."""

    weight_version = "0"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests, on_progress=None):
        self.calls.append(len(requests))
        time.sleep(0.05)
        if any(r.input_ids[0] == 0 for r in requests):
            raise MilesError("bad prompt")
        return [[Generation(list(r.input_ids), [0.0] * len(r.input_ids), {"type": "length", "length": 1}, "",
                            len(r.input_ids), "0")] for r in requests]


def _request(first: int) -> GenerateRequest:
    return GenerateRequest(input_ids=[first, 1], sampling=SamplingConfig(max_new_tokens=1))


def test_worker_batches_concurrent_jobs_and_isolates_a_bad_one():
    engine = EchoEngine()
    worker = BatchingWorker(engine, max_batch_size=8, window_s=0.05)

    async def run():
        return await asyncio.gather(*(worker.generate([_request(k)]) for k in range(6)), return_exceptions=True)

    try:
        results = asyncio.run(run())
    finally:
        worker.close()
    assert isinstance(results[0], MilesError)
    assert [r[0][0].output_ids[0] for r in results[1:]] == [1, 2, 3, 4, 5]
    assert engine.calls[0] == 6 and sorted(engine.calls[1:]) == [1] * 6  # one batch, then each alone


@pytest.mark.parametrize("blocking", [False, True], ids=["route", "local-channel"])
def test_an_update_alone_aborts_waiting_jobs_holds_the_worker_and_restores_its_pause(blocking):
    worker = BatchingWorker(EchoEngine(), max_batch_size=8, window_s=0.0)
    seen: list[bool] = []

    async def alone(fn):  # the local weight channel calls from its own thread
        if blocking:
            return await asyncio.to_thread(worker.control_here, fn, alone=True)
        return await worker.control(fn, alone=True)

    async def run():
        worker.pause()  # a job waits, as it would behind a running batch
        waiting = asyncio.ensure_future(worker.generate([_request(5)]))
        await asyncio.sleep(0.05)
        worker.resume()
        await alone(lambda: seen.append(worker.paused))
        assert not worker.paused  # held only while the update ran
        worker.pause()
        await alone(lambda: seen.append(worker.paused))
        assert worker.paused  # a pause the caller made outlives the update
        return await asyncio.gather(waiting, return_exceptions=True)

    try:
        outcome = asyncio.run(run())
    finally:
        worker.close()
    assert seen == [True, True]
    assert isinstance(outcome[0], Aborted)


def test_an_update_on_the_callers_thread_waits_for_a_running_control_item():
    worker = BatchingWorker(EchoEngine(), max_batch_size=8, window_s=0.0)
    running, order = threading.Event(), []

    def slow():
        running.set()
        time.sleep(0.2)
        order.append("worker item")

    async def run():
        item = asyncio.ensure_future(worker.control(slow))
        await asyncio.to_thread(running.wait, 10)
        await asyncio.to_thread(worker.control_here, lambda: order.append("channel update"), alone=True)
        await item

    try:
        asyncio.run(run())
    finally:
        worker.close()
    assert order == ["worker item", "channel update"]  # never beside each other


def test_a_paused_worker_with_a_waiting_job_sleeps_and_resume_runs_it():
    worker = BatchingWorker(EchoEngine(), max_batch_size=8, window_s=0.0)
    worker.pause()

    async def run():
        job = asyncio.ensure_future(worker.generate([_request(7)]))
        await asyncio.sleep(0.05)
        start = time.process_time()
        await asyncio.sleep(0.4)
        used = time.process_time() - start  # a spinning worker thread burns ~0.4 s of CPU here
        worker.resume()
        return used, await asyncio.wait_for(job, timeout=10)

    try:
        used, result = asyncio.run(run())
    finally:
        worker.close()
    assert used < 0.15 and result[0][0].output_ids == [7, 1]


def test_worker_aborts_waiting_jobs_by_rid():
    worker = BatchingWorker(EchoEngine(), max_batch_size=8, window_s=0.0)
    worker.pause()

    async def run():
        job = asyncio.ensure_future(worker.generate([GenerateRequest([5], SamplingConfig(), rid="x")]))
        await asyncio.sleep(0.05)
        assert worker.abort("x") == 1
        with pytest.raises(Aborted):
            await job

    try:
        asyncio.run(run())
    finally:
        worker.close()


def test_disk_transport_writes_a_checkpoint_the_engine_loads(tmp_path):
    from miles_core.checkpoint.loading import load_model
    from miles_core.engine import build_engine

    cfg = load_config("tiny")
    loaded = load_model(cfg.model)
    engine = build_engine(cfg.engine, loaded)
    sync = build_weight_sync(SyncConfig(transport="disk"), engine, SyncContext(loaded.hf_config, loaded.path, tmp_path))
    halved = [(n, p.detach() * 0.5) for n, p in loaded.model.named_parameters()]
    stats = sync.push(halved, version="3")
    assert engine.weight_version == "3" and stats.num_tensors == len(halved)
    assert all(torch.equal(p, t) for (_, t), p in zip(halved, loaded.model.parameters()))
    sync.push(halved, version="4")
    assert [p.name for p in tmp_path.iterdir()] == ["v4"]


def test_miles_serve_command_serves_and_stops_on_sigterm():
    port = free_port()
    env = child_env()
    process = subprocess.Popen([sys.executable, "-m", "miles_cli.app", "serve", "--model", "tiny-qwen3", "--port", str(port),
                                "--api-key", "k", "--set", 'model.device="cpu"'],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.3)
        answer = httpx.post(f"http://127.0.0.1:{port}/generate", headers={"Authorization": "Bearer k"},
                            json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}, timeout=30)
        assert answer.status_code == 200 and answer.json()["meta_info"]["completion_tokens"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert f"at http://127.0.0.1:{port}" in output


def test_serve_throughput_bench_runs_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import serve_throughput
    finally:
        sys.path.pop(0)
    rows = serve_throughput.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "r.md")])
    assert rows[0]["serve"]["errors"] == 0 and rows[0]["serve"]["requests"] == rows[0]["in_process"]["requests"]
    assert "| 8 | serve |" in (tmp_path / "r.md").read_text()
