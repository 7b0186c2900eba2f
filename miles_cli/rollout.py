"""`miles rollout`: generate samples from a prompt set into a JSONL file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from miles_cli.common import RecipeOption, SetOption, cli_errors, console, load_cli_config

app = typer.Typer(no_args_is_help=True, help="Generate samples (tokens, logprobs) from prompts to JSONL.")


@app.callback(invoke_without_command=True)
def rollout(
    recipe: RecipeOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write (one Sample per line).")],
    prompt_data: Annotated[Optional[str], typer.Option(help="Prompt file (.jsonl/.parquet); replaces the recipe's data source.")] = None,
    overrides: SetOption = None,
) -> None:
    """Generate `n_samples_per_prompt` responses for every prompt and write them as JSONL."""
    with cli_errors():
        from miles_core.rollout import run_rollout, with_prompt_data

        cfg = with_prompt_data(load_cli_config(recipe, overrides), prompt_data)
        with _progress() as progress:
            task = progress.add_task("generating", total=None)
            summary = run_rollout(
                cfg, output,
                on_start=lambda total: progress.update(task, total=total),
                on_progress=lambda k: progress.advance(task, k),
            )
        console.print(_summary_table(summary))


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _summary_table(summary) -> Table:
    table = Table(title="rollout", show_header=False)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.finish_reasons.items()))
    for key, value in [
        ("prompts", f"{summary.num_prompts}"),
        ("samples", f"{summary.num_samples}"),
        ("response tokens", f"{summary.response_tokens}"),
        ("mean response length", f"{summary.mean_response_length:.1f}"),
        ("finish reasons", reasons),
        ("time", f"{summary.seconds:.1f} s"),
        ("tokens/s", f"{summary.tokens_per_second:.1f}"),
        ("output", str(summary.output)),
    ]:
        table.add_row(key, value)
    return table
