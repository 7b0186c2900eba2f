"""Flattened buckets (`sync.flat`): SGLang's byte layout, packed and unpacked bitwise, including
1-byte tensors of odd size that leave later tensors unaligned."""

from __future__ import annotations

import torch

from miles_core.sync.flat import FlatStaging, byte_sizes, unflatten


def _bucket() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 5, generator=gen).to(torch.bfloat16),  # 30 bytes
        torch.randint(-100, 100, (7,), generator=gen, dtype=torch.int8),  # 7 bytes: the next offset is odd
        torch.randn(4, generator=gen),  # float32 at byte 37: copied, not viewed
        torch.ones(0, 2),  # empty
        torch.tensor([True, False, True]),
        torch.randn(2, 2, generator=gen, dtype=torch.float64),
    ]


def test_the_layout_is_every_tensors_bytes_back_to_back():
    tensors = _bucket()
    flat = FlatStaging(torch.device("cpu")).pack(tensors)
    sizes = [t.numel() * t.element_size() for t in tensors]
    assert sizes == [30, 7, 16, 0, 3, 32] == byte_sizes([t.dtype for t in tensors], [list(t.shape) for t in tensors])
    assert flat.dtype == torch.uint8 and flat.numel() == 88
    assert torch.equal(flat[30:37], tensors[1].view(torch.uint8))
    assert torch.equal(flat[37:53], tensors[2].view(torch.uint8))


def test_unflatten_gives_back_every_tensor_bitwise():
    tensors = _bucket()
    flat = FlatStaging(torch.device("cpu")).pack(tensors).clone()
    back = unflatten(flat, [t.dtype for t in tensors], [list(t.shape) for t in tensors])
    for sent, got in zip(tensors, back):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), sent.reshape(-1).view(torch.uint8))
    assert back[0].data_ptr() == flat.data_ptr()  # aligned: a view, no copy
    assert back[2].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()  # unaligned: a copy


def test_the_staging_buffer_is_reused_and_grows_only_when_needed():
    staging = FlatStaging(torch.device("cpu"))
    big = staging.pack([torch.zeros(100)])
    pointer = staging.buffer.data_ptr()
    small = staging.pack([torch.ones(10)])
    assert staging.buffer.data_ptr() == pointer and small.data_ptr() == big.data_ptr()
    staging.pack([torch.ones(200)])
    assert staging.buffer.numel() == 800
