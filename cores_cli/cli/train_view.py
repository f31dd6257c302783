"""Training progress on stderr: a Rich live view on a terminal, plain lines otherwise.

The live view shows the step with a bar, the loss and its parts, the learning rate,
samples per second, elapsed time and ETA, the last validation (gIoU, cIoU) and the last
checkpoint. Without a terminal (a log file, CI, a launcher's pipe) it prints one line every
``log_every`` steps (the same numbers, the last validation's gIoU and cIoU included) and one per
validation and checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from ..engine.trainer import EvalReport, RunInfo, StepReport


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _losses(losses: dict[str, float]) -> str:
    order = ["loss", "ce", "bce", "dice", "intermediate"]
    return "  ".join(f"{k} {losses[k]:.4f}" for k in order if k in losses)


def _score(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _giou_ciou(metrics: dict) -> str:
    return f"gIoU {_score(metrics.get('giou'))}  cIoU {_score(metrics.get('ciou'))}"


class TrainView:
    def __init__(self, console: Console, log_every: int = 10, live: bool | None = None) -> None:
        self.console = console
        self.log_every = max(1, log_every)
        self.live_enabled = console.is_terminal if live is None else live
        self.info: RunInfo | None = None
        self.last_step: StepReport | None = None
        self.last_eval: EvalReport | None = None
        self.last_saved: str = "-"
        self.progress = Progress(
            TextColumn("step"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), console=console, transient=False
        )
        self.task = None
        self.live: Live | None = None
        self.eval_task = None
        self._eval_started = 0.0

    # -- Reporter
    def start(self, info: RunInfo) -> None:
        self.info = info
        mix = ", ".join(f"{m['source']} {m['probability']:.0%}" for m in info.mixture)
        head = (
            f"cores train → {info.run_dir}  ·  {info.world_size} process(es) on {info.device}, {info.dtype}, "
            f"ZeRO-{info.zero_stage}  ·  global batch {info.global_batch}  ·  {info.trainable_params:,} trainable parameters"
        )
        self.console.print(Text(head), soft_wrap=True)
        self.console.print(Text(f"mixture: {mix}  ·  validation: {info.val_samples} samples"), soft_wrap=True)
        if info.resumed_from:
            self.console.print(Text(f"resuming from {info.resumed_from} at step {info.start_step}"), soft_wrap=True)
        self.task = self.progress.add_task("train", total=info.total_steps, completed=info.start_step)
        if self.live_enabled:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def step(self, r: StepReport) -> None:
        self.last_step = r
        if self.task is not None:
            self.progress.update(self.task, completed=r.step)
        if self.live is not None:
            self.live.update(self._render())
        elif r.step % self.log_every == 0 or r.step == r.total_steps:
            self.console.print(Text(self._line(r)), soft_wrap=True)

    def evaluating(self, total: int) -> None:
        self._eval_started = time.perf_counter()
        if self.live is not None:
            self.eval_task = self.progress.add_task("val", total=total)

    def eval_progress(self, n: int) -> None:
        if self.eval_task is not None:
            self.progress.advance(self.eval_task, n)
            if self.live is not None:
                self.live.update(self._render())

    def evaluated(self, r: EvalReport) -> None:
        self.last_eval = r
        if self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None
        line = self._eval_line(r)
        if self.live is not None:
            self.live.console.print(Text(line))
            self.live.update(self._render())
        else:
            self.console.print(Text(line), soft_wrap=True)

    def saved(self, path: Path, step: int) -> None:
        self.last_saved = f"{path.name} (step {step})"
        if self.live is not None:
            self.live.update(self._render())
        else:
            self.console.print(Text(f"checkpoint {path}"), soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(text)}", markup=True, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            self.live = None

    # -- rendering
    def _line(self, r: StepReport) -> str:
        # the last validation rides along, so that a log's tail alone tells how the run is doing
        return (
            f"step {r.step}/{r.total_steps}  {_losses(r.losses)}  lr {r.lr:.3g}  "
            f"{r.samples_per_s:.1f} samples/s  elapsed {_duration(r.elapsed_s)}  ETA {_duration(r.eta_s)}"
            f"  last val {self._last_val()}"
        )

    def _last_val(self) -> str:
        e = self.last_eval
        return f"{_giou_ciou(e.metrics)} (step {e.step})" if e is not None else "-"

    @staticmethod
    def _eval_line(r: EvalReport) -> str:
        best = _score(r.best_giou)
        return f"validation at step {r.step}: {_giou_ciou(r.metrics)}  (best gIoU {best}{', new best' if r.is_best else ''}; {r.seconds:.1f}s)"

    def _render(self):
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        r = self.last_step
        if r is not None:
            table.add_row("loss", _losses(r.losses))
            table.add_row("lr", f"{r.lr:.3g}")
            table.add_row("speed", f"{r.samples_per_s:.1f} samples/s  ({r.step_s:.2f} s/step)")
            table.add_row("time", f"elapsed {_duration(r.elapsed_s)}  ETA {_duration(r.eta_s)}")
        if self.last_eval is not None:
            table.add_row("validation", self._eval_line(self.last_eval))
        table.add_row("checkpoint", self.last_saved)
        return Group(self.progress, table)


def for_recipe(recipe) -> TrainView:
    """The view of a run of ``recipe`` on stderr: ``cores train``'s, in this process and (named
    by ``cores train``) on rank 0 of the workers it launches."""
    from .common import err_console

    return TrainView(err_console, recipe.train.log_every)
