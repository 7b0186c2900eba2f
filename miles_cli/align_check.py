"""`miles align-check`: measure the log-prob gap between the rollout engine and the trainer."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer
from rich.table import Table

from miles_cli.common import DebugOption, RecipeOption, SetOption, cli_errors, console, load_cli_config, print_table

app = typer.Typer(no_args_is_help=True, help="Compare engine and trainer log-probs on the same tokens (KL, bitwise).")


def _sizes(text: str) -> list[int]:
    from miles_core.errors import MilesError

    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MilesError(f"--batch-sizes '{text}' must be comma-separated integers, e.g. 1,7,64") from None
    if not sizes or min(sizes) < 1:
        raise MilesError(f"--batch-sizes '{text}' must list integers >= 1")
    return sizes


def _check_limit(flag: str, value: float) -> None:
    from miles_core.errors import MilesError

    if math.isnan(value) or value < 0:
        raise MilesError(f"{flag} must be a number >= 0 (inf disables the check), got {value}")


def _exceeds(worst: float, limit: float) -> bool:
    """A finite limit fails on anything not <= it, NaN included; inf is no gate."""
    return limit != math.inf and not worst <= limit


# Usage shows the options, not `COMMAND [ARGS]...`: the sub-app has no subcommands.
@app.callback(invoke_without_command=True, subcommand_metavar="")
def align_check(
    recipe: RecipeOption,
    overrides: SetOption = None,
    batch_sizes: Annotated[str, typer.Option(help="Engine batch sizes to sweep, comma-separated.")] = "1,7,64",
    num_prompts: Annotated[int, typer.Option(min=1, help="Prompts from the recipe's data (each sampled n times).")] = 16,
    engine: Annotated[str, typer.Option(help="Rollout engine: native.")] = "native",
    trainer: Annotated[str, typer.Option(help="Trainer: native or megatron (megatron-core, needs the megatron extra).")] = "native",
    layers: Annotated[int, typer.Option(min=0, help="Diff every layer's hidden states on this many samples.")] = 0,
    precision: Annotated[str, typer.Option(help="Trainer/engine pairing: recipe, fp8-engine (FP8 engine), int4-qat "
                                                "(INT4-QAT trainer, INT4 engine), int4-engine (plain trainer, INT4 engine).")] = "recipe",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")] = False,
    max_kl: Annotated[float, typer.Option(help="Exit with code 1 if KL (k3) exceeds this at any batch size.")] = float("inf"),
    max_abs_diff: Annotated[float, typer.Option(help="Exit with code 1 if max |delta logprob| exceeds this.")] = float("inf"),
    _debug: DebugOption = False,
) -> None:
    """Generate with the engine, recompute log-probs with the trainer, report the mismatch."""
    with cli_errors():
        from miles_core.checks.align import run_align_check

        _check_limit("--max-kl", max_kl)
        _check_limit("--max-abs-diff", max_abs_diff)
        cfg = load_cli_config(recipe, overrides)
        report = run_align_check(cfg, batch_sizes=_sizes(batch_sizes), num_prompts=num_prompts, engine=engine,
                                 trainer=trainer, layers=layers, precision=precision,
                                 on_progress=None if as_json else lambda msg: console.print(f"[dim]{msg}[/]"))
        if as_json:
            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            _print_report(report)
        failed = _exceeds(report.worst("kl_k3"), max_kl) or _exceeds(report.worst("max_abs_diff"), max_abs_diff)
    if failed:
        console.print(f"[bold red]FAIL[/]: KL {report.worst('kl_k3'):.3e} (limit {max_kl}), "
                      f"max |delta| {report.worst('max_abs_diff'):.3e} (limit {max_abs_diff})")
        raise typer.Exit(1)


def _print_report(report) -> None:
    title = (f"align-check: engine={report.engine} trainer={report.trainer} mode={report.mode} dtype={report.dtype} "
             f"precision={report.precision}")
    moe = any(r.routing_agreement is not None for r in report.results)
    columns = ["batch", "samples", "tokens", "mean |d|", "max |d|", "KL k1", "KL k3", "bitwise =", "mean e^|d|"]
    table = Table(*columns, *(["routing ="] if moe else []), title=title)
    for r in report.results:
        s = r.stats
        cells = [str(r.batch_size), str(r.num_samples), str(int(s["num_tokens"])), f"{s['mean_abs_diff']:.3e}",
                 f"{s['max_abs_diff']:.3e}", f"{s['kl_k1']:.3e}", f"{s['kl_k3']:.3e}",
                 f"{s['bitwise_equal']:.2%}", f"{s['mean_exp_abs_diff']:.6f}"]
        table.add_row(*cells, *([f"{r.routing_agreement:.2%}"] if moe else []))
    print_table(table)
    last = report.results[-1]
    for name, rows in (("response position", last.by_position), ("response length", last.by_length)):
        sub = Table(name, "tokens", "mean |d|", "max |d|", "bitwise =", title=f"batch {last.batch_size} by {name}")
        for label, s in rows.items():
            sub.add_row(label, str(int(s["num_tokens"])), f"{s['mean_abs_diff']:.3e}", f"{s['max_abs_diff']:.3e}",
                        f"{s['bitwise_equal']:.2%}")
        print_table(sub)
    if report.layers:
        sub = Table("module", "max |d|", "bitwise =", "KL", "top-1 =", title="hidden states, engine path vs trainer path")
        for row in report.layers:
            extra = [f"{row['kl']:.3e}", f"{row['top1_agree']:.2%}"] if "kl" in row else ["", ""]
            sub.add_row(row["module"], f"{row['max_abs_diff']:.3e}", f"{row['bitwise_equal']:.2%}", *extra)
        print_table(sub)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
