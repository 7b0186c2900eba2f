"""`miles train` with slime launch flags: every launch line of the shared reference
(`miles_cli_examples.md`, with tiny paths) resolves to the expected recipe field by field or is
refused with the exact message; the flag table and docs/slime_flags.md agree."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.config import load_config
from miles_core.launch.slime_flags import ARCH, OFFLOAD, ONE_DEVICE, PARALLEL, SGLANG, SPECULATIVE
from miles_core.launch.slime_flags_doc import render_markdown

runner = CliRunner()
REFUSED = "error: slime flags miles cannot run:\n  "
MTP = "MTP training is not in miles yet: drop the flag"


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"input": "1+1", "label": "2"}\n', encoding="utf-8")
    return str(path)


def resolve(tmp_path, line: str):
    """Run `miles train LINE --save-recipe` and load the recipe it wrote."""
    out = tmp_path / "from_slime.toml"
    result = runner.invoke(app, ["train", *shlex.split(line), "--save-recipe", str(out)])
    assert result.exit_code == 0, result.output
    return load_config(str(out)), result.output


def refused(line: str) -> str:
    result = runner.invoke(app, ["train", *shlex.split(line)])
    assert result.exit_code == 2, result.output
    return result.output.strip()


# -- 1. Quick start --------------------------------------------------------------------------------

QUICK_START = ("--advantage-estimator grpo --model-name qwen3-30b-a3b --hf-checkpoint tiny-qwen3 "
               "--rollout-batch-size 512 --n-samples-per-prompt 8")


def test_quick_start_as_written_needs_prompts():
    assert refused(QUICK_START) == ("error: miles train needs --recipe NAME, or --hf-checkpoint and --prompt-data "
                                    "to start from miles' defaults (missing: --prompt-data)")


def test_quick_start_with_prompt_data(tmp_path, prompts):
    cfg, output = resolve(tmp_path, f"{QUICK_START} --prompt-data {prompts}")
    assert "note: --model-name: not needed" in output
    assert cfg.model.source == "tiny-qwen3"
    assert cfg.algo.advantage_estimator == "grpo" and cfg.algo.policy_loss == "ppo_clip"
    assert cfg.rollout.batch_size == 512 and cfg.sampling.n_samples_per_prompt == 8
    assert cfg.data.path == prompts and cfg.data.task == ""
    # slime's defaults where miles' differ
    assert cfg.algo.loss_agg_mode == "seq_mean_token_mean" and cfg.algo.kl_loss_type == "k1"
    assert (cfg.data.input_key, cfg.data.label_key, cfg.data.apply_chat_template, cfg.data.shuffle) == \
        ("input", "", False, False)


def test_quick_start_over_a_recipe_keeps_the_recipe_values(tmp_path):
    # tiny sets its own data task; slime's data defaults apply only with --prompt-data.
    cfg, output = resolve(tmp_path, f"--recipe tiny {QUICK_START}")
    assert cfg.data.task == "arithmetic" and cfg.data.input_key == "prompt"
    assert cfg.rollout.batch_size == 512
    assert 'slime defaults (unset in the recipe): algo.loss_agg_mode="seq_mean_token_mean"' in output


# -- 2-6. Cluster, parallelism, speculative, MTP: refused with what is missing ----------------------

def test_large_moe_line_places_engine_servers_after_the_trainer(tmp_path, prompts):
    line = (f"--actor-num-gpus-per-node 8 --rollout-num-gpus 8 --hf-checkpoint tiny-moe --advantage-estimator grpo "
            f"--tensor-model-parallel-size 8 --expert-model-parallel-size 4 --prompt-data {prompts} --num-rollout 3000")
    cfg, _ = resolve(tmp_path, line)
    assert (cfg.engine.backend, cfg.engine.launch, cfg.engine.server) == ("sglang", True, "miles")
    assert (cfg.engine.num_gpus, cfg.engine.num_gpus_per_engine, cfg.engine.colocate) == (8, 1, False)
    assert cfg.train.backend == "megatron" and cfg.train.tensor_model_parallel_size == 8
    assert refused(line.replace("--actor-num-gpus-per-node 8", "--num-gpus-per-node 8")) == \
        REFUSED + f"--num-gpus-per-node 8: {ONE_DEVICE}"


def test_speculative_rl_line(prompts):
    line = ("--actor-num-gpus-per-node 8 --hf-checkpoint tiny-qwen3 --sglang-speculative-algorithm EAGLE "
            "--sglang-speculative-num-steps 3 --sglang-speculative-eagle-topk 1 --sglang-speculative-num-draft-tokens 4 "
            f"--sglang-speculative-draft-model-path /draft --advantage-estimator grpo --prompt-data {prompts} "
            "--mtp-num-layers 1 --enable-mtp-training --mtp-loss-scaling-factor 0.2")
    spec = ["algorithm", "num-steps", "eagle-topk", "num-draft-tokens", "draft-model-path"]
    assert refused(line) == REFUSED + "\n  ".join([
        *[f"--sglang-speculative-{name}: {SPECULATIVE}" for name in spec],
        f"--mtp-num-layers: {MTP}", f"--enable-mtp-training: {MTP}", f"--mtp-loss-scaling-factor: {MTP}"])


def test_cluster_resources_line_places_colocated_servers(tmp_path):
    line = "--actor-num-nodes 1 --actor-num-gpus-per-node 8 --rollout-num-gpus 8 --rollout-num-gpus-per-engine 2 --colocate"
    assert refused(f"--recipe tiny {line}") == ("error: engine: num_gpus_per_engine must be 1 for the native engine (no "
                                                "tensor parallelism; backend 'sglang', server 'miles'), got 2")
    cfg, _ = resolve(tmp_path, f"--recipe tiny {line} --set engine.server=sglang")  # SGLang servers, TP 2
    assert (cfg.engine.num_gpus, cfg.engine.num_gpus_per_engine, cfg.engine.colocate) == (8, 2, True)
    assert (cfg.engine.backend, cfg.engine.launch, cfg.engine.server) == ("sglang", True, "sglang")


def test_cluster_of_one_device_runs(tmp_path):
    cfg, output = resolve(tmp_path, "--recipe tiny --actor-num-nodes 1 --actor-num-gpus-per-node 1 --colocate")
    assert cfg.train.backend == "native"  # one rank: the native trainer, as without the flags
    assert cfg.engine.colocate and cfg.engine.backend == "native"  # the in-process engine shares rank 0's device


@pytest.mark.parametrize("flag", ["--offload", "--offload-train", "--offload-rollout"])
def test_offload_flags_point_at_colocate(flag):
    assert refused(f"--recipe tiny {flag}") == REFUSED + f"{flag}: {OFFLOAD}"


@pytest.mark.parametrize(("line", "message"), [
    # 1 node x 2 ranks per node = 2 ranks: the --nproc-per-node 2 rule of the native trainer
    ("--actor-num-gpus-per-node 2", "--nproc-per-node 2 needs a multi-rank trainer: set train.backend = 'fsdp' "
                                    "(data parallel) or 'megatron' (tensor parallel), got 'native'"),
    ("--actor-num-nodes 2 --actor-num-gpus-per-node 2", "--actor-num-nodes 2 places trainer ranks on several "
                                                         "nodes: add --ray (and start the cluster with `ray start`)"),
    ("--nproc-per-node 2 --actor-num-gpus-per-node 4", "--nproc-per-node 2 and --actor-num-gpus-per-node 4 "
                                                        "disagree: keep one"),
    ("--actor-num-nodes 0", "slime flags miles cannot run:\n  --actor-num-nodes 0: must be >= 1"),
])
def test_trainer_placement_flags(tmp_path, monkeypatch, line, message):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output-dir", str(tmp_path / "run"),
                                 *shlex.split(line)])
    assert result.exit_code != 0 and f"error: {message}" in result.output, result.output


def test_ray_without_ray_installed_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output-dir", str(tmp_path / "run"), "--ray"])
    assert result.exit_code != 0 and "error: --ray needs Ray: pip install 'miles[ray]'" in result.output, result.output


def test_megatron_parallelism_line_selects_the_megatron_backend(tmp_path):
    line = ("--recipe tiny --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 "
            "--expert-model-parallel-size 4 --context-parallel-size 2 --sequence-parallel")
    cfg, _ = resolve(tmp_path, line)
    train = cfg.train
    assert train.backend == "megatron" and train.sequence_parallel
    assert (train.tensor_model_parallel_size, train.pipeline_model_parallel_size, train.expert_model_parallel_size,
            train.context_parallel_size) == (8, 2, 4, 2)
    assert refused("--expert-tensor-parallel-size 2") == REFUSED + f"--expert-tensor-parallel-size 2: {PARALLEL}"


def test_parallel_sizes_of_one_keep_the_native_backend(tmp_path):
    cfg, _ = resolve(tmp_path, "--recipe tiny --tensor-model-parallel-size 1 --expert-model-parallel-size 1")
    assert cfg.train.backend == "native" and cfg.train.tensor_model_parallel_size == 1


def test_draft_drift_remedies():
    assert refused("--sglang-speculative-num-steps 2") == REFUSED + f"--sglang-speculative-num-steps: {SPECULATIVE}"
    assert refused("--sglang-enable-draft-weights-cpu-backup") == \
        REFUSED + f"--sglang-enable-draft-weights-cpu-backup: {SGLANG}"


# -- 7. Mismatch remedies ----------------------------------------------------------------------------

def test_old_tis_spelling_is_refused():
    assert refused("--recipe tiny --use-tis --tis-threshold 0.9") == REFUSED + (
        "--tis-threshold: an older slime spelling with no meaning today; use --tis-clip HIGH and --tis-clip-low LOW")


def test_tis_and_fp8_lr_remedies(tmp_path):
    cfg, _ = resolve(tmp_path, "--recipe tiny --use-tis --tis-clip 2.0 --tis-clip-low 0 --lr 5e-7")
    assert cfg.algo.use_tis and cfg.algo.tis_level == "token" and cfg.algo.tis_mode == "truncate"
    assert (cfg.algo.tis_clip_low, cfg.algo.tis_clip_high) == (0.0, 2.0)
    assert cfg.train.lr == 5e-7


# -- the flag groups -------------------------------------------------------------------------

def test_batch_algorithm_optimiser_and_checkpoint_flags(tmp_path, prompts):
    line = (f"--hf-checkpoint tiny-qwen3 --prompt-data {prompts} --input-key q --label-key a --metadata-key m "
            "--apply-chat-template --rollout-shuffle --rollout-temperature 0.7 --rollout-top-p 0.9 --rollout-top-k 20 "
            "--rollout-max-response-len 32 --rollout-stop '</s>' '###' --rollout-batch-size 4 --n-samples-per-prompt 4 "
            "--global-batch-size 8 --max-tokens-per-gpu 2048 --num-rollout 3 --advantage-estimator gspo "
            "--eps-clip 0.2 --eps-clip-high 0.28 --use-kl-loss --kl-loss-coef 0.01 --kl-loss-type low_var_kl "
            "--entropy-coef 0.001 --normalize-advantages --calculate-per-token-loss --rm-type f1 --lr 1e-6 "
            f"--weight-decay 0.1 --clip-grad 0.5 --lr-warmup-iters 5 --save {tmp_path / 'run'} --save-interval 2")
    cfg, _ = resolve(tmp_path, line)
    d, s, a, t = cfg.data, cfg.sampling, cfg.algo, cfg.train
    assert (d.input_key, d.label_key, d.metadata_key, d.apply_chat_template, d.shuffle) == ("q", "a", "m", True, True)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.stop) == (0.7, 0.9, 20, 32, ("</s>", "###"))
    # 4 prompts x 4 samples / global batch 8 = 2 optimizer steps per rollout
    assert (cfg.rollout.batch_size, s.n_samples_per_prompt, t.num_steps_per_rollout) == (4, 4, 2)
    assert (t.max_tokens_per_micro_batch, cfg.loop.num_rollout) == (2048, 3)
    assert (a.advantage_estimator, a.policy_loss, a.eps_clip, a.eps_clip_high) == ("gspo", "gspo", 0.2, 0.28)
    assert (a.use_kl_loss, a.kl_loss_coef, a.kl_loss_type, a.entropy_coef) == (True, 0.01, "low_var_kl", 0.001)
    assert (a.normalize_advantages, a.loss_agg_mode, cfg.reward.type) == (True, "token_mean", "f1")
    assert (t.lr, t.weight_decay, t.clip_grad, t.lr_warmup_steps) == (1e-6, 0.1, 0.5, 5)
    assert (cfg.loop.output_dir, cfg.loop.save_interval) == (str(tmp_path / "run"), 2)


def test_eps_clip_alone_sets_both_bounds(tmp_path):
    cfg, _ = resolve(tmp_path, "--recipe tiny --eps-clip 0.3")
    assert (cfg.algo.eps_clip, cfg.algo.eps_clip_high) == (0.3, 0.3)


def test_global_batch_size_must_divide():
    assert refused("--recipe tiny --rollout-batch-size 3 --n-samples-per-prompt 2 --global-batch-size 4") == (
        "error: --global-batch-size 4 must divide rollout_batch_size * n_samples_per_prompt = 3 * 2 = 6")


@pytest.mark.parametrize("line, message", [
    ("--rm-type gpqa", "--rm-type gpqa: not in miles' reward registry (boxed, dapo, deepscaler, f1, last_number, "
                       "math, remote_rm); use --custom-rm-path module.function"),
    ("--num-layers 28", f"--num-layers: {ARCH}"),
    ("--rollout-batch-sise 4", "--rollout-batch-sise: neither a miles train option nor a slime flag miles knows "
                               "(did you mean '--rollout-batch-size'?)"),
])
def test_refused_flags_name_themselves_and_the_alternative(line, message):
    assert refused(f"--recipe tiny {line}").startswith(REFUSED + message)


@pytest.mark.parametrize("name", ["deepscaler", "dapo"])
def test_slime_graders(tmp_path, name):
    cfg, _ = resolve(tmp_path, f"--recipe tiny --rm-type {name}")
    assert cfg.reward.type == name


def test_remote_rm_with_its_url(tmp_path):
    cfg, _ = resolve(tmp_path, "--recipe tiny --rm-type remote_rm --rm-url http://127.0.0.1:8000/reward")
    assert (cfg.reward.type, cfg.reward.remote_url) == ("remote_rm", "http://127.0.0.1:8000/reward")
    assert refused("--recipe tiny --rm-type remote_rm") == (
        "error: reward: type 'remote_rm' needs remote_url (slime's --rm-url) = 'http://host:port/path', got ''")


def test_micro_batch_ref_load_and_debug_data_flags(tmp_path):
    cfg, _ = resolve(tmp_path, "--recipe tiny --micro-batch-size 2 --ref-load /ckpt/ref "
                               "--save-debug-rollout-data '/d/rollout_{rollout_id}.jsonl'")
    assert cfg.train.micro_batch_size == 2 and cfg.model.ref_source == "/ckpt/ref"
    assert cfg.loop.save_rollout_data_path == "/d/rollout_{rollout_id}.jsonl"
    assert refused("--recipe tiny --save-debug-rollout-data '/d/{step}.jsonl'").startswith(
        "error: loop: save_rollout_data_path must be a path whose only field is {rollout_id}")


def test_print_config_shows_the_resolved_recipe():
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--rollout-batch-size", "3", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "[rollout]\nbatch_size = 3" in result.output


def test_docs_table_is_generated_from_the_flag_table():
    doc = Path(__file__).resolve().parents[2] / "docs" / "slime_flags.md"
    assert doc.read_text(encoding="utf-8") == render_markdown()


def test_placement_options_are_miles_train_options_too(tmp_path):
    result = runner.invoke(app, ["train", "--help"])
    assert all(option in result.output for option in ("--rollout-num-gpus", "--colocate"))
    cfg, output = resolve(tmp_path, "--recipe tiny --rollout-num-gpus 2 --rollout-num-gpus-per-engine 1 --colocate")
    assert (cfg.engine.num_gpus, cfg.engine.num_gpus_per_engine, cfg.engine.colocate) == (2, 1, True)
    assert (cfg.engine.backend, cfg.engine.launch, cfg.engine.server) == ("sglang", True, "miles")
    assert "slime defaults" not in output and cfg.algo.kl_loss_type == load_config("tiny").algo.kl_loss_type
    cfg, _ = resolve(tmp_path, "--recipe tiny --rollout-num-gpus 2 --set engine.server=sglang")  # --set wins
    assert cfg.engine.server == "sglang"
