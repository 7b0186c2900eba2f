"""`miles train`: the GRPO loop (rollout -> reward -> advantages -> update -> weight sync).

It also takes slime/miles launch flags (`--rollout-batch-size 512 ...`, see
`miles_core/launch/slime_flags.py` and docs/slime_flags.md): they arrive as extra arguments, which the
group below leaves to the command instead of reading them as a subcommand name."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.progress import TextColumn
from rich.table import Table
from typer.core import TyperGroup

from miles_cli.common import DebugOption, SetOption, cli_errors, console, print_table, progress_bar


class _SlimeFlagsGroup(TyperGroup):
    """`miles train` has no subcommands: leftover arguments are slime flags, not a command name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            raise click.exceptions.NoArgsIsHelpError(ctx)
        return click.Command.parse_args(self, ctx, args)


app = typer.Typer(no_args_is_help=True, cls=_SlimeFlagsGroup,
                  help="Train with GRPO: rollout, reward, policy update, weight sync. Also takes slime launch "
                       "flags (--rollout-batch-size 512 ...; docs/slime_flags.md).")

OptionalRecipe = Annotated[Optional[str], typer.Option(
    "--recipe", "-r", help="Recipe name (see `miles recipes list`) or .toml path; optional when slime flags "
                           "give --hf-checkpoint and --prompt-data.")]


# Usage shows the options, not `COMMAND [ARGS]...`: the sub-app has no subcommands.
@app.callback(invoke_without_command=True, subcommand_metavar="[SLIME FLAGS]",
              context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "allow_interspersed_args": True})
def train(
    ctx: typer.Context,
    recipe: OptionalRecipe = None,
    overrides: SetOption = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<recipe>-<date>-<time>).")] = None,
    num_rollout: Annotated[Optional[int], typer.Option(help="Number of rollout steps (loop.num_rollout).")] = None,
    hf_checkpoint: Annotated[Optional[str], typer.Option(help="Model to start from (model.source): HF dir, .gguf or built-in name.")] = None,
    debug_rollout_only: Annotated[bool, typer.Option(help="Generate and reward only; save each step's samples; no training.")] = False,
    debug_train_only: Annotated[bool, typer.Option(help="Train on saved samples (see --load-debug-rollout-data); no generation.")] = False,
    load_debug_rollout_data: Annotated[Optional[str], typer.Option(help="Samples for --debug-train-only: a JSONL file or a template with {rollout_id}.")] = None,
    print_config: Annotated[bool, typer.Option(help="Print the resolved recipe (TOML) and exit without training.")] = False,
    save_recipe: Annotated[Optional[Path], typer.Option(help="Write the resolved recipe (e.g. from slime flags) to this .toml file and exit.")] = None,
    save_interval: Annotated[Optional[int], typer.Option(help="Full checkpoint every N rollout steps (loop.save_interval).")] = None,
    keep_last: Annotated[Optional[int], typer.Option(help="Keep only the newest K checkpoints (loop.keep_last).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'auto': continue the run in --output-dir from its latest checkpoint (or start it); or a checkpoint / run folder.")] = None,
    load: Annotated[Optional[str], typer.Option(help="slime's --load: resume from DIR's latest checkpoint when it has one, else start fresh.")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Trainer ranks on this machine (default 1), as torchrun starts them (train.backend = 'fsdp', or 'megatron': TP x EP ranks per model replica, data parallelism over the rest); rank 0 also runs the rollout engine.")] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="Trainer ranks as Ray actors in a placement group (--nproc-per-node or --actor-num-nodes x --actor-num-gpus-per-node of them); needs pip install 'miles[ray]'.")] = False,
    async_mode: Annotated[bool, typer.Option("--async", help="Generate the next steps while training (loop.mode = async; needs algo.use_tis or use_rs).")] = False,
    rollout_num_gpus: Annotated[Optional[int], typer.Option(help="GPUs for rollout servers started for the run (engine.num_gpus; `miles serve` servers placed after the trainer's GPUs, on them with --colocate).")] = None,
    rollout_num_gpus_per_engine: Annotated[Optional[int], typer.Option(help="GPUs per rollout server (engine.num_gpus_per_engine; 1 for miles servers).")] = None,
    colocate: Annotated[bool, typer.Option("--colocate", help="Engine and trainer share GPUs and take turns (engine.colocate): the engine releases its memory while training, the optimizer state waits in host memory during rollout.")] = False,
    _debug: DebugOption = False,
) -> None:
    """Run `loop.num_rollout` GRPO steps and write metrics, checkpoints and the resolved config."""
    with cli_errors(graceful=True) as run:
        from miles_core.errors import MilesError
        from miles_core.launch.slime_launch import placement_overrides, resolve_config, trainer_ranks

        if debug_rollout_only and debug_train_only:
            raise MilesError("--debug-rollout-only and --debug-train-only exclude each other")
        options = []
        if num_rollout is not None:
            options.append(f"loop.num_rollout={num_rollout}")
        if async_mode:
            options.append("loop.mode=async")
        if hf_checkpoint is not None:
            options.append(f"model.source={json.dumps(hf_checkpoint)}")
        if resume is not None and load is not None:
            raise MilesError("--resume and --load both name a checkpoint to continue from; keep one")
        options += [f"loop.{key}={value}" for key, value in (("save_interval", save_interval), ("keep_last", keep_last))
                    if value is not None]
        options += placement_overrides(rollout_num_gpus, rollout_num_gpus_per_engine, colocate)
        cfg, launch, defaults = resolve_config(recipe, list(ctx.args), options + list(overrides or []))
        num_ranks = trainer_ranks(launch, nproc_per_node, use_ray)
        if output_dir is not None and "--save" in launch.given:
            raise MilesError("--output-dir and --save both name the run folder; keep one")
        for note in launch.notes:
            console.print(f"note: {note}", highlight=False)
        if defaults:
            console.print(f"slime defaults (unset in the recipe): {', '.join(defaults)}", highlight=False)
        if print_config or save_recipe:
            _show_or_save(cfg, save_recipe, list(ctx.args), recipe)
            return
        mode = "rollout_only" if debug_rollout_only else "train_only" if debug_train_only else "full"
        _run(cfg, recipe or "slime", output_dir, mode, load_debug_rollout_data, run, resume or load, resume is not None,
             num_ranks, use_ray)


def _show_or_save(cfg, path: Optional[Path], flags: list[str], recipe: Optional[str]) -> None:
    from miles_core.config.tree import dump_toml, find_recipe
    from miles_core.utils.io import atomic_write, check_output

    text = dump_toml(cfg)
    if path is None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    header = f"# Written by `miles train --save-recipe` from: {' '.join(flags) or '(no slime flags)'}\n"
    check_output(path, overwrite=True, inputs=[find_recipe(recipe)] if recipe else [], flag="--save-recipe")
    with atomic_write(path) as handle:
        handle.write(header + text)
    console.print(f"recipe: {path}")


def _run(cfg, recipe: str, output_dir: Optional[Path], mode: str, load_debug_rollout_data: Optional[str], run,
         resume: Optional[str], resume_required: bool, num_ranks: int = 1, use_ray: bool = False) -> None:
    from miles_core.errors import MilesError
    from miles_core.rl.ranks import run_training_ranks
    from miles_core.utils.io import check_output_dir

    out = output_dir or Path(cfg.loop.output_dir or _run_dir_of(resume) or _default_run_dir(recipe))
    if resume == "auto" and not (output_dir or cfg.loop.output_dir):
        raise MilesError("--resume auto continues the run in --output-dir (or --save): name that folder")
    check_output_dir(out)  # also removes the temp folder of a save that a kill cut short
    run.partial, run.resume_hint = out, _resume_hint(out)
    console.print(f"[bold]miles train[/] recipe={recipe} mode={mode} output={out}")
    if mode == "train_only" and cfg.eval.datasets:
        console.print("eval: skipped (--debug-train-only has no rollout engine)")
    with progress_bar(TextColumn("reward {task.fields[reward]}"), remaining=True) as progress:
        task = progress.add_task("rollout steps", total=cfg.loop.num_rollout, reward="-")
        result = run_training_ranks(cfg, out, num_ranks, use_ray=use_ray, mode=mode, rollout_data=load_debug_rollout_data, resume=resume,
                              resume_required=resume_required, should_stop=run.stop_requested,
                              on_step=lambda step, m: progress.update(task, advance=1, reward=_fmt(m.get("rollout/raw_reward"))))
        progress.update(task, completed=cfg.loop.num_rollout)
    print_table(_summary_table(result.history))
    for table in _eval_tables(result.evals):
        print_table(table)
    for path in result.checkpoints[-1:]:
        console.print(f"checkpoint: {path}")
    console.print(f"metrics: {out / 'metrics.jsonl'}")


def _run_dir_of(resume: Optional[str]) -> Optional[Path]:
    """The run folder a `--resume PATH` / `--load DIR` checkpoint belongs to (None: none there)."""
    from miles_core.checkpoint.training import find_checkpoint

    if resume is None or resume == "auto" or not Path(resume).exists():
        return None
    checkpoint = find_checkpoint(Path(resume))
    return checkpoint.parent.parent if checkpoint is not None else None


def _resume_hint(out: Path) -> str:
    """This command line with `--resume auto` (and the run folder) in place of any resume flag."""
    args, skip = [], False
    for arg in sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train", "..."]:
        if skip or arg.split("=")[0] in ("--resume", "--load"):
            skip = not skip and "=" not in arg
            continue
        args.append(arg)
    if not any(a.split("=")[0] in ("--output-dir", "--save") for a in args):
        args += ["--output-dir", str(out)]
    return shlex.join(["miles", *args, "--resume", "auto"])


def _default_run_dir(recipe: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"runs/{Path(recipe).stem}-{stamp}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if 0 < abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:.3f}"


def _eval_tables(evals: list[tuple[int, dict]]) -> list[Table]:
    """The first and the last evaluation (before and after training) side by side."""
    from miles_cli.eval_tables import eval_tables

    picked = evals[:1] + evals[1:][-1:]
    version = lambda m: f" (v{m['eval/weight_version']:.0f})" if "eval/weight_version" in m else ""  # noqa: E731
    return eval_tables([(f"step {step}{version(metrics)}", metrics) for step, metrics in picked])


def _summary_table(history: list[dict]) -> Table:
    columns = {"rollout/raw_reward": "reward", "rollout/response_len": "resp_len", "train/pg_loss": "pg_loss",
               "train/grad_norm": "grad_norm", "train/train_rollout_logprob_abs_diff": "logp_diff",
               "perf/step_time": "step_s"}
    if any("rollout/staleness_max" in m for m in history):  # async mode or partial rollout
        columns["rollout/staleness_max"] = "stale"
    table = Table("step", *columns.values(), title="training")
    for step, metrics in enumerate(history):
        table.add_row(str(step), *[_fmt(metrics.get(key)) for key in columns])
    return table
