"""HF safetensors IO: bitwise round trips, sharding and its index, tied embeddings, atomic
writes, and one-line errors for bad directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from miles_core.checkpoint.hf import (
    iter_state_dict,
    load_state_dict,
    load_weights_into,
    read_hf_config,
    save_hf_checkpoint,
)
from miles_core.errors import MilesError
from miles_core.models.registry import build_model

CONFIG = {
    "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def native_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model({**CONFIG, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_single_file_round_trip_is_bitwise(tmp_path):
    model = native_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_hf_checkpoint(tmp_path / "ckpt", model.state_dict().items(), CONFIG)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert read_hf_config(out) == CONFIG
    assert_same_tensors(expected, load_state_dict(out))


def test_forced_sharding_writes_hf_index(tmp_path):
    model = native_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Largest tensors are the (96, 32) fp32 embedding and lm_head: 12288 bytes each.
    out = save_hf_checkpoint(tmp_path / "ckpt", state.items(), CONFIG, max_shard_bytes=16384)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_names = sorted({p.name for p in out.glob("model-*.safetensors")})
    num_shards = len(shard_names)
    assert num_shards > 2
    assert shard_names == [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]
    assert not (out / "model.safetensors").exists()
    assert sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shard_names:
        with safe_open(out / shard, framework="pt") as handle:
            keys = set(handle.keys())
            assert handle.metadata() == {"format": "pt"}
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}
        assert sum(state[k].numel() * 4 for k in keys) <= 16384 or len(keys) == 1
    assert_same_tensors(state, load_state_dict(out))


def test_tied_embedding_is_dropped_and_restored(tmp_path):
    model = native_model(tie_word_embeddings=True)
    tied_config = {**CONFIG, "tie_word_embeddings": True}
    embedding = model.model.embed_tokens.weight.detach().clone()
    # state_dict() lists lm_head.weight and the embedding over one storage.
    out = save_hf_checkpoint(tmp_path / "ckpt", model.state_dict().items(), tied_config)
    names = [name for name, _ in iter_state_dict(out)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names

    fresh = build_model(tied_config)
    load_weights_into(fresh, out)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, embedding)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_views_and_shared_storage_are_saved_as_separate_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = [("a", base), ("b", base[1:]), ("c", base.t()), ("d", base)]
    out = save_hf_checkpoint(tmp_path / "ckpt", tensors, {"model_type": "llama"})
    loaded = load_state_dict(out)
    assert torch.equal(loaded["b"], torch.tensor([[4.0, 5, 6, 7], [8, 9, 10, 11]]))
    assert torch.equal(loaded["c"], base.t())
    assert loaded["c"].is_contiguous()


def test_dtype_cast_on_save_and_load(tmp_path):
    model = native_model()
    out = save_hf_checkpoint(tmp_path / "ckpt", model.state_dict().items(), CONFIG, dtype=torch.bfloat16)
    assert read_hf_config(out)["torch_dtype"] == "bfloat16"
    loaded = load_state_dict(out, dtype=torch.float32)
    weight = model.model.embed_tokens.weight.detach()
    assert loaded["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(loaded["model.embed_tokens.weight"], weight.to(torch.bfloat16).float())

    fresh = build_model(CONFIG)
    load_weights_into(fresh, out, dtype=torch.bfloat16)
    assert fresh.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight.detach().to(torch.bfloat16))


def test_side_files_are_copied_from_source(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "optimizer.pt").write_text("not a side file")
    out = save_hf_checkpoint(tmp_path / "ckpt", [("w", torch.ones(2))], CONFIG, source_dir=source)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"


def test_failure_inside_tensor_iterator_leaves_nothing(tmp_path):
    def tensors():
        yield "a", torch.ones(4)
        yield "b", torch.ones(4)
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError, match="export crashed"):
        save_hf_checkpoint(tmp_path / "ckpt", tensors(), CONFIG, max_shard_bytes=16)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_previous_checkpoint(tmp_path):
    out = save_hf_checkpoint(tmp_path / "ckpt", [("w", torch.ones(3))], CONFIG)

    def broken():
        yield "w", torch.zeros(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_hf_checkpoint(out, broken(), CONFIG)
    assert torch.equal(load_state_dict(out)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_shard_names_the_file(tmp_path):
    model = native_model()
    out = save_hf_checkpoint(tmp_path / "ckpt", model.state_dict().items(), CONFIG, max_shard_bytes=16384)
    second = sorted(out.glob("model-*.safetensors"))[1].name
    (out / second).unlink()
    with pytest.raises(MilesError, match=f"shard '{second}' named in '.*index.json' does not exist"):
        load_state_dict(out)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    out = save_hf_checkpoint(tmp_path / "ckpt", [("w", torch.ones(64))], CONFIG)
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-32] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(MilesError, match=r"cannot read safetensors file '.*model\.safetensors': ") as err:
        load_state_dict(out)
    assert "\n" not in str(err.value)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MilesError, match="no weights in .*model.safetensors"):
        list(iter_state_dict(tmp_path))


def test_read_hf_config_errors_name_the_path(tmp_path):
    with pytest.raises(MilesError, match="'.*nowhere' does not exist"):
        read_hf_config(tmp_path / "nowhere")
    with pytest.raises(MilesError, match="config.json' not found"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(MilesError, match="config.json' is not valid JSON"):
        read_hf_config(tmp_path)


def test_load_weights_reports_missing_and_unexpected_keys(tmp_path):
    state = native_model().state_dict()
    kept = [(k, v) for k, v in state.items() if not k.startswith("model.layers.1.")]
    kept.append(("model.extra.weight", torch.ones(2)))
    out = save_hf_checkpoint(tmp_path / "ckpt", kept, CONFIG)
    with pytest.raises(MilesError) as err:
        load_weights_into(build_model(CONFIG), out)
    message = str(err.value)
    # Layer 1 has 9 tensors: 5 are listed and "4 more" counted.
    assert "missing keys [model.layers.1." in message and "and 4 more]" in message
    assert "unexpected keys [model.extra.weight]" in message


def test_load_weights_reports_shape_mismatch(tmp_path):
    state = dict(native_model().state_dict())
    state["model.norm.weight"] = torch.ones(31)
    out = save_hf_checkpoint(tmp_path / "ckpt", state.items(), CONFIG)
    with pytest.raises(MilesError, match=r"'model.norm.weight'.*expects \(32,\), checkpoint has \(31,\)"):
        load_weights_into(build_model(CONFIG), out)


def test_load_weights_ignores_rotary_inv_freq(tmp_path):
    model = native_model()
    tensors = [*model.state_dict().items(), ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4))]
    out = save_hf_checkpoint(tmp_path / "ckpt", tensors, CONFIG)
    fresh = build_model(CONFIG)
    load_weights_into(fresh, out)
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)


def test_loaded_weights_lie_in_aligned_memory(tmp_path):
    """CPU GEMMs round differently on buffers off torch's 64-byte alignment (safetensors >= 0.8
    hands out 8-byte-aligned ones): loaded weights must compute as their clones do."""
    out = save_hf_checkpoint(tmp_path / "ckpt", native_model().state_dict().items(), CONFIG)
    model = build_model(CONFIG)
    load_weights_into(model, out)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    assert torch.equal(model.state_dict()["lm_head.weight"], load_state_dict(out)["lm_head.weight"])
