"""`miles` root command and `miles recipes`: help, version, light imports, recipe listing and
showing, and how a bad input is reported (one line, exit code 2; `--debug` raises instead)."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core import __version__
from miles_core.config import load_config
from miles_core.config.tree import dump_toml, list_recipes

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_subcommand():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for name in ("train", "rollout", "recipes"):
        assert name in result.output


def test_no_arguments_shows_help():
    result = invoke()
    assert "Usage" in result.output
    assert "rollout" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"miles {__version__}"


def test_help_does_not_import_torch():
    # A fresh interpreter: this test process has torch loaded already.
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from miles_cli.app import app\n"
        "for args in (['--help'], ['train', '--help'], ['rollout', '--help'], ['recipes', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def table_rows(output: str) -> dict[str, str]:
    """First column -> second column of a rich table, joining cells wrapped over several lines."""
    rows: dict[str, list[str]] = {}
    name = None
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) != 2:
            continue
        name = cells[0] or name
        rows.setdefault(name, []).append(cells[1])
    return {key: " ".join(" ".join(parts).split()) for key, parts in rows.items()}


def test_recipes_list_shows_names_and_descriptions():
    result = invoke("recipes", "list")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert set(rows) == set(list_recipes())
    for name in ("tiny", "quickstart"):
        assert rows[name] == load_config(name).description


def test_recipes_show_prints_the_recipe_file():
    result = invoke("recipes", "show", "tiny")
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    for expected in ("[model]", 'source = "tiny-qwen3"', "[data.arithmetic]", "num_prompts = 16",
                     "n_samples_per_prompt = 2", 'type = "last_number"', "num_rollout = 2"):
        assert expected in lines
    assert "[algo]" not in lines  # the file as written, not the resolved config


def test_recipes_show_accepts_a_path(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('description = "mine"\n[sampling]\ntemperature = 0.25\n')
    result = invoke("recipes", "show", str(recipe))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output) == {"description": "mine", "sampling": {"temperature": 0.25}}


def test_recipes_show_resolved_prints_every_section_with_defaults():
    result = invoke("recipes", "show", "--resolved", "tiny")
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    for section in ("model", "engine", "data", "data.arithmetic", "data.chat_template_kwargs", "sampling",
                    "rollout", "reward", "algo", "train", "loop"):
        assert f"[{section}]" in lines
    assert "eps_clip = 0.2" in lines  # a default the tiny recipe does not set
    assert "max_new_tokens = 8" in lines  # the recipe's own value


@pytest.mark.parametrize("resolved", [False, True])
def test_recipes_show_output_is_valid_toml_equal_to_the_recipe(resolved):
    result = invoke("recipes", "show", *(["--resolved"] if resolved else []), "tiny")
    assert result.exit_code == 0, result.output
    expected = (dump_toml(load_config("tiny")) if resolved else list_recipes()["tiny"].read_text())
    assert tomllib.loads(result.output) == tomllib.loads(expected)


@pytest.mark.parametrize("args", [("recipes", "show", "nosuch"), ("recipes", "show", "--resolved", "nosuch")])
def test_unknown_recipe_is_one_line_and_exit_code_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown recipe 'nosuch'")
    assert "quickstart" in lines[0] and "tiny" in lines[0]


@pytest.mark.parametrize("args", [("--debug", "recipes", "show", "nosuch"), ("recipes", "show", "--debug", "nosuch")])
def test_debug_shows_the_traceback_and_keeps_exit_code_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "MilesError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown recipe 'nosuch'")
    # The flag lives for one invocation only.
    plain = invoke("recipes", "show", "nosuch")
    assert plain.exit_code == 2 and "Traceback" not in plain.output


def test_unknown_key_in_recipe_on_resolved_show_is_one_line(tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text("[sampling]\ntemprature = 0.5\n")
    result = invoke("recipes", "show", "--resolved", str(recipe))
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: unknown config key 'sampling.temprature' "
                                     "(did you mean 'temperature'?)")
