"""The shared comparator: bitwise tensor checks and logit distances on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.checkpoint.compare import BitwiseReport, compare_logits, compare_tensors


def test_compare_tensors_is_bitwise():
    a = torch.tensor([0.0, 1.0, float("nan")])
    assert compare_tensors("x", a, a.clone()).equal  # NaN bits equal themselves
    assert "1 of 3 elements differ" in compare_tensors("x", a, torch.tensor([-0.0, 1.0, float("nan")])).reason
    assert compare_tensors("x", a, a.double()).reason == "dtype torch.float32 vs torch.float64"
    assert compare_tensors("x", a, a[:2]).reason == "shape (3,) vs (2,)"
    bf16 = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    bumped = bf16 + torch.tensor([0.0, 0.015625], dtype=torch.bfloat16)  # one bf16 step at 2.0
    assert "1 of 2 elements differ (max abs 0.0156)" in compare_tensors("x", bf16, bumped).reason


def test_bitwise_report():
    report = BitwiseReport()
    report.add("a", torch.ones(2), torch.ones(2))
    assert report.ok and report.summary() == "1 tensors bitwise identical"
    report.add("b", torch.ones(2), torch.zeros(2))
    assert not report.ok and report.summary().startswith("1 of 2 tensors differ; b: 2 of 2")
    assert not BitwiseReport().ok  # nothing compared is not a pass


def test_compare_logits_hand_computed():
    a = torch.tensor([[0.0, 0.0]])                 # p_a = (1/2, 1/2)
    b = torch.tensor([[math.log(3.0), 0.0]])       # p_b = (3/4, 1/4)
    out = compare_logits(a, b)
    # KL(p_a || p_b) = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 log(4/3)
    assert out["kl"] == pytest.approx(0.5 * math.log(4 / 3))
    assert out["max_abs"] == pytest.approx(math.log(3.0)) and out["mean_abs"] == pytest.approx(math.log(3.0) / 2)
    assert out["top1_agree"] == 1.0 and out["bitwise"] == 0.0  # argmax ties resolve to index 0 in both
    same = compare_logits(b, b.clone())
    assert same == {"max_abs": 0.0, "mean_abs": 0.0, "kl": 0.0, "top1_agree": 1.0, "bitwise": 1.0}
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(a, torch.zeros(1, 3))
