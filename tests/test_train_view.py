"""The training progress view: plain lines without a terminal, a live view with one."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from cores_cli.cli.train_view import TrainView
from cores_cli.engine.trainer import EvalReport, RunInfo, StepReport

INFO = RunInfo(Path("runs/x"), 20, 0, 1, "cpu", "float32", 2, 8, 1234, [{"source": "synthetic", "probability": 1.0, "datasets": {}}], 4, None)


def step(n: int) -> StepReport:
    return StepReport(n, 20, {"loss": 1.5, "ce": 0.5, "bce": 0.4, "dice": 0.6}, 3e-4, 12.5, 0.64, 10.0 * n, 5.0, 8 * n)


def test_without_a_terminal_one_line_every_log_every_steps():
    out = io.StringIO()
    view = TrainView(Console(file=out, force_terminal=False, width=200), log_every=10)
    view.start(INFO)
    for n in range(1, 21):
        view.step(step(n))
    view.evaluated(EvalReport(20, {"giou": 0.5, "ciou": 0.4}, 0.5, True, 1.0))
    view.saved(Path("runs/x/checkpoints/step-000020"), 20)
    view.close()
    lines = out.getvalue().splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["10/20", "20/20"]
    assert "loss 1.5000  ce 0.5000  bce 0.4000  dice 0.6000" in steps[0] and "lr 0.0003" in steps[0]
    assert "12.5 samples/s" in steps[0] and "ETA 0:05" in steps[0]
    assert any("gIoU 0.5000" in ln and "new best" in ln for ln in lines)
    assert any(ln.startswith("checkpoint runs/x/checkpoints/step-000020") for ln in lines)


def test_on_a_terminal_a_live_view_with_the_loss_parts_and_eta():
    out = io.StringIO()
    view = TrainView(Console(file=out, force_terminal=True, width=150), log_every=10)
    view.start(INFO)
    view.step(step(3))
    view.evaluating(4)
    view.eval_progress(4)
    view.evaluated(EvalReport(3, {"giou": 0.25, "ciou": 0.2}, 0.25, True, 1.0))
    view.close()
    text = out.getvalue()
    assert "3/20" in text and "dice 0.6000" in text and "ETA" in text and "samples/s" in text and "gIoU 0.2500" in text


def test_metrics_log_appends_jsonl_feeds_tensorboard_and_drops_lines_after_a_resume_point(tmp_path, monkeypatch):
    import json
    import sys
    import types

    from cores_cli.engine.trainer import MetricsLog

    scalars = []

    purges = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, logdir, purge_step=None):
            self.logdir = logdir
            purges.append(purge_step)

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLog(tmp_path, tensorboard=True, resume_step=None)
    for s in (1, 2, 3):
        log.write({"kind": "train", "step": s, "loss": 1.0 / s, "lr": 0.1})
    log.write({"kind": "eval", "step": 3, "giou": 0.5})
    log.close()
    assert ("train/loss", 0.5, 2) in scalars and ("val/giou", 0.5, 3) in scalars and scalars[-1] == "closed"
    MetricsLog(tmp_path, tensorboard=True, resume_step=2).close()  # resumed at step 2: step 3 is redone
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m["step"]) for m in lines] == [("train", 1), ("train", 2)]
    assert purges[0] is None and purges[1] == 3  # TensorBoard hides the killed run's events from step 3 on
