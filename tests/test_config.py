"""Recipes -> `MilesConfig`: loading by name and path, `extends`, `--set` overrides, type and
range checks with errors that name the key, and the resolved-TOML round trip."""

from __future__ import annotations

import textwrap

import pytest

from miles_core.config import tree as config_tree
from miles_core.config import MilesConfig, load_config
from miles_core.errors import MilesError


def write(path, text: str):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- loading ------------------------------------------------------------------------------------

def test_builtin_recipe_by_name_and_by_path_give_the_same_config():
    by_name = load_config("tiny")
    by_path = load_config(str(config_tree.list_recipes()["tiny"]))
    assert by_name == by_path
    assert by_name.model.source == "tiny-qwen3"
    assert by_name.sampling.n_samples_per_prompt == 2
    assert by_name.data.arithmetic.num_prompts == 16
    # Keys the recipe leaves out keep the dataclass defaults.
    assert by_name.algo.eps_clip == 0.2


def test_recipe_file_in_tmp_dir_loads_and_unset_sections_use_defaults(tmp_path):
    recipe = write(tmp_path / "mine.toml", """
        [sampling]
        temperature = 0.5
    """)
    cfg = load_config(str(recipe))
    assert cfg.sampling.temperature == 0.5
    assert cfg.sampling.top_p == 1.0
    assert cfg.model == MilesConfig().model


@pytest.mark.parametrize("name", sorted(config_tree.list_recipes()))
def test_every_builtin_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, MilesConfig)
    assert cfg.description, f"recipe {name} has no description for `miles recipes list`"


def test_builtin_recipes_include_tiny_and_quickstart():
    assert {"tiny", "quickstart"} <= set(config_tree.list_recipes())


def test_unknown_recipe_name_suggests_the_closest():
    with pytest.raises(MilesError, match=r"unknown recipe 'tinyy' \(did you mean 'tiny'\?\); expected one of: .*quickstart"):
        load_config("tinyy")


def test_missing_recipe_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(MilesError, match="recipe file not found") as err:
        load_config(str(missing))
    assert str(missing) in str(err.value)


def test_invalid_toml_is_a_miles_error_naming_the_file(tmp_path):
    recipe = write(tmp_path / "bad.toml", "[sampling\n")
    with pytest.raises(MilesError, match="is not valid TOML") as err:
        load_config(str(recipe))
    assert "bad.toml" in str(err.value)


# -- extends --------------------------------------------------------------------------------------

def test_extends_deep_merges_child_over_parent(tmp_path):
    write(tmp_path / "base.toml", """
        description = "base"
        [sampling]
        temperature = 0.7
        max_new_tokens = 16
        [data]
        task = "arithmetic"
        [data.arithmetic]
        num_prompts = 10
        max_operand = 5
    """)
    child = write(tmp_path / "child.toml", """
        extends = "base"
        description = "child"
        [sampling]
        max_new_tokens = 32
        [data.arithmetic]
        max_operand = 50
    """)
    cfg = load_config(str(child))
    assert cfg.description == "child"
    assert cfg.sampling.temperature == 0.7  # from base, untouched by child
    assert cfg.sampling.max_new_tokens == 32  # child wins
    assert cfg.data.arithmetic.num_prompts == 10  # nested table merged key by key
    assert cfg.data.arithmetic.max_operand == 50


def test_extends_resolves_the_parent_next_to_the_child_not_the_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    write(sub / "base.toml", "[rollout]\nbatch_size = 3\n")
    child = write(sub / "child.toml", 'extends = "base"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(str(child)).rollout.batch_size == 3


def test_extends_a_builtin_recipe(tmp_path):
    child = write(tmp_path / "mine.toml", """
        extends = "tiny"
        [sampling]
        n_samples_per_prompt = 4
    """)
    cfg = load_config(str(child))
    tiny = load_config("tiny")
    assert cfg.sampling.n_samples_per_prompt == 4
    assert cfg.model == tiny.model
    assert cfg.data == tiny.data


def test_extends_with_toml_suffix_is_relative_to_the_recipe(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    write(sub / "base.toml", "[rollout]\nbatch_size = 3\n")
    child = write(sub / "child.toml", 'extends = "base.toml"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(str(child)).rollout.batch_size == 3


def test_recipe_without_a_prompt_source_fails_when_prompts_are_loaded(tmp_path):
    # No hidden default: a recipe says where its prompts come from, and loading says so if not.
    from miles_core.data import load_prompts

    empty = write(tmp_path / "empty.toml", 'description = "defaults only"\n')
    cfg = load_config(str(empty), ["data.shuffle=false"])
    assert (cfg.data.path, cfg.data.task) == ("", "")
    with pytest.raises(MilesError, match="no prompt source: set data.path .* or data.task"):
        load_prompts(cfg.data)


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b"\n')
    write(tmp_path / "b.toml", 'extends = "a"\n')
    with pytest.raises(MilesError, match="cycle") as err:
        load_config(str(tmp_path / "a.toml"))
    assert "a.toml" in str(err.value) and "b.toml" in str(err.value)


def test_recipe_extending_itself_is_a_cycle(tmp_path):
    write(tmp_path / "self.toml", 'extends = "self"\n')
    with pytest.raises(MilesError, match="extends itself"):
        load_config(str(tmp_path / "self.toml"))


# -- overrides ------------------------------------------------------------------------------------

def test_override_int_float_and_bool():
    cfg = load_config("tiny", ["sampling.max_new_tokens=5", "sampling.top_p=0.9", "data.shuffle=false"])
    assert cfg.sampling.max_new_tokens == 5
    assert cfg.sampling.top_p == 0.9
    assert cfg.data.shuffle is False


def test_override_int_is_accepted_for_a_float_field_and_becomes_float():
    cfg = load_config("tiny", ["sampling.temperature=2"])
    assert cfg.sampling.temperature == 2.0
    assert type(cfg.sampling.temperature) is float


def test_override_list_of_strings_with_toml_escapes():
    cfg = load_config("tiny", ['sampling.stop=["\\n", "###"]'])
    assert cfg.sampling.stop == ("\n", "###")


def test_override_list_of_ints():
    cfg = load_config("tiny", ["sampling.stop_token_ids=[1, 2]"])
    assert cfg.sampling.stop_token_ids == (1, 2)


def test_override_bare_word_is_a_string():
    assert load_config("tiny", ["model.source=some/dir"]).model.source == "some/dir"


def test_override_quoted_string_is_unquoted():
    assert load_config("tiny", ['model.source="a b"']).model.source == "a b"


@pytest.mark.parametrize("raw", ["123", "1.5", "true"])
def test_override_number_like_value_for_a_str_field_stays_a_string(raw):
    cfg = load_config("tiny", [f"reward.key={raw}"])
    assert cfg.reward.key == raw


def test_override_literal_field_takes_a_bare_word():
    assert load_config("tiny", ["algo.advantage_estimator=dr_grpo"]).algo.advantage_estimator == "dr_grpo"


def test_override_nested_section():
    cfg = load_config("tiny", ["data.arithmetic.max_operand=20"])
    assert cfg.data.arithmetic.max_operand == 20
    assert cfg.data.arithmetic.num_prompts == 16  # sibling keys from the recipe survive


def test_override_later_wins():
    assert load_config("tiny", ["rollout.batch_size=2", "rollout.batch_size=5"]).rollout.batch_size == 5


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(MilesError, match="bad override 'sampling.temperature'; expected section.key=value"):
        load_config("tiny", ["sampling.temperature"])


# -- unknown keys and sections ---------------------------------------------------------------------

def test_unknown_key_in_override_suggests_the_closest():
    with pytest.raises(MilesError, match=r"unknown config key 'sampling\.temprature' \(did you mean 'temperature'\?\)"):
        load_config("tiny", ["sampling.temprature=0.5"])


def test_unknown_key_in_recipe_suggests_the_closest(tmp_path):
    recipe = write(tmp_path / "typo.toml", "[sampling]\ntemprature = 0.5\n")
    with pytest.raises(MilesError, match=r"unknown config key 'sampling\.temprature' \(did you mean 'temperature'\?\)"):
        load_config(str(recipe))


def test_unknown_section_in_recipe_suggests_the_closest(tmp_path):
    recipe = write(tmp_path / "typo.toml", "[sampler]\ntemperature = 0.5\n")
    with pytest.raises(MilesError, match=r"unknown config key 'sampler' \(did you mean 'sampling'\?\)"):
        load_config(str(recipe))


def test_unknown_section_in_override():
    with pytest.raises(MilesError, match="unknown config key 'nosuch'"):
        load_config("tiny", ["nosuch.key=1"])


def test_override_into_a_value_is_rejected():
    with pytest.raises(MilesError, match="config key 'sampling.temperature' is a value, not a section"):
        load_config("tiny", ["sampling.temperature.x=1"])


def test_section_given_a_scalar_in_recipe_is_rejected(tmp_path):
    recipe = write(tmp_path / "flat.toml", "sampling = 3\n")
    with pytest.raises(MilesError, match="config section 'sampling' must be a table, got 3"):
        load_config(str(recipe))


# -- type checks ----------------------------------------------------------------------------------

def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(MilesError) as err:
        load_config("tiny", ["sampling.temperature=hot"])
    assert str(err.value) == "config key 'sampling.temperature' expects float, got 'hot' (str)"


def test_wrong_type_in_recipe_file(tmp_path):
    recipe = write(tmp_path / "bad.toml", '[engine]\nmax_batch_size = "many"\n')
    with pytest.raises(MilesError) as err:
        load_config(str(recipe))
    assert str(err.value) == "config key 'engine.max_batch_size' expects int, got 'many' (str)"


def test_bool_is_not_accepted_for_int():
    with pytest.raises(MilesError, match=r"config key 'engine.max_batch_size' expects int, got True \(bool\)"):
        load_config("tiny", ["engine.max_batch_size=true"])


def test_bool_is_not_accepted_for_float():
    with pytest.raises(MilesError, match=r"config key 'sampling.temperature' expects float, got True \(bool\)"):
        load_config("tiny", ["sampling.temperature=true"])


def test_float_is_not_accepted_for_int():
    with pytest.raises(MilesError, match=r"config key 'sampling.max_new_tokens' expects int, got 1.5 \(float\)"):
        load_config("tiny", ["sampling.max_new_tokens=1.5"])


def test_list_field_rejects_a_scalar():
    with pytest.raises(MilesError, match="config key 'sampling.stop' expects a list, got '###'"):
        load_config("tiny", ["sampling.stop=###"])


def test_list_items_are_type_checked():
    with pytest.raises(MilesError, match=r"config key 'sampling.stop_token_ids' expects int, got 'x' \(str\)"):
        load_config("tiny", ['sampling.stop_token_ids=[1, "x"]'])


def test_literal_violation_lists_allowed_values():
    with pytest.raises(MilesError) as err:
        load_config("tiny", ["algo.advantage_estimator=a2c"])
    message = str(err.value)
    assert "algo.advantage_estimator" in message and "'a2c'" in message
    assert message.endswith("expected one of: dr_grpo, grpo, gspo, ppo, reinforce_plus_plus, "
                            "reinforce_plus_plus_baseline, rloo")


def test_literal_violation_in_recipe_suggests_the_closest(tmp_path):
    recipe = write(tmp_path / "bad.toml", '[model]\ndtype = "bfloat61"\n')
    with pytest.raises(MilesError, match=r"'bfloat61' \(did you mean 'bfloat16'\?\); expected one of: bfloat16, float16, float32"):
        load_config(str(recipe))


# -- __post_init__ validation -----------------------------------------------------------------------

def test_range_error_names_section_field_and_value():
    with pytest.raises(MilesError) as err:
        load_config("tiny", ["sampling.top_p=0"])
    assert str(err.value) == "sampling: top_p must be in (0, 1], got 0.0"


def test_data_with_both_path_and_task_is_rejected():
    with pytest.raises(MilesError) as err:
        load_config("tiny", ["data.path=prompts.jsonl"])
    assert str(err.value) == ("data: set only one of path or task "
                              "(got path='prompts.jsonl', task='arithmetic')")


def test_nested_section_validation_names_the_full_section():
    with pytest.raises(MilesError) as err:
        load_config("tiny", ["data.arithmetic.min_operand=10"])
    assert str(err.value) == "data.arithmetic: min_operand (10) must be <= max_operand (9)"


@pytest.mark.parametrize("override, fragment", [
    ("sampling.temperature=-1", "temperature must be >= 0, got -1.0"),
    ("sampling.top_k=0", "top_k must be -1 or >= 1, got 0"),
    ("train.lr=0", "lr must be > 0, got 0.0"),
    ("algo.eps_clip_c=0.5", "eps_clip_c must be 0 (off) or > 1, got 0.5"),
    ("loop.num_rollout=0", "num_rollout must be >= 1, got 0"),
    ("model.device=tpu", "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("train.fsdp_reshard=step", "fsdp_reshard = 'step' needs backend 'fsdp', got 'native'"),
])
def test_range_errors(override, fragment):
    with pytest.raises(MilesError) as err:
        load_config("tiny", [override])
    assert str(err.value) == f"{override.split('.')[0]}: {fragment}"


# -- resolved TOML ----------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, overrides", [
    ("tiny", []),
    ("quickstart", []),
    ("tiny", ['sampling.stop=["\\n", "###"]', "data.chat_template_kwargs={enable_thinking = false}",
              'data.prompt_template="Q: {prompt}\\nA:"', "train.adam_eps=1e-10", "data.path=p.jsonl",
              "data.task="]),
])
def test_dump_toml_round_trips_to_an_equal_config(tmp_path, recipe, overrides):
    cfg = load_config(recipe, overrides)
    path = tmp_path / "resolved.toml"
    path.write_text(config_tree.dump_toml(cfg), encoding="utf-8")
    assert load_config(str(path)) == cfg


def test_dump_toml_writes_every_section():
    text = config_tree.dump_toml(load_config("tiny"))
    for section in ("model", "engine", "data", "data.arithmetic", "sampling", "rollout", "reward",
                    "algo", "train", "loop"):
        assert f"[{section}]" in text
