"""`miles quantize`: a dense HF checkpoint -> block FP8 or compressed-tensors INT4 (W4A16)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from miles_cli.common import DebugOption, cli_errors, print_table, staged_progress

app = typer.Typer(no_args_is_help=True, help="Quantise a HF checkpoint to block FP8 or INT4 (compressed-tensors).")
_WORST_SHOWN = 5


@app.callback(invoke_without_command=True, subcommand_metavar="", context_settings={"allow_interspersed_args": True})
def quantize(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Dense HF checkpoint directory (or a built-in model name).")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output directory (must not exist).")],
    fmt: Annotated[str, typer.Option("--format", help="fp8 (128x128 block e4m3) or int4 (group-wise W4A16, pack-quantized).")],
    group_size: Annotated[int, typer.Option("--group-size", help="INT4 group size along the input features: 32, 64 or 128.")] = 128,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Module-name glob to keep dense (repeatable); replaces the defaults: lm_head, *embed_tokens, *norm, *.mlp.gate, *shared_expert_gate, *.shared_head.head.")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Quantise only modules matching this glob (repeatable), e.g. '*.mlp.experts.*' as train.qat does.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Dequantise the output: per-tensor error and logit KL vs the source.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    _debug: DebugOption = False,
) -> None:
    """Quantise SRC into DST shard by shard; nothing is left at DST if anything fails."""
    with cli_errors():
        from miles_core.checkpoint.quantize import quantize_checkpoint
        from miles_core.quant.formats import DEFAULT_IGNORE, QuantSpec

        spec = QuantSpec(format=fmt, group_size=group_size, ignore=tuple(ignore) if ignore else DEFAULT_IGNORE,
                         include=tuple(only or ()))
        with staged_progress() as on_progress:
            report = quantize_checkpoint(src, dst, spec, verify=verify, on_progress=on_progress)
        print_table(_size_table(report))
        if report.errors or report.logits or report.notes:
            print_table(_verify_table(report))
        if json_out is not None:
            json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def _size_table(report) -> Table:
    fmt = report.spec["format"] + (f" (group {report.spec['group_size']})" if report.spec["format"] == "int4" else "")
    table = Table(title=f"quantize: {report.src} -> {report.dst} [{fmt}]")
    for column in ("tensors", "count", "before", "after", "ratio"):
        table.add_column(column, justify="left" if column == "tensors" else "right")
    rows = [("quantised", report.num_quantized, report.quantized_bytes_before, report.quantized_bytes_after),
            ("kept dense", report.num_dense, report.dense_bytes, report.dense_bytes),
            ("total", report.num_quantized + report.num_dense, report.bytes_before, report.bytes_after)]
    for name, count, before, after in rows:
        table.add_row(name, str(count), _mib(before), _mib(after), f"{after / before:.3f}" if before else "-")
    table.caption = f"{report.seconds:.1f} s"
    return table


def _verify_table(report) -> Table:
    table = Table(title="verify", show_header=False)
    if report.errors:
        worst = sorted(report.errors, key=lambda e: e.rel, reverse=True)
        mean_rel = sum(e.rel for e in report.errors) / len(report.errors)
        table.add_row("tensors checked", str(len(report.errors)))
        table.add_row("relative error", f"mean {mean_rel:.3e}, max {worst[0].rel:.3e}")
        table.add_row("max abs error", f"{max(e.max_abs for e in report.errors):.3e}")
        for error in worst[:_WORST_SHOWN]:
            table.add_row(f"  {error.name}", f"rel {error.rel:.3e}, max abs {error.max_abs:.3e}")
    if report.logits:
        table.add_row("logit KL (mean / max)", f"{report.logits['kl_mean']:.3e} / {report.logits['kl_max']:.3e}")
        table.add_row("top-1 agreement", f"{report.logits['top1_agree']:.3f} over {int(report.logits['num_tokens'])} tokens")
    for note in report.notes:
        table.add_row("note", note)
    return table
