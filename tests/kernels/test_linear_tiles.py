"""The batch-invariant linear's tile choice: decode-sized calls (at most SMALL_M rows) take the
narrower tiles only where the device gave them the default tiles' bits, so a row's result never
depends on how many rows share the call. On CPU the Triton launch is replaced by a stand-in whose
two tile configurations round alike or apart; on a GPU the real kernel is checked."""

from __future__ import annotations

import logging

import pytest
import torch

from miles_core.kernels import triton_ops

SMALL, WIDE, DEFAULT = triton_ops.SMALL_M_CONFIG, triton_ops.SMALL_M_WIDE_CONFIG, triton_ops.LINEAR_CONFIG["half"]


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
    monkeypatch.setattr(triton_ops, "_launch_linear", fake)
    monkeypatch.setattr(triton_ops, "_agreement", {})
    return fake


def _weights(n: int = 48, k: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(5, k, generator=gen, dtype=torch.bfloat16), torch.randn(n, k, generator=gen, dtype=torch.bfloat16)


def test_small_tiles_run_decode_sized_calls_once_they_agree(launches):
    x, w = _weights()
    triton_ops._linear_forward(x, w, None)
    # The check (SMALL_M probe rows through both configurations), then the call on the small tiles.
    assert launches.calls == [(triton_ops.SMALL_M, SMALL), (triton_ops.SMALL_M, DEFAULT), (5, SMALL)]
    triton_ops._linear_forward(x, w, None)  # checked once per weight shape
    triton_ops._linear_forward(torch.zeros(triton_ops.SMALL_M + 1, 32, dtype=torch.bfloat16), w, None)
    assert launches.calls[3:] == [(5, SMALL), (triton_ops.SMALL_M + 1, DEFAULT)]


def test_tiles_that_round_apart_are_never_used(launches, caplog):
    launches.apart = True
    x, w = _weights()
    with caplog.at_level(logging.WARNING, logger="miles"):
        triton_ops._linear_forward(x, w, None)
        triton_ops._linear_forward(x, w, None)
    assert launches.calls[2:] == [(5, DEFAULT), (5, DEFAULT)]
    assert sum("differ in bits" in r.message for r in caplog.records) == 1
    assert "(48, 32)" in caplog.text


def test_fp32_and_unchecked_shapes_inside_a_capture_take_the_default_tiles(launches, monkeypatch):
    x, w = _weights()
    triton_ops._linear_forward(x.float(), w.float(), None)
    assert launches.calls == [(5, triton_ops.LINEAR_CONFIG["ieee"])]
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: True)
    triton_ops._linear_forward(x, w, None)
    assert launches.calls[1:] == [(5, DEFAULT)] and triton_ops._agreement == {}  # checked later, outside


def test_weights_whose_default_grid_fills_the_card_keep_the_default_tiles(launches, monkeypatch):
    """A wide weight (the lm_head) already gives every SM a program on the default tiles; the
    narrower tiles were slower there on H100, so only narrow weights take them."""
    monkeypatch.setattr(triton_ops, "_sm_count", lambda device: 4)
    x, w = _weights(n=512)  # 1 x 4 default tiles: fills a 4-SM card
    triton_ops._linear_forward(x, w, None)
    assert launches.calls == [(5, DEFAULT)]
    triton_ops._linear_forward(x, w[:384], None)  # 1 x 3 tiles: one SM idle; 1 x 6 of 64-wide tiles fill it
    assert launches.calls[1:] == [(triton_ops.SMALL_M, WIDE), (triton_ops.SMALL_M, DEFAULT), (5, WIDE)]


def test_decode_sized_calls_take_the_wider_small_tiles_only_where_they_fill_the_card(launches, monkeypatch):
    monkeypatch.setattr(triton_ops, "_sm_count", lambda device: 8)
    x, w = _weights(n=384)  # default tiles 1 x 3, 64-wide tiles 1 x 6: neither fills 8 SMs
    triton_ops._linear_forward(x, w, None)
    assert launches.calls[-1] == (5, SMALL)
    triton_ops._linear_forward(torch.zeros(128, 32, dtype=torch.bfloat16), w, None)  # 2 x 6 wide tiles fill it
    assert launches.calls[-3:] == [(triton_ops.SMALL_M, WIDE), (triton_ops.SMALL_M, DEFAULT), (128, WIDE)]


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
    assert triton_ops.small_tiles_agree(w) and triton_ops.small_tiles_agree(w, WIDE)
    full = triton_ops.linear(x, w)
    for rows in (slice(0, 1), slice(3, 67), slice(0, 128), slice(0, triton_ops.SMALL_M)):
        assert torch.equal(triton_ops.linear(x[rows], w), full[rows])
