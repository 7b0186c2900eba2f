"""Training batches: ragged per-sample tensors, token-budget micro-batches, padded forwards.

A sample of length L with R response tokens is trained on positions P-1 .. L-2 (P = L - R),
whose next tokens are the response. Sequences are right-padded in a micro-batch, so every row
starts at position 0 exactly as in the engine's prefill.

Both forwards are split in two: `*_hidden_states` returns the hidden state before each response
token (the one that predicts it), and `*_log_probs` turns those into log-probs and entropies. The
PPO critic (`critic.py`) reads its values from the same hidden states, so values and log-probs are
taken at exactly the same positions.

Shape legend: B samples in a micro-batch, T padded length, R padded response length, E hidden,
N response tokens of all samples (sample-major).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from miles_core.kernels import model_ops
from miles_core.kernels.logprobs import chunked_logprobs_entropy
from miles_core.sample import Sample
from miles_core.train.routing_replay import RoutingPlan
from miles_core.utils.device import to_device


@dataclass
class TrainBatch:
    """Per-sample training data, one list entry per sample."""

    tokens: list[torch.Tensor]
    response_lengths: list[int]
    loss_masks: list[torch.Tensor]
    advantages: list[torch.Tensor] | None = None
    """Per response token; None until the advantages are estimated (they may need the passes below)."""
    rollout_log_probs: list[torch.Tensor] | None = None
    """The engine's log-probs of the sampled tokens."""
    old_log_probs: list[torch.Tensor] | None = None
    """The trainer's log-probs under the weights that generated the rollout (no grad)."""
    ref_log_probs: list[torch.Tensor] | None = None
    """The reference model's log-probs (KL loss, KL reward)."""
    values: list[torch.Tensor] | None = None
    """The critic's values at rollout time (PPO's old values, no grad)."""
    returns: list[torch.Tensor] | None = None
    """PPO value targets (GAE advantages + old values)."""
    routed_experts: list[np.ndarray] | None = None
    """MoE: the engine's experts per token (len - 1, layers, topk), for R3 and routing agreement."""
    trainer_routed_experts: list[np.ndarray] | None = None
    """MoE, `routing_replay = "record"`: the trainer's own choice in the old log-prob pass."""

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], advantages: Sequence[torch.Tensor] | None = None) -> TrainBatch:
        def mask(s: Sample) -> torch.Tensor:
            values = s.loss_mask if s.loss_mask is not None else [1] * s.response_length
            return torch.tensor(values, dtype=torch.float32)

        has_rollout_lp = all(s.rollout_log_probs is not None for s in samples)
        has_routing = bool(samples) and all(s.rollout_routed_experts is not None for s in samples)
        return cls(
            tokens=[torch.tensor(s.tokens, dtype=torch.long) for s in samples],
            response_lengths=[s.response_length for s in samples],
            loss_masks=[mask(s) for s in samples],
            advantages=None if advantages is None else [a.float() for a in advantages],
            rollout_log_probs=[torch.tensor(s.rollout_log_probs, dtype=torch.float32) for s in samples]
            if has_rollout_lp else None,
            routed_experts=[s.rollout_routed_experts for s in samples] if has_routing else None,
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, indices: Sequence[int]) -> TrainBatch:
        picked = {}
        for f in fields(self):
            values = getattr(self, f.name)
            picked[f.name] = None if values is None else [values[i] for i in indices]
        return replace(self, **picked)

    @property
    def num_loss_tokens(self) -> float:
        return float(sum(m.sum() for m in self.loss_masks))


def micro_batches(lengths: Sequence[int], max_tokens: int, max_samples: int = 0) -> list[list[int]]:
    """Group sample indices so each group's padded size (count x longest) fits `max_tokens`
    and, when `max_samples` > 0, it holds at most `max_samples` samples.

    Longest first, so similar lengths share a group and padding stays small; a sample longer
    than the budget gets a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and has_room(groups[-1], max_samples) and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def has_room(batch: list[int], max_samples: int) -> bool:
    """Whether one more sample may join `batch` under the sample cap (0: no cap)."""
    return max_samples <= 0 or len(batch) < max_samples


def pad_ragged(values: Sequence[torch.Tensor], pad: float = 0.0) -> torch.Tensor:
    """List of 1-D tensors -> right-padded (B, R)."""
    return torch.nn.utils.rnn.pad_sequence(list(values), batch_first=True, padding_value=pad)


def response_hidden_states(model: nn.Module, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int],
                           routing: RoutingPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) hidden states that predict the N response tokens, and those tokens (N,).
    `routing` (MoE) replays and/or records the experts of every token (train/routing_replay.py)."""
    device = model.lm_head.weight.device
    ids_BT = to_device(pad_ragged(tokens), device)
    B, T = ids_BT.shape
    positions_BT = torch.arange(T, device=device)[None, :].expand(B, T)
    ctx = routing.context([(b, 0, len(t) - 1) for b, t in enumerate(tokens)], T, device) if routing else None
    hidden_BTE = model(ids_BT, positions_BT, None, routing=ctx)
    if routing:
        ids_BTLK = ctx.stacked()
        routing.recorded = [ids_BTLK[b, : len(t) - 1] for b, t in enumerate(tokens)]
    rows = to_device(torch.cat([torch.full((r,), i) for i, r in enumerate(response_lengths)]), device)
    cols = to_device(torch.cat([torch.arange(len(t) - r - 1, len(t) - 1)
                                for t, r in zip(tokens, response_lengths)]), device)
    return hidden_BTE[rows, cols], ids_BT[rows, cols + 1]


def _token_log_probs(model: nn.Module, hidden_NE: torch.Tensor, targets_N: torch.Tensor,
                     response_lengths: Sequence[int], temperature: float,
                     chunk_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(N, E) hidden states -> per-sample (log-probs, entropies) of the N target tokens."""
    logp, entropy = chunked_logprobs_entropy(hidden_NE, model.lm_head.weight, targets_N, temperature, chunk_size,
                                             model_ops(model))
    return list(logp.split(list(response_lengths))), list(entropy.split(list(response_lengths)))


def response_log_probs(model: nn.Module, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int], *,
                       temperature: float, chunk_size: int,
                       routing: RoutingPlan | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-sample (log-probs, entropies) of the response tokens under `model` at `temperature`."""
    hidden_NE, targets_N = response_hidden_states(model, tokens, response_lengths, routing)
    return _token_log_probs(model, hidden_NE, targets_N, response_lengths, temperature, chunk_size)


def prompt_groups(tokens: Sequence[torch.Tensor], response_lengths: Sequence[int]) -> list[list[int]]:
    """Indices of samples that share the same prompt tokens, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (t, r) in enumerate(zip(tokens, response_lengths)):
        groups.setdefault(tuple(t[: len(t) - r].tolist()), []).append(i)
    return list(groups.values())


def shared_prefix_micro_batches(tokens: Sequence[torch.Tensor], response_lengths: Sequence[int],
                                max_tokens: int, max_samples: int = 0) -> list[list[int]]:
    """Micro-batches for `shared_prefix_log_probs`: whole prompt groups where they fit (in
    `max_tokens`, and in `max_samples` samples when that is > 0).

    The cost of a micro-batch is what its two passes process: (distinct prompts x longest
    prompt) + (samples x longest response). A group too big for the budget is split. Costs are
    kept as running totals, so packing is linear in the number of samples.
    """
    prompt_len = [len(t) - r for t, r in zip(tokens, response_lengths)]
    batches: list[list[int]] = []
    state = (0, 0, 0)  # last batch: (distinct prompts, longest prompt, longest response)
    for group in prompt_groups(tokens, response_lengths):
        new_prompt = 1  # the first sample of a group adds its prompt to the batch
        for index in group:
            prompts, longest_prompt, longest_response = state
            grown = (prompts + new_prompt, max(longest_prompt, prompt_len[index]),
                     max(longest_response, response_lengths[index]))
            if (batches and has_room(batches[-1], max_samples)
                    and grown[0] * grown[1] + (len(batches[-1]) + 1) * grown[2] <= max_tokens):
                batches[-1].append(index)
                state = grown
            else:
                batches.append([index])
                state = (1, prompt_len[index], response_lengths[index])
            new_prompt = 0
    return batches


def shared_prefix_log_probs(model: nn.Module, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int], *,
                            temperature: float, chunk_size: int,
                            routing: RoutingPlan | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Same result as `response_log_probs`, computing each distinct prompt once."""
    hidden_NE, targets_N = shared_prefix_hidden_states(model, tokens, response_lengths, routing)
    return _token_log_probs(model, hidden_NE, targets_N, response_lengths, temperature, chunk_size)


def shared_prefix_hidden_states(model: nn.Module, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int],
                                routing: RoutingPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `response_hidden_states`, computing each distinct prompt once.

    GRPO samples come in groups that share a prompt. The prompts are run once (U rows) into a
    KV cache, whose rows are then copied per sample (index_select, differentiable), and the
    responses run as a second pass attending to it. Gradients flow back through the copies
    into the shared prompt computation, so nothing changes but the work: with n samples per
    prompt the prompt tokens are processed once instead of n times.
    """
    device = model.lm_head.weight.device
    prompts = [t[: len(t) - r] for t, r in zip(tokens, response_lengths)]
    slot_of, first_of = _prompt_slots(prompts, routing)
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)
    R = max(response_lengths)
    prefix_ids = pad_ragged([prompts[b] for b in first_of]).to(device)  # (U, P)
    U, P = prefix_ids.shape
    cache = model.new_kv_cache(U, P + R)
    prefix_ctx = routing.context([(b, 0, len(prompts[b])) for b in first_of], P, device) if routing else None
    prefix_hidden = model(prefix_ids, torch.arange(P, device=device)[None, :].expand(U, P), cache,
                          routing=prefix_ctx)  # (U, P, E)
    rows = torch.tensor(slot_of, device=device)
    cache.select(rows)
    response_ids = pad_ragged([t[len(t) - r :] for t, r in zip(tokens, response_lengths)]).to(device)  # (B, R)
    positions = prompt_len[:, None] + torch.arange(R, device=device)[None, :]
    response_ctx = routing.context([(b, len(p), r - 1) for b, (p, r) in enumerate(zip(prompts, response_lengths))],
                                   R, device) if routing else None
    response_hidden = model(response_ids, positions, cache, routing=response_ctx)  # (B, R, E)
    if routing:
        prefix_ids_ULK, response_ids_BRLK = prefix_ctx.stacked(), response_ctx.stacked()
        routing.recorded = [np.concatenate([prefix_ids_ULK[slot_of[b], : len(p)], response_ids_BRLK[b, : r - 1]])
                            for b, (p, r) in enumerate(zip(prompts, response_lengths))]
    # The hidden state that predicts response token j: the last prompt position for j = 0,
    # response position j - 1 after that.
    first = prefix_hidden[rows, prompt_len - 1]  # (B, E)
    hidden = torch.cat([first[:, None], response_hidden[:, :-1]], dim=1)  # (B, R, E)
    mask = torch.arange(R, device=device)[None, :] < torch.tensor(list(response_lengths), device=device)[:, None]
    return hidden[mask], response_ids[mask]


def _prompt_slots(prompts: list[torch.Tensor], routing: RoutingPlan | None) -> tuple[list[int], list[int]]:
    """Slot of each sample's prompt, and the first sample of each slot. Under replay, prompts
    with different recorded routing (prefilled in different engine batches) get separate slots."""
    slots: dict[tuple, int] = {}
    slot_of, first_of = [], []
    for b, prompt in enumerate(prompts):
        key: tuple = tuple(prompt.tolist())
        if routing is not None and routing.replay is not None:
            key += (routing.replay[b][: len(prompt)].tobytes(),)
        if key not in slots:
            slots[key] = len(slots)
            first_of.append(b)
        slot_of.append(slots[key])
    return slot_of, first_of


def call_in_dtype(module: nn.Module, args: tuple, dtype: torch.dtype, cache=None):
    """`module(*args)` with every parameter cast to `dtype` for the call (differentiably, so the
    gradients reach the fp32 masters), except those a model keeps in fp32 whatever its dtype
    (`keep_in_fp32`, e.g. the DeepSeek-V3 router, as the engine holds them); a plain call when
    nothing needs a cast. With a `train.speed.CastCache` the casts are leaves reused while the
    masters are unchanged, and the caller folds their gradients in (`CastCache.fold_grads`)."""
    keep = tuple(suffix for m in module.modules() for suffix in getattr(type(m), "keep_in_fp32", ()))
    if cache is not None:
        cast = cache.get(module, dtype, keep)
    else:
        cast = {name: p.to(dtype) for name, p in module.named_parameters()
                if p.dtype != dtype and not name.endswith(keep)}
    if not cast:
        return module(*args)
    return torch.func.functional_call(module, cast, args, strict=False)
