"""Low precision: block FP8 and group INT4 quantisation (pure math, `fp8.py`, `int4.py`), the
quantised checkpoint formats SGLang / vLLM / compressed-tensors read (`formats.py`), and INT4
quantisation-aware training with a straight-through estimator (`qat.py`).

Files are written by `checkpoint/quantize.py` (`miles quantize`); this package never does IO.
"""
