"""The vocab-parallel chunked log-prob/entropy (`train/vocab_parallel.py`) on 2 gloo ranks, each
holding half of the output weight, against the one-process chunked kernel on the whole weight:
forward values and every gradient (hidden states, each rank's weight rows) agree to fp32
rounding: within 1e-6 of each quantity's largest magnitude (values of order 1 to 5 here, where
one fp32 step is 1.2e-7 to 4.8e-7)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from miles_core.kernels.logprobs import chunked_logprobs_entropy
from miles_core.train.vocab_parallel import vocab_parallel_logprobs_entropy
from tests.train.spmd import run_spmd

N, E, V = 11, 16, 40  # 11 tokens in chunks of 4: a last chunk of 3


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, E, generator=gen)
    weight = torch.randn(V, E, generator=gen) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[:2] = torch.tensor([0, V - 1])  # the first row of rank 0 and the last row of rank 1
    grad_logp, grad_entropy = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    return hidden, weight, targets, grad_logp, grad_entropy


def _grads(fn, hidden, weight, targets, grad_logp, grad_entropy, use_entropy):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fn(hidden, weight, targets)
    loss = (logp * grad_logp).sum() + ((entropy * grad_entropy).sum() if use_entropy else 0.0)
    loss.backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad


def _compare(rank: int, temperature: float, use_entropy: bool) -> dict[str, float]:
    hidden, weight, targets, grad_logp, grad_entropy = _inputs()
    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    ref = _grads(lambda h, w, t: chunked_logprobs_entropy(h, w, t, temperature, 4), hidden, weight, targets,
                 grad_logp, grad_entropy, use_entropy)
    group = dist.group.WORLD
    ours = _grads(lambda h, w, t: vocab_parallel_logprobs_entropy(h, w, t, temperature, 4, group, rows.start),
                  hidden, weight[rows], targets, grad_logp, grad_entropy, use_entropy)
    ref = (*ref[:3], ref[3][rows])
    diffs = torch.stack([((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref)])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)  # the worst rank
    return dict(zip(("logp", "entropy", "grad_hidden", "grad_weight"), diffs.tolist()),
                grad_scale=ref[2].abs().max().item())


CASES = [(1.0, True), (0.7, False)]  # (temperature, whether the loss uses the entropy)


def _compare_cases(rank: int) -> list[dict[str, float]]:
    return [_compare(rank, temperature, use_entropy) for temperature, use_entropy in CASES]


def test_vocab_parallel_logprobs_match_one_process():
    for case, diffs in zip(CASES, run_spmd(_compare_cases)):  # one spawn for both cases
        assert diffs.pop("grad_scale") > 0.1, case  # the gradients compared are not all ~0
        for name, diff in diffs.items():
            assert diff < 1e-6, (case, name, diff)  # relative to the largest |value|
