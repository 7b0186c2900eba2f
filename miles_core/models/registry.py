"""HF `model_type` -> native model class. Exact keys only: no substring matching on names."""

from __future__ import annotations

from typing import Any

from torch import nn

from miles_core.errors import one_of
from miles_core.models.deepseek_v3 import DeepseekV3Args, DeepseekV3ForCausalLM
from miles_core.models.llama import LlamaArgs, LlamaForCausalLM
from miles_core.models.qwen3_moe import Qwen3MoeArgs, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {
    "llama": (LlamaArgs, LlamaForCausalLM),
    "qwen2": (LlamaArgs, LlamaForCausalLM),
    "qwen3": (LlamaArgs, LlamaForCausalLM),
    "qwen3_moe": (Qwen3MoeArgs, Qwen3MoeForCausalLM),
    "deepseek_v3": (DeepseekV3Args, DeepseekV3ForCausalLM),
}


def build_model(hf_config: dict[str, Any]) -> nn.Module:
    """Construct the native model for a HF config (weights uninitialised: on `meta` if asked)."""
    model_type = hf_config.get("model_type", "<missing>")
    if model_type not in MODEL_REGISTRY:
        raise one_of("model_type", model_type, MODEL_REGISTRY)
    args_cls, model_cls = MODEL_REGISTRY[model_type]
    return model_cls(args_cls.from_hf_config(hf_config))
