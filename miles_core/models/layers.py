"""Building blocks shared by every model family: RMSNorm, RoPE, GQA attention, gated MLP.

The math follows `transformers` exactly (fp32 norm statistics, fp32 RoPE tables cast to the
activation dtype) so native logits match HF's on the same weights.

Shape legend: B batch, T query tokens, S key tokens, H query heads, K key/value heads,
D head dim, E hidden size, F MLP intermediate size.

Positions are explicit: every token carries its position id. Without a KV cache a row is one
sequence starting at position 0 (right padding), so attention is plainly causal. With a cache,
keys live at their position index and a query at position p attends to keys 0..p; the same code
serves prefill, decode and any mix of lengths in one batch. A `PackedSegments` in the cache's
place marks a packed row (B = 1, many sequences back to back): attention stays within segments
(`kernels/packed.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from miles_core.errors import MilesError
from miles_core.kernels import FAST_OPS, Ops
from miles_core.kernels.elementwise import rotary_reference as apply_rotary  # noqa: F401 - MLA's RoPE
from miles_core.kernels.packed import PackedSegments


class Linear(nn.Linear):
    """`nn.Linear` with HF parameter names; the one place model matmuls go through, so the
    kernel behind them (fast or batch-invariant) can be chosen per model."""

    ops: Ops = FAST_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    ops: Ops = FAST_OPS

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and the attention scaling factor for a HF rope config."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise MilesError(f"unsupported rope_type '{rope_type}'; expected default, linear, llama3 or yarn")


def hf_rope_parameters(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from a HF config in either spelling (`rope_parameters` or the older
    `rope_scaling` + `rope_theta`), with the defaults `transformers` fills in for YaRN."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type", rope.get("type")) == "yarn":
        # HF prefers a top-level `original_max_position_embeddings` (Phi-3 style) to the dict's.
        original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        rope["original_max_position_embeddings"] = original or cfg["max_position_embeddings"]
        if rope.get("factor") is None:
            rope["factor"] = cfg["max_position_embeddings"] / rope["original_max_position_embeddings"]
    return theta, rope or None


def hf_common_args(cfg: dict[str, Any], *, default_max_positions: int = 4096) -> dict[str, Any]:
    """The hyper-parameters every family reads the same way from a HF `config.json` (SwiGLU MLPs
    only: another `hidden_act` is refused)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise MilesError(f"{cfg.get('model_type')} hidden_act '{cfg['hidden_act']}' is not supported; expected silu")
    theta, scaling = hf_rope_parameters(cfg)
    return dict(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", default_max_positions),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False),
    )


def hf_gqa_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """Key/value heads and head size of grouped-query attention (HF defaults: MHA, hidden / heads)."""
    heads = cfg["num_attention_heads"]
    return dict(num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) as `transformers` computes it: frequencies blend from
    extrapolated (fast dims) to interpolated by `factor` (slow dims) over a linear ramp between
    the `beta_fast` / `beta_slow` rotation counts; cos/sin are scaled by the attention factor."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths slowed by `factor`, smooth band."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute `inv_freq` in fp32 on its device (after a meta-device build or a cast)."""
        inv_freq, _ = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the frequencies to bf16 and shift every position's angle;
        # HF keeps them fp32, and the engine and trainer must agree, so recompute after any cast.
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids_BT[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


class KVCache:
    """Per-layer key/value tensors (B, K, S_max, D), indexed by token position.

    The engine owns one cache per batch of sequences; attention writes each token's k/v at
    its position and reads keys 0..max(position). Values may have their own head dim
    (`v_head_dim`, e.g. DeepSeek MLA); by default it is `head_dim`.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, v_head_dim: int | None = None) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        v_shape = (batch, num_kv_heads, max_len, v_head_dim or head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._positions: torch.Tensor | None = None
        self._length = 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
               position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v at their positions; return keys/values for positions 0..max."""
        rows = torch.arange(k_BKTD.shape[0], device=k_BKTD.device)[:, None]  # (B, 1)
        keys, values = self.keys[layer], self.values[layer]
        # Under autocast the new k/v may be bf16 while the cache is in the weights' dtype.
        keys.permute(0, 2, 1, 3)[rows, position_ids_BT] = k_BKTD.transpose(1, 2).to(keys.dtype)
        values.permute(0, 2, 1, 3)[rows, position_ids_BT] = v_BKTD.transpose(1, 2).to(values.dtype)
        if position_ids_BT is not self._positions:  # one host sync per forward, not per layer
            self._positions, self._length = position_ids_BT, int(position_ids_BT.max()) + 1
        return keys[:, :, : self._length], values[:, :, : self._length]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/duplicate) batch rows, e.g. to drop finished sequences."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    ops: Ops = FAST_OPS

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool, qk_norm: bool, norm_eps: float, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """Inference only (the engine on CUDA): [Wq; Wk; Wv] and their bias, of which the three
    projections' parameters are views (`engine.native.fuse`); read where `reads_fused` and
    `ops.fusion_agrees`; a copy of the module leaves it behind (`__getstate__`)."""

    def __getstate__(self) -> dict[str, Any]:
        return _without_fused(super().__getstate__())

    def forward(self, x_BTE: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                position_ids_BT: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTE.shape
        q, k, v = self._project(x_BTE)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        q, k = self.ops.rotary(q, *rope), self.ops.rotary(k, *rope)
        out = attend(self.ops, q, k, v, position_ids_BT, kv_cache, self.layer_idx)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


    def _project(self, x_BTE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused_qkv is not None and reads_fused(self.fused_qkv[0], self.q_proj, self.k_proj, self.v_proj):
            sizes = (self.num_heads * self.head_dim,) + (self.num_kv_heads * self.head_dim,) * 2
            if self.ops.fusion_agrees(self.fused_qkv[0], sizes):
                return self.ops.linear(x_BTE, *self.fused_qkv).split(sizes, dim=-1)
        return self.q_proj(x_BTE), self.k_proj(x_BTE), self.v_proj(x_BTE)


def attend(ops: Ops, q_BHTD, k_BKTD, v_BKTD, position_ids_BT, kv_cache: KVCache | PackedSegments | None,
           layer_idx: int) -> torch.Tensor:
    """Attention of new q/k/v: against a KV cache (stored first), within the segments of a packed
    row, or plainly causal per row. A cache with an `attend` method (the engine's paged cache)
    stores k/v and runs attention itself, so it can read keys in place (a paged kernel) instead
    of handing back a dense copy."""
    if isinstance(kv_cache, PackedSegments):
        return ops.packed_attention(q_BHTD, k_BKTD, v_BKTD, position_ids_BT, kv_cache)
    if hasattr(kv_cache, "attend"):
        return kv_cache.attend(layer_idx, q_BHTD, k_BKTD, v_BKTD, position_ids_BT, ops)
    if kv_cache is not None:
        k_BKTD, v_BKTD = kv_cache.update(layer_idx, k_BKTD, v_BKTD, position_ids_BT)
    return ops.attention(q_BHTD, k_BKTD, v_BKTD, position_ids_BT, kv_cache is not None)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    ops: Ops = FAST_OPS

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    fused_gate_up: torch.Tensor | None = None
    """Inference only (as `Attention.fused_qkv`): [W_gate; W_up], the two weights being its views."""

    def __getstate__(self) -> dict[str, Any]:
        return _without_fused(super().__getstate__())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_gate_up
        if (fused is not None and reads_fused(fused, self.gate_proj, self.up_proj)
                and self.ops.fusion_agrees(fused, (fused.shape[0] // 2,) * 2)):  # one GEMM, not two
            gate, up = self.ops.linear(x, self.fused_gate_up, None).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.ops.silu_mul(gate, up))


def reads_fused(fused: torch.Tensor, *linears: nn.Module) -> bool:
    """Whether the engine's fused weight (`engine/native/fuse.py`) may stand for `linears`: only
    without autograd (it is no parameter, so a gradient would never reach theirs) and while their
    weights are still its row views (a call with cast weights, `train.batch.call_in_dtype`, reads
    its own). A trainer that read a stale fused copy trained no q/k/v or gate/up weight."""
    if torch.is_grad_enabled():
        return False
    start = fused.data_ptr()
    return all(start <= linear.weight.data_ptr() < start + fused.nbytes for linear in linears)


def _without_fused(state: dict[str, Any]) -> dict[str, Any]:
    """A module's state for a copy or pickle, less the engine's fused weights: the copy's parameters
    are no views of a copied fused tensor, which would be a stale duplicate of their values."""
    return {key: value for key, value in state.items() if not key.startswith("fused_")}
