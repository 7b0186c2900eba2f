"""The `openai` Python client against `miles serve`: models, completions, chat (plain and
streaming, with log-probs)."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture
def oai(served):
    client = openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", timeout=60, max_retries=0)
    yield client
    client.close()


def test_models_and_completions(oai, served):
    models = oai.models.list()
    assert [m.id for m in models.data] == [served[1].model_name]
    done = oai.completions.create(model=models.data[0].id, prompt="1 + 1 =", max_tokens=3, seed=1, logprobs=0)
    assert done.choices[0].finish_reason == "length" and len(done.choices[0].logprobs.token_logprobs) == 3
    assert done.usage.completion_tokens == 3


def test_chat_completion_with_logprobs_and_seed(oai):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    first = oai.chat.completions.create(model="m", messages=messages, max_tokens=5, seed=4, n=2, logprobs=True)
    again = oai.chat.completions.create(model="m", messages=messages, max_tokens=5, seed=4, n=2, logprobs=True)
    assert len(first.choices) == 2 and first.choices[0].message.role == "assistant"
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len(first.choices[0].logprobs.content) == 5
    assert first.usage.completion_tokens == 10


def test_chat_streaming_matches_the_plain_answer(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = oai.chat.completions.create(model="m", messages=messages, max_tokens=4, seed=9)
    stream = oai.chat.completions.create(model="m", messages=messages, max_tokens=4, seed=9, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4


def test_bad_requests_raise_the_clients_error(oai):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=-1)
