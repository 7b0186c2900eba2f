"""Prompt rendering against a real tokenizer with a ChatML template, checked to the exact id.

The tokenizer is byte-level BPE with no merges, so every byte is one token whose id is the byte
value, and the three special tokens follow at 256, 257, 258. `_ids` is that tokenizer written
out by hand: expected ids are plain bytes plus the specials.
"""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from miles_core.config import DataConfig
from miles_core.data import render_prompt, render_prompt_text
from miles_core.errors import MilesError

SPECIALS = {"<|im_start|>": 256, "<|im_end|>": 257, "<|endoftext|>": 258}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    # Unprintable bytes borrow the characters from 256 up, in byte order.
    shifted = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(shifted)})
    return table


def _make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    # A BOS on plain text, like Llama's: shows add_special_tokens on the plain path and its
    # absence on the chat path (the chat template, not the tokenizer, owns specials there).
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", SPECIALS["<|endoftext|>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _make_tokenizer(CHATML)


def _ids(text: str) -> list[int]:
    """Hand tokenisation: specials by table, everything else byte by byte."""
    ids: list[int] = []
    for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>)", text):
        ids.extend([SPECIALS[piece]] if piece in SPECIALS else piece.encode("utf-8"))
    return ids


def _check(prompt, tokenizer, cfg: DataConfig, expected_text: str) -> None:
    assert render_prompt_text(prompt, tokenizer, cfg) == expected_text
    ids = render_prompt(prompt, tokenizer, cfg)
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert ids == _ids(expected_text)


def test_hand_tokenisation_matches_the_tokenizer(tokenizer):
    text = "<|im_start|>user\nnaïve {x}<|im_end|>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == _ids(text)


def test_text_prompt_becomes_one_user_message(tokenizer):
    expected = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    _check("What is 2 + 2?", tokenizer, DataConfig(task="arithmetic"), expected)


def test_system_prompt_goes_first(tokenizer):
    cfg = DataConfig(task="arithmetic", system_prompt="You are exact.")
    expected = (
        "<|im_start|>system\nYou are exact.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    _check("hi", tokenizer, cfg, expected)


def test_prompt_template_leaves_braces_alone(tokenizer):
    # The template has literal braces too, and the user text has braces, '{0}' and even
    # '{prompt}': str.format would fail or substitute; only the template's {prompt} is replaced.
    cfg = DataConfig(task="arithmetic", prompt_template="Solve: {prompt}\nPut the answer in \\boxed{}.")
    user = 'Is {a} < {0}? JSON: {"k": [1]} and {prompt}'
    expected = (
        "<|im_start|>user\nSolve: " + user + "\nPut the answer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    _check(user, tokenizer, cfg, expected)


def test_messages_keep_their_own_system_message(tokenizer):
    cfg = DataConfig(task="arithmetic", system_prompt="Ignored.", prompt_template="X {prompt} X")
    messages = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "q {prompt}"}]
    expected = (
        "<|im_start|>system\nMine.<|im_end|>\n"
        "<|im_start|>user\nq {prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    _check(messages, tokenizer, cfg, expected)
    assert messages[0]["content"] == "Mine." and len(messages) == 2


def test_messages_without_system_get_the_system_prompt(tokenizer):
    cfg = DataConfig(task="arithmetic", system_prompt="Be brief.")
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )
    _check(messages, tokenizer, cfg, expected)
    assert len(messages) == 3


def test_plain_text_without_chat_template_adds_bos(tokenizer):
    cfg = DataConfig(
        task="arithmetic", apply_chat_template=False, system_prompt="unused", prompt_template="Q: {prompt}\nA:"
    )
    assert render_prompt_text("1 + {1}", tokenizer, cfg) == "Q: 1 + {1}\nA:"
    assert render_prompt("1 + {1}", tokenizer, cfg) == [SPECIALS["<|endoftext|>"], *_ids("Q: 1 + {1}\nA:")]


def test_messages_need_the_chat_template(tokenizer):
    cfg = DataConfig(task="arithmetic", apply_chat_template=False)
    with pytest.raises(MilesError, match="apply_chat_template = false"):
        render_prompt([{"role": "user", "content": "hi"}], tokenizer, cfg)


def test_tokenizer_without_chat_template_names_the_fix():
    bare = _make_tokenizer(None)
    with pytest.raises(MilesError, match=r"no chat template; set data\.apply_chat_template = false"):
        render_prompt("hi", bare, DataConfig(task="arithmetic"))
    # With the template switched off the same tokenizer works.
    cfg = DataConfig(task="arithmetic", apply_chat_template=False)
    assert render_prompt("hi", bare, cfg) == [SPECIALS["<|endoftext|>"], *b"hi"]


@pytest.mark.parametrize("prompt", [3, None, [], [{"role": "user"}]])
def test_bad_prompt(tokenizer, prompt):
    with pytest.raises(MilesError, match=r"prompt must be text or a list of \{role, content\} messages"):
        render_prompt(prompt, tokenizer, DataConfig(task="arithmetic"))
