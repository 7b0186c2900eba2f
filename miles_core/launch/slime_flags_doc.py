"""docs/slime_flags.md rendered from the flag tables of `slime_flags.py` (kept equal by a test)."""

from __future__ import annotations

import json

from miles_core.launch.slime_flags import (
    FLAGS,
    NOTED,
    ONLY_ONE,
    PLACEMENT,
    REJECTED,
    REJECTED_PREFIXES,
    SLIME_DATA_DEFAULTS,
    SLIME_DEFAULTS,
    TYPER_FLAGS,
)


def render_markdown() -> str:
    """docs/slime_flags.md: the tables above as Markdown (kept equal by a test)."""
    rows = ["| slime flag | miles recipe key(s) | how miles differs |", "|---|---|---|"]
    rows += [f"| `{name}` | {', '.join(f'`{k}`' for k in flag.keys)} | {flag.note} |" for name, flag in FLAGS.items()]
    rows += [f"| `{name}` | (a `miles train` option) | {what} |" for name, what in TYPER_FLAGS.items()]
    rows += [f"| `{name}` | (where the trainer ranks go) | {what} |" for name, what in PLACEMENT.items()]
    noted = [f"| `{name}` | {why} |" for name, (_, why) in NOTED.items()]
    noted += [f"| `{name}` | accepted only as 1; otherwise refused: {why} |" for name, why in ONLY_ONE.items()]
    refused = [f"| `{name}` | {why} |" for name, why in REJECTED.items()]
    refused += [f"| `{prefix}*` | {why} |" for prefix, why in REJECTED_PREFIXES.items()]
    defaults = [f"| `{key}` | `{json.dumps(value)}` |" for key, value in {**SLIME_DEFAULTS, **SLIME_DATA_DEFAULTS}.items()]
    return "\n".join([
        "# slime launch flags in `miles train`",
        "",
        "Generated from `miles_core/launch/slime_flags.py` (`slime_flags_doc.render_markdown()`); edit the table there.",
        "`miles train` takes these flags as slime spells them; `--print-config` shows the recipe they",
        "resolve to and `--save-recipe F.toml` writes it. Order: recipe (or miles' defaults when",
        "`--hf-checkpoint` and `--prompt-data` are given without `--recipe`) < slime defaults where",
        "the recipe is silent < slime flags < `--hf-checkpoint`/`--num-rollout` < `--set`.",
        "",
        "## Mapped flags", "", *rows, "",
        "## slime defaults used by a slime-flag launch (where the recipe leaves the key unset)", "",
        "The data defaults apply only with `--prompt-data`.", "",
        "| recipe key | slime's default |", "|---|---|", *defaults, "",
        "## Accepted without effect (a note is printed)", "", "| flag | why |", "|---|---|", *noted, "",
        "## Refused (the run does not start; every refused flag is listed)", "",
        "A flag in none of these tables is refused too, with a did-you-mean.", "",
        "| flag | why, and what to use instead |", "|---|---|", *refused, "",
    ])
