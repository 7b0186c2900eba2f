"""`data.fewshot_messages`: worked turns between the system prompt and every prompt's messages."""

from __future__ import annotations

import pytest

from miles_core.config import DataConfig, load_config
from miles_core.data.chat import render_prompt_text
from miles_core.errors import MilesError

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


class Tokenizer:
    chat_template = TEMPLATE

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs):
        return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + ("[assistant]" if add_generation_prompt else "")


def test_fewshot_turns_go_after_the_system_prompt():
    cfg = DataConfig(system_prompt="sys", fewshot_messages=({"role": "user", "content": "1+1?"},
                                                            {"role": "assistant", "content": "2"}))
    assert render_prompt_text("2+2?", Tokenizer(), cfg) == "[system] sys\n[user] 1+1?\n[assistant] 2\n[user] 2+2?\n[assistant]"
    own_system = [{"role": "system", "content": "mine"}, {"role": "user", "content": "3+3?"}]
    assert render_prompt_text(own_system, Tokenizer(), cfg) == \
        "[system] mine\n[user] 1+1?\n[assistant] 2\n[user] 3+3?\n[assistant]"


def test_bad_fewshot_entries_are_refused():
    with pytest.raises(MilesError, match=r"fewshot_messages entries must be \{role = '...', content = '...'\} tables"):
        load_config("tiny", ["data.fewshot_messages=[{role = 'user'}]"])
