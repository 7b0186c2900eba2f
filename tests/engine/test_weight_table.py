"""`WeightTable.checked_updates`: a (name, dtype, shape) list checked once is not checked again, yet
a list that differs in one name, dtype or shape is, and the targets are the engine's own tensors."""

from __future__ import annotations

import pytest
import torch

from miles_core.engine.native.weight_table import MAX_CHECKED, WeightTable
from miles_core.errors import MilesError
from miles_core.models.tiny import TINY_QWEN3_CONFIG, tiny_model


def _table():
    model = tiny_model(TINY_QWEN3_CONFIG)
    return model, WeightTable(model)


def test_a_list_checked_before_gives_the_same_targets():
    model, table = _table()
    updates = [(n, torch.zeros_like(p)) for n, p in model.named_parameters()]
    first, sources, key = table.checked_updates(updates)
    again, sources_again, key_again = table.checked_updates([(n, t + 1) for n, t in updates])
    params = [p for _, p in model.named_parameters()]
    assert all(a is b and b is p for a, b, p in zip(first, again, params)) and len(again) == len(params) == 25
    assert torch.equal(sources_again[0], updates[0][1] + 1)  # the sources are this call's
    assert key_again is key and key[0] == (updates[0][0], torch.float32, updates[0][1].shape)  # the kept key
    _, _, other = table.checked_updates([(n, t.double()) for n, t in updates])  # same names, other dtype
    assert other != key


def test_a_list_that_differs_in_one_shape_or_name_is_checked_again():
    model, table = _table()
    updates = [(n, torch.zeros_like(p)) for n, p in model.named_parameters()]
    table.checked_updates(updates)
    with pytest.raises(MilesError, match=r"'model.norm.weight' has shape \(32,\), expected \(64,\)"):
        table.checked_updates([*updates[:-2], ("model.norm.weight", torch.zeros(32)), updates[-1]])
    with pytest.raises(MilesError, match="unknown parameter 'model.nrom.weight'"):
        table.checked_updates([*updates[:-2], ("model.nrom.weight", torch.zeros(64)), updates[-1]])


def test_invalidate_and_the_limit_forget_checked_lists():
    model, table = _table()
    names = [n for n, _ in model.named_parameters()]
    pairs = [(a, b) for a in names for b in names if a != b][:MAX_CHECKED + 5]  # distinct two-tensor lists
    for pair in pairs:
        table.checked_updates([(name, table.get(name, "test").clone()) for name in pair])
    assert len(table._checked) == MAX_CHECKED
    table.invalidate()
    assert len(table._checked) == 0


def test_the_very_tuple_of_the_last_update_skips_its_key_and_a_list_does_not():
    model, table = _table()
    updates = tuple((n, torch.zeros_like(p)) for n, p in model.named_parameters())
    targets, sources, key = table.checked_updates(updates)
    again, sources_again, key_again = table.checked_updates(updates)
    assert key_again is key and table._last[0] is updates  # known by identity: no key built, no lookup
    assert again == targets and all(a is b for a, b in zip(sources_again, (t for _, t in updates)))
    table.checked_updates(list(updates))
    assert table._last is None  # lists can change: not kept
    table.checked_updates(updates)
    table.invalidate()
    assert table._last is None
