"""Training in this process (DeepSpeed ZeRO-2 on the CPU, a one-process gloo group): learning,
validation with the best checkpoint, gradient checkpointing, state round trips, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import in_process_training, tiny_recipe

from cores_cli.engine.checkpoint import load_checkpoint, read_checkpoint_config
from cores_cli.engine.train_state import find_resume_checkpoint, prune, read_train_state
from cores_cli.engine.trainer import run_training
from cores_cli.errors import CoresError


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with in_process_training():
        yield


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_fixed_tiny_set(tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(
        run,
        "train.steps=24",
        "train.micro_batch_size=4",
        "train.lr=3.0e-3",
        "train.warmup_steps=2",
        "train.schedule=warmup_constant",
        "train.save_every=1000",
        "data.val.dataset=null",
    )
    result = run_training(recipe)
    losses = [m["loss"] for m in metrics(run) if m["kind"] == "train"]
    assert len(losses) == 24 and result.steps == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (first, last)
    parts = [m for m in metrics(run) if m["kind"] == "train"][-1]
    assert {"ce", "bce", "dice", "lr", "samples_per_s", "elapsed_s"} <= set(parts)
    assert (run / "checkpoints" / "step-000024" / "train_state" / "state.json").is_file()  # the final checkpoint


def test_validation_keeps_the_best_checkpoint_by_giou_and_old_checkpoints_are_pruned(tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(run, "train.steps=4", "train.save_every=1", "train.eval_every=2", "train.keep_checkpoints=2")
    result = run_training(recipe)
    evals = [m for m in metrics(run) if m["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    best = max(evals, key=lambda e: e["giou"])
    assert result.best_giou == pytest.approx(best["giou"]) and result.best_step == best["step"]
    meta = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert meta["extra"]["step"] == best["step"] and meta["extra"]["metrics"]["giou"] == pytest.approx(best["giou"])
    load_checkpoint(run / "checkpoints" / "best")  # a complete, loadable checkpoint
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert steps == ["step-000003", "step-000004"]
    state, optimizer, rng = read_train_state(run / "checkpoints" / "step-000004")
    assert (state.step, state.samples_consumed, state.best_step) == (4, 4 * 8, best["step"])
    assert state.scheduler["last_epoch"] == 4 and len(rng) == 1 and "torch" in rng[0]
    assert any(k.endswith("::exp_avg_sq") for k in optimizer)
    # the step checkpoint is a cores checkpoint too, with the recipe that made it
    assert read_checkpoint_config(run / "checkpoints" / "step-000004").preset == "tiny"


def test_gradient_checkpointing_and_stage_zero_train_the_same_as_without(tmp_path):
    runs = {}
    for name, extra in {"plain": [], "ckpt": ["train.gradient_checkpointing=true"], "stage0": ["train.zero_stage=0"]}.items():
        recipe = tiny_recipe(tmp_path / name, "train.steps=2", "data.val.dataset=null", "model.lora.dropout=0.0", *extra)
        run_training(recipe)
        runs[name] = [m["loss"] for m in metrics(tmp_path / name)]
    assert runs["ckpt"] == pytest.approx(runs["plain"], rel=1e-5)
    assert runs["stage0"] == pytest.approx(runs["plain"], rel=1e-5)


def test_a_missing_dataset_fails_before_the_model_is_built(tmp_path, monkeypatch):
    import cores_cli.engine.trainer as trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(trainer, "_build_model", no_model)
    recipe = tiny_recipe(tmp_path / "run", f"data.root={tmp_path}", "data.mixture={rs: {datasets: [reasonseg:train]}}")
    with pytest.raises(CoresError, match=r"data\.mixture\.rs: .*ReasonSeg"):
        run_training(recipe)


def test_resume_needs_a_checkpoint_and_a_fresh_run_refuses_to_overwrite(tmp_path):
    with pytest.raises(CoresError, match="nothing to resume"):
        run_training(tiny_recipe(tmp_path / "empty"), resume=True)
    run = tmp_path / "run"
    run_training(tiny_recipe(run, "train.steps=1", "data.val.dataset=null"))
    with pytest.raises(CoresError, match="already holds checkpoints"):
        run_training(tiny_recipe(run, "train.steps=1", "data.val.dataset=null"))


def test_resume_falls_back_when_latest_names_a_missing_checkpoint(tmp_path):
    run_training(tiny_recipe(tmp_path, "train.steps=2", "train.save_every=1", "data.val.dataset=null", "train.keep_checkpoints=0"))
    root = tmp_path / "checkpoints"
    assert find_resume_checkpoint(root).name == "step-000002"
    (root / "latest").write_text("step-000009\n")
    assert find_resume_checkpoint(root).name == "step-000002"
    (root / "step-000002" / "train_state" / "state.json").unlink()  # incomplete: skipped
    assert find_resume_checkpoint(root).name == "step-000001"
    assert prune(root, 1) == []  # the only complete checkpoint stays


def test_resume_in_process_continues_the_uninterrupted_run_exactly(tmp_path):
    """Stop after step 2 of 4 (train.steps is the same: the schedule depends on it), resume."""
    full = tmp_path / "full"
    run_training(tiny_recipe(full, "train.steps=4", "train.save_every=2", "data.val.dataset=null"))
    part = tmp_path / "part"
    recipe = tiny_recipe(part, "train.steps=4", "train.save_every=2", "data.val.dataset=null")

    class Stop(Exception):
        pass

    class StopAfterSave:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def saved(self, path, step):
            raise Stop

    with pytest.raises(Stop):
        run_training(recipe, reporter=StopAfterSave())
    torch.manual_seed(12345)  # disturb the global RNG: the resume must restore it
    result = run_training(recipe, resume=True)
    assert result.steps == 4
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]
    assert [m["lr"] for m in metrics(part)] == [m["lr"] for m in metrics(full)]


def test_report_to_wandb_offline_gets_the_recipe_and_every_steps_metrics(tmp_path, monkeypatch):
    """A stand-in `wandb` (the package is optional and not installed here) fed by a real run."""
    import sys
    import types

    from cores_cli.configio import to_dict

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data, step=None):
            calls["log"].append((data, step))

        def finish(self):
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    recipe = tiny_recipe(run, "train.steps=2", "train.save_every=2", "train.eval_every=2", "train.report_to=[wandb]")
    run_training(recipe)
    (init_kwargs,) = calls["init"]
    assert init_kwargs["mode"] == "offline" and init_kwargs["config"] == to_dict(recipe)
    logged = metrics(run)
    assert [step for _, step in calls["log"]] == [m["step"] for m in logged] == [1, 2, 2]
    for (data, _), m in zip(calls["log"], logged):
        prefix = "val" if m["kind"] == "eval" else "train"
        assert data == {f"{prefix}/{k}": v for k, v in m.items() if k not in ("kind", "step") and v is not None}
    assert "val/giou" in calls["log"][-1][0] and calls["finish"] == [True]
    assert not (run / "tensorboard").exists()  # report_to lists no TensorBoard
