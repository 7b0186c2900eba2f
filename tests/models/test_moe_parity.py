"""Native MoE models (Qwen3-MoE, DeepSeek-V3) against `transformers` on the same random weights.

Each variant is built once per module by transformers under a fixed seed, every weight and the
DeepSeek selection bias randomised, saved with `save_pretrained` (DeepSeek checkpoints also get
random MTP layers, which transformers does not hold) and loaded with `load_model`. Covers logits
parity, MoE layer numbering, ragged KV-cache decode, grouped vs reference experts, routing
record/replay (identical logits, router gradient, shape errors), YaRN, fp32 router and MTP
weights loading and saving back bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from miles_core.checkpoint.hf import read_hf_config, save_hf_checkpoint
from miles_core.config import ModelConfig
from miles_core.errors import MilesError
from miles_core.models import moe
from miles_core.models.layers import rope_inv_freq
from miles_core.checkpoint.loading import load_model
from miles_core.models.qwen3_moe import Qwen3MoeArgs
from miles_core.models.routing import RoutingContext

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_experts_per_tok=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
QWEN3_MOE = dict(BASE, num_key_value_heads=2, head_dim=16, num_experts=8, norm_topk_prob=True, mlp_only_layers=[1])
# mscale != mscale_all_dim: both the cos/sin factor and the softmax scale differ from 1.
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=0.8)
DEEPSEEK_V3 = dict(BASE, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                   routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1, num_nextn_predict_layers=1,
                   rope_theta=10000.0, rope_scaling=YARN)
VARIANTS = {
    "qwen3_moe": ("qwen3_moe", QWEN3_MOE),
    "deepseek_v3": ("deepseek_v3", DEEPSEEK_V3),
    "deepseek_v3_no_q_lora": ("deepseek_v3", dict(DEEPSEEK_V3, q_lora_rank=None)),
}
SEQ_LEN = 48  # past original_max_position_embeddings (32): YaRN matters


def hf_model(variant: str) -> torch.nn.Module:
    """A seeded tiny HF model with O(1)-effective random weights: norms in [0.5, 1.5], routers
    far from uniform, a selection bias comparable to the sigmoid scores."""
    model_type, overrides = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 1.0 if "embed_tokens" in name else 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.5)
    return model


def add_mtp_layer(ckpt: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """Append random MTP weights `model.layers.{num_layers}.*` (HF's last decoder layer's names
    plus the MTP projections) to a saved checkpoint, as DeepSeek-V3's own checkpoint has them."""
    state = load_file(ckpt / "model.safetensors")
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    shapes = {mtp + name.removeprefix(last): t.shape for name, t in state.items() if name.startswith(last)}
    E = BASE["hidden_size"]
    shapes.update({mtp + "embed_tokens.weight": (VOCAB, E), mtp + "enorm.weight": (E,), mtp + "hnorm.weight": (E,),
                   mtp + "eh_proj.weight": (E, 2 * E), mtp + "shared_head.norm.weight": (E,),
                   mtp + "shared_head.head.weight": (VOCAB, E)})
    generator = torch.Generator().manual_seed(7)
    added = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    save_file({**state, **added}, ckpt / "model.safetensors", metadata={"format": "pt"})
    return added


class Zoo:
    """Every variant built, saved and loaded once per module. `native` models are shared:
    tests that change weights load their own with `load`."""

    def __init__(self, root: Path) -> None:
        self.root, self.hf, self.mtp, self._native = root, {}, {}, {}

    def path(self, variant: str) -> Path:
        if variant not in self.hf:
            self.hf[variant] = hf = hf_model(variant)
            hf.save_pretrained(self.root / variant)
            backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t2", pad_token="t0")
            tokenizer.save_pretrained(self.root / variant)
            if hf.config.model_type == "deepseek_v3":
                self.mtp[variant] = add_mtp_layer(self.root / variant, hf.config.num_hidden_layers)
        return self.root / variant

    def load(self, variant: str, dtype: str = "float32") -> torch.nn.Module:
        return load_model(ModelConfig(source=str(self.path(variant)), device="cpu", dtype=dtype)).model.eval()

    def native(self, variant: str) -> torch.nn.Module:
        if variant not in self._native:
            self._native[variant] = self.load(variant)
        return self._native[variant]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("moe"))


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids_BT: torch.Tensor, routing: RoutingContext | None = None) -> torch.Tensor:
    positions = torch.arange(ids_BT.shape[1])[None].expand_as(ids_BT)
    return model.lm_head(model(ids_BT, positions, routing=routing))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers(zoo, variant):
    native = zoo.native(variant)
    ids = random_ids(2, SEQ_LEN)
    theirs = zoo.hf[variant](ids).logits
    ours = logits_of(native, ids)
    assert ours.shape == theirs.shape == (2, SEQ_LEN, VOCAB)
    assert theirs.abs().max() > 1.0  # logits are not all near zero, so 1e-4 is a real bound
    assert (ours - theirs).abs().max() < 1e-4


@torch.no_grad()
def test_selection_bias_and_yarn_softmax_scale_change_the_logits(zoo):
    """The parity test can fail: the selection bias and YaRN's mscale^2 each move the logits."""
    ids = random_ids(1, SEQ_LEN)
    reference = zoo.hf["deepseek_v3"](ids).logits
    native = zoo.load("deepseek_v3")
    for layer in native.moe_layers:
        native.model.layers[layer].mlp.gate.e_score_correction_bias.zero_()
    assert (logits_of(native, ids) - reference).abs().max() > 1e-2
    native = zoo.load("deepseek_v3")
    for layer in native.model.layers:
        layer.self_attn.scale_factor = 1.0
    assert (logits_of(native, ids) - reference).abs().max() > 1e-2


def test_yarn_frequencies_match_transformers():
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3))
    ours, our_factor = rope_inv_freq(DEEPSEEK_V3["qk_rope_head_dim"], 10000.0, YARN)
    assert torch.equal(ours, theirs)
    assert our_factor == pytest.approx(their_factor, rel=1e-12) and our_factor != 1.0


def test_moe_layer_indices_follow_transformers_layer_types(zoo):
    """MoE layer i is the i-th sparse decoder layer; dense layers (mlp_only_layers, off-step
    layers, DeepSeek's first_k_dense_replace) have no index."""
    config = dict(QWEN3_MOE, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **config))
    hf_sparse = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    args = Qwen3MoeArgs.from_hf_config(hf.config.to_dict())  # saves `num_local_experts`
    assert args.moe_layers == hf_sparse == (1, 5) and args.num_experts == 8
    published = {**hf.config.to_dict(), "num_experts": 8}  # the hub's spelling
    published.pop("num_local_experts")
    assert Qwen3MoeArgs.from_hf_config(published).moe_layers == (1, 5)

    for variant, expected in [("qwen3_moe", (0, 2)), ("deepseek_v3", (1, 2))]:
        native = zoo.native(variant)
        assert native.moe_layers == expected and native.num_moe_layers == 2
        assert [native.model.layers[i].mlp.moe_index for i in expected] == [0, 1]


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
@torch.no_grad()
def test_kv_cache_prefill_and_ragged_decode_match_full_forward(zoo, variant):
    """Three right-padded prompts of different lengths share one cache, then decode 5 tokens
    one at a time, so every decode step mixes three positions."""
    native = zoo.native(variant)
    prompt_lens, num_decode = [3, 9, 5], 5
    sequences = [random_ids(1, n + num_decode, seed=10 + i)[0] for i, n in enumerate(prompt_lens)]
    reference = [logits_of(native, seq[None])[0] for seq in sequences]  # each alone, (T, V)

    width = max(prompt_lens)
    prefix = torch.zeros(3, width, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(sequences, prompt_lens)):
        prefix[row, :n] = seq[:n]
    cache = native.new_kv_cache(3, width + num_decode)
    hidden = native(prefix, torch.arange(width)[None].expand(3, -1), cache)
    for row, n in enumerate(prompt_lens):
        assert (native.lm_head(hidden[row, :n]) - reference[row][:n]).abs().max() < 1e-5, f"prefill row {row}"

    for step in range(num_decode):
        positions = torch.tensor([[n + step] for n in prompt_lens])  # (3, 1)
        tokens = torch.stack([seq[n + step] for seq, n in zip(sequences, prompt_lens)])[:, None]
        logits = native.lm_head(native(tokens, positions, cache))[:, 0]  # (3, V)
        for row, n in enumerate(prompt_lens):
            assert (logits[row] - reference[row][n + step]).abs().max() < 1e-5, f"step {step} row {row}"


@torch.no_grad()
def test_grouped_experts_match_reference(zoo, monkeypatch):
    block = zoo.native("deepseek_v3").model.layers[1].mlp
    x_NE = torch.randn(13, BASE["hidden_size"], generator=torch.Generator().manual_seed(3))
    probs_NX, ids_NK = block.gate(x_NE)
    cases = {
        "router choice": ids_NK,
        "one busy expert, others idle": torch.stack([torch.full((13,), 5), torch.full((13,), 2)], dim=1),
        "single token": ids_NK[:1],
    }
    for case, ids in cases.items():
        weights = block.gate.combine_weights(probs_NX[: len(ids)], ids)
        grouped = moe.grouped_experts(block.experts, x_NE[: len(ids)], ids, weights)
        reference = moe.reference_experts(block.experts, x_NE[: len(ids)], ids, weights)
        assert (grouped - reference).abs().max() < 1e-5, case

    native, ids = zoo.native("qwen3_moe"), random_ids(2, 20)
    grouped = logits_of(native, ids)
    monkeypatch.setattr(moe, "grouped_experts", moe.reference_experts)
    assert (logits_of(native, ids) - grouped).abs().max() < 1e-5


def shifted(recorded: dict[int, torch.Tensor], num_experts: int) -> dict[int, torch.Tensor]:
    """Other valid expert ids: every id moved to the next expert (still distinct per token)."""
    return {layer: (ids + 1) % num_experts for layer, ids in recorded.items()}


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
@torch.no_grad()
def test_record_then_replay_reproduces_the_logits(zoo, variant):
    native, ids = zoo.native(variant), random_ids(2, 16)
    record = RoutingContext("record")
    recorded_logits = logits_of(native, ids, record)
    assert sorted(record.recorded) == list(range(native.num_moe_layers))
    for chosen in record.recorded.values():
        assert chosen.shape == (2, 16, 2) and chosen.dtype == torch.int64

    replay = RoutingContext("replay", replay=record.recorded)
    assert torch.equal(logits_of(native, ids, replay), recorded_logits)
    replay.check_all_consumed()
    assert torch.equal(logits_of(native, ids), recorded_logits)  # recording changes nothing

    other = RoutingContext("replay", replay=shifted(record.recorded, 8))
    assert (logits_of(native, ids, other) - recorded_logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_replayed_routing_keeps_the_router_gradient(zoo, variant):
    native, ids = zoo.native(variant), random_ids(1, 8)
    record = RoutingContext("record")
    with torch.no_grad():
        logits_of(native, ids, record)
    native.zero_grad()
    logits_of(native, ids, RoutingContext("replay", replay=shifted(record.recorded, 8))).square().mean().backward()
    for layer in native.moe_layers:
        gate = native.model.layers[layer].mlp.gate.weight
        assert gate.grad is not None and gate.grad.abs().sum() > 0, f"layer {layer}"
    native.zero_grad()


@torch.no_grad()
def test_replay_of_the_wrong_shape_names_both_shapes(zoo):
    native, ids = zoo.native("qwen3_moe"), random_ids(2, 5)
    replay = {0: torch.zeros(2, 5, 3, dtype=torch.long), 1: torch.zeros(2, 5, 2, dtype=torch.long)}
    with pytest.raises(MilesError, match=r"MoE layer 0 has shape \(2, 5, 3\), expected \(2, 5, 2\)"):
        logits_of(native, ids, RoutingContext("replay", replay=replay))


def test_deepseek_mtp_weights_load_and_save_back_bitwise(zoo, tmp_path):
    native, source = zoo.native("deepseek_v3"), zoo.path("deepseek_v3")
    state = native.state_dict()
    assert zoo.mtp["deepseek_v3"] and "model.layers.3.mlp.experts.7.down_proj.weight" in zoo.mtp["deepseek_v3"]
    for name, tensor in zoo.mtp["deepseek_v3"].items():
        assert torch.equal(state[name], tensor), name

    save_hf_checkpoint(tmp_path / "out", state.items(), read_hf_config(source))
    saved, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(source / "model.safetensors")
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name


@torch.no_grad()
def test_deepseek_router_stays_fp32_in_a_bf16_model(zoo):
    native = zoo.load("deepseek_v3", dtype="bfloat16")
    gate = native.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert native.model.layers[1].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
    assert logits_of(native, random_ids(1, 6)).dtype == torch.bfloat16
