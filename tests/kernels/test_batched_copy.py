"""The batched copy of the engine's weight updates: its chunk table by hand on CPU; on a GPU, a
mix of pairs the kernel takes and pairs it leaves to torch, copied bitwise, with the plan kept
and its launch replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from miles_core.kernels.batched_copy import BatchedCopier, chunk_table, plan_copies


def test_chunk_table_cuts_each_copy_into_chunks_of_at_most_the_chunk():
    # 10 words in chunks of 4: 4 + 4 + 2; 3 words: one chunk; byte addresses advance 8 a word
    table = chunk_table([1000, 5000], [2000, 9000], [10, 3], chunk=4)
    assert table.tolist() == [[1000, 2000, 4], [1032, 2032, 4], [1064, 2064, 2], [5000, 9000, 3]]


def test_without_a_gpu_every_pair_is_left_to_torch_and_copied():
    destinations, sources = [torch.zeros(3), torch.zeros(2, 2)], [torch.ones(3), torch.full((2, 2), 2.0)]
    assert plan_copies(destinations, sources).table is None
    BatchedCopier().copy(destinations, sources, key=("k",))
    assert destinations[0].tolist() == [1.0] * 3 and destinations[1].tolist() == [[2.0, 2.0]] * 2


@pytest.mark.gpu
def test_a_mix_of_pairs_is_copied_bitwise_in_one_launch_and_the_rest():
    generator = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(3 * 8192 * 4 + 12, device="cuda", generator=generator).bfloat16()  # 3+ chunks
    fused = torch.empty(6, 64, device="cuda", dtype=torch.bfloat16)
    sources = [big, torch.randn(2, 64, device="cuda", generator=generator).bfloat16(),  # into a view
               torch.randint(0, 255, (7,), device="cuda", dtype=torch.uint8),          # 7 bytes: torch
               torch.randn(5, 4, device="cuda", generator=generator),                  # fp32 -> bf16: torch
               torch.randn(4, 5, device="cuda", generator=generator).t()]              # not contiguous: torch
    destinations = [torch.empty_like(big), fused[2:4], torch.empty(7, device="cuda", dtype=torch.uint8),
                    torch.empty(5, 4, device="cuda", dtype=torch.bfloat16), torch.empty(5, 4, device="cuda")]
    plan = plan_copies(destinations, sources)
    assert plan.rest == [2, 3, 4] and plan.table.shape[0] == 4 + 1
    copier = BatchedCopier()
    for _ in range(4):  # launched twice, then replayed from a CUDA graph: each copy reads the bytes of now
        for tensor in destinations:
            tensor.zero_()
        for tensor in sources:
            tensor.add_(1)
        copier.copy(destinations, sources, key=("same",))
        torch.cuda.synchronize()
        for destination, source in zip(destinations, sources):
            expected = torch.empty_like(destination).copy_(source)
            assert torch.equal(destination.view(torch.uint8), expected.view(torch.uint8))
    assert len(copier._plans) == 1 and isinstance(copier._last[2].graph, torch.cuda.CUDAGraph)
