"""The batch-invariant linear's tile choice: decode-sized calls (at most SMALL_M rows) take the
narrower tiles only where the device gave them the default tiles' bits, so a row's result never
depends on how many rows share the call. On CPU the Triton launch is replaced by a stand-in whose
two tile configurations round alike or apart; on a GPU the real kernel is checked."""

from __future__ import annotations

import logging

import pytest
import torch

from miles_core.kernels import triton_linear, triton_ops

SMALL, WIDE = triton_linear.SMALL_M_CONFIG, triton_linear.SMALL_M_WIDE_CONFIG
DEFAULT = triton_linear.LINEAR_CONFIG["half"]


@pytest.fixture
def launches(monkeypatch):
    """A stand-in launcher recording each call's (rows, config); `launches.apart` makes the small
    tiles' numbers differ from the default tiles' in the last place."""
    calls: list[tuple[int, tuple]] = []

    def fake(x_MK, w_NK, bias, config):
        calls.append((x_MK.shape[0], config))
        out = x_MK.float() @ w_NK.float().T
        if config != DEFAULT and fake.apart:
            out = torch.nextafter(out, torch.full_like(out, float("inf")))
        return out.to(x_MK.dtype)

    fake.apart, fake.calls = False, calls
    monkeypatch.setattr(triton_linear, "_launch_linear", fake)
    monkeypatch.setattr(triton_linear, "_agreement", {})
    return fake


def _weights(n: int = 48, k: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(5, k, generator=gen, dtype=torch.bfloat16), torch.randn(n, k, generator=gen, dtype=torch.bfloat16)


def test_small_tiles_run_decode_sized_calls_once_they_agree(launches):
    x, w = _weights()
    triton_linear._linear_forward(x, w, None)
    # The check (SMALL_M probe rows through both configurations), then the call on the small tiles.
    assert launches.calls == [(triton_linear.SMALL_M, SMALL), (triton_linear.SMALL_M, DEFAULT), (5, SMALL)]
    triton_linear._linear_forward(x, w, None)  # checked once per weight shape
    triton_linear._linear_forward(torch.zeros(triton_linear.SMALL_M + 1, 32, dtype=torch.bfloat16), w, None)
    assert launches.calls[3:] == [(5, SMALL), (triton_linear.SMALL_M + 1, DEFAULT)]


def test_tiles_that_round_apart_are_never_used(launches, caplog):
    launches.apart = True
    x, w = _weights()
    with caplog.at_level(logging.WARNING, logger="miles"):
        triton_linear._linear_forward(x, w, None)
        triton_linear._linear_forward(x, w, None)
    assert launches.calls[2:] == [(5, DEFAULT), (5, DEFAULT)]
    assert sum("differ in bits" in r.message for r in caplog.records) == 1
    assert "(48, 32)" in caplog.text


def test_fp32_and_unchecked_shapes_inside_a_capture_take_the_default_tiles(launches, monkeypatch):
    x, w = _weights()
    triton_linear._linear_forward(x.float(), w.float(), None)
    assert launches.calls == [(5, triton_linear.LINEAR_CONFIG["ieee"])]
    monkeypatch.setattr(triton_linear, "_capturing", lambda device: True)
    triton_linear._linear_forward(x, w, None)
    assert launches.calls[1:] == [(5, DEFAULT)] and triton_linear._agreement == {}  # checked later, outside


def test_weights_whose_default_grid_fills_the_card_keep_the_default_tiles(launches, monkeypatch):
    """A wide weight (the lm_head) already gives every SM a program on the default tiles; the
    narrower tiles were slower there on H100, so only narrow weights take them."""
    monkeypatch.setattr(triton_linear, "_sm_count", lambda device: 4)
    x, w = _weights(n=512)  # 1 x 4 default tiles: fills a 4-SM card
    triton_linear._linear_forward(x, w, None)
    assert launches.calls == [(5, DEFAULT)]
    triton_linear._linear_forward(x, w[:384], None)  # 1 x 3 tiles: one SM idle; 1 x 6 of 64-wide tiles fill it
    assert launches.calls[1:] == [(triton_linear.SMALL_M, WIDE), (triton_linear.SMALL_M, DEFAULT), (5, WIDE)]


def test_decode_sized_calls_take_the_wider_small_tiles_only_where_they_fill_the_card(launches, monkeypatch):
    monkeypatch.setattr(triton_linear, "_sm_count", lambda device: 8)
    x, w = _weights(n=384)  # default tiles 1 x 3, 64-wide tiles 1 x 6: neither fills 8 SMs
    triton_linear._linear_forward(x, w, None)
    assert launches.calls[-1] == (5, SMALL)
    triton_linear._linear_forward(torch.zeros(128, 32, dtype=torch.bfloat16), w, None)  # 2 x 6 wide tiles fill it
    assert launches.calls[-3:] == [(triton_linear.SMALL_M, WIDE), (triton_linear.SMALL_M, DEFAULT), (128, WIDE)]


@pytest.mark.gpu
@pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)])
def test_cuda_small_tiles_agree_at_the_qwen3_0_6b_shapes(n, k):
    """On the GPUs we run (H100/H200) the narrower tiles give the default tiles' bits at the 0.6B
    decode shapes, so decode gets them; and rows of a decode-sized call equal those rows of a
    larger one (which runs the default tiles)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / 30
    x = torch.randn(300, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    assert triton_linear.small_tiles_agree(w) and triton_linear.small_tiles_agree(w, WIDE)
    full = triton_linear.linear(x, w)
    for rows in (slice(0, 1), slice(3, 67), slice(0, 128), slice(0, triton_linear.SMALL_M)):
        assert torch.equal(triton_linear.linear(x[rows], w), full[rows])


@pytest.mark.parametrize("apart", [False, True])
def test_fused_weights_are_checked_once_per_shape_and_refused_when_their_bits_differ(monkeypatch, caplog, apart):
    """A stand-in linear whose stacked call rounds like (or unlike) its blocks' calls."""
    calls = []

    def fake(x_MK, w_NK, bias):
        calls.append(w_NK.shape[0])
        out = x_MK.float() @ w_NK.float().T
        return (out + 1 if apart and w_NK.shape[0] == 7 else out).to(x_MK.dtype)

    monkeypatch.setattr(triton_linear, "_linear_forward", fake)
    monkeypatch.setattr(triton_linear, "_fusion_agreement", {})
    w = torch.zeros(7, 16, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="miles"):
        assert triton_linear.fusion_agrees(w, (4, 3)) is not apart
        assert triton_linear.fusion_agrees(w, (4, 3)) is not apart
    rounds = 1 if apart else len(triton_linear.FUSION_PROBE_ROWS)  # stops at the first difference
    assert calls == [7, 4, 3] * rounds
    assert ("differs in bits" in caplog.text) is apart
    monkeypatch.setattr(triton_linear, "_capturing", lambda device: True)
    assert not triton_linear.fusion_agrees(w, (5, 2)) and len(calls) == 3 * rounds  # unchecked in a capture


@pytest.mark.gpu
@pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("sizes,k", [((2048, 1024, 1024), 1024), ((3072, 3072), 1024), ((4096, 512, 512), 2560),
                                     ((1536, 256, 256), 896)])
def test_cuda_fused_weights_give_each_block_its_own_bits(sizes, k):
    """On the GPUs we run, the linear of stacked q/k/v (gate/up) weights gives each block's bits at
    Qwen3-0.6B / 4B and Qwen2-0.5B shapes, so invariant decode runs one GEMM for them."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(sum(sizes), k, device="cuda", generator=gen, dtype=torch.bfloat16) / 30
    assert triton_linear.fusion_agrees(w, sizes)
    for rows in (3, 200, 700):
        x = torch.randn(rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        separate = torch.cat([triton_linear.linear(x, block) for block in w.split(sizes)], dim=1)
        assert torch.equal(triton_linear.linear(x, w), separate)
