"""`engine.backend = "sglang"`: the `RolloutEngine` protocol over SGLang's native HTTP API.

The same client drives real SGLang servers and `miles serve`. One `generate` call sends each
server one batched `POST /generate` (token ids in, `output_ids`, per-token log-probs, finish
reasons, weight version and base64 routed experts out); requests go to the live server with the
fewest outstanding sequences. A server that fails (connection error, 5xx, timeout) is taken out
and its requests are sent to the others; the call fails with one clear line only when none is
left. A 4xx answer is the request's fault and fails at once.

Seeds: `miles serve` says (`/get_server_info` -> `miles.per_sample_seeds`) that sample j of a
request with `sampling_seed` s draws from the stream of (s, j), exactly as the native engine in
process, so a request is sent once with `n`. SGLang seeds every copy of an `n > 1` request alike,
so for other servers each sample is sent as its own request with seed `sample_seed(s, j)`.

Weights arrive through `update_weights_from_disk` (the `disk` sync transport) or the routes of
`http_weights.WeightRoutes` (`nccl`, `cuda_ipc`); the version every server reports afterwards is
checked, and `weights_checksums` reads every server's sha256 per tensor
(`sync.check_weight_update_equal`). `release_memory` / `resume_memory` call every server's
memory routes (`engine.colocate`). Servers started for the run (`engine.launch`, `servers.py`)
are owned by the client and stopped by `close`.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from miles_core.config import EngineConfig
from miles_core.engine.http_submit import MAX_SUBMITTED, Submissions, wire_rids
from miles_core.engine.http_weights import WeightRoutes
from miles_core.engine.native import sample_seed
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.errors import MilesError, Refused
from miles_core.utils.http import client as http_client


class ServerFailed(Exception):
    """A server did not answer (connection, timeout, 5xx): take it out and retry elsewhere."""


@dataclass(eq=False)
class _Server:
    url: str
    alive: bool = True
    outstanding: int = 0
    per_sample_seeds: bool = False
    miles: bool = False
    """A `miles serve` server (its `/get_server_info` has a `miles` section)."""
    num_ranks: int = 1
    """Ranks it takes in a weight-update group (SGLang's tp_size; miles serve: 1)."""


@dataclass
class _Unit:
    """One wire prompt: request `index`, samples `first .. first + n - 1` of it."""

    index: int
    first: int
    n: int
    payload: dict


class SGLangHttpEngine(WeightRoutes, Submissions):
    """`RolloutEngine` over SGLang-protocol servers at `cfg.urls`."""

    is_remote = True
    """Weights must travel to it (sync transport `disk`), not be copied in process."""

    def __init__(self, cfg: EngineConfig, *, urls: Sequence[str], tokenizer=None, routed_experts_topk: int = 0,
                 max_position_embeddings: int = 0, owned=None) -> None:
        if not urls:
            raise MilesError("engine.backend = 'sglang' needs engine.urls = ['http://host:port', ...]")
        self.cfg, self.tokenizer, self.topk = cfg, tokenizer, routed_experts_topk
        self.owned = owned
        """The servers started for this run (`servers.ServerFleet`), stopped by `close`."""
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        # Connections: a batched `generate` holds one per server; `submit` one per request in flight.
        self.client = http_client(timeout=cfg.request_timeout_s, headers=headers,
                                  limits=httpx.Limits(max_connections=MAX_SUBMITTED, max_keepalive_connections=64))
        self.servers = [_Server(url.rstrip("/")) for url in urls]
        self._lock = threading.Lock()
        self._rids = itertools.count()
        self._in_flight: dict[str, list[str]] = {}
        self._init_submissions()
        self._channels: tuple[list[str], list] | None = None
        """(server urls, their local weight channels, none where one has none) for
        `update_weights_from_tensor(local=True)`."""
        self._context_limits = [cfg.max_context_len or max_position_embeddings]
        self._wait_healthy()
        self._weight_version = str(self._get(self.servers[0], "/get_model_info").get("weight_version") or "0")

    # -- servers -----------------------------------------------------------------------------
    def _live(self) -> list[_Server]:
        live = [s for s in self.servers if s.alive]
        if not live:
            raise MilesError(f"no SGLang server is left (all of {', '.join(s.url for s in self.servers)} failed)")
        return live

    def _wait_healthy(self) -> None:
        for server in self.servers:
            delay = 0.5
            for attempt in range(self.cfg.health_retries):
                if self._healthy(server):
                    info = self._get(server, "/get_server_info")
                    server.miles = isinstance(info.get("miles"), dict)
                    server.per_sample_seeds = bool((info.get("miles") or {}).get("per_sample_seeds"))
                    server.num_ranks = int(info.get("tp_size") or 1)
                    if info.get("max_context_length"):
                        self._context_limits.append(int(info["max_context_length"]))
                    break
                if attempt + 1 < self.cfg.health_retries:
                    time.sleep(delay)
                    delay *= 2
            else:
                raise MilesError(f"SGLang server {server.url} is not healthy after {self.cfg.health_retries} "
                                 "attempts (GET /health); is it running and is engine.urls right?")

    def _healthy(self, server: _Server) -> bool:
        try:
            return self.client.get(server.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _call(self, server: _Server, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            response = self.client.request(method, server.url + path, json=body)
        except httpx.HTTPError as err:
            raise ServerFailed(f"{server.url}{path}: {type(err).__name__}: {err}") from None
        if response.status_code >= 500:
            raise ServerFailed(f"{server.url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            raise Refused(f"{server.url}{path} refused the request: HTTP {response.status_code}: "
                          f"{_error_text(response)}", response.status_code)
        return response

    def _get(self, server: _Server, path: str) -> dict:
        try:
            return self._call(server, "GET", path).json()
        except ServerFailed as err:
            raise MilesError(f"SGLang server failed: {err}") from None

    def _each(self, method: str, path: str, body: dict | Callable[[_Server], dict] | None = None
              ) -> list[httpx.Response]:
        """Call every live server (`body`: the same for each, or made for each); one that fails is
        taken out (the rest carry on)."""
        answers = []
        for server in self._live():
            try:
                answers.append(self._call(server, method, path, body(server) if callable(body) else body))
            except ServerFailed:
                server.alive = False
        self._live()
        return answers

    # -- protocol ----------------------------------------------------------------------------
    @property
    def max_context_len(self) -> int:
        """Prompt + response token limit: `engine.max_context_len`, else the model's, and no more
        than any server reports."""
        return min(limit for limit in self._context_limits if limit > 0)

    @property
    def weight_version(self) -> str:
        return self._weight_version

    def pause(self) -> None:
        self._each("POST", "/pause_generation", {"mode": "abort"})

    def resume(self) -> None:
        self._each("POST", "/continue_generation", {})

    def flush_cache(self) -> None:
        self._each("POST", "/flush_cache")

    def health(self) -> bool:
        return any(self._healthy(s) for s in self.servers if s.alive)

    def abort(self, rid: str) -> None:
        """Abort request `rid` (all its samples) on every server."""
        for wire_rid in self._in_flight.get(rid, [rid]):
            self._each("POST", "/abort_request", {"rid": wire_rid})

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        raise MilesError("the sglang backend receives weights through a sync transport that reaches other "
                         "processes: set sync.transport = 'disk', 'nccl', 'cuda_ipc' (or 'auto')")

    def update_weights_from_disk(self, path: str, version: str) -> None:
        """Every server loads the HF checkpoint at `path` and must then report `version`."""
        body = {"model_path": str(path), "weight_version": str(version), "flush_cache": True}
        for answer in self._each("POST", "/update_weights_from_disk", body):
            if not answer.json().get("success", False):
                raise MilesError(f"weight update from '{path}' failed: {answer.json().get('message')}")
        for server in self._live():
            reported = self._get(server, "/get_model_info").get("weight_version")
            if str(reported) != str(version):
                raise MilesError(f"{server.url} reports weight_version '{reported}' after loading version '{version}'")
        self._weight_version = str(version)

    def release_memory(self, keep_weights: bool = True) -> dict[str, int]:
        """Every server frees its GPU memory for a colocated trainer; the bytes `miles serve`
        servers report, summed (SGLang reports none). `keep_weights=False` tells `miles serve`
        servers to drop the weights (SGLang drops them unless started with
        `--enable-weights-cpu-backup`)."""
        totals: dict[str, int] = {}
        dropping = {"keep_weights": False}
        for answer in self._each("POST", "/release_memory_occupation",
                                 lambda server: dropping if server.miles and not keep_weights else {}):
            report = answer.json() if answer.content else None
            for key, value in ((report or {}).get("miles") or {}).items():
                totals[key] = totals.get(key, 0) + int(value)
        return totals

    def resume_memory(self) -> None:
        """Every server takes its GPU memory back (the same weights, unless dropped)."""
        self._each("POST", "/resume_memory_occupation", {})

    def close(self) -> None:
        self._close_submissions()
        self.close_weight_channels()
        self.client.close()
        if self.owned is not None:
            self.owned.stop()

    # -- generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest],
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        return self._generate(requests, on_progress, keep_aborted=False)

    def _generate(self, requests: Sequence[GenerateRequest], on_progress: Callable[[int], None] | None, *,
                  keep_aborted: bool) -> list[list[Generation]]:
        """`generate`; with `keep_aborted` an aborted request's answer (the tokens so far) is a
        result, not an error (`submit`)."""
        results: list[list[Generation | None]] = [[None] * r.sampling.n_samples_per_prompt for r in requests]
        rids = [r.rid or f"miles-{next(self._rids)}" for r in requests]
        pending = self._units(requests, rids)
        for rid, request in zip(rids, requests):
            self._in_flight[rid] = wire_rids(rid, request.sampling.n_samples_per_prompt)
        try:
            while pending:
                pending = self._round(pending, results, on_progress, keep_aborted)
        finally:
            for rid in rids:
                self._in_flight.pop(rid, None)
        return results  # type: ignore[return-value]

    def _units(self, requests: Sequence[GenerateRequest], rids: list[str]) -> list[_Unit]:
        together = all(s.per_sample_seeds for s in self.servers)
        units = []
        for index, (request, rid) in enumerate(zip(requests, rids)):
            n = request.sampling.n_samples_per_prompt
            if together or n == 1:
                units.append(_Unit(index, 0, n, _payload(request, rid, request.seed, n)))
            else:
                units += [_Unit(index, j, 1, _payload(request, f"{rid}-{j}", sample_seed(request.seed, j), 1))
                          for j in range(n)]
        return units

    def _round(self, units: list[_Unit], results, on_progress, keep_aborted: bool) -> list[_Unit]:
        """Send every unit once, spread over the live servers; returns the units to retry."""
        plan = self._assign(units)
        retry: list[_Unit] = []
        with ThreadPoolExecutor(max_workers=len(plan)) as pool:
            futures = {pool.submit(self._send, server, chunk): (server, chunk) for server, chunk in plan.items()}
            for future, (server, chunk) in futures.items():
                try:
                    answers = future.result()
                except ServerFailed:
                    server.alive = False
                    retry += chunk
                    continue
                self._store(chunk, answers, results, keep_aborted)
                if on_progress:
                    on_progress(sum(u.n for u in chunk))
        if retry:
            self._live()  # fails the step with one line when none is left
        return retry

    def _assign(self, units: list[_Unit]) -> dict[_Server, list[_Unit]]:
        plan: dict = {}
        with self._lock:
            for unit in units:
                server = min(self._live(), key=lambda s: s.outstanding)
                server.outstanding += unit.n
                plan.setdefault(id(server), (server, []))[1].append(unit)
        return {server: chunk for server, chunk in plan.values()}

    def _send(self, server: _Server, chunk: list[_Unit]) -> list[dict]:
        body = {key: [u.payload[key] for u in chunk] for key in ("input_ids", "sampling_params", "rid")}
        body.update(return_logprob=True, return_routed_experts=self.cfg.return_routed_experts)
        try:
            answers = self._call(server, "POST", "/generate", body).json()
        finally:
            with self._lock:
                server.outstanding -= sum(u.n for u in chunk)
        expected = sum(u.n for u in chunk)
        if not isinstance(answers, list) or len(answers) != expected:
            raise ServerFailed(f"{server.url}/generate answered {type(answers).__name__} of "
                               f"{len(answers) if isinstance(answers, list) else 1} items, expected {expected}")
        return answers

    def _store(self, chunk: list[_Unit], answers: list[dict], results, keep_aborted: bool) -> None:
        position = 0
        for unit in chunk:
            prompt_len = len(unit.payload["input_ids"])
            for j in range(unit.n):
                results[unit.index][unit.first + j] = self._generation(answers[position], prompt_len, keep_aborted)
                position += 1

    def _generation(self, answer: dict, prompt_len: int, keep_aborted: bool) -> Generation:
        meta = answer["meta_info"]
        if meta["finish_reason"].get("type") == "abort" and not keep_aborted:
            raise MilesError(f"request {meta.get('id')} was aborted by the server: {meta['finish_reason']}")
        output_ids = [int(t) for t in answer["output_ids"]]
        logprobs = [float(entry[0]) for entry in meta.get("output_token_logprobs") or []]
        return Generation(output_ids=output_ids, output_logprobs=logprobs, finish_reason=meta["finish_reason"],
                          text=answer.get("text", ""), prompt_tokens=int(meta.get("prompt_tokens", prompt_len)),
                          weight_version=str(meta.get("weight_version") or self._weight_version),
                          routed_experts=self._experts(meta, prompt_len + len(output_ids)))

    def _experts(self, meta: dict, num_tokens: int) -> np.ndarray | None:
        if not self.cfg.return_routed_experts or not meta.get("routed_experts") or self.topk < 1:
            return None
        flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
        return flat.reshape(num_tokens - 1, -1, self.topk).copy()


def _payload(request: GenerateRequest, rid: str, seed: int, n: int) -> dict:
    s = request.sampling
    params = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_new_tokens": s.max_new_tokens,
              "stop": list(s.stop), "stop_token_ids": list(s.stop_token_ids), "n": n, "sampling_seed": seed,
              "no_stop_trim": False, "skip_special_tokens": True}
    return {"input_ids": list(request.input_ids), "sampling_params": params, "rid": rid}


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error") or body.get("message")  # SGLang's weight routes answer {success, message}
    except (ValueError, AttributeError):
        return response.text[:300]
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)
