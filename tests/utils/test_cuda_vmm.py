"""`utils.cuda_vmm.Region` (GPU): pages given back by `unmap` and taken again by `map` at the same
address, and the whole region given back to the driver only once no tensor views it."""

from __future__ import annotations

import gc

import pytest
import torch

GIB = 1 << 30


def _free() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def _view(region, count: int) -> torch.Tensor:
    storage = region.tensor.untyped_storage()
    return torch.empty(0, dtype=torch.float32, device=region.device).set_(storage, 0, (count,), (1,))


@pytest.mark.gpu
def test_unmap_gives_the_pages_back_and_map_puts_new_ones_at_the_same_address():
    from miles_core.utils.cuda_vmm import Region

    start = _free()
    region = Region(GIB, torch.device("cuda"))
    assert start - _free() >= GIB and region.nbytes >= GIB
    view = _view(region, 1024)
    address = view.data_ptr()
    region.unmap()
    assert not region.mapped and _free() >= start - GIB // 64  # the pages went to the driver
    region.map()
    view.fill_(2.0)
    assert region.mapped and view.data_ptr() == address and view.sum().item() == 2048.0
    del region, view


@pytest.mark.gpu
def test_a_region_is_given_back_once_no_tensor_views_it():
    from miles_core.utils.cuda_vmm import Region

    start = _free()
    region = Region(GIB, torch.device("cuda"))
    view = _view(region, 1024)
    view.fill_(3.0)
    del region  # a tensor placed in it still reads there: the pages must stay
    assert start - _free() >= GIB
    assert view.sum().item() == 3072.0
    del view
    assert _free() >= start - GIB // 64
