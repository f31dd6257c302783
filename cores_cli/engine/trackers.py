"""Where a training run's metrics go (``train.report_to``): one small class per backend.

``jsonl`` is ``RUN/metrics.jsonl`` and is always written: it is the run directory's own record,
which ``--resume`` cuts back to the checkpoint and ``--overwrite`` recognises. ``tensorboard``
writes ``RUN/tensorboard/``, ``wandb`` a Weights & Biases run (under ``RUN/wandb/``). Both are
optional packages, imported only when a run asks for them: listed in ``report_to`` and missing,
they stop the run before anything heavy is loaded (:func:`check_backends`), with the ``pip
install`` line that fixes it. With ``report_to`` unset, TensorBoard is used when installed, as
before the key existed.

Every tracker gets the same records :class:`~cores_cli.engine.trainer.MetricsLog` is given (a
``kind`` of ``train`` or ``eval``, a ``step`` and numbers) and only rank 0 creates any.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import CoresError
from ..fileio import atomic_write_text

BACKENDS = ("jsonl", "tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers under ``train/`` or ``val/`` (what TensorBoard and W&B plot)."""
    prefix = "val" if record.get("kind") == "eval" else "train"
    return {
        f"{prefix}/{k}": v
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")
    }


class JsonlTracker:
    """``metrics.jsonl``: appended, one JSON object per line.

    On resume the log is cut back to the checkpoint's step first (one atomic rewrite): the
    killed run's later train and validation lines are redone by the resumed run, and a line
    torn by the kill is dropped.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [ln for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if _kept_on_resume(ln, resume_step)]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def _kept_on_resume(line: str, resume_step: int) -> bool:
    """A complete record of a step up to the checkpoint's (train or validation)."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(step, int) and not isinstance(step, bool) and step <= resume_step


class TensorBoardTracker:
    """``RUN/tensorboard/``: every number of every record as a scalar at its step."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the killed run's events past the checkpoint, as metrics.jsonl is cut back
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run: the resolved recipe as its config, each record at its step.

    ``WANDB_MODE=offline`` (or ``dryrun``) is passed on explicitly, so no login is attempted
    whatever a settings file says; the run is then kept under ``RUN/wandb/`` for ``wandb sync``.
    The API key is left to wandb (``wandb login`` or ``WANDB_API_KEY``): cores never reads it
    into a file or a message, and removes it from wandb's error text should it appear there.
    ``WANDB_PROJECT`` chooses the project (default ``cores``); the run is named after RUN. A
    resumed training run starts a new W&B run that continues at the checkpoint's step.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        kwargs: dict[str, Any] = {
            "project": os.environ.get("WANDB_PROJECT") or "cores",
            "name": run_dir.resolve().name,
            "dir": str(run_dir),  # wandb keeps its files in DIR/wandb/
            "config": config,
            "job_type": "train",
            # wandb would otherwise wrap stdout/stderr, under the live view and the worker pipes
            "settings": {"console": "off"},
        }
        if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun"):
            kwargs["mode"] = "offline"
        try:
            self.run = wandb.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - wandb's errors (no login, no network, bad settings) vary by version
            raise CoresError(
                f"train.report_to lists wandb, but the W&B run did not start: {_without_key(str(exc))} "
                "(run `wandb login`, or set WANDB_MODE=offline to log without an account)"
            ) from None

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _without_key(text: str) -> str:
    text = " ".join(text.split())  # one line
    key = os.environ.get("WANDB_API_KEY", "").strip()
    return text.replace(key, "***") if len(key) >= 8 else text


# ------------------------------------------------------------------------------ choosing backends


def chosen_backends(report_to: Sequence[str] | None, tensorboard: bool = True) -> dict[str, bool]:
    """Backend name → whether it is required (missing = an error) or used only when installed.

    ``report_to`` unset: ``jsonl``, and TensorBoard when installed unless the deprecated
    ``train.tensorboard`` is false. Set: ``jsonl`` and exactly what it lists."""
    if report_to is None:
        return {"jsonl": True, **({"tensorboard": False} if tensorboard else {})}
    return {"jsonl": True, **{name: True for name in report_to if name != "jsonl"}}


def check_backends(report_to: Sequence[str] | None, tensorboard: bool = True) -> None:
    """A one-line CoresError for a listed backend whose package is missing (before any model loads)."""
    for name, required in chosen_backends(report_to, tensorboard).items():
        if required and name in _INSTALL and not _importable(name):
            raise CoresError(f"train.report_to lists {name}, but {name} is not installed: {_INSTALL[name]}")


def _importable(name: str) -> bool:
    # imported, not looked up: what counts is whether the import the tracker makes will work
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        elif name == "wandb":
            import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def open_trackers(
    run_dir: Path,
    report_to: Sequence[str] | None,
    *,
    tensorboard: bool = True,
    resume_step: int | None = None,
    config: dict[str, Any] | None = None,
) -> list[Tracker]:
    """The trackers of a run, opened in the order listed (``jsonl`` first); a failure closes
    the ones already open before it is raised."""
    check_backends(report_to, tensorboard)
    opened: list[Tracker] = []
    try:
        for name, required in chosen_backends(report_to, tensorboard).items():
            if name == "jsonl":
                opened.append(JsonlTracker(run_dir, resume_step))
            elif name == "tensorboard":
                if required or _importable(name):
                    opened.append(TensorBoardTracker(run_dir, resume_step))
            elif name == "wandb":
                opened.append(WandbTracker(run_dir, config or {}))
            else:
                raise CoresError(f"train.report_to: unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    except BaseException:
        for tracker in reversed(opened):
            tracker.close()
        raise
    return opened
