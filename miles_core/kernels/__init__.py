"""Numerical kernels with a plain-PyTorch reference next to every fast path (DESIGN principle 6)."""
