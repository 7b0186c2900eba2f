"""Native Llama-family models against `transformers` on the same random weights.

Covers plain Llama, Llama 3.1 RoPE scaling, tied embeddings (SmolLM2), Qwen2 q/k/v bias and
Qwen3 q/k norm with an explicit head_dim; the KV-cache path (ragged prefill + token-by-token
decode) against the full forward; `build_model` errors; and `load_model` on a saved HF
directory (tied weights stay tied, logits match).
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from miles_core.config import ModelConfig
from miles_core.errors import MilesError
from miles_core.checkpoint.loading import load_model
from miles_core.models.registry import build_model

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
VARIANTS = {
    "llama": ("llama", {}),
    "llama31_rope": ("llama", {"rope_scaling": LLAMA31_ROPE}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": False}),
}


def hf_model(variant: str) -> torch.nn.Module:
    """A seeded tiny HF model whose every parameter is random and O(1)-effective: norms in
    [0.5, 1.5], biases non-zero, projections large enough that attention is far from uniform
    (so RoPE, bias or norm mistakes move the logits well past the tolerance)."""
    model_type, overrides = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    config._attn_implementation = "eager"  # the plainest reference implementation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.1)
    return model


def native_from(hf: torch.nn.Module) -> torch.nn.Module:
    """Native model built from the HF config; lm_head is left out of the state dict when tied,
    so a tie that does not hold leaves it random."""
    native = build_model(hf.config.to_dict())
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    result = native.load_state_dict(state, strict=False)
    expected_missing = ["lm_head.weight"] if hf.config.tie_word_embeddings else []
    assert (result.missing_keys, result.unexpected_keys) == (expected_missing, [])
    return native.eval()


def native_logits(model: torch.nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids_BT.shape[1])[None].expand_as(ids_BT)
    return model.lm_head(model(ids_BT, positions))


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers(variant):
    hf = hf_model(variant)
    native = native_from(hf)
    ids = random_ids(2, 96)  # positions past original_max_position_embeddings (64)
    theirs = hf(ids).logits
    ours = native_logits(native, ids)
    assert ours.shape == theirs.shape == (2, 96, VOCAB)
    assert theirs.abs().max() > 1.0  # logits are not all near zero, so 1e-4 is a real bound
    assert (ours - theirs).abs().max() < 1e-4


@torch.no_grad()
def test_each_variant_feature_changes_the_logits():
    """The parity test above can fail: every feature it covers moves the logits by >> 1e-4."""
    ids = random_ids(1, 96)

    def gap(variant: str, mutate) -> float:
        hf = hf_model(variant)
        native = native_from(hf)
        mutate(native)
        return float((native_logits(native, ids) - hf(ids).logits).abs().max())

    def default_rope(model):
        rotary = model.model.rotary_emb
        rotary.scaling = None
        rotary.reset_buffers()

    def zero_biases(model):
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()

    def unit_qk_norms(model):
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.fill_(1.0)

    def untie(model):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone() * 0.5)

    assert gap("llama31_rope", default_rope) > 1e-2
    assert gap("qwen2", zero_biases) > 1e-2
    assert gap("qwen3", unit_qk_norms) > 1e-2
    assert gap("llama_tied", untie) > 1e-2


@torch.no_grad()
def test_kv_cache_prefill_and_ragged_decode_match_full_forward():
    """Three sequences with different prompt lengths share one right-padded cache; each then
    decodes 6 tokens one at a time, so every decode step mixes three different positions."""
    native = native_from(hf_model("qwen3"))
    prompt_lens, num_decode = [3, 9, 5], 6
    sequences = [random_ids(1, n + num_decode, seed=10 + i)[0] for i, n in enumerate(prompt_lens)]
    reference = [native_logits(native, seq[None])[0] for seq in sequences]  # each alone, (T, V)

    width = max(prompt_lens)
    prefix = torch.zeros(3, width, dtype=torch.long)  # right padding with token 0
    for row, (seq, n) in enumerate(zip(sequences, prompt_lens)):
        prefix[row, :n] = seq[:n]
    cache = native.new_kv_cache(3, width + num_decode)
    hidden = native(prefix, torch.arange(width)[None].expand(3, -1), cache)
    for row, n in enumerate(prompt_lens):
        diff = (native.lm_head(hidden[row, :n]) - reference[row][:n]).abs().max()
        assert diff < 1e-5, f"prefill row {row}: {diff}"

    for step in range(num_decode):
        positions = torch.tensor([[n + step] for n in prompt_lens])  # (3, 1)
        tokens = torch.stack([seq[n + step] for seq, n in zip(sequences, prompt_lens)])[:, None]
        logits = native.lm_head(native(tokens, positions, cache))[:, 0]  # (3, V)
        for row, n in enumerate(prompt_lens):
            diff = (logits[row] - reference[row][n + step]).abs().max()
            assert diff < 1e-5, f"decode step {step} row {row}: {diff}"


def test_build_model_rejects_unknown_model_type():
    with pytest.raises(MilesError) as err:
        build_model({**BASE, "model_type": "mistral"})
    assert str(err.value) == "unknown model_type 'mistral'; expected one of: deepseek_v3, llama, qwen2, qwen3, qwen3_moe"
    with pytest.raises(MilesError, match="unknown model_type '<missing>'; expected one of: deepseek_v3, llama, qwen2, qwen3, qwen3_moe"):
        build_model(BASE)


def save_with_tokenizer(model: torch.nn.Module, out_dir) -> None:
    """A HF directory that `load_model` accepts: weights, config and a word-level tokenizer."""
    model.save_pretrained(out_dir)
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t2", pad_token="t0").save_pretrained(out_dir)


@torch.no_grad()
def test_load_model_keeps_tied_weights_tied_and_matches_transformers(tmp_path):
    hf = hf_model("llama_tied")
    save_with_tokenizer(hf, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True

    loaded = load_model(ModelConfig(source=str(tmp_path / "ckpt"), device="cpu"))
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert loaded.eos_token_ids == frozenset({2})
    assert loaded.device == torch.device("cpu")

    ids = random_ids(2, 40)
    assert (native_logits(model, ids) - hf(ids).logits).abs().max() < 1e-4
    # Still one tensor: an update through the embedding shows in the output layer.
    model.model.embed_tokens.weight.mul_(2.0)
    assert torch.equal(model.lm_head.weight, 2.0 * hf.lm_head.weight)
