"""The trainer side's sections: `[train]` (the policy update) and `[sync]` (weights to the engine).

Same rules as `sections.py` (frozen, keyword-only, validated in `__post_init__`); split out to keep
each file readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_core.config.tree import check as _check


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    backend: Literal["native", "fsdp", "megatron"] = "native"
    """Trainer: `native` (PyTorch, same model code as the engine, one process), `fsdp` (the same
    math on N data-parallel ranks under FSDP2; `miles train --nproc-per-node N`) or `megatron` (a
    megatron-core GPTModel with the same weights; needs the `megatron` extra)."""
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """`constant` after warmup, or cosine decay from `lr` to `min_lr` over the run."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule, in [0, lr]."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, >= 0."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay, in [0, 1)."""
    adam_beta2: float = 0.98
    """AdamW second-moment decay, in [0, 1)."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon, > 0."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    num_steps_per_rollout: int = 1
    """Optimizer steps per rollout; the rollout's samples are split evenly between them."""
    max_tokens_per_micro_batch: int = 4096
    """Token budget (prompt + response, padded) of one forward/backward; gradients accumulate."""
    micro_batch_size: int = 0
    """Most samples in one forward/backward (slime's `--micro-batch-size`), a cap on top of the
    token budget; 0: the token budget alone. Gradients accumulate, so the loss does not depend on it."""
    routing_replay: Literal["off", "rollout", "record"] = "off"
    """MoE experts used by the trainer: `off` its own router; `rollout` the engine's recorded choice
    (Rollout Routing Replay, R3; needs engine.return_routed_experts); `record` its own choice in the
    old log-prob pass, replayed in the later optimizer steps of the rollout."""
    share_prompt_prefix: bool = True
    """Run each distinct prompt once per micro-batch and let its samples attend to it (same
    result, less work: GRPO's n samples of a prompt share it)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Forward/backward dtype; weights and optimizer state stay fp32 (autocast for bf16)."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk when turning hidden states into log-probs (bounds logits memory)."""
    pack_sequences: bool = False
    """Pack a micro-batch's sequences into one row without padding (attention kept within each
    sequence; with `share_prompt_prefix` a shared prompt is fed once). Bitwise equal to the padded
    forward in invariant mode, equal to rounding (~1e-6 in fp32) in fast mode; off by default so
    recorded runs keep their numbers. `max_tokens_per_micro_batch` then counts real tokens."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (less
    memory, about one more forward of compute); not applied to the KV-cache forward of the padded
    `share_prompt_prefix` path."""
    compile: bool = False
    """`torch.compile` each decoder layer of the trainer's model (CUDA speed; the first steps compile)."""
    precision: Literal["bf16", "fp8"] = "bf16"
    """Linear matmuls of the policy: `bf16` in `compute_dtype` (the default; fp32 when that is
    float32), or `fp8`: row-wise scaled e4m3 forward with a straight-through backward (torch's
    `_scaled_mm` on CUDA for bf16, emulated elsewhere; output head and routers stay in `compute_dtype`)."""
    qat: Literal["off", "int4"] = "off"
    """`int4`: quantisation-aware training, the `qat_modules` weights fake-quantised to group INT4 in
    every forward (straight-through gradient), exactly as `miles quantize --format int4` rounds them."""
    qat_group_size: Literal[32, 64, 128] = 128
    """INT4 group size (input features per scale) of `qat`; must equal `sync.quantize_group_size`."""
    qat_modules: tuple[str, ...] = ("*.mlp.experts.*",)
    """Module-name globs that `qat` fake-quantises (default: the routed experts of MoE layers)."""
    tensor_model_parallel_size: int = 1
    """`megatron` backend: tensor-parallel ranks (slime's `--tensor-model-parallel-size`); > 1 needs that many `--nproc-per-node` ranks or a multiple (data-parallel replicas; every family, the MoE ones with `sequence_parallel`)."""
    pipeline_model_parallel_size: int = 1
    """`megatron` backend: pipeline stages (`--pipeline-model-parallel-size`); > 1 needs that many times TP x EP `--nproc-per-node` ranks or a multiple (every family; one micro-batch in flight)."""
    expert_model_parallel_size: int = 1
    """`megatron` backend: expert-parallel ranks (`--expert-model-parallel-size`); > 1 needs that many `--nproc-per-node` ranks or a multiple (data-parallel replicas; MoE families)."""
    context_parallel_size: int = 1
    """`megatron` backend: context-parallel ranks (`--context-parallel-size`): each sequence split over them, as megatron splits it; not with EP or PP, nor for MLA."""
    sequence_parallel: bool = False
    """`megatron` backend: megatron's sequence parallelism (`--sequence-parallel`, needs TP > 1)."""
    fsdp_reshard: Literal["micro_batch", "step"] = "micro_batch"
    """`fsdp` backend: when each layer's parameters are resharded and its gradients reduce-scattered.
    `micro_batch` (FSDP's way, ZeRO-3: parameters gathered for every forward and backward, gradients
    reduced after every backward; the least memory) or `step` (parameters stay gathered and gradients
    accumulate unsharded over an optimizer step's micro-batches, reduced once after the last: one
    all-gather and one reduce-scatter a step instead of three collectives a layer a micro-batch,
    costing each rank a `compute_dtype` copy of the model and an fp32 gradient while it trains)."""
    use_distributed_optimizer: bool = False
    """`megatron` backend: ZeRO-1 AdamW (slime's `--use-distributed-optimizer`): the moments sharded over the data-parallel ranks, gradients reduce-scattered, parameters all-gathered."""
    seed: int = 0
    max_bad_steps: int = 3
    """Consecutive optimizer steps with a non-finite loss or gradient norm (each one skipped:
    no update, no scheduler step) before the run stops with an error."""

    def __post_init__(self) -> None:
        _check(self.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}")
        _check(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        _check(self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
        _check(self.num_steps_per_rollout >= 1, f"num_steps_per_rollout must be >= 1, got {self.num_steps_per_rollout}")
        _check(self.max_tokens_per_micro_batch >= 1,
               f"max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
        _check(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                     "context_parallel_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        parallel = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                    self.expert_model_parallel_size, self.context_parallel_size)
        _check(self.backend == "megatron" or (max(parallel) == 1 and not self.sequence_parallel),
               f"model-parallel sizes {parallel} and sequence_parallel need backend 'megatron', got '{self.backend}'")
        _check(self.backend == "fsdp" or self.fsdp_reshard == "micro_batch",
               f"fsdp_reshard = '{self.fsdp_reshard}' needs backend 'fsdp', got '{self.backend}'")
        _check(self.backend == "megatron" or not self.use_distributed_optimizer,
               f"use_distributed_optimizer needs backend 'megatron', got '{self.backend}'")
        _check(self.logprob_chunk_size >= 1, f"logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}")


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    transport: Literal["auto", "inprocess", "disk", "nccl", "cuda_ipc"] = "auto"
    """How the trainer's weights reach the engine after each step: `inprocess` (the engine lives in
    this process and copies the tensors), `disk` (a HF checkpoint in `disk_dir`, loaded by the
    servers through `/update_weights_from_disk`), `nccl` (broadcast to every server over a
    weight-update process group, SGLang's `/update_weights_from_distributed`), `cuda_ipc` (a
    `miles serve` server on the same GPU maps the trainer's buffer), or `auto` (`disk` for engines
    in other processes, such as the `sglang` backend, else `inprocess`)."""
    disk_dir: str = ""
    """`disk` transport: folder for the checkpoints the servers load (must be readable by them at
    the same path); empty means `weight_sync/` in the run folder."""
    bucket_mb: int = 512
    """Most MiB of tensors handed over in one bucket (a larger tensor goes alone); bounds the
    transient memory of transports that stage a bucket."""
    quantize: Literal["off", "fp8", "int4"] = "off"
    """Deliver the weights quantised as `miles quantize` writes them (block FP8 or group INT4; with
    `train.qat` only its modules): `disk` writes that checkpoint, a CPU engine holds it dequantised."""
    quantize_group_size: Literal[32, 64, 128] = 128
    """INT4 group size of `quantize`."""
    timeout_s: float = 600.0
    """Seconds a weight sync may take before the run stops with an error instead of hanging; 0: no limit."""
    nccl_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """`nccl` transport: collective backend of the weight-update group; `auto` is nccl when the
    weights are on CUDA, gloo when they are on CPU."""
    nccl_flatten: bool = True
    """`nccl` transport: send each bucket as one broadcast of its bytes (SGLang's `load_format =
    "flattened_bucket"`, what `miles serve` and recent SGLang accept) instead of one broadcast per
    tensor; false for SGLang releases without flattened buckets."""
    nccl_master_address: str = ""
    """`nccl` transport: address the servers reach the trainer at; empty: this machine's address
    on the route to the first server."""
    check_weight_update_equal: bool = False
    """After every sync, read the engine's weights back and require them bitwise equal to what was
    sent (slime's `--check-weight-update-equal`; a debugging aid: one extra copy of the weights)."""

    def __post_init__(self) -> None:
        _check(self.bucket_mb >= 1, f"bucket_mb must be >= 1, got {self.bucket_mb}")
        _check(self.timeout_s >= 0, f"timeout_s must be >= 0 (0: no limit), got {self.timeout_s}")
        address = self.nccl_master_address
        _check(address == address.strip() and "/" not in address and " " not in address and address.count(":") != 1,
               f"nccl_master_address must be a host name or IP address (no scheme, port or spaces), got '{address}'")
