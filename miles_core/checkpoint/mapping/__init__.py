"""HF <-> megatron-core name maps, one module per family, dispatched by exact HF `model_type`.

`base` holds the shared pieces (slots, key-map expansion, the named tensor transforms); each
family module declares its key maps and how its HF config and megatron's arguments translate.
"""

from __future__ import annotations

from miles_core.checkpoint.mapping import deepseek_v3, llama, qwen3_moe
from miles_core.checkpoint.mapping.base import Family, Link, Plan, Slot, plan
from miles_core.errors import one_of

FAMILIES: dict[str, Family] = {
    model_type: module.FAMILY
    for module in (llama, qwen3_moe, deepseek_v3)
    for model_type in module.FAMILY.model_types
}


def family_for(model_type: str) -> Family:
    """The family of an exact HF `model_type`; anything else is a MilesError listing the known ones."""
    if model_type not in FAMILIES:
        raise one_of("model_type", model_type, FAMILIES)
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "Link", "Plan", "Slot", "family_for", "plan"]
