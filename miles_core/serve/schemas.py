"""Request bodies of `miles serve`, as strict pydantic models: SGLang-native and OpenAI.

Field names follow SGLang (`io_struct.py`, `sampling_params.py`, `entrypoints/openai/protocol.py`)
and the OpenAI API. Models are strict (a string is not a number) and refuse unknown fields, so a
typo answers 400 instead of being ignored. Fields SGLang has but the native engine cannot honour
are not listed, so they are refused with a message instead of silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplingParams(Strict):
    """SGLang `sampling_params` (one dict, or one per prompt of a batch)."""

    max_new_tokens: int = Field(128, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    """-1 (or SGLang's 1 << 30) keeps every token."""
    n: int = Field(1, ge=1, le=1024)
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    sampling_seed: int | None = Field(None, ge=0, lt=2**63 - 1)
    """miles serve: sample j of the request draws from a stream seeded from (seed, j)."""


class GenerateBody(Strict):
    """SGLang `POST /generate` (`GenerateReqInput`)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    stream: bool = False


class AbortBody(Strict):
    rid: str = ""
    abort_all: bool = False


class UpdateFromDiskBody(Strict):
    """SGLang `UpdateWeightFromDiskReqInput` (the fields miles serve uses)."""

    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class UpdateFromTensorBody(Strict):
    """`serialized_named_tensors`: base64 strings, each a safetensors blob (never pickle)."""

    serialized_named_tensors: list[str]
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class PauseBody(Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class Empty(Strict):
    """Bodies of routes that take none (an empty body or `{}`)."""


# -- OpenAI --------------------------------------------------------------------------------------
class OpenAIBase(Strict):
    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63 - 1)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_routed_experts: bool = False


class CompletionBody(OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)
    chat_template_kwargs: dict[str, Any] | None = None
