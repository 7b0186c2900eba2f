"""`f1` reward: SQuAD-style token F1 between the response and the label.

Both texts are normalised as the SQuAD v1.1 evaluation script does (lowercase, punctuation
removed, articles a/an/the removed, whitespace collapsed), split on whitespace, and scored by
the F1 of their token multisets. A list or tuple label holds several acceptable answers and
the best F1 counts, as SQuAD scores against multiple references.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from miles_core.errors import MilesError
from miles_core.sample import Sample

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def f1_reward(sample: Sample) -> float:
    """Token F1 in [0, 1] between `sample.response` and the label (best over a list label)."""
    labels = sample.label if isinstance(sample.label, (list, tuple)) else [sample.label]
    if not labels or any(label is None or isinstance(label, bool) for label in labels):
        raise MilesError(f"f1 reward needs a str/number label or a non-empty list of them, got {sample.label!r}")
    return max(token_f1(sample.response, str(label)) for label in labels)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised token multisets; two empty texts score 1, one empty text 0."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)
