"""`miles train`: the GRPO loop (rollout -> reward -> advantages -> update -> weight sync)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from miles_cli.common import RecipeOption, SetOption, cli_errors, console, load_cli_config

app = typer.Typer(no_args_is_help=True, help="Train with GRPO: rollout, reward, policy update, weight sync.")


@app.callback(invoke_without_command=True)
def train(
    recipe: RecipeOption,
    overrides: SetOption = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<recipe>-<date>-<time>).")] = None,
    num_rollout: Annotated[Optional[int], typer.Option(help="Number of rollout steps (loop.num_rollout).")] = None,
    hf_checkpoint: Annotated[Optional[str], typer.Option(help="Model to start from (model.source): HF dir, .gguf or built-in name.")] = None,
    debug_rollout_only: Annotated[bool, typer.Option(help="Generate and reward only; save each step's samples; no training.")] = False,
    debug_train_only: Annotated[bool, typer.Option(help="Train on saved samples (see --load-debug-rollout-data); no generation.")] = False,
    load_debug_rollout_data: Annotated[Optional[str], typer.Option(help="Samples for --debug-train-only: a JSONL file or a template with {rollout_id}.")] = None,
) -> None:
    """Run `loop.num_rollout` GRPO steps and write metrics, checkpoints and the resolved config."""
    with cli_errors():
        from miles_core.errors import MilesError
        from miles_core.loop import run_training

        if debug_rollout_only and debug_train_only:
            raise MilesError("--debug-rollout-only and --debug-train-only exclude each other")
        extra = list(overrides or [])
        if num_rollout is not None:
            extra.append(f"loop.num_rollout={num_rollout}")
        if hf_checkpoint is not None:
            extra.append(f"model.source={json.dumps(hf_checkpoint)}")
        cfg = load_cli_config(recipe, extra)
        out = output_dir or Path(cfg.loop.output_dir or _default_run_dir(recipe))
        mode = "rollout_only" if debug_rollout_only else "train_only" if debug_train_only else "full"
        console.print(f"[bold]miles train[/] recipe={recipe} mode={mode} output={out}")
        if mode == "train_only" and cfg.eval.datasets:
            console.print("eval: skipped (--debug-train-only has no rollout engine)")
        with _progress() as progress:
            task = progress.add_task("rollout steps", total=cfg.loop.num_rollout, reward="-")
            result = run_training(cfg, out, mode=mode, rollout_data=load_debug_rollout_data,
                                  on_step=lambda step, m: progress.update(task, advance=1, reward=_fmt(m.get("rollout/raw_reward"))))
        console.print(_summary_table(result.history))
        for table in _eval_tables(result.evals):
            console.print(table)
        for path in result.checkpoints[-1:]:
            console.print(f"checkpoint: {path}")
        console.print(f"metrics: {out / 'metrics.jsonl'}")


def _default_run_dir(recipe: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"runs/{Path(recipe).stem}-{stamp}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if 0 < abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:.3f}"


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("reward {task.fields[reward]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


def _eval_tables(evals: list[tuple[int, dict]]) -> list[Table]:
    """The first and the last evaluation (before and after training) side by side."""
    from miles_cli.eval_tables import eval_tables

    picked = evals[:1] + evals[1:][-1:]
    return eval_tables([(f"step {step}", metrics) for step, metrics in picked])


def _summary_table(history: list[dict]) -> Table:
    columns = {"rollout/raw_reward": "reward", "rollout/response_len": "resp_len", "train/pg_loss": "pg_loss",
               "train/grad_norm": "grad_norm", "train/train_rollout_logprob_abs_diff": "logp_diff",
               "perf/step_time": "step_s"}
    table = Table("step", *columns.values(), title="training")
    for step, metrics in enumerate(history):
        table.add_row(str(step), *[_fmt(metrics.get(key)) for key in columns])
    return table
