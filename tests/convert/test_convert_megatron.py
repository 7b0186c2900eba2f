"""Interoperability with real megatron-core (CPU, see megatron_cpu.py): megatron-core loads our
torch_dist checkpoints through `dist_checkpointing` and reproduces the native model's logits;
checkpoints megatron-core saves convert to HF checkpoints whose logits match megatron's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

import megatron_cpu as mc  # noqa: E402

from miles_core.checkpoint.hf import iter_state_dict, load_weights_into, read_hf_config  # noqa: E402
from miles_core.checkpoint.convert import convert  # noqa: E402
from miles_core.checkpoint.loading import materialize  # noqa: E402
from miles_core.models.registry import build_model  # noqa: E402

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory):
    with mc.megatron_on_cpu(tmp_path_factory.mktemp("process-group")):
        yield


def native_logits(hf_dir) -> torch.Tensor:
    cfg = read_hf_config(hf_dir)
    with torch.device("meta"):
        model = build_model(cfg)
    model = materialize(model, torch.device("cpu"), torch.float32)
    load_weights_into(model, hf_dir)
    positions = torch.arange(IDS.shape[1]).expand_as(IDS)
    with torch.no_grad():
        return model.lm_head(model.eval()(IDS, positions)).float()


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"])
def test_megatron_core_loads_our_checkpoint(on_cpu, tiny_hf, tmp_path, name):
    src = tiny_hf(name)
    convert(src, tmp_path / "ckpt", to="torch_dist")
    model = mc.build_gpt(read_hf_config(src))
    mc.load(model, tmp_path / "ckpt" / "release")
    torch.testing.assert_close(mc.logits(model, IDS), native_logits(src), atol=2e-5, rtol=1e-4)
    if name == "deepseek_v3":  # MTP weights landed in megatron's MTP modules
        hf, mtp = dict(iter_state_dict(src)), model.mtp.layers[0]
        layer = mtp.transformer_layer
        pairs = {"eh_proj.weight": mtp.eh_proj.weight, "enorm.weight": mtp.enorm.weight,
                 "hnorm.weight": mtp.hnorm.weight, "shared_head.norm.weight": mtp.final_layernorm.weight,
                 "self_attn.q_a_layernorm.weight": layer.self_attention.q_layernorm.weight,
                 "self_attn.kv_b_proj.weight": layer.self_attention.linear_kv_up_proj.weight,
                 "mlp.gate.e_score_correction_bias": layer.mlp.router.expert_bias,
                 "mlp.experts.3.down_proj.weight": layer.mlp.experts.local_experts[3].linear_fc2.weight}
        for hf_name, param in pairs.items():
            assert torch.equal(param, hf[f"model.layers.2.{hf_name}"]), hf_name


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_checkpoint_saved_by_megatron_core_converts_to_hf(on_cpu, tiny_hf, tmp_path, name):
    """megatron-core's local-spec key names (not the Transformer Engine ones) are read too."""
    cfg = read_hf_config(tiny_hf(name))
    model = mc.build_gpt(cfg, te_names=False)
    mc.randomize(model)
    mc.save(model, tmp_path / "mcore", 7, mc.training_args(cfg))
    report = convert(tmp_path / "mcore", tmp_path / "hf", to="hf", model_type=cfg["model_type"], verify=True)
    assert report.bitwise.ok and report.mtp_num_layers == (1 if name == "deepseek_v3" else 0)
    torch.testing.assert_close(native_logits(tmp_path / "hf"), mc.logits(model, IDS), atol=2e-5, rtol=1e-4)
