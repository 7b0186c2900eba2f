"""`remote_rm`: samples POSTed to a local HTTP server; errors and timeouts are counted failures."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from miles_core.config import RewardConfig
from miles_core.errors import MilesError
from miles_core.rewards import compute_rewards
from miles_core.sample import Sample


class _Judge(BaseHTTPRequestHandler):
    received: list[dict] = []
    in_flight = peak = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (http.server's name)
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.received.append(payload)
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
        try:
            if self.path == "/slow":
                time.sleep(2.0)
            elif self.path == "/busy":
                time.sleep(0.2)
            status, body = (500, {"error": "down"}) if self.path == "/error" else \
                (200, {"score": 1.0 if payload["response"] == payload["label"] else 0.25})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that timed out and left: expected here


@pytest.fixture()
def judge():
    _Judge.received, _Judge.in_flight, _Judge.peak = [], 0, 0
    server = _Server(("127.0.0.1", 0), _Judge)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cfg(url: str, **kw) -> RewardConfig:
    return RewardConfig(type="remote_rm", remote_url=url, key="score", **kw)


def _samples(n: int) -> list[Sample]:
    return [Sample(index=i, prompt=f"q{i}", response="4" if i % 2 == 0 else "5", label="4") for i in range(n)]


def test_rewards_come_from_the_server(judge):
    samples = _samples(4)
    stats = compute_rewards(samples, _cfg(f"{judge}/reward"))
    assert [s.reward for s in samples] == [{"score": 1.0}, {"score": 0.25}] * 2
    # mean of 1, 0.25, 1, 0.25 = 2.5 / 4
    assert stats.num_failed == 0 and stats.mean_reward == 0.625
    assert sorted(_Judge.received, key=lambda p: p["prompt"])[0] == {"prompt": "q0", "response": "4", "label": "4"}


def test_concurrency_is_bounded(judge):
    stats = compute_rewards(_samples(6), _cfg(f"{judge}/busy", max_concurrency=2))
    assert stats.num_failed == 0 and len(_Judge.received) == 6
    assert _Judge.peak == 2


def test_server_error_is_a_counted_failure(judge):
    samples = _samples(2)
    stats = compute_rewards(samples, _cfg(f"{judge}/error", max_failure_fraction=1.0))
    assert stats.num_failed == 2 and [s.reward for s in samples] == [0.0, 0.0]
    assert "HTTPStatusError" in samples[0].metadata["reward_error"] and "500" in stats.first_error


def test_timeout_is_a_counted_failure(judge):
    samples = _samples(2)
    start = time.monotonic()
    stats = compute_rewards(samples, _cfg(f"{judge}/slow", timeout=0.3, max_failure_fraction=1.0))
    assert time.monotonic() - start < 1.5  # not the server's 2 s
    assert stats.num_failed == 2
    assert samples[0].metadata["reward_error"] == "timed out after 0.3 s (reward.timeout)"


def test_too_many_failures_stop_the_run(judge):
    with pytest.raises(MilesError, match="2 of 2 reward calls failed \\(remote_rm\\)"):
        compute_rewards(_samples(2), _cfg(f"{judge}/error"))


def test_remote_rm_needs_a_url():
    with pytest.raises(ValueError, match="type 'remote_rm' needs remote_url"):
        RewardConfig(type="remote_rm")
