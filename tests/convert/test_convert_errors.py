"""Bad input gives one clear MilesError and leaves nothing at the output path."""

from __future__ import annotations

import json
import shutil

import pytest

from miles_core.checkpoint.hf import iter_state_dict, read_hf_config, save_hf_checkpoint
from miles_core.checkpoint.convert import convert
from miles_core.errors import MilesError


def fails(match: str, src, dst, **kwargs) -> None:
    with pytest.raises(MilesError, match=match):
        convert(src, dst, **kwargs)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]  # no temp left


def rewrite(src, dst, *, config=None, tensors=None):
    """A copy of the HF checkpoint `src` with config fields and tensors changed (None drops)."""
    named = dict(iter_state_dict(src))
    for name, tensor in (tensors or {}).items():
        named.pop(name) if tensor is None else named.__setitem__(name, tensor)
    save_hf_checkpoint(dst, named.items(), {**read_hf_config(src), **(config or {})})
    return dst


def test_wrong_model_type(tiny_hf, tmp_path):
    fails("--model-type 'llama' does not match model_type 'qwen3'", tiny_hf("qwen3"), tmp_path / "out",
          to="torch_dist", model_type="llama")
    fails("unknown model_type 'gpt2'", rewrite(tiny_hf("qwen3"), tmp_path / "gpt2", config={"model_type": "gpt2"}),
          tmp_path / "out", to="torch_dist")
    # qwen3 weights declared as llama: the q/k norms have no place
    src = rewrite(tiny_hf("qwen3"), tmp_path / "as-llama", config={"model_type": "llama"})
    fails("does not match model_type 'llama'.*unexpected .*q_norm", src, tmp_path / "out", to="torch_dist")
    convert(tiny_hf("qwen3"), tmp_path / "dist", to="torch_dist")
    fails("--model-type 'llama' does not match model_type 'qwen3'", tmp_path / "dist", tmp_path / "out",
          to="hf", model_type="llama")


def test_torch_dist_key_names_must_match_the_family(tiny_hf, tmp_path):
    """A megatron checkpoint without a HF config, read as the wrong family."""
    convert(tiny_hf("qwen3"), tmp_path / "dist", to="torch_dist")
    common = tmp_path / "dist" / "release" / "common.pt"
    import torch

    state = torch.load(common, weights_only=False)
    del state["hf_config"]
    torch.save(state, common)
    fails("pass --model-type", tmp_path / "dist", tmp_path / "out", to="hf")
    fails("missing .*unexpected \\[decoder layer 0 self_attention.k_layernorm", tmp_path / "dist",
          tmp_path / "out", to="hf", model_type="qwen2")
    assert convert(tmp_path / "dist", tmp_path / "ok", to="hf", model_type="qwen3", verify=True).bitwise.ok


def test_missing_files(tiny_hf, tmp_path):
    fails("does not exist", tmp_path / "nowhere", tmp_path / "out", to="torch_dist")
    (tmp_path / "empty").mkdir()
    fails("cannot tell the format", tmp_path / "empty", tmp_path / "out", to="hf")
    src = shutil.copytree(tiny_hf("qwen3"), tmp_path / "no-weights")
    (src / "model.safetensors").unlink()
    fails("no weights in", src, tmp_path / "out", to="torch_dist")
    src = rewrite(tiny_hf("qwen3"), tmp_path / "no-o", tensors={"model.layers.1.self_attn.o_proj.weight": None})
    fails("missing \\[model.layers.1.self_attn.o_proj.weight\\]", src, tmp_path / "out", to="torch_dist")
    convert(tiny_hf("qwen3"), tmp_path / "dist", to="torch_dist")
    next((tmp_path / "dist" / "release").glob("*.distcp")).unlink()
    fails("is missing __0_0.distcp", tmp_path / "dist", tmp_path / "out", to="hf")
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("12")
    fails("names 'iter_0000012', which does not exist", tmp_path / "dist", tmp_path / "out", to="hf")


def test_shape_mismatch(tiny_hf, tmp_path):
    src = rewrite(tiny_hf("qwen3"), tmp_path / "heads", config={"num_key_value_heads": 4})
    fails("shape mismatch for 'model.layers.0.self_attn.k_proj.weight'", src, tmp_path / "out", to="torch_dist")
    src = rewrite(tiny_hf("qwen3"), tmp_path / "vocab", config={"vocab_size": 100})
    fails("shape mismatch for 'model.embed_tokens.weight'", src, tmp_path / "out", to="torch_dist")
    import torch

    src = rewrite(tiny_hf("qwen3"), tmp_path / "o", tensors={"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 32)})
    fails("mixes dtypes or shapes", src, tmp_path / "out", to="torch_dist")


def test_mtp_requested_without_mtp_weights(tiny_hf, tmp_path):
    fails("--mtp-num-layers 1 requested but .* has MTP weights for 0 layer", tiny_hf("qwen3_moe"),
          tmp_path / "out", to="torch_dist", mtp_num_layers=1)
    fails("--mtp-num-layers 2 requested but .* for 1 layer", tiny_hf("deepseek_v3"), tmp_path / "out",
          to="torch_dist", mtp_num_layers=2)
    convert(tiny_hf("qwen3"), tmp_path / "dist", to="torch_dist")
    fails("has MTP weights for 0 layer", tmp_path / "dist", tmp_path / "out", to="hf", mtp_num_layers=1)


def test_output_rules(tiny_hf, tmp_path):
    (tmp_path / "taken").mkdir()
    fails_existing = pytest.raises(MilesError, match="already exists")
    with fails_existing:
        convert(tiny_hf("qwen3"), tmp_path / "taken", to="torch_dist")
    fails("already a HF checkpoint", tiny_hf("qwen3"), tmp_path / "out", to="hf")
    fails("unknown output format 'safetensors'", tiny_hf("qwen3"), tmp_path / "out", to="safetensors")
    convert(tiny_hf("qwen3"), tmp_path / "dist", to="torch_dist")
    fails("already a torch_dist checkpoint", tmp_path / "dist", tmp_path / "out", to="torch_dist")
    assert json.loads((tmp_path / "dist" / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"


class _TouchOnLoad:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.path),)


def test_common_pt_is_read_without_running_code(tiny_hf, tmp_path):
    import torch

    convert(tiny_hf("qwen3"), tmp_path / "dist", to="torch_dist")
    common = tmp_path / "dist" / "release" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["args"].hook = _TouchOnLoad(tmp_path / "touched")
    torch.save(state, common)
    assert convert(tmp_path / "dist", tmp_path / "hf", to="hf").bitwise is None
    assert not (tmp_path / "touched").exists()


def test_mtp_copies_that_differ_from_the_main_embedding_are_refused(tmp_path, monkeypatch):
    """Megatron's MTP layers share the main embedding/output layer; a checkpoint whose MTP copies
    differ cannot be represented, so conversion stops before writing anything."""
    import shutil

    from safetensors.torch import load_file, save_file

    from miles_core.checkpoint.sources import resolve_model_source
    from miles_core.checkpoint.convert import convert
    from miles_core.errors import MilesError

    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "dsv3"
    shutil.copytree(resolve_model_source("tiny-deepseek-v3"), src)
    state = load_file(src / "model.safetensors")
    state["model.layers.3.embed_tokens.weight"] = state["model.layers.3.embed_tokens.weight"] + 1
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MilesError, match="'model.layers.3.embed_tokens.weight' differs from 'model.embed_tokens.weight'"):
        convert(src, tmp_path / "out", to="torch_dist")
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "no_mtp", to="torch_dist", mtp_num_layers=0)  # dropping the MTP layers works
    assert (tmp_path / "no_mtp" / "latest_checkpointed_iteration.txt").exists()
