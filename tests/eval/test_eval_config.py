"""`[[eval.datasets]]` in recipes: lists of tables in the config tree, keys inherited from the
top-level sections, validation naming the entry, and round trips through the resolved TOML."""

from __future__ import annotations

import pytest

from miles_core.config import tree as config_tree
from miles_core.config import DataConfig, EvalConfig, EvalDatasetConfig, load_config
from miles_core.errors import MilesError

BASE = '''
[data]
task = "arithmetic"
system_prompt = "Be brief."
prompt_template = "{prompt} Reply with only the number."
max_prompts = 100

[data.arithmetic]
num_prompts = 512
max_operand = 20

[sampling]
temperature = 0.7
max_new_tokens = 24
n_samples_per_prompt = 8

[reward]
type = "last_number"
'''


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text(BASE + text, encoding="utf-8")
    return str(path)


def test_recipes_without_eval_have_no_datasets():
    assert load_config("tiny", ["eval.datasets=[]"]).eval == EvalConfig()


def test_builtin_recipes_evaluate_on_the_held_out_split():
    for name in ("tiny", "quickstart"):
        [dataset] = load_config(name).eval.datasets
        assert dataset.name == "heldout"
        assert (dataset.data.task, dataset.data.arithmetic.split) == ("arithmetic", "test")
        assert load_config(name).data.arithmetic.split == "train"


def test_eval_dataset_inherits_what_it_leaves_out(tmp_path):
    cfg = load_config(recipe(tmp_path, '''
[eval]
eval_interval = 4

[[eval.datasets]]
name = "heldout"

[eval.datasets.data.arithmetic]
split = "test"
num_prompts = 16

[eval.datasets.sampling]
n_samples_per_prompt = 4
'''))
    assert cfg.eval.eval_interval == 4 and not cfg.eval.skip_eval_before_train
    [ds] = cfg.eval.datasets
    # Source, format and the other arithmetic keys from [data]; only the split and size differ.
    assert (ds.data.task, ds.data.max_prompts, ds.data.system_prompt) == ("arithmetic", 100, "Be brief.")
    assert ds.data.prompt_template == cfg.data.prompt_template
    assert (ds.data.arithmetic.split, ds.data.arithmetic.num_prompts, ds.data.arithmetic.max_operand) == ("test", 16, 20)
    assert (ds.sampling.temperature, ds.sampling.max_new_tokens, ds.sampling.n_samples_per_prompt) == (0.7, 24, 4)
    assert ds.reward == cfg.reward and ds.correct_threshold == 1.0


def test_a_dataset_naming_its_source_inherits_no_source_keys(tmp_path):
    cfg = load_config(recipe(tmp_path, '''
[[eval.datasets]]
name = "file"
data = { path = "held.jsonl", input_key = "question" }
reward = { type = "boxed" }
sampling = { temperature = 0.0, n_samples_per_prompt = 1 }
'''))
    [ds] = cfg.eval.datasets
    # task and max_prompts belong to the training source: not inherited next to a path.
    assert (ds.data.path, ds.data.task, ds.data.max_prompts) == ("held.jsonl", "", 0)
    assert (ds.data.input_key, ds.data.system_prompt) == ("question", "Be brief.")
    assert ds.reward.type == "boxed"
    assert (ds.sampling.temperature, ds.sampling.max_new_tokens) == (0.0, 24)


def test_several_datasets_in_order(tmp_path):
    cfg = load_config(recipe(tmp_path, '''
[[eval.datasets]]
name = "a"
[[eval.datasets]]
name = "b"
correct_threshold = 0.5
'''))
    assert [(d.name, d.correct_threshold) for d in cfg.eval.datasets] == [("a", 1.0), ("b", 0.5)]


def test_overrides_reach_inherited_keys_and_can_replace_the_list():
    cfg = load_config("tiny", ["data.system_prompt=Hi", "sampling.max_new_tokens=5"])
    [ds] = cfg.eval.datasets
    assert (ds.data.system_prompt, ds.sampling.max_new_tokens) == ("Hi", 5)
    cfg = load_config("tiny", ['eval.datasets=[{name = "x", sampling = {n_samples_per_prompt = 3}}]'])
    assert [(d.name, d.sampling.n_samples_per_prompt) for d in cfg.eval.datasets] == [("x", 3)]
    assert load_config("tiny", ["eval.eval_interval=2"]).eval.eval_interval == 2


@pytest.mark.parametrize("overrides", [[], ["eval.eval_interval=3", "eval.skip_eval_before_train=true"]])
@pytest.mark.parametrize("name", ["tiny", "quickstart"])
def test_resolved_config_round_trips(tmp_path, name, overrides):
    cfg = load_config(name, overrides)
    text = config_tree.dump_toml(cfg)
    assert "[[eval.datasets]]" in text and "[eval.datasets.data.arithmetic]" in text
    path = tmp_path / "resolved.toml"
    path.write_text(text, encoding="utf-8")
    assert load_config(str(path)) == cfg


def test_programmatic_configs_need_no_recipe():
    ds = EvalDatasetConfig(name="x", data=DataConfig(task="arithmetic"))
    assert EvalConfig(datasets=(ds,)).datasets[0].sampling.n_samples_per_prompt == 1


# -- bad values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ('[[eval.datasets]]\nname = "a/b"\n', "eval.datasets[0]: name must be non-empty letters, digits"),
    ('[[eval.datasets]]\nname = "a"\n[[eval.datasets]]\n', "eval.datasets[1]: name must be non-empty"),
    ('[[eval.datasets]]\nname = "a"\n[[eval.datasets]]\nname = "a"\n', "eval: dataset names must be unique, got 'a'"),
    ('[[eval.datasets]]\nname = "a"\nsamples = 3\n', "unknown config key 'eval.datasets[0].samples'"),
    ('[[eval.datasets]]\nname = "a"\n[eval.datasets.sampling]\nn_samples_per_prompt = 0\n',
     "eval.datasets[0].sampling: n_samples_per_prompt must be in [1, 1048576], got 0"),
    ('[[eval.datasets]]\nname = "a"\n[eval.datasets.data]\npath = "x.jsonl"\ntask = "arithmetic"\n',
     "eval.datasets[0].data: set only one of path or task"),
    ('[eval]\ndatasets = ["a"]\n', "config section 'eval.datasets[0]' must be a table, got 'a'"),
    ('[eval]\ndatasets = "a"\n', "config key 'eval.datasets' expects a list"),
    ('[eval]\neval_interval = -1\n', "eval: eval_interval must be >= 0, got -1"),
])
def test_bad_eval_config_is_one_error_naming_the_entry(tmp_path, text, fragment):
    with pytest.raises(MilesError) as err:
        load_config(recipe(tmp_path, text))
    assert fragment in str(err.value)
