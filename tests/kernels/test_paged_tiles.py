"""Invariant paged decode's query tile: the narrow tile (16 rows a warp) runs only where the device
gave it the 64-row tile's bits, checked once per shape and never inside a CUDA graph capture. On
CPU the Triton launch is replaced by a stand-in whose two tiles round alike or apart; the real
kernel is checked on GPUs in tests/engine/test_paged_gpu.py."""

from __future__ import annotations

import logging

import pytest
import torch

from miles_core.kernels import paged_attention

WIDE = paged_attention.INVARIANT_TILE


@pytest.fixture
def launches(monkeypatch):
    """Records each launch's (sequences, tile); `launches.apart` moves the narrow tile's output."""
    calls: list[tuple[int, tuple]] = []

    def fake(q_BHD, keys, values, tables, positions, tile):
        calls.append((q_BHD.shape[0], tile))
        out = q_BHD.float().clone()
        if tile != WIDE and fake.apart:
            out = out + 1
        return out.to(q_BHD.dtype)

    fake.apart, fake.calls = False, calls
    monkeypatch.setattr(paged_attention, "_launch", fake)
    monkeypatch.setattr(paged_attention, "_narrow_agrees", {})
    return fake


def _inputs(H=16, K=8, D=32):
    pool = torch.zeros(4, 64, K, D, dtype=torch.bfloat16)
    return torch.zeros(3, H, D, dtype=torch.bfloat16), pool, pool, torch.zeros(3, 2, dtype=torch.int32), \
        torch.zeros(3, dtype=torch.int32)


@pytest.mark.parametrize("G,tile", [(1, (16, 1)), (2, (16, 1)), (16, (16, 1)), (17, WIDE), (64, WIDE)])
def test_narrow_tile_is_one_warp_of_sixteen_rows(G, tile):
    assert paged_attention.narrow_tile(G) == tile


def test_invariant_decode_takes_the_narrow_tile_once_it_agrees(launches):
    args = _inputs()
    paged_attention.paged_decode(*args, invariant=True)
    assert launches.calls == [(64, (16, 1)), (64, WIDE), (3, (16, 1))]  # the check, then the call
    paged_attention.paged_decode(*args, invariant=True)
    paged_attention.paged_decode(*args, invariant=False)
    assert launches.calls[3:] == [(3, (16, 1)), (3, (16, 4))]  # checked once; fast mode never checks


def test_a_narrow_tile_that_rounds_apart_is_never_used(launches, caplog):
    launches.apart = True
    with caplog.at_level(logging.WARNING, logger="miles"):
        paged_attention.paged_decode(*_inputs(), invariant=True)
        paged_attention.paged_decode(*_inputs(), invariant=True)
    assert launches.calls[2:] == [(3, WIDE), (3, WIDE)]
    assert sum("differs in bits" in r.message for r in caplog.records) == 1


def test_unchecked_shapes_inside_a_capture_take_the_wide_tile(launches, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    q, *rest = _inputs()
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")), raising=False)
    paged_attention.paged_decode(q, *rest, invariant=True)
    assert launches.calls == [(3, WIDE)] and paged_attention._narrow_agrees == {}


def test_a_group_of_more_than_sixteen_heads_takes_the_wide_tile_unchecked(launches):
    paged_attention.paged_decode(*_inputs(H=34, K=2), invariant=True)
    assert launches.calls == [(3, WIDE)]
