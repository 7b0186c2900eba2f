"""`NativeEngine.release_memory` / `resume_memory` (engine.colocate): the KV pool is freed, the
weights go to host memory and come back bitwise, generations after resume equal those before,
generation is refused while released, and release waits for no one (refused when busy). A
release that drops the weights keeps only the RoPE frequencies and refuses generation, naming
what is missing, until updates wrote every weight again. The GPU tests check what only CUDA
shows: the allocator's drop and captured graphs after resume."""

from __future__ import annotations

import pytest
import torch

from miles_core.engine.native.engine import EngineReleased
from miles_core.engine.native.fuse import fuse_projections
from miles_core.engine.native.stable_memory import unwritten_spans
from miles_core.errors import MilesError
from miles_core.models.base import named_weights
from paged_helpers import model_for, paged, prompts, requests


def _state(engine) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in named_weights(engine.model, remove_duplicate=False)}


def _tokens(engine, reqs) -> list[list[tuple[int, ...]]]:
    return [[tuple(g.output_ids) + tuple(g.output_logprobs) for g in gens] for gens in engine.generate(reqs)]


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_release_then_resume_gives_the_same_weights_and_generations(mode):
    engine = paged(model_for("qwen3", mode), block_size=16, num_kv_blocks=40, return_routed_experts=False)
    reqs = requests(prompts(3, seed=4), n=2, max_new_tokens=10)
    before, weights = _tokens(engine, reqs), _state(engine)
    pool_bytes = engine.pool.num_bytes
    # (40 + 1 null) blocks x 16 tokens x 2 kv heads x (16 + 16 dims) x 4 bytes x 2 layers, K and V
    assert pool_bytes == 41 * 16 * 2 * (16 + 16) * 4 * 2 == 335_872
    stats = engine.release_memory()
    assert engine.released and engine.pool.num_bytes == 0
    assert stats["kv_cache_bytes"] == pool_bytes
    assert stats["weights_bytes"] == sum(p.numel() * 4 for p in engine.model.parameters()) + \
        sum(b.numel() * b.element_size() for b in engine.model.buffers())
    assert stats["gpu_freed_bytes"] == 0  # CPU: nothing is measured by the CUDA allocator
    engine.resume_memory()
    assert not engine.released and engine.pool.num_bytes == pool_bytes
    after = _state(engine)
    assert all(torch.equal(after[name], weights[name]) for name in weights)
    assert _tokens(engine, reqs) == before


def test_generation_is_refused_while_released_and_waits_in_the_background_loop():
    engine = paged(model_for("qwen3"), block_size=16, num_kv_blocks=40)
    reqs = requests(prompts(1, seed=2), n=1, max_new_tokens=4)
    expected = _tokens(engine, reqs)
    engine.release_memory()
    with pytest.raises(EngineReleased, match="memory is released.*resume_memory"):
        engine.generate(reqs)
    assert engine.step() is False  # nothing runs on the freed pool
    engine.resume_memory()
    assert _tokens(engine, reqs) == expected


def test_release_is_refused_while_requests_are_in_flight_and_twice_is_harmless():
    engine = paged(model_for("qwen3"), block_size=16, num_kv_blocks=40)
    handle = engine.submit(requests(prompts(1, seed=3), n=2, max_new_tokens=6)[0])
    engine.step()
    with pytest.raises(MilesError, match="release_memory: 1 requests are in flight"):
        engine.release_memory()
    while not handle.done:
        engine.step()
    first = engine.release_memory()
    assert engine.release_memory() == {"kv_cache_bytes": 0, "weights_bytes": 0, "weights_dropped_bytes": 0,
                                       "gpu_freed_bytes": 0}
    assert first["kv_cache_bytes"] > 0
    engine.resume_memory()
    engine.resume_memory()  # a second resume changes nothing
    assert not engine.released


def test_fused_projections_are_views_of_the_fused_weight_again_after_resume():
    engine = paged(model_for("qwen3", "fast"), block_size=16, num_kv_blocks=40, return_routed_experts=False)
    fuse_projections(engine.model)  # what the engine does on CUDA
    reqs = requests(prompts(2, seed=5), n=1, max_new_tokens=6)
    before, weights = _tokens(engine, reqs), _state(engine)
    engine.release_memory()
    attn = engine.model.model.layers[0].self_attn
    assert attn.fused_qkv is None  # unfused before the move
    engine.resume_memory()
    fused_weight = attn.fused_qkv[0]
    rows = attn.q_proj.weight.shape[0]
    assert attn.k_proj.weight.data_ptr() == fused_weight[rows:].data_ptr()
    mlp = engine.model.model.layers[0].mlp
    assert mlp.up_proj.weight.data_ptr() == mlp.fused_gate_up[mlp.gate_proj.weight.shape[0]:].data_ptr()
    assert all(torch.equal(_state(engine)[name], weights[name]) for name in weights)
    assert _tokens(engine, reqs) == before


def test_tied_embeddings_stay_one_tensor():
    model = model_for("qwen3")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    engine = paged(model, block_size=16, num_kv_blocks=40)
    engine.release_memory()
    engine.resume_memory()
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight


def _inv_freq_bytes(engine) -> int:
    return sum(b.numel() * b.element_size() for m in engine.model.modules() for n, b in m._buffers.items()
               if n in m._non_persistent_buffers_set)


def _drop_then_write_back(engine, weights: dict[str, torch.Tensor]) -> None:
    """Resume after a dropping release; generation is refused, naming the first weight still
    missing, until every weight was written again (a fused view held back till the end)."""
    reqs = requests(prompts(1, seed=2), n=1, max_new_tokens=4)
    with pytest.raises(EngineReleased, match="update_weights: .*call resume_memory first"):
        engine.update_weights([("lm_head.weight", weights["lm_head.weight"])], version="1")  # nowhere to write yet
    engine.resume_memory()
    with pytest.raises(EngineReleased, match=f"{len(weights)} of the engine's weights were dropped at release_memory.*"
                                             f"first: '{next(iter(weights))}'.*engine.weights_cpu_backup = true"):
        engine.generate(reqs)
    last = "model.layers.1.self_attn.k_proj.weight"
    engine.update_weights([(name, tensor) for name, tensor in weights.items() if name != last], version="1")
    with pytest.raises(EngineReleased, match=f"request '.*': 1 of the engine's weights .*first: '{last}'"):
        engine.submit(reqs[0])
    with pytest.raises(EngineReleased, match=rf"get_weights_by_name\('{last}'\): 1 of"):
        engine.get_weights_by_name(last)
    engine.update_weights([(last, weights[last])], version="2")


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_a_release_that_drops_the_weights_generates_again_only_once_every_weight_is_written(mode):
    engine = paged(model_for("qwen3", mode), block_size=16, num_kv_blocks=40, return_routed_experts=False)
    fuse_projections(engine.model)  # the fused q/k/v are rebuilt from the written views
    reqs = requests(prompts(3, seed=4), n=2, max_new_tokens=10)
    before, weights = _tokens(engine, reqs), _state(engine)
    stats = engine.release_memory(keep_weights=False)
    assert stats["weights_bytes"] == _inv_freq_bytes(engine) > 0  # only what no sync carries is copied
    assert stats["weights_dropped_bytes"] == sum(p.numel() * 4 for p in engine.model.parameters())
    assert all(p.untyped_storage().nbytes() == 4 for p in engine.model.parameters())  # a placeholder each
    _drop_then_write_back(engine, weights)
    assert all(torch.equal(_state(engine)[name], weights[name]) for name in weights)
    assert _tokens(engine, reqs) == before
    engine.release_memory()  # a release that keeps them afterwards: nothing is missing
    engine.resume_memory()
    assert _tokens(engine, reqs) == before


@pytest.mark.gpu
def test_gpu_release_frees_the_kv_pool_and_weights_and_resume_gives_identical_greedy_tokens():
    model = model_for("qwen3", "fast").cuda()
    engine = paged(model, block_size=64, num_kv_blocks=256, return_routed_experts=False, stable_memory=False)
    reqs = requests(prompts(4, seed=6), n=2, max_new_tokens=16, temperature=0.0)
    before = _tokens(engine, reqs)
    pool_bytes = engine.pool.num_bytes
    allocated = torch.cuda.memory_allocated()
    stats = engine.release_memory()
    assert stats["gpu_freed_bytes"] >= 0.9 * pool_bytes
    assert allocated - torch.cuda.memory_allocated() >= 0.9 * (pool_bytes + stats["weights_bytes"])
    assert all(p.device.type == "cpu" and p.is_pinned() for p in engine.model.parameters())
    engine.resume_memory()
    assert all(p.is_cuda for p in engine.model.parameters())
    assert _tokens(engine, reqs) == before
    if engine.runner.graphs is not None:  # captured again on the restored pool and weights
        assert engine.runner.graphs.pool is engine.pool


@pytest.mark.gpu
def test_gpu_stable_memory_gives_pages_back_and_keeps_graphs_and_addresses():
    model = model_for("qwen3", "fast").cuda()
    engine = paged(model, block_size=64, num_kv_blocks=2048, return_routed_experts=False)
    reqs = requests(prompts(4, seed=6), n=2, max_new_tokens=16, temperature=0.0)
    before = _tokens(engine, reqs)
    pool_bytes = engine.pool.num_bytes
    engine.release_memory()  # the first release moves everything into the regions
    engine.resume_memory()  # ... and captures the graphs once more
    graphs, addresses = engine.runner.graphs, _addresses(engine)
    assert _tokens(engine, reqs) == before
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    stats = engine.release_memory()
    assert torch.cuda.mem_get_info()[0] - free_before >= 0.9 * pool_bytes  # the pages went to the driver
    assert stats["gpu_freed_bytes"] >= pool_bytes
    engine.resume_memory()
    assert engine.runner.graphs is graphs and graphs is not None  # no capture on resume
    assert _addresses(engine) == addresses
    assert _tokens(engine, reqs) == before


@pytest.mark.gpu
def test_gpu_stable_memory_dropping_the_weights_keeps_graphs_and_gives_the_same_tokens_once_written():
    model = model_for("qwen3", "fast").cuda()
    engine = paged(model, block_size=64, num_kv_blocks=2048, return_routed_experts=False)
    reqs = requests(prompts(4, seed=6), n=2, max_new_tokens=16, temperature=0.0)
    before, weights = _tokens(engine, reqs), {n: t.cuda() for n, t in _state(engine).items()}
    engine.release_memory()
    engine.resume_memory()
    graphs, addresses = engine.runner.graphs, _addresses(engine)
    free_before = torch.cuda.mem_get_info()[0]
    stats = engine.release_memory(keep_weights=False)
    assert torch.cuda.mem_get_info()[0] - free_before >= 0.9 * stats["kv_cache_bytes"]
    assert stats["weights_bytes"] == _inv_freq_bytes(engine) and stats["weights_dropped_bytes"] > 0
    _drop_then_write_back(engine, weights)
    assert engine.runner.graphs is graphs and _addresses(engine) == addresses
    assert _tokens(engine, reqs) == before


def _addresses(engine) -> list[int]:
    return [t.data_ptr() for t in [*engine.model.parameters(), *engine.pool.keys, *engine.pool.values]]


class HostRegion:
    """Stands in for `cuda_vmm.Region` on CPU: unmapping loses the contents (filled with 0xFF:
    NaN as floats), as fresh device pages hold anything."""

    regions: list = []
    fail_on: int = -1

    def __init__(self, nbytes: int, device: torch.device) -> None:
        if len(HostRegion.regions) == HostRegion.fail_on:
            raise MilesError("CUDA virtual memory: cuMemCreate of 1.00 GiB failed with error 2 (out of memory)")
        self.nbytes, self.device, self.mapped = nbytes, device, True
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        HostRegion.regions.append(self)

    def unmap(self) -> None:
        self.tensor.fill_(0xFF)
        self.mapped = False

    def map(self) -> None:
        self.mapped = True


@pytest.fixture
def host_regions(monkeypatch):
    from miles_core.engine.native import stable_memory

    HostRegion.regions, HostRegion.fail_on = [], -1
    monkeypatch.setattr(stable_memory, "supported", lambda device: True)
    monkeypatch.setattr(stable_memory, "new_region", HostRegion)
    return HostRegion


def test_stable_memory_keeps_every_address_and_brings_back_the_bits(host_regions):
    engine = paged(model_for("qwen3", "fast"), block_size=16, num_kv_blocks=40, return_routed_experts=False)
    engine.model.lm_head.weight = engine.model.model.embed_tokens.weight  # tied, as SmolLM2
    fuse_projections(engine.model)  # what the engine does on CUDA
    reqs = requests(prompts(3, seed=4), n=2, max_new_tokens=10)
    before, weights = _tokens(engine, reqs), _state(engine)
    stats = engine.release_memory()
    with pytest.raises(EngineReleased, match="get_weights_by_name: the engine's memory is released"):
        engine.get_weights_by_name("lm_head.weight")
    with pytest.raises(EngineReleased, match="update_weights: .*call resume_memory first"):
        engine.update_weights([("lm_head.weight", torch.zeros(1))], version="9")
    weights_region, pool_region = host_regions.regions
    assert not weights_region.mapped and not pool_region.mapped and engine.released
    assert stats["kv_cache_bytes"] == pool_region.nbytes >= 335_872 and stats["weights_bytes"] <= weights_region.nbytes
    engine.resume_memory()
    addresses = _addresses(engine)
    region_start = weights_region.tensor.data_ptr()
    assert all(region_start <= p.data_ptr() < region_start + weights_region.nbytes for p in engine.model.parameters())
    attn, mlp = engine.model.model.layers[0].self_attn, engine.model.model.layers[0].mlp
    rows = attn.q_proj.weight.shape[0]
    assert attn.k_proj.weight.data_ptr() == attn.fused_qkv[0][rows:].data_ptr()  # still views of the fused weight
    assert mlp.up_proj.weight.data_ptr() == mlp.fused_gate_up[mlp.gate_proj.weight.shape[0]:].data_ptr()
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert all(torch.equal(_state(engine)[name], weights[name]) for name in weights)
    assert _tokens(engine, reqs) == before  # NaN pages: only a zeroed pool and restored weights give this
    for _ in range(2):
        engine.release_memory()
        engine.resume_memory()
    assert _addresses(engine) == addresses and len(host_regions.regions) == 2
    assert _tokens(engine, reqs) == before


def test_stable_memory_dropping_the_weights_keeps_only_the_rope_frequencies(host_regions):
    engine = paged(model_for("qwen3", "fast"), block_size=16, num_kv_blocks=40, return_routed_experts=False)
    engine.model.lm_head.weight = engine.model.model.embed_tokens.weight  # tied: one tensor, two names
    fuse_projections(engine.model)
    reqs = requests(prompts(3, seed=4), n=2, max_new_tokens=10)
    before, weights = _tokens(engine, reqs), _state(engine)
    engine.release_memory()  # the first release moves everything into the regions
    engine.resume_memory()
    stats = engine.release_memory(keep_weights=False)
    weights_region = host_regions.regions[0]
    assert not weights_region.mapped
    assert stats["weights_bytes"] == _inv_freq_bytes(engine) > 0  # the unmapped pages lose the rest (NaN)
    assert stats["weights_dropped_bytes"] + stats["weights_bytes"] >= sum(p.numel() * 4 for p in engine.model.parameters())
    _drop_then_write_back(engine, weights)
    assert _tokens(engine, reqs) == before  # NaN RoPE frequencies would change every token


def test_unwritten_spans_are_the_bytes_outside_every_written_tensor():
    region = torch.zeros(64, dtype=torch.float32)  # 256 bytes
    base = region.data_ptr()
    q, k, fused = region[0:8], region[8:16], region[0:16]  # the fused tensor is q and k together
    rope, gap_rope, strided = region[20:24], region[40:44], region[48:64].view(4, 4)[:, :2]
    spans = unwritten_spans([fused, q, k, rope, gap_rope, strided], [q, k, strided], base)
    assert spans == [(80, 16), (160, 16)]  # rope at bytes 80..96, gap_rope at 160..176; the rest is written
    assert unwritten_spans([region[0:4], region[4:8]], [], base) == [(0, 32)]  # adjacent spans merge


def test_stable_memory_failures_say_what_to_set_and_leave_a_working_engine(host_regions):
    engine = paged(model_for("qwen3"), block_size=16, num_kv_blocks=40)
    reqs = requests(prompts(2, seed=7), n=1, max_new_tokens=6)
    before = _tokens(engine, reqs)
    for fail_on in (0, 1):  # the weights' region (nothing moved yet), the pool's (the weights moved)
        host_regions.regions, host_regions.fail_on = [], fail_on
        with pytest.raises(MilesError, match="out of memory.*set engine.stable_memory = false"):
            engine.release_memory()
        assert not engine.released and engine.pool.num_bytes > 0
        assert _tokens(engine, reqs) == before
