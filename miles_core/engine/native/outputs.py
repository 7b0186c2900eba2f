"""When a sequence stops, and the `Generation` it becomes (SGLang's finish reasons and text trim).

Finish reasons: `{"type": "stop", "matched": token id | stop string}`, `{"type": "length",
"length": N}` and `{"type": "abort", "message": ...}`.
"""

from __future__ import annotations

import numpy as np

from miles_core.engine.native.sequence import Sequence
from miles_core.engine.protocol import Generation


def finish_reason(seq: Sequence, token: int, eos_token_ids: frozenset[int], tokenizer) -> dict | None:
    """Why `seq` stops after appending `token`, or None to go on."""
    sampling = seq.request.sampling
    if token in eos_token_ids or token in sampling.stop_token_ids:
        return {"type": "stop", "matched": token}
    if sampling.stop:
        # Every token decodes to at least one byte, so a stop string of b UTF-8 bytes lies
        # within the last b + 1 tokens (the first may carry bytes before the match).
        window = max(len(s.encode("utf-8")) for s in sampling.stop) + 1
        tail = tokenizer.decode(seq.output_ids[-window:], skip_special_tokens=False)
        for stop in sampling.stop:
            if stop in tail:
                return {"type": "stop", "matched": stop}
    num_output = seq.length - seq.prompt_len  # not len(seq.output_ids): a copy per row and step
    if num_output >= seq.max_new_tokens:
        return {"type": "length", "length": num_output}
    return None


def response_text(tokenizer, output_ids: list[int], finish_reason: dict) -> str:
    """Like SGLang (no_stop_trim off): the text leaves out a matched stop token or string;
    output_ids keep the stop token, which training must see."""
    matched = finish_reason.get("matched")
    shown = output_ids[:-1] if isinstance(matched, int) else output_ids
    text = tokenizer.decode(shown, skip_special_tokens=True)
    return text[: text.index(matched)] if isinstance(matched, str) and matched in text else text


def to_generation(seq: Sequence, tokenizer, weight_version: str, capture_routing: bool) -> Generation:
    output_ids = seq.output_ids
    text = response_text(tokenizer, output_ids, seq.finish_reason)
    routed = None
    if capture_routing:
        # Every token fed has its experts: all but the last one sampled (length - 1 rows).
        routed = np.concatenate(seq.routing)[: seq.length - 1] if seq.routing else None
    return Generation(
        output_ids=list(output_ids), output_logprobs=list(seq.logprobs), finish_reason=seq.finish_reason,
        text=text, prompt_tokens=seq.prompt_len, weight_version=weight_version, routed_experts=routed,
    )
