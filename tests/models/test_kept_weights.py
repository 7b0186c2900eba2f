"""`WeightExport`: the same `KeptWeights` while no parameter moves (optimizer steps write in
place), a new one once any does; tied weights once, detached views of the parameters."""

from __future__ import annotations

import torch

from miles_core.models.base import named_weights
from miles_core.models.kept_weights import KeptWeights, WeightExport


def _tiny():
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig

    return load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model


def test_the_same_tuple_while_the_weights_stay_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path))
    model = _tiny()
    export = WeightExport(model)
    kept = export.current()
    assert isinstance(kept, KeptWeights) and isinstance(kept, tuple)
    assert [name for name, _ in kept] == [name for name, _ in named_weights(model)]
    assert all(not tensor.requires_grad for _, tensor in kept)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # an optimizer step: in place
    assert export.current() is kept
    weight = dict(kept)["model.norm.weight"]
    assert torch.equal(weight, model.model.norm.weight)  # views: they see the step


def test_a_moved_parameter_gives_a_new_tuple_with_its_new_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path))
    model = _tiny()
    export = WeightExport(model)
    kept = export.current()
    norm = model.model.norm.weight
    norm.data = norm.data.clone() + 1  # moved: a new storage
    fresh = export.current()
    assert fresh is not kept and dict(fresh)["model.norm.weight"].data_ptr() == norm.data_ptr()
    assert torch.equal(dict(fresh)["model.norm.weight"], norm)
    model.to(torch.float64)  # every parameter moves
    assert export.current() is not fresh and dict(export.current())["model.norm.weight"].dtype == torch.float64
