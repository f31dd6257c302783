"""`cores train` as a user runs it, in subprocesses: `--gpus 0` through DeepSpeed on the CPU, a
SIGKILL in the middle of writing a checkpoint, `--resume`, and two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cores_cli.engine.checkpoint import load_checkpoint
from cores_cli.engine.train_state import read_train_state

ARGS = [
    "--recipe", "tiny-synthetic",
    "--set", "train.steps=6",
    "--set", "train.save_every=2",
    "--set", "train.eval_every=3",
    "--set", "data.mixture.synthetic.options={n: 12}",
    "--set", "data.val.options={n: 4}",
    "--set", "data.num_workers=0",
]


def cores(*args: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if fault:
        env["CORES_TEST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cores_cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def records(run: Path) -> list[tuple]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.append((m["kind"], m["step"], m.get("loss"), m.get("lr"), m.get("giou")))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "full"
    res = cores("train", "--gpus", "0", "--run-dir", str(run), *ARGS)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(run / "checkpoints" / "step-000006")
    return run


def test_gpus_0_trains_through_deepspeed_and_writes_checkpoints(uninterrupted):
    run = uninterrupted
    rows = records(run)
    assert [r[1] for r in rows if r[0] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r[1] for r in rows if r[0] == "eval"] == [3, 6]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    state, _, _ = read_train_state(run / "checkpoints" / "step-000006")
    assert state.step == 6 and state.optimizer_steps == 6 and state.samples_consumed == 6 * 8
    meta = json.loads((run / "checkpoints" / "step-000006" / "config.json").read_text())
    assert meta["extra"]["recipe"]["train"]["zero_stage"] == 2  # ZeRO-2 ran on the CPU
    model, report = load_checkpoint(run / "checkpoints" / "step-000006")
    assert not report.missing and (run / "recipe.yaml").is_file()


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_and_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    res = cores("train", "--gpus", "0", "--run-dir", str(run), *ARGS, fault="kill-during-save:4")
    assert res.returncode == -9, res.stderr  # SIGKILL in the middle of writing step 4
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    assert not (ckpts / "step-000004").exists()
    assert any(p.name.startswith(".step-000004") for p in ckpts.iterdir())  # the half-written one
    load_checkpoint(ckpts / "step-000002")  # the previous checkpoint is whole
    assert read_train_state(ckpts / "step-000002")[0].step == 2

    res = cores("train", "--gpus", "0", "--resume", "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    assert read_train_state(ckpts / "step-000006")[0].step == 6
    assert not any(p.name.startswith(".step-") for p in ckpts.iterdir())  # leftovers cleaned
    # same steps, losses, learning rates and validation as the run that was never killed: bit for bit
    assert records(run) == records(uninterrupted)


@pytest.mark.slow
def test_two_cpu_processes_split_the_stream_and_save_once(tmp_path):
    run = tmp_path / "two"
    res = cores(
        "train", "--gpus", "2", "--launcher", "torchrun", "--run-dir", str(run), *ARGS,
        "--set", "train.device=cpu", "--set", "train.steps=2", "--set", "train.micro_batch_size=2", "--set", "data.val.dataset=null",
    )
    assert res.returncode == 0, res.stderr
    state, optimizer, rng = read_train_state(run / "checkpoints" / "step-000002")
    assert state.world_size == 2 and len(rng) == 2  # both ranks' RNG, written by rank 0
    assert state.samples_consumed == 2 * 2 * 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert any(k.endswith("::exp_avg") for k in optimizer)  # full per-parameter state, not rank shards
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples_seen"] for m in lines] == [4, 8]  # rank 0 logs once per step for both ranks
