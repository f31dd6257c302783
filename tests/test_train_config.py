"""Recipes, overrides, the schedule, the launch command and `cores train` argument handling
(no training here: see test_train_run.py and test_train_cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cores_cli.cli.app import app
from cores_cli.engine.deepspeed_setup import deepspeed_config, lr_factor, train_dtype
from cores_cli.engine.launch import LaunchSpec, launch_command
from cores_cli.engine.train_config import load_recipe, recipe_from_mapping, recipe_text, shipped_recipes
from cores_cli.engine.trainer import check_recipe
from cores_cli.errors import ConfigError, CoresError

runner = CliRunner()


def test_shipped_recipes_load_by_name_and_by_path():
    assert {"tiny-synthetic", "cores-7b", "bench-cache"} <= set(shipped_recipes())
    tiny = load_recipe("tiny-synthetic")
    assert tiny.model.preset == "tiny" and tiny.model.sam.image_size == 128
    assert "sam_image_encoder" in tiny.model.train_extra and not tiny.train.require_pretrained
    paper = load_recipe("cores-7b")
    t = paper.train
    assert (t.lr, t.betas, t.weight_decay, t.warmup_steps, t.grad_clip, t.zero_stage) == (3e-4, (0.9, 0.95), 0.0, 100, 1.0, 2)
    assert (t.micro_batch_size, t.grad_accumulation, t.precision) == (2, 10, "auto")
    assert {k: v.rate for k, v in paper.data.mixture.items()} == {"sem_seg": 9, "refer_seg": 3, "reason_seg": 1}
    assert paper.model.sam.encoder_depth == 32 and paper.model.mllm.text.hidden_size == 4096
    path = Path(__file__).resolve().parents[1] / "cores_cli" / "recipes" / "tiny-synthetic.yaml"
    assert load_recipe(path) == tiny


def test_the_paper_recipe_trains_exactly_the_papers_parts():
    from cores_cli.model.builder import build_on_meta
    from cores_cli.model.cores import TRAINABLE_GROUPS

    model = build_on_meta(load_recipe("cores-7b").model)
    trainable = {g for g, ps in model.parameter_groups().items() if any(p.requires_grad for _, p in ps)}
    assert trainable == set(TRAINABLE_GROUPS)


def test_overrides_are_typed_and_bad_keys_are_named():
    r = load_recipe("tiny-synthetic", ["train.lr=1e-4", "model.chain.depth=3", "data.mixture.synthetic.rate=2", "model.preset=tiny"])
    assert r.train.lr == 1e-4 and r.model.chain.depth == 3 and r.data.mixture["synthetic"].rate == 2.0
    with pytest.raises(ConfigError, match="train.lrr"):
        load_recipe("tiny-synthetic", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_recipe("tiny-synthetic", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"data\.mixture\.x\.rte"):
        recipe_from_mapping({"data": {"mixture": {"x": {"rte": 1}}}})
    with pytest.raises(ConfigError, match="zero_stage"):
        load_recipe("tiny-synthetic", ["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe("no-such-recipe")


def test_a_resolved_recipe_reads_back_identically(tmp_path):
    r = load_recipe("cores-7b", ["model.chain.depth=3", "train.steps=7"])
    f = tmp_path / "recipe.yaml"
    f.write_text(recipe_text(r))
    assert load_recipe(f) == r


def test_recipe_checks_catch_random_7b_weights_and_a_cache_on_a_trainable_encoder():
    with pytest.raises(CoresError, match="model.mllm.path and model.sam.checkpoint"):
        check_recipe(load_recipe("cores-7b"))
    check_recipe(load_recipe("cores-7b", ["model.mllm.path=/m", "model.sam.checkpoint=/s.pth"]))
    with pytest.raises(CoresError, match="embedding_cache"):
        check_recipe(load_recipe("tiny-synthetic", ["train.embedding_cache=/tmp/c"]))


def test_schedule_warms_up_then_decays_linearly_to_the_floor():
    cfg = load_recipe("cores-7b").train
    f = lr_factor(cfg, 5000)
    assert f(0) == pytest.approx(1 / 100) and f(99) == pytest.approx(1.0)
    assert f(100) == pytest.approx(1.0) and f(2550) == pytest.approx(0.5)
    assert 0 < f(4999) < 1e-3
    cos = lr_factor(load_recipe("cores-7b", ["train.schedule=warmup_cosine", "train.min_lr_ratio=0.1"]).train, 1100)
    assert cos(600) == pytest.approx(0.55) and cos(1100) == pytest.approx(0.1)


def test_deepspeed_config_carries_the_recipe():
    cfg = load_recipe("cores-7b").train
    assert train_dtype(cfg, torch.device("cpu")) == torch.float32  # auto: fp32 on the CPU
    ds = deepspeed_config(cfg, torch.bfloat16, torch.device("cuda"))
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (2, 10, 1.0)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    with pytest.raises(CoresError, match="bf16 training needs"):
        train_dtype(load_recipe("cores-7b", ["train.zero_stage=0", "train.precision=bf16"]).train, torch.device("cpu"))


def test_launch_commands(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    one = launch_command(LaunchSpec(8, recipe, master_port=29501), python="py")
    assert one == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port", "29501", "--no_local_rank",
                   "--module", "cores_cli.cli.train_worker", "--recipe", str(recipe)]
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = launch_command(LaunchSpec(8, recipe, nodes=2, hostfile=hosts, resume=True), python="py")
    assert multi[3:9] == ["--num_gpus", "8", "--hostfile", str(hosts), "--num_nodes", "2"] and multi[-1] == "--resume"
    tr = launch_command(LaunchSpec(2, recipe, launcher="torchrun", master_port=1234), python="py")
    assert tr == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1",
                  "--master_port", "1234", "-m", "cores_cli.cli.train_worker", "--recipe", str(recipe)]
    tr2 = launch_command(LaunchSpec(4, recipe, nodes=2, launcher="torchrun", master_addr="10.0.0.1", node_rank=1), python="py")
    assert tr2[5:11] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1"]
    for bad, message in [
        (LaunchSpec(8, recipe, nodes=2), "needs --hostfile"),
        (LaunchSpec(8, recipe, nodes=2, hostfile=tmp_path / "missing"), "hostfile not found"),
        (LaunchSpec(8, recipe, nodes=2, launcher="torchrun"), "--master-addr"),
        (LaunchSpec(0, recipe), "--gpus 0"),
    ]:
        with pytest.raises(CoresError, match=message):
            launch_command(bad)


def test_cli_dry_run_prints_the_launcher_command(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    res = runner.invoke(app, ["train", "--gpus", "8", "--nodes", "2", "--hostfile", str(hosts), "--config", "tiny-synthetic",
                              "--run-dir", str(tmp_path / "run"), "--set", "train.lr=2e-4", "--master-port", "29511", "--dry-run"])
    assert res.exit_code == 0, res.output
    launch = [ln for ln in res.stdout.splitlines() if ln.startswith("# launch: ")][0].split()[2:]
    assert launch == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--hostfile", str(hosts),
                      "--num_nodes", "2", "--master_port", "29511", "--no_local_rank", "--module", "cores_cli.cli.train_worker",
                      "--recipe", str(tmp_path / "run" / "recipe.yaml")]
    assert "lr: 0.0002" in res.stdout and not (tmp_path / "run").exists()  # a dry run writes nothing


def test_cli_errors_are_one_line_with_the_key_named(tmp_path):
    res = runner.invoke(app, ["train", "--gpus", "0", "--config", "tiny-synthetic", "--set", "train.lrr=1"])
    assert res.exit_code == 1 and "train.lrr" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--gpus", "0", "--resume", "--run-dir", str(tmp_path / "none")])
    assert res.exit_code == 1 and "nothing to resume" in res.output
    res = runner.invoke(app, ["train", "--gpus", "0", "--resume"])
    assert res.exit_code == 2 and "--run-dir" in res.output
    res = runner.invoke(app, ["train", "--gpus", "0", "--config", "cores-7b"])
    assert res.exit_code == 1 and "model.mllm.path" in res.output
