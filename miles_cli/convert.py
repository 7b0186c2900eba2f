"""`miles convert`: HF <-> Megatron torch_dist checkpoints (GGUF in), streamed and verifiable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from miles_cli.common import DebugOption, cli_errors, print_table, staged_progress

app = typer.Typer(no_args_is_help=True, help="Convert checkpoints: HF <-> Megatron torch_dist (GGUF in).")


# Options may follow the positional paths: a Typer sub-app is a click group, which forbids that by default.
@app.callback(invoke_without_command=True, subcommand_metavar="", context_settings={"allow_interspersed_args": True})
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="HF directory, torch_dist checkpoint (or its root with latest_checkpointed_iteration.txt), or .gguf file.")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output directory (must not exist).")],
    to: Annotated[str, typer.Option("--to", help="Output format: torch_dist or hf.")],
    mtp_num_layers: Annotated[Optional[int], typer.Option(help="MTP layers to convert (default: all the source has; 0 drops them).")] = None,
    model_type: Annotated[Optional[str], typer.Option(help="HF model_type; needed for torch_dist checkpoints that carry no HF config.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Read the output back: bitwise tensor check, and logits for HF outputs.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    _debug: DebugOption = False,
) -> None:
    """Convert SRC into DST, tensor by tensor; nothing is left at DST if anything fails."""
    with cli_errors():
        from miles_core.checkpoint.convert import convert as run_convert

        with staged_progress() as on_progress:
            report = run_convert(src, dst, to=to, mtp_num_layers=mtp_num_layers, model_type=model_type,
                                 verify=verify, on_progress=on_progress)
        print_table(_summary_table(report))
        if json_out is not None:
            json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _summary_table(report) -> Table:
    table = Table(title="convert", show_header=False)
    rows = [("source", f"{report.src} ({report.src_format})"), ("output", f"{report.dst} ({report.to})"),
            ("model_type", report.model_type), ("MTP layers", str(report.mtp_num_layers)),
            ("tensors", str(report.num_tensors)), ("size", f"{report.num_bytes / 2**20:.1f} MiB"),
            ("time", f"{report.seconds:.1f} s")]
    if report.bitwise is not None:
        rows.append(("bitwise", report.bitwise.summary()))
    if report.logits is not None:
        rows.append(("logits", ", ".join(f"{k} {v:.3g}" for k, v in report.logits.items())))
    rows += [("note", note) for note in report.notes]
    for key, value in rows:
        table.add_row(key, value)
    return table
