"""HF -> torch_dist -> HF is bitwise identical for every family (MTP included), and the
torch_dist side has megatron-core's folder layout, key names, stacking and fused layouts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from miles_core.checkpoint import convert as convert_module
from miles_core.checkpoint.hf import iter_state_dict, read_hf_config
from miles_core.checkpoint.torch_dist import DistReader
from miles_core.checkpoint.convert import convert


def assert_same_checkpoint(a_dir, b_dir):
    a, b = dict(iter_state_dict(a_dir)), dict(iter_state_dict(b_dir))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3", "deepseek_v3_no_q_lora"])
def test_hf_to_torch_dist_to_hf_is_bitwise(tiny_hf, tmp_path, name):
    src = tiny_hf(name)
    there = convert(src, tmp_path / "dist", to="torch_dist", verify=True)
    back = convert(tmp_path / "dist", tmp_path / "hf", to="hf", verify=True)
    assert_same_checkpoint(src, tmp_path / "hf")
    assert read_hf_config(tmp_path / "hf") == read_hf_config(src)
    assert there.bitwise.ok and back.bitwise.ok
    assert there.mtp_num_layers == back.mtp_num_layers == (1 if name == "deepseek_v3" else 0)
    assert back.logits["bitwise"] == 1.0 and back.logits["kl"] == 0.0


def test_dense_layout_is_megatrons(tiny_hf, tmp_path):
    convert(tiny_hf("qwen3"), tmp_path / "ckpt", to="torch_dist")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "release"
    folder = tmp_path / "ckpt" / "release"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert json.loads((folder / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = torch.load(folder / "common.pt", weights_only=False)
    assert (common["args"].num_layers, common["args"].num_query_groups, common["checkpoint_version"]) == (2, 2, 3.0)
    reader = DistReader(folder)
    sizes = {key: tuple(md.size) for key, md in reader.tensors.items()}
    assert sizes["decoder.layers.self_attention.linear_qkv.weight"] == (2, 128, 64)  # 2 groups x (2 q + k + v) x 16
    assert sizes["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (2, 64)
    assert sizes["decoder.layers.self_attention.q_layernorm.weight"] == (2, 16)
    assert sizes["decoder.layers.mlp.linear_fc1.weight"] == (2, 192, 64)
    assert sizes["decoder.layers.mlp.linear_fc1.layer_norm_weight"] == (2, 64)
    assert {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"} <= sizes.keys()
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_1_2" in reader.metadata.state_dict_metadata
    # fused QKV is group-interleaved: [q heads 0,1 | k0 | v0 | q heads 2,3 | k1 | v1]
    hf = dict(iter_state_dict(tiny_hf("qwen3")))
    qkv = reader.read("decoder.layers.self_attention.linear_qkv.weight", (1,))
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(qkv[64:96], q[32:64]) and torch.equal(qkv[96:112], k[16:32]) and torch.equal(qkv[112:], v[16:32])
    fc1 = reader.read("decoder.layers.mlp.linear_fc1.weight", (0,))
    assert torch.equal(fc1[:96], hf["model.layers.0.mlp.gate_proj.weight"])


def test_moe_and_mtp_layout_is_megatrons(tiny_hf, tmp_path):
    convert(tiny_hf("qwen3_moe"), tmp_path / "moe", to="torch_dist")
    sizes = {k: tuple(m.size) for k, m in DistReader(tmp_path / "moe" / "release").tensors.items()}
    assert sizes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 64, 64)  # (layer, expert, 2F, E)
    assert sizes["decoder.layers.mlp.router.weight"] == (2, 4, 64)
    assert sizes["decoder.layers.pre_mlp_layernorm.weight"] == (2, 64)

    convert(tiny_hf("deepseek_v3"), tmp_path / "ds", to="torch_dist")
    reader = DistReader(tmp_path / "ds" / "release")
    sizes = {k: tuple(m.size) for k, m in reader.tensors.items()}
    # a dense first layer makes megatron write per-layer keys
    assert sizes["decoder.layers.0.mlp.linear_fc1.weight"] == (192, 64)
    assert sizes["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"] == (4, 64, 64)
    assert sizes["decoder.layers.1.mlp.router.expert_bias"] == (4,)
    assert sizes["decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight"] == (32,)
    assert sizes["mtp.layers.0.eh_proj.weight"] == (64, 128)
    assert sizes["mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc2.weight"] == (4, 64, 32)
    assert not any("embed_tokens" in k or "shared_head" in k for k in sizes)
    assert "mtp.layers.0.eh_proj._extra_state/shard_0_1" in reader.metadata.state_dict_metadata
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_3_4" in reader.metadata.state_dict_metadata


def test_mtp_layers_can_be_dropped(tiny_hf, tmp_path):
    convert(tiny_hf("deepseek_v3"), tmp_path / "dist", to="torch_dist", mtp_num_layers=0)
    assert not any(k.startswith("mtp.") for k in DistReader(tmp_path / "dist" / "release").tensors)
    convert(tiny_hf("deepseek_v3"), tmp_path / "dist1", to="torch_dist")
    report = convert(tmp_path / "dist1", tmp_path / "hf", to="hf", mtp_num_layers=0, verify=True)
    names = {n for n, _ in iter_state_dict(tmp_path / "hf")}
    assert report.mtp_num_layers == 0 and not any(n.startswith("model.layers.2.") for n in names)
    assert read_hf_config(tmp_path / "hf")["num_nextn_predict_layers"] == 0


def test_per_layer_keys_and_many_files_round_trip(tiny_hf, tmp_path, monkeypatch):
    """A checkpoint with per-layer keys (as megatron writes for mixed layers) split over many
    files reads back the same."""
    plan = convert_module.mapping.plan
    monkeypatch.setattr(convert_module.mapping, "plan", lambda *a: dataclasses.replace(plan(*a), stacked=False))
    monkeypatch.setattr(convert_module, "MAX_FILE_BYTES", 20_000)
    convert(tiny_hf("qwen3_moe"), tmp_path / "dist", to="torch_dist")
    folder = tmp_path / "dist" / "release"
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in DistReader(folder).tensors
    assert len(list(folder.glob("__*_0.distcp"))) > 5
    monkeypatch.undo()
    convert(tmp_path / "dist", tmp_path / "hf", to="hf", verify=True)
    assert_same_checkpoint(tiny_hf("qwen3_moe"), tmp_path / "hf")


def test_gguf_source_converts_both_ways(tmp_path, monkeypatch):
    """A llama.cpp GGUF (written by the GGUF import tests' writer) is dequantised, then converted."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gguf_writer", Path(__file__).parents[1] / "checkpoint" / "conftest.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    gguf = writer.write_gguf(writer.tiny_hf_model("qwen3"), tmp_path / "tiny.gguf", "qwen3")
    assert convert(gguf, tmp_path / "dist", to="torch_dist", verify=True).src_format == "gguf"
    report = convert(gguf, tmp_path / "hf", to="hf", verify=True)
    assert report.bitwise.ok and report.logits["bitwise"] == 1.0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
