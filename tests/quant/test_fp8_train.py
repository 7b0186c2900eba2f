"""`train.precision = "fp8"`: the row-wise FP8 forward against hand-computed numbers, its
straight-through gradients as FP8 GEMMs, the module swap, and a tiny run end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.loading import load_model
from miles_core.config import ModelConfig
from miles_core.quant.fp8_train import FP8TrainLinear, apply_fp8_training, fp8_linear, fp8_matmul_emulated, quantize_rowwise

runner = CliRunner()


def test_forward_hand_computed():
    # x row [3, 0.1]: s = 3/448; 0.1 / s = 14.93 rounds to 15 in e4m3 (spacing 1 in [8, 16)), so x' = [3, 15 s].
    # W row [1, 1]: s = 1/448, exact. y = 3 + 15 * 3/448 = 3.100446...; bias 0.5 added.
    x = torch.tensor([[3.0, 0.1]])
    w = torch.tensor([[1.0, 1.0]])
    y = fp8_matmul_emulated(x, w, torch.tensor([0.5]))
    s = torch.tensor(3.0) / 448
    assert torch.equal(y, (torch.tensor(3.0) + 15 * s + 0.5).view(1, 1))
    assert abs(y.item() - 3.600446) < 1e-6


def test_forward_equals_quantise_dequantise_matmul():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 32, generator=gen), torch.randn(8, 32, generator=gen)
    q_x, s_x = quantize_rowwise(x)
    q_w, s_w = quantize_rowwise(w)
    assert s_x.shape == (5, 1) and torch.equal(s_x, x.abs().amax(-1, keepdim=True) / 448)
    expected = (q_x.float() * s_x) @ (q_w.float() * s_w).T
    assert torch.equal(fp8_linear(x, w), expected)
    assert not torch.equal(fp8_linear(x, w), x @ w.T)  # it does round
    assert (fp8_linear(x, w) - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()


def _dequantised(t):
    q, scale = quantize_rowwise(t)
    return q.float() * scale


def test_gradients_are_fp8_gemms_of_the_straight_through_chain():
    """dL/dx = fp8(g) fp8(W^T)^T, dL/dW = fp8(g^T) fp8(x^T)^T, scales along each contraction; 6
    tokens (padded to 16 for the weight gradient: zero rows change nothing); bias: the sum of g."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, generator=gen, requires_grad=True)
    w = torch.randn(4, 16, generator=gen, requires_grad=True)
    b = torch.randn(4, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, 4, generator=gen)
    fp8_linear(x, w, b).backward(g)
    g_MN, x_MK = g.reshape(6, 4), x.detach().reshape(6, 16)
    assert torch.equal(x.grad, (_dequantised(g_MN) @ _dequantised(w.detach().T).T).view(2, 3, 16))
    assert torch.equal(w.grad, _dequantised(g_MN.T) @ _dequantised(x_MK.T).T)
    assert torch.equal(b.grad, g.sum((0, 1)))
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    F.linear(x2, w2).backward(g)  # close to the unquantised gradient, not equal to it
    for fp8, exact in ((x.grad, x2.grad), (w.grad, w2.grad)):
        assert not torch.equal(fp8, exact) and (fp8 - exact).abs().max() < 0.1 * exact.abs().max()


def test_backward_hand_computed():
    # One token: g = [3, 0.1] (scale 3/448, 0.1 rounds to 15 scales as in the forward test), W^T
    # rows [1, 1] exact: dL/dx = 3 + 15 * 3/448. dL/dW = g^T x: each row of g^T and of x^T holds one
    # value, quantised exactly (v / (|v| / 448) = +-448), so dL/dW = g^T x exactly.
    x = torch.tensor([[2.0]], requires_grad=True)
    w = torch.tensor([[1.0], [1.0]], requires_grad=True)
    fp8_linear(x, w).backward(torch.tensor([[3.0, 0.1]]))
    assert torch.equal(x.grad, (torch.tensor(3.0) + 15 * (torch.tensor(3.0) / 448)).view(1, 1))
    assert torch.equal(w.grad, torch.tensor([[6.0], [0.2]]))


def test_swap_keeps_head_and_routers():
    model = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model
    names = apply_fp8_training(model)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.0.mlp.experts.0.down_proj" in names
    assert "lm_head" not in names and not any(n.endswith("mlp.gate") for n in names)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FP8TrainLinear)
    assert set(dict(model.named_parameters())) == set(dict(load_model(ModelConfig(source="tiny-qwen3-moe",
                                                                                  device="cpu")).model.named_parameters()))


def test_fp8_training_is_refused_with_true_on_policy(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", "tiny-moe-int4-qat", "--output-dir", str(tmp_path / "run"),
                                 "--set", 'train.precision="fp8"'])
    assert result.exit_code != 0 and "train.precision = 'bf16'" in " ".join(result.output.split())


@pytest.mark.gpu
def test_scaled_mm_path_matches_emulation():
    from miles_core.quant.fp8_train import fp8_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(129, 256, device="cuda", generator=gen).bfloat16()
    w = torch.randn(192, 256, device="cuda", generator=gen).bfloat16()
    fast, ref = fp8_matmul(x, w).float(), fp8_matmul_emulated(x, w).float()
    assert (fast - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.gpu
def test_scaled_mm_backward_matches_emulation(monkeypatch):
    from miles_core.quant import fp8_train

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(100, 256, device="cuda", generator=gen).bfloat16().requires_grad_()  # 100: padded to 112
    w = torch.randn(192, 256, device="cuda", generator=gen).requires_grad_()  # an fp32 master
    g = torch.randn(100, 192, device="cuda", generator=gen).bfloat16()
    fp8_linear(x, w).backward(g)
    fast = (x.grad.float(), w.grad.float())
    x.grad = w.grad = None
    monkeypatch.setattr(fp8_train, "_fp8_device", lambda t: False)  # every GEMM emulated
    fp8_linear(x, w).backward(g)
    for got, ref in zip(fast, (x.grad.float(), w.grad.float())):
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_quantiser_gives_the_torch_bits(dtype):
    """Rows, and columns with the tokens padded to 16, as the three GEMMs quantise their operands,
    in either schedule (one pass over many rows, or split over few)."""
    from miles_core.kernels import fp8_rowwise_triton
    from miles_core.quant import fp8_train

    gen = torch.Generator(device="cuda").manual_seed(3)
    t = (torch.randn(100, 272, device="cuda", generator=gen) * 50).to(dtype)
    t[7] = 0
    assert fp8_train._kernel_ok(t)
    tall = (torch.randn(9000, 40, device="cuda", generator=gen) * 3).to(dtype)  # enough rows for one pass
    for operand, columns, pad, split in ((t, False, 1, None), (t, True, 16, None), (t, True, 1, False),
                                         (t, False, 16, False), (tall, False, 1, None), (tall, False, 16, True),
                                         (tall, True, 16, None)):
        q, scale = fp8_rowwise_triton.quantize_rows(operand, columns=columns, pad_to=pad, split=split)
        ref_q, ref_scale = fp8_train._quantize_rows_torch(operand, columns, pad)
        assert q.is_contiguous() and q.shape == ref_q.shape
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("behaviour", ["same", "apart", "fails"])
def test_the_triton_quantiser_is_used_only_where_it_gives_the_torch_bits(monkeypatch, caplog, behaviour):
    """A stand-in kernel (here on CPU) that rounds like the torch path, unlike it, or does not build."""
    import logging
    import types

    from miles_core.quant import fp8_train

    def quantize_rows(t, *, columns=False, pad_to=1, split=None):
        if behaviour == "fails":
            raise RuntimeError("no kernel here")
        q, scale = fp8_train._quantize_rows_torch(t, columns, pad_to)
        return q, scale * (2 if behaviour == "apart" else 1)

    monkeypatch.setattr(fp8_train, "fp8_rowwise_triton", types.SimpleNamespace(quantize_rows=quantize_rows))
    monkeypatch.setattr(fp8_train, "_kernel_agrees", {})
    with caplog.at_level(logging.WARNING, logger="miles"):
        assert fp8_train._kernel_ok(torch.zeros(2, 2)) is (behaviour == "same")
        fp8_train._kernel_ok(torch.zeros(2, 2))  # checked once per device and dtype
    assert len(caplog.records) == {"same": 0, "apart": 1, "fails": 2}[behaviour]
    assert list(fp8_train._kernel_agrees.values()) == [behaviour == "same"]
