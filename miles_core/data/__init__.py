"""Prompt data: datasets (jsonl/parquet files, built-in tasks) -> `Sample`s, and prompt -> token ids.

`load_prompts` reads the prompts named by a `DataConfig`; `render_prompt` turns one prompt into
the token ids the rollout engine starts from (prompt template, system prompt, chat template).
"""

from miles_core.data.chat import render_prompt, render_prompt_text
from miles_core.data.datasets import load_prompts

__all__ = ["load_prompts", "render_prompt", "render_prompt_text"]
