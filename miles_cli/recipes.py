"""`miles recipes list|show NAME`: browse the built-in recipes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from miles_cli.common import DebugOption, cli_errors, print_table

app = typer.Typer(no_args_is_help=True, help="List and show built-in recipes.")


@app.command("list")
def list_command(_debug: DebugOption = False) -> None:
    """List built-in recipes with their descriptions."""
    from miles_core.config.tree import list_recipes, load_recipe

    with cli_errors():
        table = Table("recipe", "description", title="built-in recipes")
        for name in list_recipes():
            table.add_row(name, str(load_recipe(name).get("description", "")))
        print_table(table)


@app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Recipe name or path.")],
    resolved: Annotated[bool, typer.Option(help="Show the fully resolved config with every default.")] = False,
    _debug: DebugOption = False,
) -> None:
    """Print a recipe's TOML (or, with --resolved, every value after defaults and `extends`)."""
    from miles_core.config import tree as config_tree
    from miles_core.config import load_config
    from miles_core.utils.io import read_text

    with cli_errors():
        if resolved:
            text = config_tree.dump_toml(load_config(name))
        else:
            config_tree.load_recipe(name)  # malformed TOML is one error line with its line, not shown as is
            text = read_text(config_tree.find_recipe(name), "recipe")
        # Plain text, never wrapped: the output must stay valid TOML when redirected to a file.
        typer.echo(text.rstrip("\n"))
