"""Run tracking (`train.report_to`): the key, the jsonl log, TensorBoard when installed, and W&B
through a stand-in `wandb` module (the real one is not a dependency and is not installed here)."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cores_cli.cli.app import app
from cores_cli.cli.train_view import TrainView
from cores_cli.configio import to_dict
from cores_cli.engine.trackers import chosen_backends
from cores_cli.engine.train_config import load_recipe, recipe_from_mapping, recipe_text
from cores_cli.engine.trainer import EvalReport, MetricsLog, RunInfo, StepReport, check_recipe
from cores_cli.errors import ConfigError, CoresError

TRAIN = {"kind": "train", "step": 1, "loss": 1.25, "ce": 0.5, "lr": 3e-4, "samples_per_s": 8.0, "samples_seen": 8}
EVAL = {"kind": "eval", "step": 1, "giou": 0.5, "ciou": 0.4, "n": 4, "best_giou": 0.5, "eval_s": 0.2}


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` package: records what cores hands it."""

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0
        self.fail = fail

    def init(self, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((dict(data), step))

            def finish(self):
                fake.finished += 1

        return Run()


# ------------------------------------------------------------------------------ the key


def test_report_to_is_a_list_with_jsonl_first_and_each_backend_once():
    assert load_recipe("tiny-synthetic").train.report_to is None  # the default: jsonl + TensorBoard if installed
    r = load_recipe("tiny-synthetic", ["train.report_to=[wandb, tensorboard, wandb]"])
    assert r.train.report_to == ["jsonl", "wandb", "tensorboard"]
    assert load_recipe("tiny-synthetic", ["train.report_to=wandb"]).train.report_to == ["jsonl", "wandb"]  # one name
    assert load_recipe("tiny-synthetic", ["train.report_to=tensorboard,wandb"]).train.report_to == ["jsonl", "tensorboard", "wandb"]
    assert load_recipe("tiny-synthetic", ["train.report_to=[]"]).train.report_to == ["jsonl"]
    assert recipe_from_mapping({"train": {"report_to": ["jsonl"]}}).train.report_to == ["jsonl"]


def test_report_to_reads_back_from_the_run_directorys_recipe(tmp_path):
    r = load_recipe("tiny-synthetic", ["train.report_to=[wandb]"])
    (tmp_path / "recipe.yaml").write_text(recipe_text(r))
    assert load_recipe(tmp_path / "recipe.yaml") == r


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.report_to=[jsonl, mlflow]", r"^train\.report_to\[1\]: 'mlflow' is not one of 'jsonl', 'tensorboard', 'wandb'$"),
        ("train.report_to=3", r"^train\.report_to: expected a list, got 3$"),
        ("train.report_to={wandb: true}", r"^train\.report_to: expected a list"),
    ],
)
def test_a_bad_report_to_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe("tiny-synthetic", [override])
    assert "\n" not in str(err.value)


def test_the_deprecated_tensorboard_key_still_works_and_cannot_contradict_report_to():
    assert chosen_backends(None, tensorboard=True) == {"jsonl": True, "tensorboard": False}  # TensorBoard if installed
    assert chosen_backends(None, tensorboard=False) == {"jsonl": True}
    off = load_recipe("tiny-synthetic", ["train.tensorboard=false"]).train
    assert chosen_backends(off.report_to, off.tensorboard) == {"jsonl": True}
    # an earlier run's recipe.yaml holds tensorboard: true; report_to, when set, decides
    on = load_recipe("tiny-synthetic", ["train.tensorboard=true", "train.report_to=[wandb]"]).train
    assert chosen_backends(on.report_to, on.tensorboard) == {"jsonl": True, "wandb": True}
    with pytest.raises(ConfigError, match=r"^train\.tensorboard is false but train\.report_to lists tensorboard"):
        load_recipe("tiny-synthetic", ["train.tensorboard=false", "train.report_to=[tensorboard]"])


def test_a_listed_backend_that_is_not_installed_stops_the_run_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(CoresError, match=r"^train\.report_to lists wandb, but wandb is not installed: pip install wandb$"):
        check_recipe(load_recipe("tiny-synthetic", ["train.report_to=[wandb]"]))
    with pytest.raises(CoresError, match=r"^train\.report_to lists tensorboard, but tensorboard is not installed: pip install tensorboard$"):
        check_recipe(load_recipe("tiny-synthetic", ["train.report_to=[tensorboard]"]))
    check_recipe(load_recipe("tiny-synthetic"))  # unset: TensorBoard only when installed, no error
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--gpus", "0", "--recipe", "tiny-synthetic", "--run-dir", str(run), "--set", "train.report_to=[wandb]"])
    assert res.exit_code == 1 and "pip install wandb" in res.output and "Traceback" not in res.output
    assert not run.exists()  # refused before the run directory was touched


# ------------------------------------------------------------------------------ the backends


def test_jsonl_gets_every_record_as_one_line_and_nothing_else_is_opened(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=lambda *a, **k: opened.append(a)))
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    log = MetricsLog(tmp_path, resume_step=None, report_to=["jsonl"])
    log.write(TRAIN)
    log.write(EVAL)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [TRAIN, EVAL]
    assert opened == [] and sys.modules["wandb"].inits == []  # report_to decides: no TensorBoard, no W&B
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_writes_event_files_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, resume_step=None, report_to=["tensorboard"])
    log.write(TRAIN)
    log.write({**TRAIN, "step": 2, "loss": 0.75})
    log.write({**EVAL, "step": 2})
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.25), (2, 0.75)]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("val/giou")] == [(2, 0.5)]


def test_wandb_offline_gets_the_recipe_as_config_and_every_records_metrics(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    secret = "wandb-secret-key-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    recipe = load_recipe("tiny-synthetic", ["train.report_to=[wandb]", f"train.run_dir={tmp_path / 'run'}"])
    config = to_dict(recipe)
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLog(run, resume_step=None, report_to=recipe.train.report_to, config=config)
    log.write(TRAIN)
    log.write(EVAL)
    log.close()
    (init,) = fake.inits
    assert init["mode"] == "offline"  # passed on explicitly: no login is attempted
    assert init["config"] == config and init["config"]["train"]["report_to"] == ["jsonl", "wandb"]
    assert init["dir"] == str(run) and init["project"] == "cores" and init["name"] == "run"
    assert fake.logged == [
        ({"train/loss": 1.25, "train/ce": 0.5, "train/lr": 3e-4, "train/samples_per_s": 8.0, "train/samples_seen": 8}, 1),
        ({"val/giou": 0.5, "val/ciou": 0.4, "val/n": 4, "val/best_giou": 0.5, "val/eval_s": 0.2}, 1),
    ]
    assert fake.finished == 1
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == [TRAIN, EVAL]  # jsonl too
    assert secret not in repr(fake.inits)  # the key is wandb's business, never handed on by cores
    for path in run.rglob("*"):
        assert not path.is_file() or secret not in path.read_text(errors="replace")


def test_wandb_mode_is_left_to_wandb_unless_offline(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    MetricsLog(tmp_path, report_to=["wandb"]).close()
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older name for offline
    MetricsLog(tmp_path, report_to=["wandb"]).close()
    assert "mode" not in fake.inits[0] and fake.inits[0]["project"] == "mine"
    assert fake.inits[1]["mode"] == "offline"


def test_a_wandb_run_that_cannot_start_is_one_line_without_the_key_and_closes_what_was_opened(tmp_path, monkeypatch):
    secret = "wandb-secret-key-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail=RuntimeError(f"invalid api key {secret}\nsee the docs")))
    closed = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, logdir, purge_step=None):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    with pytest.raises(CoresError) as err:
        MetricsLog(tmp_path, report_to=["jsonl", "tensorboard", "wandb"])
    message = str(err.value)
    assert message.startswith("train.report_to lists wandb, but the W&B run did not start: invalid api key *** see the docs")
    assert secret not in message and "\n" not in message and "WANDB_MODE=offline" in message
    assert closed == [True]


# ------------------------------------------------------------------------------ what the user sees

INFO = RunInfo(Path("runs/x"), 20, 0, 1, "cpu", "float32", 2, 8, 1234, [{"source": "synthetic", "probability": 1.0, "datasets": {}}], 4, None)


def _step(n: int) -> StepReport:
    return StepReport(n, 20, {"loss": 1.5}, 3e-4, 12.5, 0.64, 10.0 * n, 5.0 * (20 - n), 8 * n)


def test_log_lines_show_eta_samples_per_second_and_the_last_validation(tmp_path):
    out = io.StringIO()
    view = TrainView(Console(file=out, force_terminal=False, width=300), log_every=5)
    view.start(INFO)
    for n in range(1, 11):
        view.step(_step(n))
        if n == 5:
            view.evaluated(EvalReport(5, {"giou": 0.5123, "ciou": 0.4321}, 0.5123, True, 1.0))
    view.close()
    steps = [ln for ln in out.getvalue().splitlines() if ln.startswith("step ")]
    assert len(steps) == 2
    assert "12.5 samples/s" in steps[0] and "ETA 1:15" in steps[0] and steps[0].endswith("last val -")
    assert "12.5 samples/s" in steps[1] and "ETA 0:50" in steps[1]
    assert steps[1].endswith("last val gIoU 0.5123  cIoU 0.4321 (step 5)")


def test_the_live_view_shows_eta_samples_per_second_and_the_last_validation():
    out = io.StringIO()
    view = TrainView(Console(file=out, force_terminal=True, width=200), log_every=5)
    view.start(INFO)
    view.step(_step(4))
    view.evaluated(EvalReport(4, {"giou": 0.5123, "ciou": 0.4321}, 0.5123, True, 1.0))
    view.step(_step(5))
    view.close()
    text = out.getvalue()
    assert "12.5 samples/s" in text and "ETA 1:15" in text
    assert "gIoU 0.5123  cIoU 0.4321" in text


# ------------------------------------------------------------------------------ rank 0 only

FAKE_WANDB_MODULE = '''
import json, os

def _note(**event):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as fh:
        fh.write(json.dumps({"rank": os.environ.get("RANK"), **event}) + "\\n")

class _Run:
    def log(self, data, step=None):
        _note(event="log", step=step, keys=sorted(data))

    def finish(self):
        _note(event="finish")

def init(**kwargs):
    _note(event="init", mode=kwargs.get("mode"))
    return _Run()
'''


@pytest.mark.slow
def test_with_two_processes_only_rank_0_reports_to_wandb(tmp_path):
    """Two CPU processes under torchrun, a stand-in `wandb` module on their path: one W&B run."""
    import os
    import subprocess

    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    (fake_dir / "wandb.py").write_text(FAKE_WANDB_MODULE)
    events = tmp_path / "wandb-events.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="offline", FAKE_WANDB_LOG=str(events),
        PYTHONPATH=os.pathsep.join([str(fake_dir), *filter(None, [env.get("PYTHONPATH")])]),
    )
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "cores_cli", "train", "--gpus", "2", "--launcher", "torchrun", "--run-dir", str(run),
         "--recipe", "tiny-synthetic", "--set", "train.device=cpu", "--set", "train.steps=2", "--set", "train.save_every=2",
         "--set", "train.micro_batch_size=2", "--set", "data.val.dataset=null", "--set", "data.num_workers=0",
         "--set", "data.mixture.synthetic.options={n: 12}", "--set", "train.report_to=[wandb]"],
        check=False, capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    seen = [json.loads(x) for x in events.read_text().splitlines()]
    assert {e["rank"] for e in seen} == {"0"}
    assert [e["event"] for e in seen] == ["init", "log", "log", "finish"]
    assert seen[0]["mode"] == "offline" and [e["step"] for e in seen if e["event"] == "log"] == [1, 2]
