"""Per-sequence uniform streams: torch's CPU generator reproduced with Python's `random`, for speed.

Each sequence draws one uniform number per sampled token from its own stream seeded with
`sample_seed(request seed, j)`, so its tokens do not depend on its batch. The numbers are those of
`torch.rand(1, generator=torch.Generator().manual_seed(seed))`, draw after draw; reading them
through torch cost about 2 us of dispatch per row and step (0.8 ms a step at 256 rows on an H100
host). torch's CPU generator is a 32-bit Mersenne Twister (MT19937, `at::mt19937`), the same
generator as Python's `random.Random`: given torch's 624 state words, `getrandbits(32)` yields
torch's 32-bit outputs, at about 0.1 us each, and a float32 uniform is torch's
`uniform_real_distribution<float>`: the output's low 24 bits times 2^-24 (exact in float32).
`uniforms` calls `getrandbits` through `map` with no Python frame per row (11 us for 256 rows
on a desktop CPU, against 15 us through a generator expression).

Seeding: torch seeds MT19937 with the seed's low 32 bits (`init_with_uint32`: Knuth's
recurrence). The words are read from the generator's state (`get_state`: the legacy CPU state
layout, 624 words as uint64 after a 24-byte header), checked once against `mt19937_words`, the
recurrence in Python (100 us a seed); if a torch build ever lays its state out otherwise, the
recurrence is used instead. `tests/engine/test_streams.py` checks the draws against torch's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import repeat

import numpy as np
import torch

STATE_WORDS = 624
_HEADER_BYTES = 24  # the_initial_seed (u64), left (i32), seeded (i32), next (u64)
_FLOAT_BITS = 24  # float32 mantissa digits: torch keeps this many bits of each 32-bit draw
_layout_ok: bool | None = None


def mt19937_words(seed: int) -> list[int]:
    """MT19937's state after torch's `manual_seed(seed)` (Knuth's initialisation, low 32 bits)."""
    words = [seed & 0xFFFFFFFF]
    for j in range(1, STATE_WORDS):
        prev = words[-1]
        words.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return words


def _torch_words(seed: int) -> list[int] | None:
    """The state words read from a freshly seeded torch generator, or None if its layout differs."""
    state = torch.Generator().manual_seed(seed).get_state().numpy()
    if state.size < _HEADER_BYTES + 8 * STATE_WORDS:
        return None
    header = np.frombuffer(state.tobytes()[:_HEADER_BYTES], dtype=np.int64)
    if header[0] != seed % 2**64 or header[2] != 0:  # the seed, then `next` == 0 after seeding
        return None
    return np.frombuffer(state.data, dtype=np.uint64, count=STATE_WORDS, offset=_HEADER_BYTES).tolist()


def torch_stream(seed: int) -> random.Random:
    """A stream whose `getrandbits(32)` draws are those of torch's CPU generator seeded with `seed`."""
    global _layout_ok
    if _layout_ok is None:
        _layout_ok = _torch_words(12345) == mt19937_words(12345)
    words = _torch_words(seed) if _layout_ok else None
    stream = random.Random()
    # Index 624: the next draw regenerates the state first, as torch's first draw after seeding does.
    stream.setstate((3, tuple(words or mt19937_words(seed)) + (STATE_WORDS,), None))
    return stream


def uniforms(streams: Sequence[random.Random]) -> torch.Tensor:
    """One float32 uniform in [0, 1) from each stream: `torch.rand(1, generator=...)`'s numbers."""
    bits = np.fromiter(map(random.Random.getrandbits, streams, repeat(32)), dtype=np.uint32, count=len(streams))
    mantissa = (bits & np.uint32((1 << _FLOAT_BITS) - 1)).astype(np.float32)
    return torch.from_numpy(mantissa * np.float32(2.0**-_FLOAT_BITS))
