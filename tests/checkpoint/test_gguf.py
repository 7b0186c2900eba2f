"""GGUF import: synthetic llama.cpp-style files from tiny seeded HF models come back as the
same weights (F32 bitwise, Q8_0 within quantisation error) and the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from miles_core.checkpoint.gguf import gguf_to_hf, permute_rotary, unpermute_rotary
from miles_core.checkpoint.hf import load_state_dict, load_weights_into, read_hf_config
from miles_core.errors import MilesError
from miles_core.models.registry import build_model

MODELS = {
    # llama: tied embeddings and GQA, so both the Q and the K permutation are exercised.
    "llama": dict(tie_word_embeddings=True),
    # qwen2: q/k/v biases, untied lm_head.
    "qwen2": dict(tie_word_embeddings=False),
    # qwen3: q/k norms and a head_dim (32) unlike hidden_size / heads (16).
    "qwen3": dict(tie_word_embeddings=False, head_dim=32),
}
INPUT_IDS = torch.tensor([[1, 60, 61, 62, 3, 200, 7, 2, 1, 90, 255]])


def native_logits(model_dir) -> torch.Tensor:
    model = build_model(read_hf_config(model_dir))
    load_weights_into(model, model_dir)
    model.eval()
    with torch.no_grad():
        positions = torch.arange(INPUT_IDS.shape[1])[None]
        return model.lm_head(model(INPUT_IDS, positions))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_rotary_permutation_by_hand():
    # One head of dim 4, rows (x0, x1, y0, y1) = 0, 1, 2, 3: llama.cpp stores pairs (x0, y0, x1, y1).
    rows = np.arange(4, dtype=np.float32)[:, None]
    assert permute_rotary(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]
    # Two heads of dim 4, with a column dimension carried along.
    rows = np.arange(16, dtype=np.float32).reshape(8, 2)
    assert permute_rotary(rows, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    assert np.array_equal(unpermute_rotary(permute_rotary(rows, 2), 2), rows)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_f32_gguf_round_trips_bitwise(tmp_path, arch, make_hf_model, make_gguf):
    model = make_hf_model(arch, **MODELS[arch])
    path = make_gguf(model, tmp_path / f"{arch}.gguf", arch)
    out = gguf_to_hf(path, tmp_path / "hf")

    expected = {k: v for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    loaded = load_state_dict(out)
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

    config = read_hf_config(out)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(model.config, key), key
    default_head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert config.get("head_dim", default_head_dim) == getattr(model.config, "head_dim", default_head_dim)
    assert config["model_type"] == arch and config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"

    assert (native_logits(out) - hf_logits(model)).abs().max() < 1e-5


def test_q8_0_gguf_matches_dequantised_weights(tmp_path, make_hf_model, make_gguf):
    from transformers import AutoModelForCausalLM

    model = make_hf_model("llama", tie_word_embeddings=False)
    path = make_gguf(model, tmp_path / "q8.gguf", "llama", GGMLQuantizationType.Q8_0)
    out = gguf_to_hf(path, tmp_path / "hf")
    loaded = load_state_dict(out)
    q8 = GGMLQuantizationType.Q8_0
    for name, tensor in model.state_dict().items():
        original = tensor.numpy()
        if original.ndim == 1:
            assert torch.equal(loaded[name], tensor), name
            continue
        # Row permutation commutes with row-wise block quantisation: exact after undoing it.
        assert np.array_equal(loaded[name].numpy(), dequantize(quantize(original, q8), q8)), name
        # Blocks of 32 with scale max|x|/127: error at most half a step (weights ~N(0, 0.05)).
        assert np.abs(loaded[name].numpy() - original).max() < 1e-3, name

    ours = native_logits(out)
    original_logits = hf_logits(model)
    # Quantisation noise only: a few percent of the logit range (a wrong tensor gives ~100%).
    assert (ours - original_logits).abs().max() < 0.03 * original_logits.abs().max()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32)
    assert (ours - hf_logits(reference)).abs().max() < 1e-5


def test_tokenizer_and_generation_config(tmp_path, make_hf_model, make_gguf):
    from transformers import AutoTokenizer

    path = make_gguf(make_hf_model("qwen2"), tmp_path / "m.gguf", "qwen2")
    out = gguf_to_hf(path, tmp_path / "hf")
    ours = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    messages = [{"role": "user", "content": "the heat"}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a test bot.<|im_end|>\n"
                    "<|im_start|>user\nthe heat<|im_end|>\n<|im_start|>assistant\n")
    assert ours(text).input_ids == reference(text).input_ids
    assert ours.decode(ours(text).input_ids) == text
    assert (ours.eos_token, ours.bos_token) == ("<|im_end|>", "<|im_start|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def write_raw_gguf(path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    writer = GGUFWriter(path, arch)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture_is_named(tmp_path):
    write_raw_gguf(tmp_path / "g.gguf", "gemma2", {"token_embd.weight": np.zeros((4, 8), dtype=np.float32)})
    with pytest.raises(MilesError, match="architecture 'gemma2' .* expected one of: llama, qwen2, qwen3"):
        gguf_to_hf(tmp_path / "g.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unmapped_tensor_is_named(tmp_path):
    # Llama 3.1 files carry rope frequency factors, which this importer does not translate.
    write_raw_gguf(tmp_path / "extra.gguf", "llama", {
        "token_embd.weight": np.zeros((8, 4), dtype=np.float32),
        "rope_freqs.weight": np.ones(2, dtype=np.float32),
    })
    with pytest.raises(MilesError, match="tensor 'rope_freqs.weight' in '.*extra.gguf' has no HF equivalent"):
        gguf_to_hf(tmp_path / "extra.gguf", tmp_path / "hf")


def test_truncated_gguf_names_the_file(tmp_path, make_hf_model, make_gguf):
    path = make_gguf(make_hf_model("llama"), tmp_path / "m.gguf", "llama")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(MilesError, match="cannot read GGUF file '.*m.gguf'"):
        gguf_to_hf(path, tmp_path / "hf")
    with pytest.raises(MilesError, match="GGUF file '.*missing.gguf' does not exist"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "hf")
