"""Issue 11, train / export / config / checkpoint loading: nothing lost, nothing silently wrong.

- `cores export --overwrite` never deletes the checkpoint, its run or a folder it did not write;
- a fresh `cores train` never mixes with an earlier run's logs, and `--overwrite` replaces only
  what a run writes;
- malformed checkpoint files and zero/negative sizes are one-line errors naming the file or key;
- overrides that change what a checkpoint's weights mean are refused; `in_context_k` is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIST_ENV, build_tiny, in_process_training, tiny_config
from typer.testing import CliRunner

from cores_cli.cli.app import app
from cores_cli.config import tiny
from cores_cli.configio import apply_overrides
from cores_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from cores_cli.engine.export import export_checkpoint
from cores_cli.engine.loading import load_for_inference
from cores_cli.engine.train_config import load_recipe
from cores_cli.engine.trainer import MetricsLog, run_training
from cores_cli.errors import CheckpointError, ConfigError, CoresError

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_a_clean_process_group():
    with in_process_training():
        yield


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symlinks not followed), by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(build_tiny(seed=3), tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture
def run_layout(checkpoint, tmp_path) -> Path:
    """A training run as train_state.py lays it out, with a user's own file in it."""
    run = tmp_path / "runs" / "mine"
    step = run / "checkpoints" / "step-000002"
    shutil.copytree(checkpoint, step)
    (step / "train_state").mkdir()
    (step / "train_state" / "state.json").write_text('{"format": "cores-train-state", "step": 2}\n')
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    (run / "recipe.yaml").write_text("model: {preset: tiny}\n")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    (run / "notes.txt").write_text("my notes on this run\n")
    return run


# ------------------------------------------------------------------------------ item 3: export


def test_export_refuses_any_out_overlapping_the_checkpoint_or_its_run_and_the_run_stays_byte_for_byte(run_layout, tmp_path):
    run = run_layout
    ckpt = run / "checkpoints" / "step-000002"
    before = snapshot(run)
    link = tmp_path / "link-to-run"
    link.symlink_to(run, target_is_directory=True)
    targets = [run, ckpt, run / "checkpoints", run / "exported", ckpt / "llava", tmp_path / "runs", link]
    for out in targets:
        with pytest.raises(CoresError, match=r" (is|lies inside|contains) the (checkpoint|training run) .*outside it"):
            export_checkpoint(ckpt, out, overwrite=True)
        assert snapshot(run) == before, out
    # the command: exit 1, one line, and still nothing lost
    export_app = _export_app()
    res = runner.invoke(export_app, [str(ckpt), str(run), "--overwrite"])
    assert res.exit_code == 1 and "runs/mine is the training run" in res.output and "Traceback" not in res.output
    assert snapshot(run) == before and not (run.parent / "mine.old").exists()


def test_export_never_replaces_a_copied_checkpoint_or_the_base_a_checkpoint_is_built_on(checkpoint, tmp_path):
    import json
    import shutil

    copy = tmp_path / "my-model"  # a trained checkpoint copied by hand: not an export
    shutil.copytree(checkpoint, copy)
    before = snapshot(copy)
    with pytest.raises(CoresError, match="is not a cores export"):
        export_checkpoint(checkpoint, copy, overwrite=True)
    assert snapshot(copy) == before

    base = export_checkpoint(checkpoint, tmp_path / "base")  # an export that another checkpoint builds on
    derived = tmp_path / "derived"
    shutil.copytree(base, derived, ignore=shutil.ignore_patterns("llava"))
    meta = json.loads((derived / "config.json").read_text())
    meta["model"]["mllm"]["path"] = str(base / "llava")
    (derived / "config.json").write_text(json.dumps(meta))
    before = snapshot(base)
    with pytest.raises(CoresError, match=r"holds .*base/llava, the mllm.path the checkpoint is built on"):
        export_checkpoint(derived, base, overwrite=True)
    assert snapshot(base) == before


def test_export_overwrite_replaces_only_an_earlier_export(checkpoint, tmp_path):
    user = tmp_path / "my-folder"
    user.mkdir()
    (user / "thesis.tex").write_text("three years of work\n")
    user_file = tmp_path / "my-file"
    user_file.write_text("data\n")
    for out, message in [(user, "is not a cores export"), (user_file, "is a file")]:
        with pytest.raises(CoresError, match=message):
            export_checkpoint(checkpoint, out, overwrite=True)
    assert (user / "thesis.tex").read_text() == "three years of work\n" and user_file.read_text() == "data\n"

    out = export_checkpoint(checkpoint, tmp_path / "export")
    export_checkpoint(checkpoint, out, overwrite=True)  # an earlier export is replaced
    load_checkpoint(out)
    (out / "README.md").write_text("how I made this export\n")
    with pytest.raises(CoresError, match="holds 'README.md'"):
        export_checkpoint(checkpoint, out, overwrite=True)
    assert (out / "README.md").read_text() == "how I made this export\n"

    # the swap puts the earlier export aside under a name of its own: a user's OUT.old survives
    aside = tmp_path / "fresh.old"
    aside.mkdir()
    (aside / "keep.txt").write_text("keep\n")
    fresh = export_checkpoint(checkpoint, tmp_path / "fresh")
    export_checkpoint(checkpoint, fresh, overwrite=True)
    assert (aside / "keep.txt").read_text() == "keep\n" and sorted(p.name for p in aside.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no aside left behind


def _export_app():
    import typer

    from cores_cli.cli.export import export as export_command

    sub = typer.Typer()
    sub.command()(export_command)
    return sub


# ------------------------------------------------------------------------------ item 7: train run dir

FAST = [
    "train.device=cpu", "train.steps=4", "train.save_every=4", "data.val.dataset=null", "data.num_workers=0",
    "data.mixture.synthetic.options={n: 4}", "train.micro_batch_size=2", "train.tensorboard=false",
]


def recipe_for(run: Path, *extra: str):
    return load_recipe("tiny-synthetic", [f"train.run_dir={run}", *FAST, *extra])


def cli_train(run: Path, *flags: str):
    args = ["train", "--gpus", "0", "--recipe", "tiny-synthetic", "--run-dir", str(run)]
    for o in FAST:
        args += ["--set", o]
    return runner.invoke(app, [*args, *flags])


def train_steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["kind"] == "train"]


class Killed(Exception):
    pass


class DieAtStep:
    """A reporter that stops the run at a step, after that step's metrics line was written:
    what a kill before the first checkpoint leaves behind."""

    def __init__(self, step: int) -> None:
        self.at = step

    def __getattr__(self, name):
        return lambda *a, **k: None

    def step(self, report) -> None:
        if report.step == self.at:
            raise Killed


def test_a_restart_after_a_kill_before_the_first_checkpoint_is_refused_and_overwrite_starts_clean(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        run_training(recipe_for(run), reporter=DieAtStep(2))
    assert train_steps(run) == [1, 2] and not (run / "checkpoints").exists()
    (run / "notes.txt").write_text("mine\n")
    before = snapshot(run)

    res = cli_train(run)  # the same command again: refused before anything is loaded
    assert res.exit_code == 1, res.output
    assert "already holds an earlier run's metrics.jsonl" in res.output and "--overwrite" in res.output
    assert snapshot(run) == before  # nothing appended, nothing removed
    with pytest.raises(CoresError, match="already holds an earlier run's metrics.jsonl"):
        run_training(recipe_for(run))

    # (the CLI's --overwrite is this same call: cores train --gpus 0 trains in its own process)
    run_training(recipe_for(run), overwrite=True)
    assert train_steps(run) == [1, 2, 3, 4]  # one run's log, each step once
    assert (run / "notes.txt").read_text() == "mine\n"
    assert (run / "checkpoints" / "step-000004" / "train_state" / "state.json").is_file()

    # with checkpoints, the refusal names both ways out; --resume with --overwrite is a usage error
    res = cli_train(run)
    assert res.exit_code == 1 and "already holds checkpoints" in res.output and "--resume" in res.output
    res = cli_train(run, "--resume", "--overwrite")
    assert res.exit_code == 2 and "pass one of them" in res.output


def test_dry_run_is_refused_like_the_real_run_and_removes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    before = snapshot(run)
    res = cli_train(run, "--dry-run")
    assert res.exit_code == 1 and "already holds an earlier run's metrics.jsonl" in res.output
    res = cli_train(run, "--dry-run", "--overwrite")
    assert res.exit_code == 0, res.output
    assert f"# --overwrite would first remove from {run}: metrics.jsonl" in res.stdout
    assert snapshot(run) == before


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    from cores_cli.engine.trainer import check_run_dir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "checkpoints" / "my-notes.txt").write_text("mine\n")
    before = snapshot(run)
    with pytest.raises(CoresError, match=r"my-notes\.txt is not something a training run writes"):
        check_run_dir(run, resume=False, overwrite=True)
    res = cli_train(run, "--overwrite")
    assert res.exit_code == 1 and "nothing was removed" in res.output
    assert snapshot(run) == before
    # --resume with no checkpoint says what to do instead
    with pytest.raises(CoresError, match="nothing to resume.*pass --overwrite instead"):
        check_run_dir(run, resume=True, overwrite=False)


def test_a_recipe_of_the_users_in_the_run_dir_is_not_replaced_without_overwrite(tmp_path):
    from cores_cli.engine.train_config import recipe_text
    from cores_cli.engine.trainer import check_run_dir

    run = tmp_path / "run"
    run.mkdir()
    mine = "# my recipe, with my comments\n" + recipe_text(recipe_for(run))
    (run / "recipe.yaml").write_text(mine)
    ours = recipe_text(recipe_for(run))
    with pytest.raises(CoresError, match="recipe.yaml holds another recipe than this run's"):
        check_run_dir(run, resume=False, overwrite=False, recipe=ours)
    assert (run / "recipe.yaml").read_text() == mine
    assert check_run_dir(run, resume=False, overwrite=True, recipe=ours) == [run / "recipe.yaml"]
    (run / "recipe.yaml").write_text(ours)  # the same recipe again (a restart, or a launcher's): fine
    assert check_run_dir(run, resume=False, overwrite=False, recipe=ours) == []


def test_overwrite_empties_a_linked_checkpoints_folder_and_keeps_the_link(tmp_path):
    from cores_cli.engine.trainer import clear_earlier_run

    run, disk = tmp_path / "run", tmp_path / "big-disk" / "ckpts"
    (disk / "step-000002").mkdir(parents=True)
    (disk / "step-000002" / "config.json").write_text("{}")
    (disk / "latest").write_text("step-000002")
    (tmp_path / "big-disk" / "other.txt").write_text("mine\n")
    run.mkdir()
    (run / "checkpoints").symlink_to(disk, target_is_directory=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')

    clear_earlier_run(run)

    assert (run / "checkpoints").is_symlink() and list(disk.iterdir()) == []
    assert not (run / "metrics.jsonl").exists() and (tmp_path / "big-disk" / "other.txt").read_text() == "mine\n"


def test_a_launched_run_is_checked_and_cleared_once_before_its_workers_start(tmp_path, monkeypatch):
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "notes.txt").write_text("mine\n")
    launched = []

    def fake_launch(argv, **_):
        from cores_cli.engine.trainer import check_run_dir

        from cores_cli.engine.train_config import recipe_text

        # what every worker will find: no earlier results, the recipe, the user's file; and the
        # recipe a worker reads back is the one it would write itself
        check_run_dir(run, resume=False, overwrite=False, recipe=recipe_text(load_recipe(str(run / "recipe.yaml"))))
        launched.append((argv, sorted(p.name for p in run.iterdir())))
        return 0

    monkeypatch.setattr(subprocess, "call", fake_launch)
    args = ["train", "--gpus", "2", "--launcher", "torchrun", "--recipe", "tiny-synthetic", "--run-dir", str(run), "--set", "train.device=cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "already holds an earlier run's metrics.jsonl" in res.output
    assert not launched  # refused in the launching process: no worker started
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    (argv, files), = launched
    assert files == ["notes.txt", "recipe.yaml"] and "--overwrite" not in argv
    assert (run / "notes.txt").read_text() == "mine\n"


def test_resume_cuts_the_log_back_to_the_checkpoint_step_in_one_rewrite(tmp_path):
    lines = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 6)]
    lines.insert(2, {"kind": "eval", "step": 2, "giou": 0.1})
    lines.insert(5, {"kind": "eval", "step": 4, "giou": 0.2})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "train", "st'  # torn by the kill
    (tmp_path / "metrics.jsonl").write_text(text)
    MetricsLog(tmp_path, tensorboard=False, resume_step=2).close()
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m["step"]) for m in kept] == [("train", 1), ("train", 2), ("eval", 2)]
    assert not list(tmp_path.glob(".metrics.jsonl*"))  # rewritten atomically, no temporary left


# ------------------------------------------------------------------------------ item 12: malformed files


@pytest.mark.parametrize(
    "relative,content,message",
    [
        ("adapter/adapter_config.json", "garbage{", r"adapter_config\.json is not valid JSON"),
        ("adapter/adapter_config.json", "[1, 2]", r"adapter_config\.json is not a peft LoRA config"),
        ("adapter/adapter_config.json", '{"peft_type": "PREFIX_TUNING"}', r"adapter_config\.json is not a peft LoRA config"),
        ("tokenizer/tokenizer.json", "[1]", r"cannot load the tokenizer in .*tokenizer"),
        ("tokenizer/tokenizer.json", '{"version": "1.0"}', r"cannot load the tokenizer in .*tokenizer"),
    ],
)
def test_a_malformed_checkpoint_file_is_one_error_naming_it(checkpoint, tmp_path, relative, content, message):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / relative).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_for_inference(ck, None, [], CPU, torch.float32)


def test_predict_on_a_malformed_adapter_config_prints_one_line(checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / "adapter" / "adapter_config.json").write_text("[]")
    res = runner.invoke(app, ["predict", "--example", "-c", str(ck), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "adapter_config.json is not a peft LoRA config" in res.output


SIZE_OVERRIDES = [
    "sam.image_size=0", "sam.image_size=8", "sam.patch_size=0", "sam.encoder_depth=-1", "sam.encoder_num_heads=3",
    "sam.decoder_num_heads=3", "sam.prompt_embed_dim=0", "sam.window_size=0", "sam.encoder_global_attn_indexes=[5]",
    "mllm.text.hidden_size=0", "mllm.text.num_heads=0", "mllm.text.num_kv_heads=3", "mllm.text.vocab_size=-1",
    "mllm.vision.image_size=0", "mllm.vision.patch_size=-2", "mllm.vision_feature_layer=5",
    "lora.r=0", "lora.alpha=0", "lora.dropout=1.0", "chain.refiner_heads=0", "chain.refiner_heads=3",
    "prompt.max_text_tokens=0", "loss.bce=-1", "sam.window_size=1000", "lora.target_modules=[q-proj]",
]


@pytest.mark.parametrize("override", SIZE_OVERRIDES)
def test_a_zero_negative_or_unfit_size_is_an_error_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must"):
        apply_overrides(tiny(), [override])
    # the same in a recipe, under model.
    with pytest.raises(ConfigError, match=rf"^model\.{re.escape(key)} must"):
        load_recipe("tiny-synthetic", [f"model.{override}"])


def test_lora_targets_that_match_no_layer_are_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"lora.target_modules \['nosuch'\]: no linear layer of the language model"):
        build_tiny("lora.target_modules=[nosuch]")


@pytest.mark.parametrize("command", ["predict", "eval", "train"])
def test_commands_report_a_zero_size_in_one_line(command, tmp_path):
    key = "model.sam.image_size" if command == "train" else "sam.image_size"
    common = {
        "predict": ["predict", "--example", "--preset", "tiny", "-o", str(tmp_path / "out")],
        "eval": ["eval", "--preset", "tiny", "--dataset", "synthetic:val", "--opt", "n=2"],
        "train": ["train", "--gpus", "0", "--recipe", "tiny-synthetic", "--run-dir", str(tmp_path / "run")],
    }[command]
    for bad in (f"{key}=0", key.replace("sam.image_size", "lora.r") + "=0"):
        res = runner.invoke(app, [*common, "--set", bad])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert f"{bad.split('=')[0]} must be at least 1, got 0" in res.output


# ------------------------------------------------------------------------------ item 13: overrides on a checkpoint


def test_an_override_that_changes_the_architecture_of_a_checkpoint_is_refused(checkpoint):
    for override in ("chain.depth=3", "chain.reasoning=false", "sam.prompt_embed_dim=32", "lora.r=4", "mllm.image_mode=crop"):
        key = override.split("=")[0]
        with pytest.raises(CheckpointError, match=rf"^{re.escape(key)}=.* does not fit checkpoint .*trained with {key}"):
            load_for_inference(checkpoint, None, [override], CPU, torch.float32)
    # inference settings, and a value equal to the trained one, are fine
    loaded = load_for_inference(checkpoint, None, ["prompt.in_context_k=2", "chain.depth=2", "lora.dropout=0.0"], CPU, torch.float32)
    assert loaded.model.cfg.prompt.in_context_k == 2 and loaded.model.cfg.chain.depth == 2


def test_resume_refuses_a_recipe_that_changes_the_trained_architecture(tmp_path):
    run = tmp_path / "run"
    run_training(recipe_for(run, "train.steps=1", "train.save_every=1"))
    with pytest.raises(CheckpointError, match=r"chain\.depth=3 does not fit checkpoint"):
        run_training(recipe_for(run, "train.steps=2", "train.save_every=1", "model.chain.depth=3"), resume=True)
    assert train_steps(run) == [1]


@pytest.mark.parametrize("k,ok", [(-1, False), (0, True), (16, True), (17, False), (500, False)])
def test_in_context_k_is_bounded(k, ok):
    """16 exemplars (~60 tokens each) already fill twice the default 512-token text budget."""
    if ok:
        assert apply_overrides(tiny(), [f"prompt.in_context_k={k}"]).prompt.in_context_k == k
    else:
        with pytest.raises(ConfigError, match=r"prompt\.in_context_k must be between 0 and 16"):
            apply_overrides(tiny(), [f"prompt.in_context_k={k}"])


def test_a_valid_config_still_builds(checkpoint):
    # the checks must not reject anything the presets and shipped recipes use
    for name in ("tiny-synthetic", "cores-7b", "bench-cache"):
        load_recipe(name)
    assert tiny_config("chain.depth=3", "prompt.in_context_k=4").chain.depth == 3


# ------------------------------------------------------------------------------ item 7, as reported


@pytest.mark.slow
def test_a_sigkilled_run_restarted_with_the_same_command_is_refused_and_overwrite_starts_clean(tmp_path):
    """The report's reproduction, with real processes: SIGKILL before the first checkpoint, then
    the same command again, then with --overwrite."""
    import subprocess

    from proc_helpers import kill_after_lines

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cores_cli", "train", "--gpus", "0", "--recipe", "tiny-synthetic", "--run-dir", str(run)]
    for o in FAST:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in DIST_ENV:
        env.pop(k, None)
    # 1000 steps with one checkpoint at the end: the kill always comes before it
    long_run = [*cmd, "--set", "train.steps=1000", "--set", "train.save_every=1000"]
    kill_after_lines(long_run, run / "metrics.jsonl", 2, env, tmp_path)
    before = snapshot(run)
    res = subprocess.run(long_run, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 1 and "already holds an earlier run's metrics.jsonl" in res.stderr, res.stderr
    assert snapshot(run) == before

    res = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert train_steps(run) == [1, 2, 3, 4] and "--overwrite: removed the earlier run's recipe.yaml, metrics.jsonl" in res.stderr


def test_two_runs_in_one_process_with_the_group_torn_down_between(tmp_path):
    """A notebook trains, tears the process group down (as `cores train --gpus 0` does) and trains
    again: DeepSpeed's cached clone of the first world group must not be reused."""
    import torch.distributed as dist

    first = run_training(recipe_for(tmp_path / "one"))
    dist.destroy_process_group()
    second = run_training(recipe_for(tmp_path / "two"))
    assert first.steps == second.steps > 0 and second.last_checkpoint.is_dir()
