"""Per-token log-probabilities and entropies from hidden states, in vocab-sized chunks.

Math: for hidden h (E,), output weight W (V, E) and temperature tau, logits z = W h / tau,
logprob(y) = z_y - logsumexp(z), entropy H = logsumexp(z) - sum_j p_j z_j with p = softmax(z).
Gradients: d logprob / dz = onehot(y) - p; dH / dz = -p * (log p + H).

Memory: the reference materialises fp32 logits (N, V) for all N tokens, and autograd keeps
them for backward. `chunked_logprobs_entropy` computes chunks of `chunk_size` tokens at a time
and recomputes each chunk's logits in backward, so at most (chunk_size, V) fp32 logits exist
at once, whatever N is. Logits are always computed and reduced in fp32.

Shape legend: N tokens, E hidden size, V vocab, C chunk tokens.
"""

from __future__ import annotations

import torch

from miles_core.kernels import FAST_OPS


def reference_logprobs_entropy(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain autograd version: full (N, V) fp32 logits."""
    logits = (hidden_NE @ weight_VE.T).to(_acc_dtype(hidden_NE)) / temperature
    logp_NV = torch.log_softmax(logits, dim=-1)
    entropy = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_NV.gather(-1, targets_N[:, None]).squeeze(1), entropy


def _acc_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64 (so gradcheck can run in double)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_stats(h_CE, weight_VE, temperature, ops):
    logits = ops.linear(h_CE, weight_VE).to(_acc_dtype(h_CE))  # (C, V)
    # Divide by a tensor, exactly as the engine's sampler does: a Python-scalar divisor may be
    # turned into a multiply by its reciprocal, which rounds differently.
    logits = logits / torch.full_like(logits[:, :1], temperature)
    logp_CV = ops.log_softmax(logits)
    probs = logp_CV.exp()
    entropy = -(probs * logp_CV).sum(-1)
    return logp_CV, probs, entropy


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NE, weight_VE, targets_N, temperature, chunk_size, ops):
        logprobs, entropies = [], []
        for start in range(0, hidden_NE.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            logp_CV, _, entropy = _chunk_stats(hidden_NE[sl], weight_VE, temperature, ops)
            logprobs.append(logp_CV.gather(-1, targets_N[sl, None]).squeeze(1))
            entropies.append(entropy)
        ctx.save_for_backward(hidden_NE, weight_VE, targets_N)
        ctx.temperature, ctx.chunk_size, ctx.ops = temperature, chunk_size, ops
        # An output the loss does not use (entropy, when it is only a metric) gets grad None
        # instead of zeros, and backward skips its term: three fewer passes over (C, V).
        ctx.set_materialize_grads(False)
        if not logprobs:  # N = 0: a context-parallel rank can hold none of a micro-batch's targets
            return tuple(hidden_NE.new_zeros(0, dtype=_acc_dtype(hidden_NE)) for _ in range(2))
        return torch.cat(logprobs), torch.cat(entropies)

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NE, weight_VE, targets_N = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden_NE) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight_VE, dtype=_acc_dtype(weight_VE)) if ctx.needs_input_grad[1] else None
        inv_t = 1.0 / ctx.temperature  # dz/dlogits of z = logits / T, folded into the (N,) grads
        for start in range(0, hidden_NE.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h_CE = hidden_NE[sl]
            logp_CV, probs, entropy = _chunk_stats(h_CE, weight_VE, ctx.temperature, ctx.ops)
            grad_z = torch.zeros_like(probs)
            if grad_entropy_N is not None:
                grad_z -= probs * (logp_CV + entropy[:, None]) * (grad_entropy_N[sl, None] * inv_t)
            if grad_logp_N is not None:
                g_C1 = grad_logp_N[sl, None] * inv_t
                grad_z -= probs * g_C1
                grad_z.scatter_add_(-1, targets_N[sl, None], g_C1)
            if grad_hidden is not None:
                grad_hidden[sl] = (grad_z.to(weight_VE.dtype) @ weight_VE).to(hidden_NE.dtype)
            if grad_weight is not None:
                grad_weight += _weight_grad(grad_z, h_CE, weight_VE.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VE.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _weight_grad(grad_z_CV: torch.Tensor, h_CE: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """One chunk's dW (V, E) in fp32. Half-precision weights on CUDA: a half GEMM with fp32 output
    (tensor cores; grad_z rounded to the weight's dtype, as for the hidden-state gradient) instead
    of an fp32 GEMM on CUDA cores, which took 10% of a 0.6B training step (H100 profile)."""
    if h_CE.is_cuda and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.mm(grad_z_CV.to(weight_dtype).T, h_CE.to(weight_dtype), out_dtype=torch.float32)
    return grad_z_CV.T @ h_CE.to(grad_z_CV.dtype)


def chunked_logprobs_entropy(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                             temperature: float = 1.0, chunk_size: int = 1024, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` and entropies, (N,) each, never holding more than
    (chunk_size, V) logits. Differentiable w.r.t. hidden and weight. `ops` picks the matmul and
    log-softmax kernels (`kernels.FAST_OPS` by default; the invariant ones for zero-KL)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLogprobs.apply(hidden_NE, weight_VE, targets_N, float(temperature), int(chunk_size), ops or FAST_OPS)
