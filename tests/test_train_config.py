"""Recipes, overrides, the schedule, the launch command and `cores train` argument handling
(no training here: see test_train_run.py and test_train_cli.py)."""

from __future__ import annotations

import dataclasses

import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cores_cli.cli.app import app
from cores_cli.engine.deepspeed_setup import deepspeed_config, lr_factor, train_dtype
from cores_cli.engine.launch import launch_command, train_launch
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


@pytest.mark.parametrize("name", ["cores-7b", "cores-7b-v0"])
def test_the_paper_recipes_train_exactly_the_papers_parts(name):
    from cores_cli.model.builder import build_on_meta
    from cores_cli.model.cores import TRAINABLE_GROUPS

    model = build_on_meta(load_recipe(name).model)
    trainable = {g for g, ps in model.parameter_groups().items() if any(p.requires_grad for _, p in ps)}
    assert trainable == set(TRAINABLE_GROUPS)


def test_the_v0_recipe_is_the_7b_recipe_on_llava_7b_v0():
    v0, v15 = load_recipe("cores-7b-v0"), load_recipe("cores-7b")
    assert v0.model.preset == "llava-7b-v0" and v0.model.mllm.num_image_tokens == 256 and v0.model.mllm.image_start_end
    assert v0.model.chain.hidden_at == "predicting" and v15.model.chain.hidden_at == "token"  # the official code's reading
    v0_chain = dataclasses.replace(v0.model.chain, hidden_at="token")
    assert (v0_chain, v0.model.lora, v0.model.loss, v0.data) == (v15.model.chain, v15.model.lora, v15.model.loss, v15.data)
    assert v0.train.run_dir == "runs/cores-7b-v0" and v0.train.steps == v15.train.steps


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
    one = launch_command(train_launch(8, recipe, master_port=29501), python="py")
    assert one == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port", "29501", "--no_local_rank",
                   "--module", "cores_cli.engine.train_worker", "--recipe", str(recipe)]
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = launch_command(train_launch(8, recipe, nodes=2, hostfile=hosts, resume=True), python="py")
    assert multi[3:9] == ["--num_gpus", "8", "--hostfile", str(hosts), "--num_nodes", "2"] and multi[-1] == "--resume"
    tr = launch_command(train_launch(2, recipe, launcher="torchrun", master_port=1234), python="py")
    assert tr == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1",
                  "--master_port", "1234", "-m", "cores_cli.engine.train_worker", "--recipe", str(recipe)]
    tr2 = launch_command(train_launch(4, recipe, nodes=2, launcher="torchrun", master_addr="10.0.0.1", node_rank=1), python="py")
    assert tr2[5:11] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1"]
    for bad, message in [
        (train_launch(8, recipe, nodes=2), "needs --hostfile"),
        (train_launch(8, recipe, nodes=2, hostfile=tmp_path / "missing"), "hostfile not found"),
        (train_launch(8, recipe, nodes=2, launcher="torchrun"), "--master-addr"),
        (train_launch(0, recipe), "--gpus 0"),
    ]:
        with pytest.raises(CoresError, match=message):
            launch_command(bad)


def test_cli_dry_run_prints_the_launcher_command(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    res = runner.invoke(app, ["train", "--gpus", "8", "--nodes", "2", "--hostfile", str(hosts), "--recipe", "tiny-synthetic",
                              "--run-dir", str(tmp_path / "run"), "--set", "train.lr=2e-4", "--master-port", "29511", "--dry-run"])
    assert res.exit_code == 0, res.output
    launch = [ln for ln in res.stdout.splitlines() if ln.startswith("# launch: ")][0].split()[2:]
    assert launch == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--hostfile", str(hosts),
                      "--num_nodes", "2", "--master_port", "29511", "--no_local_rank", "--module", "cores_cli.engine.train_worker",
                      "--recipe", str(tmp_path / "run" / "recipe.yaml"), "--reporter", "cores_cli.cli.train_view:for_recipe"]
    assert "lr: 0.0002" in res.stdout and not (tmp_path / "run").exists()  # a dry run writes nothing


def test_cli_errors_are_one_line_with_the_key_named(tmp_path):
    res = runner.invoke(app, ["train", "--gpus", "0", "--recipe", "tiny-synthetic", "--set", "train.lrr=1"])
    assert res.exit_code == 1 and "train.lrr" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--gpus", "0", "--resume", "--run-dir", str(tmp_path / "none")])
    assert res.exit_code == 1 and "nothing to resume" in res.output
    res = runner.invoke(app, ["train", "--gpus", "0", "--resume"])
    assert res.exit_code == 2 and "--run-dir" in res.output
    res = runner.invoke(app, ["train", "--gpus", "0", "--recipe", "cores-7b"])
    assert res.exit_code == 1 and "model.mllm.path" in res.output


def _dry_run(tmp_path, *args):
    return runner.invoke(app, ["train", "--run-dir", str(tmp_path / "run"), "--master-port", "29511", "--dry-run", *args])


def test_without_gpus_the_cli_launches_one_process_per_visible_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    res = _dry_run(tmp_path, "--recipe", "tiny-synthetic")
    assert res.exit_code == 0, res.output
    assert "no --gpus: 4 visible GPU(s), launching 4 process(es)" in res.stderr
    launch = [ln for ln in res.stdout.splitlines() if ln.startswith("# launch: ")][0].split()[2:]
    assert launch[:5] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "4"]
    assert not (tmp_path / "run").exists()


def test_without_gpus_and_no_visible_gpu_the_cli_trains_on_the_cpu_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    res = _dry_run(tmp_path, "--recipe", "tiny-synthetic")
    assert res.exit_code == 0, res.output
    assert res.stderr.strip().splitlines() == ["no --gpus and no visible GPU: training on the CPU in this process"]
    assert "# would train in this process on the CPU" in res.stdout and "device: cpu" in res.stdout
    assert "# launch:" not in res.stdout
    # --gpus 0 still means the CPU, and says nothing about visible GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    res = _dry_run(tmp_path, "--recipe", "tiny-synthetic", "--gpus", "0")
    assert res.exit_code == 0 and "# would train in this process on the CPU" in res.stdout and "no --gpus" not in res.output


def test_the_recipe_option_is_recipe_or_r_and_config_is_a_hidden_alias(tmp_path):
    by_name = {flag: _dry_run(tmp_path, "--gpus", "0", flag, "cores-7b", "--set", "model.mllm.path=/m", "--set", "model.sam.checkpoint=/s")
               for flag in ("--recipe", "-r", "--config")}
    assert all(res.exit_code == 0 for res in by_name.values()), {k: r.output for k, r in by_name.items()}
    assert by_name["--recipe"].stdout == by_name["-r"].stdout == by_name["--config"].stdout
    assert "hidden_size: 4096" in by_name["--config"].stdout  # cores-7b
    both = runner.invoke(app, ["train", "--gpus", "0", "--recipe", "tiny-synthetic", "--config", "tiny-synthetic", "--dry-run"])
    assert both.exit_code == 2 and "--config is the old name of --recipe" in both.output
    assert runner.invoke(app, ["train", "--gpus", "0", "-c", "tiny-synthetic", "--dry-run"]).exit_code == 2  # -c is a checkpoint
    help_text = runner.invoke(app, ["train", "--help"]).stdout
    assert re.search(r"--recipe\s+-r\s", help_text) and "--config" not in help_text


def test_train_device_goes_through_the_one_device_decision(monkeypatch):
    from cores_cli.engine.trainer import training_device
    from cores_cli.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(load_recipe("tiny-synthetic").train) == torch.device("cpu")  # auto
    with pytest.raises(CoresError, match=r"^train\.device 'cuda' asked for, but no CUDA GPU is visible; use --gpus 0"):
        training_device(load_recipe("tiny-synthetic", ["train.device=cuda"]).train)
    with pytest.raises(CoresError, match=r"^device 'cuda:1' asked for, but no CUDA GPU is visible$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(load_recipe("tiny-synthetic").train) == resolve_device("auto") == torch.device("cuda")


def test_a_launched_worker_finds_the_progress_view_cores_train_names(tmp_path):
    from cores_cli.cli.train import WORKER_VIEW
    from cores_cli.cli.train_view import TrainView
    from cores_cli.engine.train_worker import reporter_factory

    assert isinstance(reporter_factory(WORKER_VIEW)(load_recipe("tiny-synthetic")), TrainView)
    for bad in ("cores_cli.cli.train_view", "cores_cli.cli.train_view:nothing", "no_such_module:view"):
        with pytest.raises(CoresError, match="names no callable"):
            reporter_factory(bad)
