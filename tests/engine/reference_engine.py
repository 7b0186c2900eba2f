"""The previous native engine (static batches, dense KV cache), kept verbatim as the reference
that the paged engine must reproduce. Its original docstring:

The native in-process rollout engine: batched generation with a KV cache, CPU or GPU.

It runs the same model class the trainer trains (DESIGN principle 3). Requests are expanded
into `n` sequences each and processed in batches of at most `max_batch_size` sequences; the
prompt of a request is prefilled once and its KV cache copied to its `n` samples. Finished
rows are dropped from the batch once a quarter of it has finished, which bounds both wasted
compute and cache copies. Sampling streams are per sequence (seeded from the request seed),
so results repeat run to run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from miles_core.config import EngineConfig
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.engine.sampler import sample_tokens
from miles_core.errors import MilesError
from miles_core.kernels import model_ops
from miles_core.models.base import named_weights
from miles_core.models.routing import RoutingContext


@dataclass
class _Sequence:
    request: GenerateRequest
    prompt_slot: int
    max_new_tokens: int
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: dict | None = None
    routing: list[np.ndarray] = field(default_factory=list)
    """MoE: chunks of (tokens, layers, topk) expert ids of the tokens fed so far."""

    @property
    def length(self) -> int:
        return len(self.request.input_ids) + len(self.output_ids)


from miles_core.engine.native import sample_seed  # noqa: E402  (the same streams)


class ReferenceEngine:
    """`RolloutEngine` over a native model in this process."""

    def __init__(self, model: nn.Module, tokenizer, cfg: EngineConfig, *, eos_token_ids: Iterable[int],
                 max_position_embeddings: int, weight_version: str = "0") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context_len = cfg.max_context_len or max_position_embeddings
        # Routing capture (SGLang's --enable-return-routed-experts): MoE models only.
        self.capture_routing = cfg.return_routed_experts and getattr(model, "num_moe_layers", 0) > 0
        self._weight_version = weight_version
        self._paused = threading.Event()

    @property
    def weight_version(self) -> str:
        return self._weight_version

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- control ---------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        params = dict(named_weights(self.model, remove_duplicate=False))  # and persistent buffers
        updates = list(named_tensors)  # references, not copies: all are checked before any is written
        for name, tensor in updates:
            if name not in params:
                raise MilesError(f"update_weights: unknown parameter '{name}'")
            if params[name].shape != tensor.shape:
                raise MilesError(f"update_weights: '{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
        with torch.no_grad():
            for name, tensor in updates:
                params[name].copy_(tensor)
        self._weight_version = str(version)

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def flush_cache(self) -> None:
        """Nothing persists between `generate` calls, so there is no prefix cache to drop."""

    def health(self) -> bool:
        return not self._paused.is_set()

    # -- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest],
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        if self._paused.is_set():
            raise MilesError("the engine is paused; call resume() before generate()")
        sequences = [self._expand(request) for request in requests]
        for batch in self._batches(sequences):
            with torch.inference_mode():
                self._run_batch(batch, on_progress)
        return [[self._to_generation(seq) for seq in group] for group in sequences]

    def _expand(self, request: GenerateRequest) -> list[_Sequence]:
        prompt_len = len(request.input_ids)
        if prompt_len == 0:
            raise MilesError(f"request '{request.rid}' has an empty prompt")
        if prompt_len >= self.max_context_len:
            raise MilesError(f"prompt of request '{request.rid}' has {prompt_len} tokens; the context "
                             f"holds {self.max_context_len} (engine.max_context_len or the model's limit)")
        budget = min(request.sampling.max_new_tokens, self.max_context_len - prompt_len)
        return [
            _Sequence(request, -1, budget, torch.Generator().manual_seed(sample_seed(request.seed, j)))
            for j in range(request.sampling.n_samples_per_prompt)
        ]

    def _batches(self, groups: list[list[_Sequence]]) -> Iterable[list[_Sequence]]:
        batch: list[_Sequence] = []
        for group in groups:
            for seq in group:
                batch.append(seq)
                if len(batch) == self.cfg.max_batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _run_batch(self, batch: list[_Sequence], on_progress) -> None:
        logits_BV, cache = self._prefill(batch)
        active = list(range(len(batch)))  # batch index of each cache row
        params = self._sampling_tensors(batch)
        while active:
            rows = [batch[i] for i in active]
            uniform = torch.tensor([float(torch.rand(1, generator=s.generator)) for s in rows])
            take = torch.tensor(active, device=logits_BV.device)
            tokens, logprobs = sample_tokens(logits_BV, *(p.index_select(0, take) for p in params), uniform,
                                             log_softmax=model_ops(self.model).log_softmax)
            finished = self._append(rows, tokens.tolist(), logprobs.tolist())
            if finished and on_progress:
                on_progress(finished)
            still = [r for r, seq in enumerate(rows) if seq.finish_reason is None]
            if not still:
                return
            if len(still) <= 0.75 * len(rows):
                keep = torch.tensor(still, device=logits_BV.device)
                cache.select(keep)
                tokens = tokens.index_select(0, keep)
                active = [active[r] for r in still]
                rows = [rows[r] for r in still]
            positions = torch.tensor([[seq.length - 1] for seq in rows], device=tokens.device)
            routing = self._routing_context()
            hidden = self.model(tokens[:, None], positions, cache, routing=routing)  # (B, 1, E)
            if routing is not None:
                # Only rows still generating need the routing of the token they just fed; a
                # finished row's last token is never part of a sample's routed experts.
                for seq, ids_1LK in zip(rows, routing.stacked()):
                    if seq.finish_reason is None:
                        seq.routing.append(ids_1LK)
            logits_BV = self.model.lm_head(hidden[:, -1])

    def _prefill(self, batch: list[_Sequence]):
        """Prefill each distinct prompt once, then give every sample its own cache row."""
        prompts: dict[int, int] = {}
        for seq in batch:
            seq.prompt_slot = prompts.setdefault(id(seq.request), len(prompts))
        unique = list({id(s.request): s.request for s in batch}.values())
        lengths = torch.tensor([len(r.input_ids) for r in unique])
        width = int(lengths.max())
        ids = torch.zeros(len(unique), width, dtype=torch.long)
        for row, request in enumerate(unique):
            ids[row, : len(request.input_ids)] = torch.tensor(request.input_ids)
        device = self.device
        max_len = max(len(s.request.input_ids) + s.max_new_tokens for s in batch)
        cache = self.model.new_kv_cache(len(unique), max_len)
        positions = torch.arange(width)[None, :].expand(len(unique), -1)
        routing = self._routing_context()
        hidden = self.model(ids.to(device), positions.to(device), cache, routing=routing)  # (U, T, E)
        if routing is not None:
            prompt_ids_UTLK = routing.stacked()
            for seq in batch:
                seq.routing.append(prompt_ids_UTLK[seq.prompt_slot, : len(seq.request.input_ids)])
        last = hidden[torch.arange(len(unique), device=device), (lengths - 1).to(device)]
        rows = torch.tensor([s.prompt_slot for s in batch], device=device)
        cache.select(rows)
        return self.model.lm_head(last).index_select(0, rows), cache

    def _routing_context(self) -> RoutingContext | None:
        return RoutingContext("record") if self.capture_routing else None

    def _sampling_tensors(self, batch: list[_Sequence]) -> tuple[torch.Tensor, ...]:
        device = self.device
        sampling = [s.request.sampling for s in batch]
        return (
            torch.tensor([p.temperature for p in sampling], device=device),
            torch.tensor([p.top_k for p in sampling], device=device),
            torch.tensor([p.top_p for p in sampling], device=device),
        )

    def _append(self, rows: list[_Sequence], tokens: list[int], logprobs: list[float]) -> int:
        """Record one step per row and mark rows that finished; returns how many finished."""
        finished = 0
        for seq, token, logprob in zip(rows, tokens, logprobs):
            if seq.finish_reason is not None:  # kept in the batch until the next compaction
                continue
            seq.output_ids.append(token)
            seq.logprobs.append(logprob)
            seq.finish_reason = self._finish_reason(seq, token)
            finished += seq.finish_reason is not None
        return finished

    def _finish_reason(self, seq: _Sequence, token: int) -> dict | None:
        if token in self.eos_token_ids or token in seq.request.sampling.stop_token_ids:
            return {"type": "stop", "matched": token}
        stops = seq.request.sampling.stop
        if stops:
            # Every token decodes to at least one byte, so a stop string of b UTF-8 bytes lies
            # within the last b + 1 tokens (the first may carry bytes before the match).
            window = max(len(s.encode("utf-8")) for s in stops) + 1
            tail = self.tokenizer.decode(seq.output_ids[-window:], skip_special_tokens=False)
            for stop in stops:
                if stop in tail:
                    return {"type": "stop", "matched": stop}
        if len(seq.output_ids) >= seq.max_new_tokens:
            return {"type": "length", "length": len(seq.output_ids)}
        return None

    def _to_generation(self, seq: _Sequence) -> Generation:
        # Like SGLang (no_stop_trim off): the text leaves out a matched stop token or string;
        # output_ids keep the stop token, which training must see.
        matched = seq.finish_reason.get("matched")
        shown = seq.output_ids[:-1] if isinstance(matched, int) else seq.output_ids
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        if isinstance(matched, str) and matched in text:
            text = text[: text.index(matched)]
        return Generation(
            output_ids=list(seq.output_ids), output_logprobs=list(seq.logprobs),
            finish_reason=seq.finish_reason, text=text, prompt_tokens=len(seq.request.input_ids),
            weight_version=self._weight_version,
            routed_experts=np.concatenate(seq.routing) if self.capture_routing else None,
        )
