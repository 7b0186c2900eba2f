"""slime/miles launch flags (`python train.py --rollout-batch-size 512 ...`) read as recipe keys.

One declarative table: `FLAGS` maps each supported kebab-case flag to the recipe keys it sets,
with a note wherever miles does not do exactly what slime does; `REJECTED` (and the prefix rules
in `REJECTED_PREFIXES`) name flags miles refuses, each with what to use instead or which feature
is missing; `NOTED` flags are accepted and change nothing (the reason is printed). A flag in no
table is refused with a did-you-mean. Nothing is silently ignored.

A slime-flag launch also takes slime's defaults where they differ from ours (`SLIME_DEFAULTS`),
for every key that the recipe leaves unset: slime reduces losses per sample and uses k1 KL.
`docs/slime_flags.md` is `slime_flags_doc.render_markdown()` of these tables (a test keeps them equal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from miles_core.config import MilesConfig, inherit_eval_defaults
from miles_core.config.tree import apply_overrides, build, load_recipe
from miles_core.errors import MilesError, did_you_mean
from miles_core.rewards.registry import CONFIGURED_REWARDS, REWARDS


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
        raise _Refused(f"--rm-type {name}: not in miles' reward registry ({known}); use --custom-rm-path module.function")
    return {"reward.type": name}


MEGATRON = ("above 1 selects train.backend = megatron; sizes above 1 need GPUs (refused on CPU) and are not "
            "run by miles yet")

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
    **{f"--{name.replace('_', '-')}": Flag((f"train.{name}",), int, MEGATRON, to=_parallel(f"train.{name}"))
       for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                    "context_parallel_size")},
    "--sequence-parallel": Flag(("train.sequence_parallel",), bool, MEGATRON, to=_parallel("train.sequence_parallel")),
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

ONE_DEVICE = ("not in miles yet: the rollout engine runs in trainer rank 0's process, on its device (more "
              "trainer ranks: --nproc-per-node, or --ray with --actor-num-nodes/--actor-num-gpus-per-node); drop "
              "the flag or set it to 1")
PARALLEL = ("expert tensor parallelism is not in miles' megatron backend yet: drop the flag or set it to 1")
ARCH = ("not needed: miles reads the architecture from --hf-checkpoint's config.json; drop the flag")
SGLANG = ("configures an SGLang server that slime launches: with miles' native engine drop it; with SGLang "
          "servers use --set engine.backend=sglang and pass server flags in engine.sglang_args (engine.launch = "
          "true) or start the servers yourself (engine.urls)")
SPECULATIVE = "speculative decoding is not in miles' native engine yet: drop the flag"
MTP = "MTP training is not in miles yet: drop the flag"

# Flags that are fine at 1 (what miles does) and refused with the message otherwise.
ONLY_ONE = {
    "--rollout-num-gpus": ONE_DEVICE,
    "--rollout-num-gpus-per-engine": ONE_DEVICE, "--num-gpus-per-node": ONE_DEVICE,
    "--expert-tensor-parallel-size": PARALLEL,
}

REJECTED: dict[str, str] = {
    "--tis-threshold": "an older slime spelling with no meaning today; use --tis-clip HIGH and --tis-clip-low LOW",
    "--offload": ONE_DEVICE, "--offload-train": ONE_DEVICE, "--offload-rollout": ONE_DEVICE,
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
    "--colocate": (bool, "always so in miles: engine and trainer share one process and device"),
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


class _Refused(Exception):
    pass


@dataclass
class SlimeLaunch:
    """What the flags of one launch line ask for."""

    values: dict[str, Any] = field(default_factory=dict)
    """Recipe key -> value, in flag order (later flags win)."""
    given: dict[str, Any] = field(default_factory=dict)
    """Flag -> parsed value, as typed."""
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.values.items()]


def parse_slime_flags(argv: list[str]) -> SlimeLaunch:
    """Read `--flag value` / `--flag=value` / `--switch` items; every refused flag in one error."""
    launch, refused, i = SlimeLaunch(), [], 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        i += 1
        if not name.startswith("--"):
            refused.append(f"'{argv[i - 1]}': not a flag (flags start with --)")
            continue
        kind = _kind(name)
        raw: Any = inline if eq else None
        if raw is None and kind is not bool:
            count = _count_values(argv, i) if kind is list else min(1, _count_values(argv, i))
            raw = argv[i:i + count] if kind is list else (argv[i] if count else None)
            i += count
        try:
            _apply(launch, name, raw)
        except _Refused as err:
            refused.append(str(err))
    if "--eps-clip-high" in launch.given:
        launch.values["algo.eps_clip_high"] = launch.given["--eps-clip-high"]
    if refused:
        raise MilesError("slime flags miles cannot run:\n  " + "\n  ".join(refused))
    return launch


def _kind(name: str) -> type | None:
    if name in FLAGS:
        return FLAGS[name].type
    if name in NOTED:
        return NOTED[name][0]
    if name in ONLY_ONE or name in PLACEMENT:
        return int
    return list  # refused below, with the values that follow it


def _count_values(argv: list[str], start: int) -> int:
    end = start
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return end - start


def _apply(launch: SlimeLaunch, name: str, raw: Any) -> None:
    if name in REJECTED:
        raise _Refused(f"{name}: {REJECTED[name]}")
    for prefix, message in REJECTED_PREFIXES.items():
        if name.startswith(prefix):
            raise _Refused(f"{name}: {message}")
    if name in ONLY_ONE:
        if _convert(name, raw, int) != 1:
            raise _Refused(f"{name} {raw}: {ONLY_ONE[name]}")
        launch.notes.append(f"{name} 1: what miles does (one device)")
        return
    if name in PLACEMENT:
        value = _convert(name, raw, int)
        if value < 1:
            raise _Refused(f"{name} {raw}: must be >= 1")
        launch.given[name] = value
        return
    if name in NOTED:
        _convert(name, raw, NOTED[name][0])
        launch.notes.append(f"{name}: {NOTED[name][1]}")
        return
    if name not in FLAGS:
        known = [*FLAGS, *REJECTED, *NOTED, *ONLY_ONE, *PLACEMENT, *TYPER_FLAGS]
        raise _Refused(f"{name}: neither a miles train option nor a slime flag miles knows{did_you_mean(name, known)}")
    flag = FLAGS[name]
    value = _convert(name, raw, flag.type)
    launch.given[name] = value
    launch.values.update(flag.apply(value))


def _convert(name: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if raw is None:
            return True
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        raise _Refused(f"{name}: a switch takes no value, got '{raw}'")
    if raw is None or raw == []:
        raise _Refused(f"{name}: expects a value")
    if kind is list:
        return list(raw) if isinstance(raw, list) else [raw]
    try:
        return kind(raw)
    except ValueError:
        raise _Refused(f"{name}: expects {kind.__name__}, got '{raw}'") from None


def apply_slime_defaults(raw: dict[str, Any], launch: SlimeLaunch) -> tuple[dict[str, Any], list[str]]:
    """slime's defaults for keys the recipe (`raw`) and the flags leave unset; the keys used."""
    defaults = dict(SLIME_DEFAULTS)
    if "data.path" in launch.values:
        defaults.update(SLIME_DATA_DEFAULTS)
    used = [key for key in defaults if key not in launch.values and not _has(raw, key)]
    overrides = [f"{key}={json.dumps(defaults[key])}" for key in used]
    return apply_overrides(raw, overrides, MilesConfig), [f"{k}={json.dumps(defaults[k])}" for k in used]


def steps_for_global_batch(launch: SlimeLaunch, rollout_batch_size: int, n_samples: int) -> int | None:
    """train.num_steps_per_rollout from --global-batch-size (None if not given), checked as slime does."""
    gbs = launch.given.get("--global-batch-size")
    if gbs is None:
        return None
    total = rollout_batch_size * n_samples
    if gbs <= 0 or total % gbs:
        raise MilesError(f"--global-batch-size {gbs} must divide rollout_batch_size * n_samples_per_prompt = "
                         f"{rollout_batch_size} * {n_samples} = {total}")
    steps = total // gbs
    given = launch.given.get("--num-steps-per-rollout")
    if given is not None and given != steps:
        raise MilesError(f"--num-steps-per-rollout {given} disagrees with --global-batch-size {gbs}: "
                         f"{total} samples / {gbs} = {steps} steps")
    return steps


def trainer_ranks(launch: SlimeLaunch, nproc_per_node: int | None, use_ray: bool) -> int:
    """How many trainer ranks a launch asks for: nodes x ranks per node (--nproc-per-node or
    slime's --actor-num-gpus-per-node; they must agree when both are given)."""
    nodes = launch.given.get("--actor-num-nodes", 1)
    per_node = launch.given.get("--actor-num-gpus-per-node")
    if per_node is not None and nproc_per_node is not None and per_node != nproc_per_node:
        raise MilesError(f"--nproc-per-node {nproc_per_node} and --actor-num-gpus-per-node {per_node} disagree: "
                         "keep one")
    if nodes > 1 and not use_ray:
        raise MilesError(f"--actor-num-nodes {nodes} places trainer ranks on several nodes: add --ray (and start "
                         "the cluster with `ray start`)")
    return nodes * (per_node or nproc_per_node or 1)


def _has(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def resolve_config(recipe: str | None, flags: list[str], overrides: list[str]):
    """(MilesConfig, SlimeLaunch, slime defaults used) of a launch: recipe (or miles' defaults)
    < slime defaults where the recipe is silent < slime flags < `overrides` (CLI options, --set)."""
    launch = parse_slime_flags(flags)
    raw = load_recipe(recipe) if recipe else {}
    used: list[str] = []
    if launch.given or launch.notes:
        raw, used = apply_slime_defaults(raw, launch)
    tail = list(overrides)
    cfg = _build(raw, launch.overrides() + tail, needs_sources=recipe is None)
    steps = steps_for_global_batch(launch, cfg.rollout.batch_size, cfg.sampling.n_samples_per_prompt)
    if steps is not None:
        cfg = _build(raw, launch.overrides() + [f"train.num_steps_per_rollout={steps}"] + tail, needs_sources=False)
    return cfg, launch, used


def _build(raw: dict[str, Any], overrides: list[str], *, needs_sources: bool):
    raw = apply_overrides(raw, overrides, MilesConfig)
    if needs_sources:
        missing = [flag for flag, keys in (("--hf-checkpoint", ("model.source",)),
                                           ("--prompt-data", ("data.path", "data.task"))) if not any(
            _has(raw, key) and raw_value(raw, key) for key in keys)]
        if missing:
            raise MilesError("miles train needs --recipe NAME, or --hf-checkpoint and --prompt-data to start "
                             f"from miles' defaults (missing: {', '.join(missing)})")
    return build(MilesConfig, inherit_eval_defaults(raw))


def raw_value(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node
