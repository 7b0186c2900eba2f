"""slime/miles launch flags (`python train.py --rollout-batch-size 512 ...`) read as recipe keys.

One declarative table: `FLAGS` maps each supported kebab-case flag to the recipe keys it sets,
with a note wherever miles does not do exactly what slime does; `REJECTED` (and the prefix rules
in `REJECTED_PREFIXES`) name flags miles refuses, each with what to use instead or which feature
is missing; `NOTED` flags are accepted and change nothing (the reason is printed). A flag in no
table is refused with a did-you-mean. Nothing is silently ignored.

A slime-flag launch also takes slime's defaults where they differ from ours (`SLIME_DEFAULTS`),
for every key that the recipe leaves unset: slime reduces losses per sample and uses k1 KL.
`docs/slime_flags.md` is `slime_flags_doc.render_markdown()` of these tables (a test keeps them equal);
`slime_launch.py` reads a launch against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from miles_core.rewards.registry import CONFIGURED_REWARDS, REWARDS


class FlagRefused(Exception):
    """A flag miles does not take (the message says what to do instead)."""


@dataclass(frozen=True)
class Flag:
    keys: tuple[str, ...]
    """Recipe keys the flag sets (for the table; `to` decides the values)."""
    type: type = str
    """int, float or str for one value; bool for a switch (no value); list for one or more strings."""
    note: str = ""
    """How miles differs from slime for this flag; empty when it is the same."""
    to: Callable[[Any], dict[str, Any]] | None = None
    """value -> {recipe key: value}; default: the flag's value into its one key."""

    def apply(self, value: Any) -> dict[str, Any]:
        return self.to(value) if self.to else {self.keys[0]: value}


def _estimator(name: str) -> dict[str, Any]:
    # slime: the estimator `gspo` alone selects the sequence-ratio loss.
    return {"algo.advantage_estimator": name, **({"algo.policy_loss": "gspo"} if name == "gspo" else {})}


def _parallel(key: str) -> Callable[[Any], dict[str, Any]]:
    # slime trains on Megatron: a size above 1 selects miles' megatron backend, whose trainer
    # refuses what it cannot run (on CPU: any size > 1) naming the flag.
    return lambda v: {key: v, **({"train.backend": "megatron"} if v and v != 1 else {})}


def _rm_type(name: str) -> dict[str, Any]:
    if name not in REWARDS and name not in CONFIGURED_REWARDS:
        known = ", ".join(sorted([*REWARDS, *CONFIGURED_REWARDS]))
        raise FlagRefused(f"--rm-type {name}: not in miles' reward registry ({known}); use --custom-rm-path module.function")
    return {"reward.type": name}


def _rollout_gpus(num_gpus: int) -> dict[str, Any]:
    # slime's rollout engines are servers on GPUs of their own: miles launches `miles serve` ones.
    return {"engine.num_gpus": num_gpus, "engine.backend": "sglang", "engine.launch": True, "engine.server": "miles"}


MEGATRON = "above 1 selects train.backend = megatron; sizes above 1 are refused: not in miles' megatron backend yet"
TENSOR_PARALLEL = ("above 1 selects train.backend = megatron; trainer ranks (--nproc-per-node) a multiple of it "
                   "(data parallelism = ranks / size), every family (qwen3_moe and deepseek_v3 with "
                   "--sequence-parallel)")
PIPELINE_PARALLEL = ("above 1 selects train.backend = megatron; trainer ranks (--nproc-per-node) a multiple of it "
                     "times TP x EP (data parallelism beside), every family (MoE stages replay their own layers); "
                     "one micro-batch in flight (no 1F1B)")
EXPERT_PARALLEL = ("above 1 selects train.backend = megatron; trainer ranks (--nproc-per-node) a multiple of it "
                   "(data parallelism = ranks / size), "
                   "MoE families (qwen3_moe, deepseek_v3), with tensor parallelism too (TP x EP ranks a replica)")

FLAGS: dict[str, Flag] = {
    # batch shape
    "--rollout-batch-size": Flag(("rollout.batch_size",), int),
    "--n-samples-per-prompt": Flag(("sampling.n_samples_per_prompt",), int),
    "--num-steps-per-rollout": Flag(("train.num_steps_per_rollout",), int),
    "--global-batch-size": Flag(("train.num_steps_per_rollout",), int,
                                "samples per optimizer step; miles sets num_steps_per_rollout = "
                                "rollout_batch_size * n_samples_per_prompt / global_batch_size (must divide)",
                                to=lambda v: {}),
    "--max-tokens-per-gpu": Flag(("train.max_tokens_per_micro_batch",), int,
                                 "miles always packs micro-batches by tokens (slime only with --use-dynamic-batch-size)"),
    "--micro-batch-size": Flag(("train.micro_batch_size",), int,
                               "a cap of N samples per micro-batch on top of the token budget (slime ignores it "
                               "under --use-dynamic-batch-size, which miles always has); the loss does not change"),
    # megatron-core parallelism (train.backend = megatron)
    "--tensor-model-parallel-size": Flag(("train.tensor_model_parallel_size",), int, TENSOR_PARALLEL,
                                         to=_parallel("train.tensor_model_parallel_size")),
    "--pipeline-model-parallel-size": Flag(("train.pipeline_model_parallel_size",), int, PIPELINE_PARALLEL,
                                           to=_parallel("train.pipeline_model_parallel_size")),
    "--expert-model-parallel-size": Flag(("train.expert_model_parallel_size",), int, EXPERT_PARALLEL,
                                         to=_parallel("train.expert_model_parallel_size")),
    "--context-parallel-size": Flag(("train.context_parallel_size",), int, MEGATRON,
                                    to=_parallel("train.context_parallel_size")),
    "--sequence-parallel": Flag(("train.sequence_parallel",), bool,
                                "selects train.backend = megatron; with TP > 1 the sequence split over the TP "
                                "ranks between the split layers (needed by MoE families under TP)",
                                to=_parallel("train.sequence_parallel")),
    "--use-distributed-optimizer": Flag(("train.use_distributed_optimizer",), bool,
                                        "selects train.backend = megatron; ZeRO-1 AdamW over the data-parallel "
                                        "ranks (of each pipeline stage), checkpoints in the plain optimizer's layout",
                                        to=lambda v: {"train.use_distributed_optimizer": v,
                                                      **({"train.backend": "megatron"} if v else {})}),
    # engine placement
    "--rollout-num-gpus": Flag(("engine.num_gpus",), int,
                               "launches num_gpus / --rollout-num-gpus-per-engine `miles serve` servers (the native "
                               "engine) on the GPUs after the trainer's (engine.server = sglang for SGLang's)",
                               to=_rollout_gpus),
    "--rollout-num-gpus-per-engine": Flag(("engine.num_gpus_per_engine",), int,
                                          "GPUs per server (SGLang's --tp-size); must be 1 for `miles serve` servers"),
    "--colocate": Flag(("engine.colocate",), bool,
                       "engine and trainer share GPUs: the engine releases its memory while the trainer trains, the "
                       "optimizer state waits in host memory while the engine generates (slime's offloading)"),
    # data
    "--prompt-data": Flag(("data.path", "data.task"), str, "a .jsonl or .parquet file; clears the recipe's data.task",
                          to=lambda v: {"data.path": v, "data.task": ""}),
    "--input-key": Flag(("data.input_key",), str),
    "--label-key": Flag(("data.label_key",), str),
    "--metadata-key": Flag(("data.metadata_key",), str),
    "--apply-chat-template": Flag(("data.apply_chat_template",), bool),
    "--rollout-shuffle": Flag(("data.shuffle",), bool),
    "--rollout-seed": Flag(("data.seed",), int, "seeds the prompt shuffle; sampling seeds are sampling.seed"),
    # sampling
    "--rollout-temperature": Flag(("sampling.temperature",), float),
    "--rollout-top-p": Flag(("sampling.top_p",), float),
    "--rollout-top-k": Flag(("sampling.top_k",), int),
    "--rollout-max-response-len": Flag(("sampling.max_new_tokens",), int),
    "--rollout-stop": Flag(("sampling.stop",), list),
    "--custom-generate-function-path": Flag(("rollout.generate_function",), str,
                                            "miles calls `async fn(ctx, sample, sampling)` (ctx: token-in/token-out "
                                            "generate and abort on the engine, the tokenizer, the tools), slime "
                                            "`fn(args, sample, sampling_params)`: another signature is refused at start"),
    # algorithm
    "--advantage-estimator": Flag(("algo.advantage_estimator", "algo.policy_loss"), str,
                                  "`gspo` also sets algo.policy_loss = gspo, as in slime", to=_estimator),
    "--eps-clip": Flag(("algo.eps_clip", "algo.eps_clip_high"), float,
                       "also sets eps_clip_high unless --eps-clip-high is given (slime's default)",
                       to=lambda v: {"algo.eps_clip": v, "algo.eps_clip_high": v}),
    "--eps-clip-high": Flag(("algo.eps_clip_high",), float),
    "--eps-clip-c": Flag(("algo.eps_clip_c",), float),
    "--kl-coef": Flag(("algo.kl_coef",), float,
                      "reward shaping; miles accepts it only for ppo and reinforce_plus_plus* (slime: also "
                      "grpo, where it does nothing)"),
    "--use-kl-loss": Flag(("algo.use_kl_loss",), bool),
    "--check-weight-update-equal": Flag(("sync.check_weight_update_equal",), bool,
                                        "read the engine's weights back after each sync; bitwise equal or an error"),
    "--kl-loss-coef": Flag(("algo.kl_loss_coef",), float),
    "--kl-loss-type": Flag(("algo.kl_loss_type",), str),
    "--use-unbiased-kl": Flag(("algo.use_unbiased_kl",), bool),
    "--entropy-coef": Flag(("algo.entropy_coef",), float),
    "--gamma": Flag(("algo.gamma",), float),
    "--lambd": Flag(("algo.lambd",), float),
    "--use-tis": Flag(("algo.use_tis",), bool, "token-level truncated IS (miles' default tis_level/tis_mode)"),
    "--tis-clip": Flag(("algo.tis_clip_high",), float),
    "--tis-clip-low": Flag(("algo.tis_clip_low", "algo.tis_mode"), float,
                           "slime clamps the weight to [low, high]: a non-zero low also sets tis_mode = clip "
                           "(0 keeps truncate, the same weights)",
                           to=lambda v: {"algo.tis_clip_low": v, **({"algo.tis_mode": "clip"} if v > 0 else {})}),
    "--normalize-advantages": Flag(("algo.normalize_advantages",), bool,
                                   "reinforce_plus_plus* are whitened even without it (REINFORCE++ paper)"),
    "--calculate-per-token-loss": Flag(("algo.loss_agg_mode",), bool, "token_mean; without it slime's "
                                       "per-sample mean (seq_mean_token_mean)",
                                       to=lambda v: {"algo.loss_agg_mode": "token_mean"}),
    "--use-opsm": Flag(("algo.use_opsm",), bool),
    "--opsm-delta": Flag(("algo.opsm_delta",), float),
    # rewards
    "--rm-type": Flag(("reward.type",), str, "math, f1 (ours: boxed answer graded with math-verify; slime "
                      "grades the whole response); deepscaler as slime (answer after `</think>`, boxed, 0/1) but "
                      "compared with math-verify, not deepscaler's sympy checker; dapo as slime (`Answer:` line, "
                      "+1/-1) returning the score, not {score, acc, pred}; remote_rm with --rm-url", to=_rm_type),
    "--rm-url": Flag(("reward.remote_url",), str, "remote_rm POSTs {prompt, response, label}, reads the JSON answer; "
                     "each call bounded by reward.timeout, reward.max_concurrency in flight; no retries (slime: "
                     "10 with back-off): a failed call scores 0 and counts in reward.max_failure_fraction"),
    "--custom-rm-path": Flag(("reward.type",), str, "miles calls fn(sample), slime fn(args, sample): a "
                             "two-argument function is refused when the run starts"),
    "--reward-key": Flag(("reward.key",), str),
    # asynchronous training and partial rollout
    "--fully-async": Flag(("loop.mode",), bool, "miles' async mode: generation runs loop.max_staleness / "
                          "num_steps_per_rollout steps ahead in a background thread on a fixed weight-version "
                          "schedule (slime: train_async.py with a free-running rollout function); needs --use-tis",
                          to=lambda v: {"loop.mode": "async"}),
    "--max-weight-staleness": Flag(("loop.max_staleness",), int,
                                   "a bound in optimizer steps on every trained token, kept by scheduling "
                                   "generation (slime: groups over it are recycled)"),
    "--partial-rollout": Flag(("rollout.partial",), bool, "native engine only"),
    "--mask-offpolicy-in-partial-rollout": Flag(("rollout.mask_offpolicy_prefix",), bool),
    "--over-sampling-batch-size": Flag(("algo.over_sampling_batch_size",), int),
    # optimisation
    "--lr": Flag(("train.lr",), float),
    "--min-lr": Flag(("train.min_lr",), float),
    "--lr-decay-style": Flag(("train.lr_schedule",), str, "constant or cosine (Megatron's linear is refused)"),
    "--lr-warmup-iters": Flag(("train.lr_warmup_steps",), int),
    "--weight-decay": Flag(("train.weight_decay",), float),
    "--adam-beta1": Flag(("train.adam_beta1",), float),
    "--adam-beta2": Flag(("train.adam_beta2",), float),
    "--adam-eps": Flag(("train.adam_eps",), float),
    "--clip-grad": Flag(("train.clip_grad",), float),
    "--seed": Flag(("train.seed",), int),
    # checkpoints
    "--ref-load": Flag(("model.ref_source",), str, "the reference model (KL loss / KL reward) from this checkpoint "
                       "(HF dir, .gguf or built-in name; same tokenizer), else a copy of --hf-checkpoint. slime also "
                       "starts the policy from it when --load is absent (a Megatron torch_dist dir); miles starts the "
                       "policy from --hf-checkpoint"),
    "--save-debug-rollout-data": Flag(("loop.save_rollout_data_path",), str,
                                      "each step's samples as miles JSONL (slime: .pt) at the path with `{rollout_id}` "
                                      "= the 0-based step; --load-debug-rollout-data reads it back"),
    "--save": Flag(("loop.output_dir",), str, "the run folder: full checkpoints (HF export + trainer and loop "
                   "state, resumable with --load DIR or --resume auto) in DIR/checkpoints/step_NNNNNN, plus "
                   "metrics and config; slime writes torch_dist to DIR/iter_NNNNNNN"),
}

ONE_DEVICE = ("not in miles yet: trainer ranks come from --nproc-per-node (or --ray with --actor-num-nodes/"
              "--actor-num-gpus-per-node), engine servers from --rollout-num-gpus; drop the flag or set it to 1")
OFFLOAD = ("miles offloads exactly when engine and trainer share GPUs (--colocate): the engine releases its "
           "memory while the trainer trains, the optimizer state waits in host memory during rollout; drop the flag")
PARALLEL = ("expert tensor parallelism is not in miles' megatron backend yet: drop the flag or set it to 1")
ARCH = ("not needed: miles reads the architecture from --hf-checkpoint's config.json; drop the flag")
SGLANG = ("configures an SGLang server that slime launches: with miles' native engine drop it; with SGLang "
          "servers use --set engine.backend=sglang and pass server flags in engine.sglang_args (engine.launch = "
          "true) or start the servers yourself (engine.urls)")
SPECULATIVE = "speculative decoding is not in miles' native engine yet: drop the flag"
MTP = "MTP training is not in miles yet: drop the flag"

# Flags that are fine at 1 (what miles does) and refused with the message otherwise.
ONLY_ONE = {
    "--num-gpus-per-node": ONE_DEVICE,
    "--expert-tensor-parallel-size": PARALLEL,
}

REJECTED: dict[str, str] = {
    "--tis-threshold": "an older slime spelling with no meaning today; use --tis-clip HIGH and --tis-clip-low LOW",
    "--offload": OFFLOAD, "--offload-train": OFFLOAD, "--offload-rollout": OFFLOAD,
    "--mtp-num-layers": MTP, "--enable-mtp-training": MTP, "--mtp-loss-scaling-factor": MTP,
    "--num-layers": ARCH, "--hidden-size": ARCH, "--ffn-hidden-size": ARCH, "--num-attention-heads": ARCH,
    "--group-query-attention": ARCH, "--num-query-groups": ARCH, "--kv-channels": ARCH, "--seq-length": ARCH,
    "--max-position-embeddings": ARCH, "--swiglu": ARCH, "--normalization": ARCH, "--norm-epsilon": ARCH,
    "--rotary-base": ARCH, "--vocab-size": ARCH, "--untie-embeddings-and-output-weights": ARCH,
    "--disable-bias-linear": ARCH, "--use-rotary-position-embeddings": ARCH, "--qk-layernorm": ARCH,
}
REJECTED_PREFIXES = {"--sglang-speculative-": SPECULATIVE, "--sglang-": SGLANG, "--moe-": ARCH}

# Where the trainer ranks go (no recipe change): read by `trainer_ranks`.
PLACEMENT: dict[str, str] = {
    "--actor-num-nodes": "nodes of trainer ranks; more than 1 needs --ray (a cluster started with `ray start`)",
    "--actor-num-gpus-per-node": "trainer ranks per node, as --nproc-per-node (train.backend = 'fsdp' past 1)",
}

# Accepted, no recipe change; the reason is printed.
NOTED: dict[str, tuple[type, str]] = {
    "--model-name": (str, "not needed: miles reads model_type from --hf-checkpoint's config.json"),
    "--use-dynamic-batch-size": (bool, "always on in miles (micro-batches packed to --max-tokens-per-gpu)"),
}

# slime's defaults where ours differ, applied to keys the recipe leaves unset (see module doc).
SLIME_DEFAULTS: dict[str, Any] = {
    "algo.loss_agg_mode": "seq_mean_token_mean",
    "algo.kl_loss_type": "k1",
}
# slime's dataset defaults, applied (same rule) when --prompt-data names the prompts.
SLIME_DATA_DEFAULTS: dict[str, Any] = {
    "data.input_key": "input", "data.label_key": "", "data.apply_chat_template": False, "data.shuffle": False,
}
# Flags that `miles train` declares itself (same meaning as slime's); listed for the table.
TYPER_FLAGS = {
    "--hf-checkpoint": "model.source (HF dir, .gguf or built-in name)",
    "--num-rollout": "loop.num_rollout",
    "--debug-rollout-only": "generate and reward only; samples saved to <run>/rollouts/",
    "--debug-train-only": "train on saved samples, no generation",
    "--load-debug-rollout-data": "miles JSONL samples (a file or a {rollout_id} template), not slime's .pt",
    "--save-interval": "loop.save_interval: a full checkpoint every N rollouts and after the last (as slime); "
                       "without it miles still saves after the last rollout, slime never",
    "--load": "resume from DIR's latest full checkpoint (a miles run folder, its checkpoints/ or one "
              "step_NNNNNN folder); starts fresh when DIR holds none yet, as slime does. Only a miles checkpoint; "
              "to start from other weights use --hf-checkpoint",
}
