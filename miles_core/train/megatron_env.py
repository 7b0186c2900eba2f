"""The process state megatron-core needs: a `torch.distributed` group, its model-parallel groups
and, on CPU only, the patches that let megatron-core 0.16 run without CUDA.

megatron-core assumes CUDA in a few places that a CPU forward/backward reaches. `CPU_PATCHES`
lists every patch, applied by `start` only when the trainer's device is the CPU (never on a GPU,
where the real functions are right) and undone by `shutdown`:
- `torch.cuda.current_device` -> "cpu": parameter and buffer allocation ask for the CUDA device;
- `torch.cuda.synchronize` -> no-op: called around MoE dispatch and checkpoint saves;
- the model-parallel CUDA RNG tracker's `fork` -> no-op context: it swaps CUDA RNG states around
  dropout regions, and dropout is 0 in our configs (on a GPU `start` seeds the tracker instead,
  `model_parallel_cuda_manual_seed`, as megatron's training scripts do);
- `LanguageModule._is_in_embd_group` -> False: with pipeline stages and tied embeddings the model
  copies the first stage's embedding into the last stage's output layer at construction, moving
  it with `.cuda()`; the loader (`WeightMap.load`) writes both copies from the same HF tensor;
- `rotary_pos_embedding.get_pos_emb_on_this_cp_rank` -> `megatron_context`'s CPU version: under
  context parallelism the RoPE table is sliced with an index built in pinned memory and `.cuda()`
  (dense RoPE and MLA's; YaRN's module imports its own copy, patched too though YaRN is refused
  today, so lifting that refusal does not break CP on CPU);
Two patches are for a missing Transformer Engine, on any device (the GPU machines have none):
- `moe_utils.te_general_gemm` = None when the module lacks it: 0.16 names it without importing
  it when Transformer Engine is absent (NameError in the MoE layer);
- `multi_latent_attention.HAVE_TE` = False when `transformer_engine` does not import: 0.16's
  extension module imports without it (its TE classes are mocks), so MLA believes TE is there
  and fails on `isinstance(..., TELinear)`.
The MoE token dispatcher is set to `allgather` in the model config (the others need CUDA); under
expert parallelism its collectives (`all_gather_into_tensor`, `reduce_scatter_tensor`) run on gloo.

One world per process: `start` joins the group that is already there (a launcher's: TP x CP x EP
ranks per model replica times the data-parallel replicas; megatron-core's groups, its data- and
expert-data-parallel ones included, then use its backend, gloo on CPU) or makes a
one-rank gloo (CPU) / NCCL (GPU) group itself. A later call with the same sizes is a no-op; one
with other sizes, or after a launcher destroyed its group, starts again. `shutdown` (for tests,
which build other process groups in the same process) undoes only what `start` did.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from miles_core.errors import MilesError
from miles_core.train.megatron_context import cpu_pos_emb_on_this_cp_rank


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes (megatron's names); data parallelism is what the world size leaves."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False


def _patches(device: torch.device) -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) of every patch `device` needs (see the module docstring)."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding, yarn_rotary_pos_embedding
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    patches = []
    if device.type == "cpu":
        patches += [
            (torch.cuda, "current_device", lambda: "cpu"),
            (torch.cuda, "synchronize", lambda *args, **kwargs: None),
            (mp_random.get_cuda_rng_tracker(), "fork", lambda *args, **kwargs: contextlib.nullcontext()),
            (LanguageModule, "_is_in_embd_group", lambda self: False),
            (rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", cpu_pos_emb_on_this_cp_rank),
            (yarn_rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", cpu_pos_emb_on_this_cp_rank),
        ]
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append((moe_utils, "te_general_gemm", None))
    if importlib.util.find_spec("transformer_engine") is None:
        patches.append((multi_latent_attention, "HAVE_TE", False))
    return patches


_MISSING = object()


class _State:
    """What `start` changed, so `shutdown` restores exactly that."""

    saved: list[tuple[object, str, object]] = []
    owns_group = False
    owns_model_parallel = False
    started = False
    sizes: ParallelSizes | None = None


def start(device: torch.device, sizes: ParallelSizes) -> None:
    """Make megatron-core usable in this process on `device` with `sizes` (once per process)."""
    from megatron.core import parallel_state

    if _State.started and _State.sizes == sizes and dist.is_initialized():
        return
    shutdown()  # a different layout, or a launcher's group that has been destroyed since
    _State.started, _State.sizes = True, sizes
    for owner, name, value in _patches(device):
        _State.saved.append((owner, name, getattr(owner, name, _MISSING)))
        setattr(owner, name, value)
    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="miles-megatron-")) / "store"
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", init_method=f"file://{store}",
                                rank=0, world_size=1)
        _State.owns_group = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=sizes.tensor, pipeline_model_parallel_size=sizes.pipeline,
            expert_model_parallel_size=sizes.expert, context_parallel_size=sizes.context)
        _State.owns_model_parallel = True
    if device.type == "cuda":
        # megatron-core's layers fork its model-parallel CUDA RNG states (the tracker raises when
        # they were never added); on CPU the tracker's fork is patched out instead. Dropout is 0
        # in our configs, so the seed sets nothing that reaches the numbers.
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)


def shutdown() -> None:
    """Undo `start`: the groups it created, the patches it applied."""
    from megatron.core import parallel_state

    if not _State.started:
        return
    if _State.owns_model_parallel:
        parallel_state.destroy_model_parallel()
    if _State.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    for owner, name, value in reversed(_State.saved):
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _State.saved, _State.owns_group, _State.owns_model_parallel, _State.started = [], False, False, False
    _State.sizes = None


def check_sizes(sizes: ParallelSizes, world_size: int) -> None:
    """Refuse the parallel layouts this version cannot run, naming the flag: tensor and expert
    parallelism (together too), pipeline stages beside either or both, context parallelism beside
    any of them, data parallelism beside them,
    DP = world / (TP x CP x EP x PP) replicas, so the world must be a multiple of the
    model-parallel size; sequence parallelism with tensor parallelism only (megatron's rule)."""
    if sizes.sequence_parallel and sizes.tensor == 1:
        raise MilesError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence "
                         "over the tensor-parallel ranks); set both or drop the flag")
    named = [(f, n) for f, n in (("--tensor-model-parallel-size", sizes.tensor), ("--context-parallel-size",
                                 sizes.context), ("--expert-model-parallel-size", sizes.expert),
                                 ("--pipeline-model-parallel-size", sizes.pipeline)) if n > 1]
    named = named or [("--tensor-model-parallel-size", 1)]
    flag = " x ".join(f"{f} {n}" for f, n in named)
    size = sizes.tensor * sizes.context * sizes.expert * sizes.pipeline
    if world_size % size == 0:
        return
    if world_size == 1:
        raise MilesError(f"{flag} needs {size} trainer ranks, one per shard (or a multiple of {size}: "
                         f"data-parallel replicas): add --nproc-per-node {size}")
    raise MilesError(f"--nproc-per-node {world_size} is not a multiple of {flag} (data parallelism is "
                     f"ranks / {size} replicas of the model); use --nproc-per-node {size} or a multiple of it")
