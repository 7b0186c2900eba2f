"""Typed configuration: one frozen, keyword-only dataclass per component.

Each component receives only its own section (the engine gets `EngineConfig`, never the whole
recipe). `MilesConfig` is the root that a recipe TOML file mirrors. Values are validated in
`__post_init__` with the field, the bad value and the allowed range. Runtime state (eos ids,
KV block counts, devices actually chosen) lives elsewhere, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from miles_core import config_tree

DType = Literal["float32", "bfloat16", "float16"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    source: str = "tiny-qwen3"
    """HF checkpoint directory, a `.gguf` file, or a built-in name (`smollm2-135m`, `tiny-qwen3`)."""
    dtype: DType = "float32"
    """Parameter and compute dtype of the native model."""
    device: str = "auto"
    """`auto` (CUDA if present, else CPU), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "source must name a checkpoint, got ''")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
               f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    backend: Literal["native"] = "native"
    """Rollout engine: `native` (in-process PyTorch, shares the trainer's model code)."""
    max_batch_size: int = 64
    """Most sequences decoded together in one forward pass."""
    max_context_len: int = 0
    """Prompt + response token limit; 0 uses the model's `max_position_embeddings`."""

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}")
        _check(self.max_context_len >= 0, f"max_context_len must be >= 0, got {self.max_context_len}")


@dataclass(frozen=True, kw_only=True)
class ArithmeticConfig:
    num_prompts: int = 256
    """How many problems the task generates."""
    min_operand: int = 0
    max_operand: int = 9
    operators: str = "+"
    """Characters from `+-*`; each problem picks one."""
    split: Literal["train", "test"] = "train"
    """`test` draws from problems disjoint from `train` (held-out evaluation)."""
    seed: int = 0

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
    metadata_key: str = "metadata"
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (text becomes one user message)."""
    system_prompt: str = ""
    """System message put before text prompts when the chat template is applied."""
    prompt_template: str = "{prompt}"
    """Format string applied to text prompts before templating, e.g. to add an instruction."""
    shuffle: bool = True
    """Shuffle prompt order (with `seed`) when the training loop draws batches."""
    seed: int = 0
    max_prompts: int = 0
    """Use only the first N prompts; 0 uses all."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)

    def __post_init__(self) -> None:
        _check(bool(self.path) != bool(self.task),
               f"set exactly one of path or task (got path='{self.path}', task='{self.task}')")
        _check(self.max_prompts >= 0, f"max_prompts must be >= 0, got {self.max_prompts}")
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
        _check(self.n_samples_per_prompt >= 1,
               f"n_samples_per_prompt must be >= 1, got {self.n_samples_per_prompt}")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    batch_size: int = 8
    """Prompts per rollout step (slime's `rollout_batch_size`); each yields a group of samples."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class MilesConfig:
    """The whole recipe. Sections are handed to their components one by one."""

    description: str = ""
    """One line shown by `miles recipes list`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(task="arithmetic"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


def load_config(recipe: str, overrides: list[str] | None = None) -> MilesConfig:
    """Recipe name or path + `section.key=value` overrides -> validated `MilesConfig`."""
    raw = config_tree.load_recipe(recipe)
    raw = config_tree.apply_overrides(raw, list(overrides or []), MilesConfig)
    return config_tree.build(MilesConfig, raw)
