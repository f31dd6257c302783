"""`cores eval`: gIoU / cIoU / mIoU on a named dataset, LISA's protocol, printed with it.

The command parses its options, calls :func:`cores_cli.engine.eval_run.run_eval` and renders
what it reports (:class:`EvalConsole`); torch is imported only once the command runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import CoresError
from .common import clean_errors, err_console, fail, stdout_line, use_threads, warn

if TYPE_CHECKING:  # names only: the engine imports torch
    from ..engine.eval_run import EvalRequest, EvalRun, WarningSummary


def _reader_options(opts: list[str], queries: str | None) -> dict:
    out = {}
    for item in opts:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CoresError(f"--opt {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    if queries is not None:
        out["queries"] = queries
    return out


@clean_errors
def evaluate(
    dataset: str = typer.Option(..., "--dataset", "-d", help="reasonseg:val, reasonseg:test:short|long, refcoco:unc:val, refcocog:umd:test, partimagenet:val, pascalpart:val, synthetic:val, reasonpart:DIR (the --out of make-reasonpart), ..."),
    data_root: Path = typer.Option(None, "--data-root", help="Folder holding the datasets in LISA's layout (not needed for synthetic:*)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="A cores checkpoint directory, or a cores train run directory (its checkpoints/best, else the latest step), or a Hugging Face Hub id (org/name or org/name@revision) holding one (LISA and original LLaVA weights: convert them once with `cores import`); default: the tiny model shipped with cores, trained on the synthetic benchmark."),
    preset: str = typer.Option(None, "--preset", help="Evaluate a preset with RANDOM weights (a smoke run of the protocol)."),
    set_: list[str] = typer.Option([], "--set", help="Override a model setting, e.g. --set prompt.in_context_k=0 (repeatable)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass (teacher-forced mode)."),
    generate: bool = typer.Option(False, "--generate", help="Let the model write each answer (one query at a time) instead of the fixed template."),
    queries: str = typer.Option(None, "--queries", help="ReasonSeg/synthetic: 'first' query per image (LISA's protocol, the default on val/test) or 'all'."),
    opt: list[str] = typer.Option([], "--opt", help="Reader option key=value, e.g. --opt n=50 for synthetic, --opt skip_missing=true (repeatable)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N samples."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the metrics and protocol as JSON here, and the per-target JSONL beside it."),
    per_sample: Path = typer.Option(None, "--per-sample", help="Per-target JSONL path (default: OUTPUT with .samples.jsonl)."),
    save_vis: int = typer.Option(0, "--save-vis", min=0, help="Save overlays of the N lowest-IoU targets: prediction filled, ground truth outlined, a legend and the whole query below the image."),
    save_masks: bool = typer.Option(False, "--save-masks", help="Put each predicted mask in the per-target JSONL as COCO RLE (mask_rle: {size: [h, w], counts}), so any metric can be recomputed from the file."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted evaluation from its per-target JSONL: run the same command again with --resume; targets already scored are not evaluated again and the results equal an uninterrupted run's. Refused when the file was written for another evaluation (dataset, model, options)."),
    vis_dir: Path = typer.Option(None, "--vis-dir", help="Folder for --save-vis (default: beside OUTPUT)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics, protocol and reader warnings as one JSON object on stdout."),
    strict: bool = typer.Option(False, "--strict", help="Refuse to evaluate (exit 1, before the model loads) when any sample has a reader warning: a shape outside the image, no target polygon, a blank query, ...; exit 1 after evaluating when an image turns out unreadable."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Processes to evaluate in (one per GPU; CPU processes when there is no GPU), via torchrun."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch. Default: this process's share of the CPUs that are idle now (OMP_NUM_THREADS, when set, is kept)."),
    workers: int = typer.Option(None, "--workers", min=0, help="Processes (per evaluating process) that read the images ahead of the model, beside it. 0: in this process, batch by batch. Default: on a GPU every idle CPU but one (at most 8); on the CPU one per 4 idle CPUs (at most 2), since the model needs them more."),
    quantize: str = typer.Option(None, "--quantize", help="8bit or 4bit: load the LLaVA through bitsandbytes, as LISA's --load_in_8bit/--load_in_4bit (CUDA; pip install 'cores\\[quantize]')."),
    device_map: str = typer.Option(None, "--device-map", help="auto: spread the LLaVA over the visible GPUs (a 13B model on two smaller GPUs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-query in-context exemplar draw."),
    context_library: Path = typer.Option(None, "--context-library", help="Exemplar library (JSONL); default: the model's, else the shipped one."),
) -> None:
    """Evaluate a checkpoint on a dataset and print gIoU, cIoU (and by target size), with the
    protocol that produced them.

    \b
    Example:
      cores eval --dataset reasonseg:val --data-root ./dataset --checkpoint runs/cores-7b -o val.json
      cores eval --dataset synthetic:val --checkpoint runs/tiny --save-vis 8 -o synth.json
      cores eval --dataset refcoco:unc:val --data-root ./dataset -c runs/cores-7b --gpus 8

    Each query is asked on its own (LISA's protocol); ReasonSeg val/test use the first query of
    each image unless --queries all. Target pixels marked ignore (255) count in neither
    intersection nor union. Samples whose annotation the reader had to warn about (listed on
    stderr and in the results JSON) are scored as read unless --strict; a sample whose image
    cannot be decoded is left out of the metrics and listed the same way.

    The per-target JSONL grows while evaluating: if the run is interrupted, the same command
    with --resume continues from it (the batch size and --gpus may change).
    """
    from ..engine.eval_run import EvalRequest, run_eval

    req = EvalRequest(
        dataset=dataset,
        data_root=data_root,
        reader_options=_reader_options(opt, queries),
        batch_size=batch_size,
        mode="generate" if generate else "teacher",
        seed=seed,
        limit=limit,
        output=output,
        per_sample=per_sample,
        save_vis=save_vis,
        vis_dir=vis_dir,
        context_library=context_library,
        strict=strict,
        checkpoint=checkpoint,
        preset=preset,
        model_overrides=list(set_),
        device=device,
        dtype=dtype,
        processes=gpus,
        save_masks=save_masks,
        resume=resume,
        quantize=quantize,
        device_map=device_map,
        workers=workers,
    )
    # with --gpus N this same command line runs in every process (without its --gpus)
    use_threads(threads)
    outcome = run_eval(req, EvalConsole(dataset, json_out), command=sys.argv[1:])
    if outcome.exit_code != 0:
        raise typer.Exit(outcome.exit_code)


class EvalConsole:
    """The terminal view of an evaluation (:class:`~cores_cli.engine.eval_run.EvalView`):
    warnings and progress on stderr, the table, and the results on stdout with ``--json``."""

    def __init__(self, dataset: str, json_out: bool) -> None:
        self.dataset = dataset
        self.json_out = json_out
        self.bar: Progress | None = None

    def warnings(self, summary: WarningSummary, strict: bool) -> None:
        lines = summary.lines(strict)
        if lines:
            warn(lines[0])
            for line in lines[1:]:
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)

    def random_weights(self, source: str) -> None:
        warn(f"{source}: the numbers only exercise the protocol")

    def caution(self, message: str) -> None:
        warn(message)

    def resuming(self, path: Path, targets: int, samples: int, total: int) -> None:
        err_console.print(f"resuming from {path}: {targets} targets of {samples} of the {total} samples are scored already", markup=False, highlight=False, soft_wrap=True)

    def evaluating(self, total: int, world: int) -> Callable[[int], None]:
        # the dataset name is the user's text: printed as written, never read as Rich markup
        self.bar = Progress(TextColumn("evaluating {task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err_console)
        self.bar.start()
        # the bar counts this process's share; say so when the others' are not in it
        label = self.dataset if world <= 1 else f"{self.dataset} (process 1 of {world}, its share)"
        task = self.bar.add_task(label, total=total)
        bar = self.bar
        return lambda n: bar.advance(task, n)

    def evaluated(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def results(self, req: EvalRequest, run: EvalRun, source: str) -> None:
        if self.json_out:
            stdout_line(json.dumps({"dataset": req.dataset, "protocol": run.protocol, "metrics": run.result.metrics, "warnings": run.warnings}))
        _print_table(run.result.metrics, run.protocol, source)
        if run.left_out:
            _print_left_out(run, req.strict)
        if run.summary is not None and run.summary.affected:
            err_console.print(f"  reader warnings: {run.summary.headline()}; listed above" + (" and in the results JSON" if req.output else ""), markup=False, highlight=False)

    def unsaved(self, document: dict[str, Any]) -> None:
        if not self.json_out:  # else the --json line already holds the metrics
            stdout_line(json.dumps(document, ensure_ascii=False))

    def written(self, paths: list[Path]) -> None:
        err_console.print("wrote " + _describe_written(paths), markup=False, highlight=False)

    def error(self, message: str) -> None:
        fail(message)


def _print_left_out(run: EvalRun, strict: bool) -> None:
    """Samples found unreadable while evaluating: after the table, since only now are they known."""
    n = len(run.left_out)
    fate = "--strict fails the run once the results are written" if strict else "the metrics are over the other samples"
    warn(f"{n} of {len(run.samples)} samples left out of the metrics, their image could not be read; {fate}")
    for line in run.summary.lines(strict, kinds=("unreadable_image",))[1:]:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def _describe_written(written: list[Path]) -> str:
    files = [str(p) for p in written if p.suffix != ".png"]
    pngs = [p for p in written if p.suffix == ".png"]
    if pngs:
        files.append(f"{len(pngs)} overlay(s) in {pngs[0].parent}")
    return ", ".join(files)


def _print_table(metrics: dict, proto: dict, source: str) -> None:
    table = Table(title=f"{proto['dataset']}: {source}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("targets", justify="right")

    def fmt(v):
        return "—" if v is None else f"{100 * v:.2f}"

    table.add_row("gIoU", fmt(metrics.get("giou")), str(metrics.get("n")))
    table.add_row("cIoU", fmt(metrics.get("ciou")), str(metrics.get("n")))
    for b, name in (("s", "small"), ("m", "medium"), ("l", "large")):
        table.add_row(f"cIoU_{b} ({name})", fmt(metrics.get(f"ciou_{b}")), str(metrics.get(f"n_{b}")))
    if metrics.get("miou") is not None:
        table.add_row("mIoU", fmt(metrics["miou"]), "")
    err_console.print(table)
    for key in ("what", "mode", "samples", "left_out", "in_context_k", "chain", "threshold", "processes", "seed"):
        if key == "left_out" and not proto.get(key):
            continue
        err_console.print(f"  {key}: {proto[key]}", markup=False, highlight=False)
