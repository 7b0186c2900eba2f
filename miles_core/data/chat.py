"""Prompt -> token ids: the prompt template, the system prompt and the tokenizer's chat template.

This is the one place a prompt is turned into the token ids the engine starts from; the response
ids then come from the engine and are never re-tokenised. A prompt is either text or a list of
chat messages ({"role": str, "content": str, ...}); `prompt_problem` is the shared check.

Text prompts first go through `DataConfig.prompt_template`, where only the literal `{prompt}` is
replaced: prompts full of braces (code, LaTeX, JSON) pass through unchanged, and so do braces in
the template itself. With `apply_chat_template`, text becomes one user message; the system prompt
is put first unless the messages already have one. Without it, text is tokenised as is, with the
tokenizer's special tokens (BOS) added, and message lists are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from miles_core.config import DataConfig
from miles_core.errors import MilesError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[dict[str, Any]]
Messages = list[dict[str, Any]]


def render_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[int]:
    """Token ids of the prompt as the model sees it, ending where the response starts."""
    rendered = _prepare(prompt, tokenizer, cfg)
    if isinstance(rendered, str):
        return [int(i) for i in tokenizer(rendered, add_special_tokens=True)["input_ids"]]
    # transformers 5 returns a BatchEncoding for tokenize=True; 4.x a list unless return_dict.
    # Asking for the dict explicitly gives the same shape on both.
    encoded = tokenizer.apply_chat_template(
        rendered, add_generation_prompt=True, tokenize=True, return_dict=True, **cfg.chat_template_kwargs
    )
    return [int(i) for i in encoded["input_ids"]]


def render_prompt_text(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    """The rendered prompt as text, for display and logs (special tokens the tokenizer adds on
    its own, such as a BOS for plain text, are not shown)."""
    rendered = _prepare(prompt, tokenizer, cfg)
    if isinstance(rendered, str):
        return rendered
    return tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False,
                                         **cfg.chat_template_kwargs)


def prompt_problem(prompt: Any) -> str:
    """Why `prompt` is neither text nor a list of {role, content} messages; "" if it is one."""
    if isinstance(prompt, str):
        return ""
    if not isinstance(prompt, list):
        return f"got {type_name(prompt)}"
    if not prompt:
        return "got an empty list"
    for number, message in enumerate(prompt):
        problem = _message_problem(message)
        if problem:
            return f"but message {number} {problem}"
    return ""


def type_name(value: Any) -> str:
    """JSON-ish name of a value's type for error messages (`null` rather than `NoneType`)."""
    return "null" if value is None else type(value).__name__


def _message_problem(message: Any) -> str:
    if not isinstance(message, dict):
        return f"is {type_name(message)}, not a dict"
    for key in ("role", "content"):
        if key not in message:
            return f"has no '{key}'"
        if not isinstance(message[key], str):
            return f"has '{key}' of type {type_name(message[key])}, expected text"
    return ""


def _prepare(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str | Messages:
    """Text to tokenise as is, or messages to render with the chat template."""
    problem = prompt_problem(prompt)
    if problem:
        raise MilesError(f"prompt must be text or a list of {{role, content}} messages, {problem}")
    if isinstance(prompt, str):
        text = cfg.prompt_template.replace("{prompt}", prompt)
        if not cfg.apply_chat_template:
            return text
        messages = [{"role": "user", "content": text}]
    elif not cfg.apply_chat_template:
        raise MilesError(
            "prompt is a list of chat messages but data.apply_chat_template = false; "
            "set it to true or give text prompts"
        )
    else:
        messages = list(prompt)
    _require_chat_template(tokenizer)
    if cfg.fewshot_messages:  # after any system message, before the prompt's own turns
        system = [m for m in messages[:1] if m["role"] == "system"]
        messages = [*system, *(dict(m) for m in cfg.fewshot_messages), *messages[len(system):]]
    return _with_system_prompt(messages, cfg.system_prompt)


def _with_system_prompt(messages: Messages, system_prompt: str) -> Messages:
    # A system message already in the data was written for that prompt: it wins.
    if not system_prompt or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise MilesError(
        f"tokenizer '{name}' has no chat template; set data.apply_chat_template = false "
        "to tokenise text prompts as plain text"
    )
