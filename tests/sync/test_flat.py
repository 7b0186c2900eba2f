"""Flattened buckets (`sync.flat`): SGLang's byte layout, packed and unpacked bitwise, including
1-byte tensors of odd size that leave later tensors unaligned."""

from __future__ import annotations

import torch

from miles_core.sync.flat import (MAX_LAYOUTS, FlatReceiver, FlatStaging, byte_sizes, signature,
                                  unflatten, unflatten_views)
from miles_core.utils.layout import aligned_offsets


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


def test_a_pack_through_cached_views_is_bitwise_for_any_source_layout():
    gen = torch.Generator().manual_seed(1)
    staging = FlatStaging(torch.device("cpu"))
    for round_ in range(3):  # rounds 2 and 3 copy through the views round 1 built
        tensors = _bucket()
        tensors[0] = torch.randn(5, 3, generator=gen).to(torch.bfloat16).t()  # not contiguous
        tensors[2] = torch.nn.Parameter(torch.randn(4, generator=gen))  # requires grad
        flat = staging.pack(tensors)
        assert torch.equal(flat, torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]))
        assert len(staging.layouts._layouts) == 1 and not flat.requires_grad
    # byte offsets 0, 30, 37, 53, 53, 56: the float32 tensors at 37 and 53 (empty) are raw byte slices
    assert staging.layouts.get(signature(tensors), None, None, lambda n: staging.buffer)[1].unaligned == [2, 3]


def test_the_views_follow_a_grown_buffer():
    staging = FlatStaging(torch.device("cpu"))
    small, big = [torch.full((3,), 1.5)], [torch.full((100,), 2.5)]
    staging.pack(small)
    assert torch.equal(staging.pack(big).view(torch.float32), big[0])  # grows: the old views are dropped
    assert torch.equal(staging.pack(small).view(torch.float32), small[0])
    assert staging.buffer.numel() == 400 and len(staging.layouts._layouts) == 2  # small again, then big


def test_aligned_offsets_and_the_layout_limit():
    # sizes 12, 8, 400 at 256-byte alignment: 0, 256, 512, ending at 912; align 1: back to back
    assert aligned_offsets([12, 8, 400], 256) == ([0, 256, 512], 912)
    assert aligned_offsets([12, 8, 400], 1) == ([0, 12, 20], 420)
    staging = FlatStaging(torch.device("cpu"), align=256, min_bytes=1 << 20)
    for size in range(1, MAX_LAYOUTS + 6):
        _, offsets = staging.pack_with_offsets([torch.ones(size), torch.ones(1, dtype=torch.int8)])
        assert offsets == [0, -(-size * 4 // 256) * 256]
    assert len(staging.layouts._layouts) == MAX_LAYOUTS and staging.buffer.numel() == 1 << 20


def test_the_receiver_reuses_one_buffer_and_its_views():
    tensors = _bucket()
    dtypes, shapes = [t.dtype for t in tensors], [list(t.shape) for t in tensors]
    receiver = FlatReceiver(torch.device("cpu"))
    for round_ in range(2):
        buffer, layout = receiver.buffer_for(dtypes, shapes)
        buffer.copy_(FlatStaging(torch.device("cpu")).pack(tensors))  # what a broadcast writes
        back = unflatten_views(layout, dtypes, shapes)
        for sent, got in zip(tensors, back):
            assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)
        assert back[0].data_ptr() == receiver.buffer.data_ptr()  # a view, not a fresh tensor
        tensors = [t + 1 if t.dtype != torch.bool else ~t for t in tensors]
    other, _ = receiver.buffer_for([torch.float32], [[3]])
    assert other.data_ptr() == receiver.buffer.data_ptr() and receiver.buffer.numel() == 88
