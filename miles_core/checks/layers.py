"""Per-layer hidden-state diff between the engine's path and the trainer's path (align-check --layers).

The engine computes a response token by token: prefill the prompt, then one decode step per
token against the KV cache. The trainer computes all positions in one forward. Running one
sample through both while hooks record the output of the embedding, every decoder layer and
the final norm at the response positions shows the first module whose bits differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from miles_core.checkpoint.compare import compare_logits
from miles_core.checkpoint.loading import DTYPES
from miles_core.sample import Sample
from miles_core.train.batch import call_in_dtype


def _probe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    inner = model.model
    probes = [("embed_tokens", inner.embed_tokens)]
    probes += [(f"layers.{i}", layer) for i, layer in enumerate(inner.layers)]
    return probes + [("norm", inner.norm)]


class _Recorder:
    """Forward hooks that keep each probed module's output, call by call."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in _probe_modules(model)]

    def _hook(self, name: str):
        def record(module, args, output):
            self.outputs.setdefault(name, []).append(output.detach())
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def _engine_states(model: nn.Module, sample: Sample) -> dict[str, torch.Tensor]:
    """Hidden states at positions P-1 .. L-2, computed as the engine does (prefill + decode)."""
    device = model.lm_head.weight.device
    tokens = torch.tensor(sample.tokens, device=device)
    prompt_len = sample.prompt_length
    recorder = _Recorder(model)
    try:
        cache = model.new_kv_cache(1, len(tokens))
        model(tokens[None, :prompt_len], torch.arange(prompt_len, device=device)[None], cache)
        for pos in range(prompt_len, len(tokens) - 1):
            model(tokens[None, pos : pos + 1], torch.tensor([[pos]], device=device), cache)
    finally:
        recorder.close()
    return {name: torch.cat([outs[0][0, -1:]] + [o[0] for o in outs[1:]]) for name, outs in recorder.outputs.items()}


@torch.no_grad()
def _trainer_states(model: nn.Module, compute_dtype: torch.dtype, sample: Sample) -> dict[str, torch.Tensor]:
    """Hidden states at the same positions from one full forward in the trainer's compute dtype."""
    device = model.lm_head.weight.device
    tokens = torch.tensor(sample.tokens, device=device)[None]
    positions = torch.arange(tokens.shape[1], device=device)[None]
    recorder = _Recorder(model)
    try:
        call_in_dtype(model, (tokens, positions), compute_dtype)  # keep_in_fp32 weights stay fp32, as in training
    finally:
        recorder.close()
    span = slice(sample.prompt_length - 1, len(sample.tokens) - 1)
    return {name: outs[0][0, span] for name, outs in recorder.outputs.items()}


def layer_diffs(engine_model: nn.Module, trainer, samples: list[Sample], temperature: float) -> list[dict[str, Any]]:
    """One row per probed module: max |engine - trainer| and the bitwise-equal fraction, over
    the response positions of `samples`; a last row `logits` compares the two paths' next-token
    distributions with the comparator `miles convert --verify` uses (KL, top-1 agreement)."""
    compute_dtype = DTYPES[trainer.cfg.compute_dtype]
    totals: dict[str, dict[str, float]] = {}
    engine_logits, trainer_logits = [], []
    for sample in samples:
        engine = _engine_states(engine_model, sample)
        train = _trainer_states(trainer.model, compute_dtype, sample)
        for name, a in engine.items():
            b = train[name].to(a.device)
            row = totals.setdefault(name, {"max_abs_diff": 0.0, "equal": 0.0, "count": 0.0})
            row["max_abs_diff"] = max(row["max_abs_diff"], float((a.float() - b.float()).abs().max()))
            row["equal"] += float((a == b).sum())
            row["count"] += a.numel()
        with torch.no_grad():
            engine_logits.append(engine_model.lm_head(engine["norm"]).float() / temperature)
            trainer_logits.append(engine_model.lm_head(train["norm"].to(engine["norm"])).float() / temperature)
    rows = [{"module": name, "max_abs_diff": row["max_abs_diff"], "bitwise_equal": row["equal"] / row["count"]}
            for name, row in totals.items()]
    stats = compare_logits(torch.cat(engine_logits), torch.cat(trainer_logits))
    rows.append({"module": "logits", "max_abs_diff": stats["max_abs"], "bitwise_equal": stats["bitwise"],
                 "kl": stats["kl"], "top1_agree": stats["top1_agree"]})
    return rows
