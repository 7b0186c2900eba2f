"""`miles rollout`: generate samples from a prompt set into a JSONL file, or (`--eval`) evaluate
checkpoints on the recipe's eval datasets and print the metrics side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from miles_cli.common import DebugOption, RecipeOption, SetOption, cli_errors, console, load_cli_config, print_table, progress_bar

app = typer.Typer(no_args_is_help=True, help="Generate samples (tokens, logprobs) from prompts to JSONL, or --eval checkpoints.")


# Usage shows the options, not `COMMAND [ARGS]...`: the sub-app has no subcommands.
@app.callback(invoke_without_command=True, subcommand_metavar="")
def rollout(
    recipe: RecipeOption,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file to write (one Sample per line); required unless --eval. The resolved recipe goes beside it as <stem>.config.toml.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output (never an input: prompts, recipe, checkpoint).")] = False,
    prompt_data: Annotated[Optional[str], typer.Option(help="Prompt file (.jsonl/.parquet); replaces the recipe's data source.")] = None,
    overrides: SetOption = None,
    eval_: Annotated[bool, typer.Option("--eval", help="Evaluate on the recipe's eval datasets and print metrics instead.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option(help="With --eval: model to evaluate (HF dir, .gguf or built-in name; default model.source).")] = None,
    compare: Annotated[Optional[str], typer.Option(help="With --eval: a second model, evaluated on the same prompts and seeds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --eval: print the metrics as JSON instead of tables.")] = False,
    show: Annotated[int, typer.Option("--show", help="Print N samples turn by turn (tool calls, masks).")] = 0,
    _debug: DebugOption = False,
) -> None:
    """Generate `n_samples_per_prompt` responses for every prompt and write them as JSONL; with
    `--eval`, evaluate one or two checkpoints on the recipe's eval datasets instead."""
    with cli_errors():
        from miles_core.errors import MilesError
        from miles_core.rl.rollout_job import run_rollout, with_prompt_data

        if eval_:
            if output is not None or prompt_data is not None:
                raise MilesError("--eval uses the recipe's eval datasets and writes no samples; drop --output/--prompt-data")
            _evaluate(load_cli_config(recipe, overrides), checkpoint, compare, as_json)
            return
        if checkpoint or compare or as_json:
            raise MilesError("--checkpoint, --compare and --json need --eval")
        if output is None:
            raise MilesError("--output is required (or pass --eval to evaluate)")
        if show < 0:
            raise MilesError(f"--show must be >= 0 samples, got {show}")
        cfg = with_prompt_data(load_cli_config(recipe, overrides), prompt_data)
        _check_outputs(recipe, cfg, output, overwrite)
        with progress_bar() as progress:
            task = progress.add_task("generating", total=None)
            summary = run_rollout(
                cfg, output,
                on_start=lambda total: progress.update(task, total=total),
                on_progress=lambda k: progress.advance(task, k),
            )
        print_table(_summary_table(summary))
        _show_samples(output, show)


def _check_outputs(recipe: str, cfg, output: Path, overwrite: bool) -> None:
    """Refuse, before any generation, to write over an existing file or over an input."""
    from miles_core.config.tree import find_recipe
    from miles_core.utils.io import check_output

    inputs = [find_recipe(recipe), *([cfg.data.path] if cfg.data.path else []), cfg.model.source]
    check_output(output, overwrite=overwrite, inputs=inputs)
    check_output(output.with_name(output.stem + ".config.toml"), overwrite=overwrite, inputs=inputs,
                 flag="--output's recipe copy")


def _evaluate(cfg, checkpoint: str | None, compare: str | None, as_json: bool) -> None:
    from miles_core.rl.eval import run_eval

    checkpoints = [checkpoint or cfg.model.source, *([compare] if compare else [])]
    if as_json:
        typer.echo(json.dumps(run_eval(cfg, checkpoints).to_dict(), indent=2))
        return
    from miles_cli.eval_tables import eval_tables

    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=None)
        report = run_eval(cfg, checkpoints, on_start=lambda total: progress.update(task, total=total),
                          on_progress=lambda k: progress.advance(task, k))
    for table in eval_tables(list(zip(report.checkpoints, report.metrics))):
        print_table(table)
    for name, seconds in zip(report.checkpoints, report.seconds):
        console.print(f"{name}: {seconds:.1f} s")


def _show_samples(output: Path, count: int) -> None:
    """The first `count` samples: each span of the response with its role, size and loss mask."""
    from itertools import islice

    from rich.markup import escape

    from miles_core.agent.multiturn import turn_spans
    from miles_core.sample import read_samples_jsonl

    for sample in islice(read_samples_jsonl(output), count):
        meta = sample.metadata
        console.rule(f"sample {sample.index} (prompt {sample.group_index}): {sample.status.value}, "
                     f"{meta.get('num_turns', 1)} turn(s), {meta.get('tool_calls', 0)} tool call(s), "
                     f"{sample.prompt_length} prompt + {sample.response_length} response tokens")
        for span in turn_spans(sample):
            style = "green" if span["trained"] else "yellow"
            label = f"{span['role']}, {span['length']} tokens, loss_mask {int(span['trained'])}"
            console.print(f"[{style}]\\[{label}][/{style}] {escape(span['text'])}")


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
