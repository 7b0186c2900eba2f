"""What every route of `miles serve` shares: the options, the engine behind its batching worker,
the tokenizer and the facts about the served model; plus request -> engine-request conversion
and the checks that turn bad input into a 4xx before it reaches the engine."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles_core.config import SamplingConfig
from miles_core.engine.protocol import GenerateRequest, RolloutEngine
from miles_core.errors import MilesError
from miles_core.serve.worker import BatchingWorker


class RequestError(Exception):
    """Bad input: answered with `status` and `{"error": {"message": ..., "code": status}}`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 unless told otherwise."""
    port: int = 30000
    api_key: str = ""
    """When set, every route but /health needs `Authorization: Bearer KEY`."""
    allow_unauthenticated_weight_updates: bool = False
    """Serve weight-update and memory routes without an api key (trusted networks only)."""
    allowed_model_roots: tuple[str, ...] = ()
    """Folders `/update_weights_from_disk` may load from (the served model's folder always)."""
    max_request_bytes: int = 8 << 20
    """Largest request body; larger gets 413."""
    batch_window_ms: float = 5.0
    """How long the worker waits for more concurrent requests before it starts a batch."""
    served_model_name: str = ""

    def __post_init__(self) -> None:  # checked before the model loads: a typo costs no wait
        if not 0 <= self.port <= 65535:
            raise MilesError(f"--port must be in [0, 65535] (0 picks a free one), got {self.port}")
        if self.max_request_bytes < 1:
            raise MilesError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if not 0 <= self.batch_window_ms < math.inf:
            raise MilesError(f"--batch-window-ms must be a finite number >= 0, got {self.batch_window_ms}")


@dataclass
class ModelFacts:
    model_path: str
    max_context_len: int
    vocab_size: int
    num_moe_layers: int = 0
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeState:
    engine: RolloutEngine
    worker: BatchingWorker
    tokenizer: Any
    options: ServeOptions
    facts: ModelFacts
    weight_channel: Any = None
    """The local weight channel's server (`weight_channel.WeightChannelServer`), once asked for."""
    weight_groups: dict[str, Any] = field(default_factory=dict)
    """Weight-update groups this server joined, by name (`sync.group.WeightGroup`)."""

    def close(self) -> None:
        """Stop the worker and the local weight channel (the server stops)."""
        self.worker.close()
        if self.weight_channel is not None:
            self.weight_channel.close()

    @property
    def model_name(self) -> str:
        return self.options.served_model_name or self.facts.model_path

    def allowed_roots(self) -> list[Path]:
        return [Path(self.facts.model_path).resolve(), *(Path(r).resolve() for r in self.options.allowed_model_roots)]

    def check_weights_path(self, raw: str) -> Path:
        if "\x00" in raw:
            raise RequestError(f"model_path {raw!a} holds a NUL byte; expected a folder path")
        path = Path(raw).resolve()
        if not any(path == root or path.is_relative_to(root) for root in self.allowed_roots()):
            raise RequestError(f"model_path '{raw}' is outside the allowed model roots (--allowed-model-root)", 403)
        if not path.is_dir():
            raise RequestError(f"model_path '{raw}' is not a directory")
        return path

    # -- prompts and requests ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]]

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < self.facts.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.facts.vocab_size})")
        if len(ids) >= self.facts.max_context_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {self.facts.max_context_len}")

    def request(self, ids: list[int], params, *, rid: str) -> GenerateRequest:
        """One engine request; `params` has SGLang sampling fields (`SamplingParams`)."""
        self.check_prompt(ids)
        stop = (params.stop,) if isinstance(params.stop, str) else tuple(params.stop or ())
        top_k = -1 if params.top_k < 1 or params.top_k >= self.facts.vocab_size else params.top_k
        sampling = SamplingConfig(
            temperature=params.temperature, top_p=params.top_p, top_k=top_k,
            max_new_tokens=params.max_new_tokens, stop=stop,
            stop_token_ids=tuple(params.stop_token_ids or ()), n_samples_per_prompt=params.n,
        )
        seed = params.sampling_seed if params.sampling_seed is not None else secrets.randbelow(2**62)
        return GenerateRequest(input_ids=list(ids), sampling=sampling, seed=seed, rid=rid)

    def text_of(self, gen, params) -> str:
        """The response text as SGLang shows it: stop trimmed unless `no_stop_trim`."""
        if not params.no_stop_trim and params.skip_special_tokens:
            return gen.text
        matched = gen.finish_reason.get("matched")
        ids = gen.output_ids if params.no_stop_trim or not isinstance(matched, int) else gen.output_ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        if not params.no_stop_trim and isinstance(matched, str) and matched in text:
            text = text[: text.index(matched)]
        return text
