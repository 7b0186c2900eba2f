"""The component config sections: one frozen, keyword-only dataclass per component.

Each component receives only its own section (the engine gets `EngineConfig`, never the whole
recipe). `MilesConfig` is the root that a recipe TOML file mirrors. Values are validated in
`__post_init__` with the field, the bad value and the allowed range. Runtime state (eos ids,
KV block counts, devices actually chosen) lives elsewhere, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from miles_core.config.agent import ToolsConfig
from miles_core.config.tree import check as _check

DType = Literal["float32", "bfloat16", "float16"]


MAX_BATCH = 1 << 20
"""Upper bound of batch-size-like counts: far above any real run, low enough that a typo fails
here with a message instead of being OOM-killed while the batch is built."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    source: str = "tiny-qwen3"
    """HF checkpoint directory, a `.gguf` file, or a built-in name (`smollm2-135m`, `tiny-qwen3`)."""
    dtype: DType = "float32"
    """Parameter and compute dtype of the native model."""
    device: str = "auto"
    """`auto` (CUDA if present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    ref_source: str = ""
    """The reference model for the KL loss / KL reward (slime's `--ref-load`), in any `source` form;
    empty: a frozen copy of the starting weights (`source`). It must share the tokenizer (same vocab)."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "source must name a checkpoint, got ''")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
               f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    backend: Literal["native", "sglang"] = "native"
    """Rollout engine: `native` (in-process PyTorch, shares the trainer's model code) or `sglang`
    (HTTP client of SGLang's native API: SGLang servers or `miles serve`, at `urls`)."""
    max_batch_size: int = 64
    """Most sequences decoded together in one forward pass."""
    max_context_len: int = 0
    """Prompt + response token limit; 0 uses the model's `max_position_embeddings`."""
    return_routed_experts: bool = False
    """MoE: record every token's top-k experts at every MoE layer into the samples (for R3)."""
    mem_fraction: float = 0.5
    """CUDA: most of the GPU memory free after loading the weights that the KV pool takes (like
    SGLang's `mem_fraction_static`), capped at `max_batch_size` sequences of `max_context_len`
    tokens; used when `num_kv_blocks` is 0. Below SGLang's 0.85 because the embedded trainer
    shares the GPU."""
    num_kv_blocks: int = 0
    """KV pool size in blocks; 0 sizes it from `mem_fraction` (CUDA) or, on CPU, for
    `max_batch_size` sequences of `max_context_len` tokens, at most 1 GiB."""
    block_size: int = 64
    """Tokens per KV block; 64 equals the invariant attention kernel's key tile (BLOCK_N)."""
    max_num_batched_tokens: int = 16384
    """Most prompt tokens prefilled in one step; longer prompts are prefilled in chunks. An eager
    prefill step of a 0.6B model costs about 50 ms of host time (kernel launches, compiled-region
    guards) whatever its size, more than its GPU work at 8,192 tokens on an H200: fewer, larger
    steps (activations grow with it: 16,384 tokens x a 4B model's 19,456-wide SwiGLU input is
    0.6 GB in bf16)."""
    weights: Literal["dense", "quantized"] = "dense"
    """Native engine on a quantised checkpoint (`miles quantize`): `dense` dequantises it on load into
    `model.dtype`; `quantized` keeps its FP8 / INT4 Linear weights as stored and computes with the
    quantised GEMMs (Triton on CUDA; dequantise per matmul elsewhere, same bits as `dense`)."""
    cuda_graphs: bool = True
    """CUDA, dense models: capture the decode step as CUDA graphs at batch sizes 1, 2, 4, 8, 16, ...
    `max_batch_size` and replay them (a few seconds of capture at start-up; MoE runs eagerly)."""
    overlap: Literal["auto", "on", "off"] = "auto"
    """Plan and launch each decode step before reading the previous one's tokens, so the host's
    per-step work runs while the GPU computes (SGLang's overlap scheduler does the same); `auto`:
    on CUDA, off on CPU (where nothing runs asynchronously). Invariant mode gives the same bits
    either way; fast mode's rounding follows its batch sizes, which a stop found a step late
    changes for one step (`engine/native/overlap.py`)."""
    stable_memory: bool = True
    """CUDA, `engine.colocate`: the KV pool and weights keep their addresses across a release
    (CUDA virtual memory), so a resume needs no graph capture; false frees and reallocates them."""
    urls: tuple[str, ...] = ()
    """`sglang` backend: base URLs of the servers (`http://host:port`); requests go to the one with
    the fewest outstanding sequences."""
    api_key: str = ""
    """`sglang` backend: sent as `Authorization: Bearer KEY` when set."""
    request_timeout_s: float = 600.0
    """`sglang` backend: seconds one HTTP call may take before the server counts as failed."""
    health_retries: int = 5
    """`sglang` backend: health-check attempts per server at start-up (back-off doubles from 0.5 s)."""
    launch: bool = False
    """`sglang` backend: start the servers for the run (`server`), stopped when it ends."""
    server: Literal["sglang", "miles"] = "sglang"
    """With `launch`: `sglang` (`python -m sglang.launch_server`, needs `sglang`) or `miles`
    (`miles serve`, the native engine, on the run's model.source / dtype)."""
    sglang_args: tuple[str, ...] = ()
    """With `launch`: extra arguments of every server's command line (`sglang.launch_server` flags,
    or `miles serve` options such as `["--set", "engine.max_batch_size=32"]`)."""
    num_gpus: int = 0
    """With `launch`: GPUs for all servers together (slime's `--rollout-num-gpus`), giving
    `num_gpus / num_gpus_per_engine` servers placed after the trainer's GPUs (on them with
    `colocate`); 0: one server per `urls` entry (or one)."""
    num_gpus_per_engine: int = 1
    """GPUs of one server (slime's `--rollout-num-gpus-per-engine`; SGLang's `--tp-size`); 1 for
    `miles` servers and the native engine (no tensor parallelism)."""
    launch_timeout_s: float = 600.0
    """With `launch`: seconds every server may take to answer `GET /health` after it is started."""
    colocate: bool = False
    """Engine and trainer share GPUs (slime's `--colocate`): the engine releases its GPU memory (KV
    cache, CUDA graphs, weights) while the trainer trains, and the trainer moves its optimizer
    state to CPU while the engine generates."""
    weights_cpu_backup: bool = False
    """`colocate`: copy the engine's weights to host memory at each release and back at the resume
    (SGLang's `--enable-weights-cpu-backup`); false drops them, since the weight sync after every
    resume rewrites them all: no copy out and back, no host memory of their size."""
    ranks: Literal["first", "all"] = "first"
    """With several trainer ranks (`--nproc-per-node N`): the in-process native engine in rank 0's
    process only (`first`), or one in every rank's process on its GPU (`all`: rank 0 splits each
    generation over them; each takes the full weights its rank's FSDP gather makes for the sync)."""

    def __post_init__(self) -> None:
        _check(1 <= self.max_batch_size <= MAX_BATCH,
               f"max_batch_size must be in [1, {MAX_BATCH}], got {self.max_batch_size}")
        _check(self.max_context_len >= 0, f"max_context_len must be >= 0, got {self.max_context_len}")
        _check(0 < self.mem_fraction <= 1, f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        _check(self.num_kv_blocks >= 0, f"num_kv_blocks must be >= 0, got {self.num_kv_blocks}")
        _check(self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two >= 16, got {self.block_size}")
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _check(self.request_timeout_s > 0, f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        _check(self.health_retries >= 1, f"health_retries must be >= 1, got {self.health_retries}")
        _check(self.backend != "sglang" or bool(self.urls) or self.launch,
               "backend 'sglang' needs urls = ['http://host:port', ...] (or launch = true)")
        self._check_placement()
        for url in self.urls:
            _check(re.fullmatch(r"https?://[^/\s]+/?", url) is not None,
                   f"urls entries must look like http://host:port, got '{url}'")

    def _check_placement(self) -> None:
        per, total = self.num_gpus_per_engine, self.num_gpus
        _check(total >= 0, f"num_gpus must be >= 0, got {total}")
        _check(per >= 1, f"num_gpus_per_engine must be >= 1, got {per}")
        _check(self.launch_timeout_s > 0, f"launch_timeout_s must be > 0, got {self.launch_timeout_s}")
        _check(not self.launch or self.backend == "sglang",
               f"launch = true starts servers for backend 'sglang' (the HTTP client), got backend '{self.backend}'")
        native = self.backend == "native" or (self.launch and self.server == "miles")
        _check(per == 1 or not native, f"num_gpus_per_engine must be 1 for the native engine (no tensor "
               f"parallelism; backend '{self.backend}', server '{self.server}'), got {per}")
        _check(total <= 1 or (self.backend == "sglang" and self.launch),
               f"num_gpus = {total} places servers on GPUs of their own: needs backend = 'sglang' with launch = "
               "true (the native engine runs in trainer rank 0's process, on its device)")
        _check(total % per == 0, f"num_gpus ({total}) must be a multiple of num_gpus_per_engine ({per})")
        count = total // per
        _check(not (self.launch and count and self.urls and len(self.urls) != count),
               f"num_gpus / num_gpus_per_engine = {count} servers, but urls names {len(self.urls)}")


@dataclass(frozen=True, kw_only=True)
class ArithmeticConfig:
    num_prompts: int = 256
    """How many problems the task generates."""
    min_operand: int = 0
    """Smallest operand (inclusive)."""
    max_operand: int = 9
    """Largest operand (inclusive)."""
    operators: str = "+"
    """Characters from `+-*`; each problem picks one."""
    split: Literal["train", "test"] = "train"
    """`test` draws from problems disjoint from `train` (held-out evaluation)."""
    seed: int = 0
    """Seed of the problem draw."""

    def __post_init__(self) -> None:
        _check(self.num_prompts >= 1, f"num_prompts must be >= 1, got {self.num_prompts}")
        _check(self.min_operand <= self.max_operand,
               f"min_operand ({self.min_operand}) must be <= max_operand ({self.max_operand})")
        _check(bool(self.operators) and set(self.operators) <= set("+-*"),
               f"operators must be a non-empty subset of '+-*', got '{self.operators}'")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = ""
    """Prompt file (`.jsonl` or `.parquet`); leave empty to use `task`."""
    task: str = ""
    """Built-in generated task instead of a file: `arithmetic`."""
    input_key: str = "prompt"
    """Record key holding the prompt: text, or a list of chat messages."""
    label_key: str = "label"
    """Record key of the reference answer handed to the reward function (absent -> None)."""
    metadata_key: str = "metadata"
    """Record key of a dict of extra fields copied into `Sample.metadata`."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (text becomes one user message)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra chat-template variables, e.g. `{enable_thinking = false}` for Qwen3."""
    system_prompt: str = ""
    """System message put before text prompts when the chat template is applied."""
    fewshot_messages: tuple[dict[str, Any], ...] = ()
    """Chat messages put after the system prompt and before every prompt's own messages (few-shot
    turns, e.g. a worked tool call); with the chat template only."""
    prompt_template: str = "{prompt}"
    """Text around a text prompt; the literal `{prompt}` is replaced (e.g. to add an instruction)."""
    shuffle: bool = True
    """Shuffle prompt order (with `seed`) when the training loop draws batches."""
    seed: int = 0
    """Seed of the prompt shuffle."""
    max_prompts: int = 0
    """Use only the first N prompts; 0 uses all."""
    on_long_prompt: Literal["error", "skip"] = "error"
    """A prompt with no room for one generated token in the engine's context (engine.max_context_len
    or the model's max_position_embeddings), found before the first step: `error` names it and
    stops; `skip` drops such prompts and prints how many."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)

    def __post_init__(self) -> None:
        _check(not (self.path and self.task),
               f"set only one of path or task (got path='{self.path}', task='{self.task}')")
        _check(self.max_prompts >= 0, f"max_prompts must be >= 0, got {self.max_prompts}")
        bad = [m for m in self.fewshot_messages if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         and isinstance(m.get("content"), str))]
        _check(not bad, f"fewshot_messages entries must be {{role = '...', content = '...'}} tables, got {bad[:1]}")
        _check("{prompt}" in self.prompt_template,
               f"prompt_template must contain '{{prompt}}', got '{self.prompt_template}'")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    """Stop strings; the response text is cut before the match."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop token ids besides the tokenizer's and generation config's eos ids."""
    n_samples_per_prompt: int = 1
    """Responses per prompt (SGLang's `n`); a GRPO group."""
    seed: int = 0
    """Base seed; each request derives its own, so results repeat run to run."""

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 or >= 1, got {self.top_k}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(1 <= self.n_samples_per_prompt <= MAX_BATCH,
               f"n_samples_per_prompt must be in [1, {MAX_BATCH}], got {self.n_samples_per_prompt}")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    batch_size: int = 8
    """Prompts per rollout step (slime's `rollout_batch_size`); each yields a group of samples. At
    most the number of prompts in the data (a larger batch would repeat prompts within a step)."""
    partial: bool = False
    """Partial rollout: once a step has its groups, abort the unfinished ones and continue them (tokens and
    log-probs kept) in a later step under the new weights; needs algo.over_sampling_batch_size > batch_size."""
    mask_offpolicy_prefix: bool = False
    """With `partial`: response tokens generated in an earlier step (older weights) get loss mask 0."""

    generate_function: str = ""
    """Custom rollout of one sample (slime's `--custom-generate-function-path`): a
    `package.module:function` path to `async fn(ctx, sample, sampling) -> Sample | list[Sample]`."""
    environment: str = ""
    """Multi-turn environment (`reset()`/`step(action)`): `package.module:factory` called with the
    prompt sample; empty with `tools.names` set: the built-in tool-use environment."""
    max_turns: int = 4
    """Multi-turn: most model turns in one sample (each followed by tool results or an observation)."""
    sample_timeout_s: float = 0.0
    """Seconds one sample's generate function may take before it is aborted (reward 0, not trained); 0: no limit."""
    step_timeout_s: float = 0.0
    """Seconds all samples of one generate call may take; unfinished ones are then aborted; 0: no limit."""
    tools: ToolsConfig = field(default_factory=ToolsConfig)

    def __post_init__(self) -> None:
        _check(1 <= self.batch_size <= MAX_BATCH, f"batch_size must be in [1, {MAX_BATCH}], got {self.batch_size}")
        _check(self.partial or not self.mask_offpolicy_prefix, "mask_offpolicy_prefix needs partial = true")
        _check(1 <= self.max_turns <= 1024, f"max_turns must be in [1, 1024], got {self.max_turns}")
        for name in ("sample_timeout_s", "step_timeout_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    @property
    def agentic(self) -> bool:
        """Whether samples come from a generate function (custom, or the built-in multi-turn one)."""
        return bool(self.generate_function or self.environment or self.tools.names)


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    type: str = "math"
    """Registry name (`math`, `boxed`, `f1`, `last_number`, `deepscaler`, `dapo`, `remote_rm`) or a
    `module:function` path."""
    key: str = ""
    """When the reward function returns a dict, the entry used as the scalar reward."""
    max_concurrency: int = 16
    """Most async reward calls in flight at once."""
    max_failure_fraction: float = 0.5
    """Stop the run when more than this fraction of a batch's reward calls fail (raise, return a
    non-number or time out; they score 0); 1 never stops."""
    timeout: float = 60.0
    """Seconds per sample for a user (dotted-path) or async reward function; a sample that takes
    longer scores 0 and counts as failed. 0 waits forever. Built-in rewards run without it."""
    remote_url: str = ""
    """`remote_rm`: the URL each sample is POSTed to (slime's `--rm-url`), e.g. `http://host:8000/reward`."""

    def __post_init__(self) -> None:
        _check(bool(self.type), "type must name a reward function, got ''")
        _check(self.max_concurrency >= 1, f"max_concurrency must be >= 1, got {self.max_concurrency}")
        _check(0 <= self.max_failure_fraction <= 1,
               f"max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")
        _check(self.timeout >= 0, f"timeout must be >= 0 seconds, got {self.timeout}")
        _check(self.type != "remote_rm" or re.fullmatch(r"https?://\S+", self.remote_url) is not None,
               f"type 'remote_rm' needs remote_url (slime's --rm-url) = 'http://host:port/path', got '{self.remote_url}'")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    num_rollout: int = 10
    """Rollout steps (generate -> reward -> train -> sync) in the run."""
    save_interval: int = 0
    """Write a full checkpoint (HF export + trainer and loop state, resumable) every N rollout
    steps; 0 saves only at the end (and when a signal stops the run)."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (older ones are removed after a successful save); 0 keeps all."""
    output_dir: str = ""
    """Run folder; empty means `runs/<recipe>-<date>-<time>`."""
    save_rollout_data: bool = False
    """Also write each step's samples to `rollouts/step_NNNNNN.jsonl` in the run folder."""
    save_rollout_data_path: str = ""
    """Write each step's samples (JSONL) to this path instead, relative to the working directory;
    `{rollout_id}` (format spec allowed, e.g. `{rollout_id:06d}`) becomes the 0-based step, as
    `--load-debug-rollout-data` reads it (slime's `--save-debug-rollout-data`). Setting it saves."""
    mode: Literal["sync", "async"] = "sync"
    """`sync`: generate, then train; `async`: generation of later steps overlaps training (needs TIS/MIS)."""
    max_staleness: int = 1
    """Most weight versions (optimizer steps, several per rollout) a trained token may lag the trainer."""

    def __post_init__(self) -> None:
        _check(self.num_rollout >= 1, f"num_rollout must be >= 1, got {self.num_rollout}")
        _check(self.max_staleness >= 0, f"max_staleness must be >= 0, got {self.max_staleness}")
        _check(self.save_interval >= 0, f"save_interval must be >= 0, got {self.save_interval}")
        _check(self.keep_last >= 0, f"keep_last must be >= 0, got {self.keep_last}")
        _check(_formats(self.save_rollout_data_path),
               f"save_rollout_data_path must be a path whose only field is {{rollout_id}}, "
               f"got '{self.save_rollout_data_path}'")


def _formats(template: str) -> bool:
    try:
        template.format(rollout_id=0)
    except (KeyError, IndexError, ValueError):
        return False
    return True


@dataclass(frozen=True, kw_only=True)
class EvalDatasetConfig:
    """One held-out set. In a recipe, keys left out of its `data`, `sampling` and `reward` tables
    are taken from the top-level sections (see `inherit_eval_defaults`)."""

    name: str = ""
    """Metric prefix: results are logged as `eval/<name>/...`; letters, digits, `_`, `-`, `.`."""
    data: DataConfig = field(default_factory=DataConfig)
    """The prompts, all of them in file order (`shuffle` is ignored)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How responses are drawn; `n_samples_per_prompt` is the largest k of pass@k. The same
    seeds are used at every evaluation, so two evaluations differ only by the weights."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """How samples are scored."""
    correct_threshold: float = 1.0
    """A sample counts as correct (`accuracy`, `pass@k`) when its reward is >= this."""

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)),
               f"name must be non-empty letters, digits, '_', '-' or '.', got '{self.name}'")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    datasets: tuple[EvalDatasetConfig, ...] = ()
    """Held-out sets (`[[eval.datasets]]` tables in a recipe); none disables evaluation."""
    eval_interval: int = 0
    """Also evaluate every N rollout steps; 0 evaluates only before training and after the last step."""
    skip_eval_before_train: bool = False
    """Do not evaluate the starting weights."""

    def __post_init__(self) -> None:
        _check(self.eval_interval >= 0, f"eval_interval must be >= 0, got {self.eval_interval}")
        names = [d.name for d in self.datasets]
        twice = sorted({n for n in names if names.count(n) > 1})
        _check(not twice, f"dataset names must be unique, got {', '.join(map(repr, twice))} more than once")


@dataclass(frozen=True, kw_only=True)
class AlignmentConfig:
    mode: Literal["fast", "invariant"] = "fast"
    """`fast`: vendor kernels (a small train/inference mismatch, corrected by TIS/MIS);
    `invariant`: batch-invariant kernels in engine and trainer, bitwise-equal log-probs (KL = 0)."""
    true_on_policy: bool = False
    """Fail the run at the first step whose trainer log-probs differ from the engine's in any bit."""
