"""The engine's Python sampling streams give torch's CPU generator numbers, bit for bit: the
seeding (read from torch's state and by the recurrence), draws across state regenerations
(every 624 draws), many streams read at once, and seeds beyond 32 bits."""

from __future__ import annotations

import pytest
import torch

from miles_core.engine.native import sample_seed, streams
from miles_core.engine.native.streams import mt19937_words, torch_stream, uniforms

SEEDS = [0, 1, 12345, 2**32 + 5, 2**63 - 2, sample_seed(7, 3), sample_seed(0, 0)]


@pytest.mark.parametrize("seed", SEEDS)
def test_seeding_recurrence_equals_torch_state(seed):
    assert streams._torch_words(seed) == mt19937_words(seed)
    assert len(mt19937_words(seed)) == 624 and mt19937_words(seed)[0] == seed % 2**32


@pytest.mark.parametrize("layout_ok", [True, False])
def test_draws_equal_torch_rand_across_regenerations(monkeypatch, layout_ok):
    monkeypatch.setattr(streams, "_layout_ok", layout_ok)  # False: seeded by the recurrence
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    ours = [torch_stream(s) for s in SEEDS]
    for _ in range(1300):  # two regenerations of the 624-word state
        expected = torch.tensor([float(torch.rand(1, generator=g)) for g in generators])
        got = uniforms(ours)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_streams_advance_independently():
    """Streams drawn at different rates keep their own positions (rows join and leave a batch)."""
    g_a, g_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    a, b = torch_stream(5), torch_stream(6)
    for step in range(700):
        group = [a, b] if step % 3 == 0 else [a]
        gens = [g_a, g_b] if step % 3 == 0 else [g_a]
        assert uniforms(group).tolist() == [float(torch.rand(1, generator=g)) for g in gens]
    assert uniforms([]).shape == (0,)
