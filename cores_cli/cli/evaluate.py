"""`cores eval`: gIoU / cIoU / mIoU on a named dataset, LISA's protocol, printed with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import CoresError
from ..runtime import resolve_device, resolve_dtype
from .common import clean_errors, err_console, fail, stdout_line, warn


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


_STATUS_ENV = "CORES_EVAL_STATUS_FILE"
"""Set by :func:`_relaunch`: where rank 0 leaves the exit status of an error it met after the
evaluation, which it reports itself and then exits 0."""


def _relaunch(gpus: int, argv: list[str]) -> int:
    """Run this same command in ``gpus`` processes through torchrun (one per GPU, or CPU
    processes with gloo when there is no GPU); their exit status."""
    args = [a for i, a in enumerate(argv) if a != "--gpus" and (i == 0 or argv[i - 1] != "--gpus") and not a.startswith("--gpus=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "cores_cli", *args]
    with tempfile.TemporaryDirectory(prefix="cores-eval-") as tmp:
        status = Path(tmp) / "status"
        code = subprocess.call(cmd, env={**os.environ, _STATUS_ENV: str(status)})
        if code == 0 and status.is_file():
            code = int(status.read_text(encoding="utf-8").strip() or "1")
    return code


@clean_errors
def evaluate(
    dataset: str = typer.Option(..., "--dataset", "-d", help="reasonseg:val, reasonseg:test:short|long, refcoco:unc:val, refcocog:umd:test, partimagenet:val, pascalpart:val, synthetic:val, reasonpart:DIR (the --out of make-reasonpart), ..."),
    data_root: Path = typer.Option(None, "--data-root", help="Folder holding the datasets in LISA's layout (not needed for synthetic:*)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="A cores checkpoint directory; default: the tiny model shipped with cores, trained on the synthetic benchmark."),
    preset: str = typer.Option(None, "--preset", help="Evaluate a preset with RANDOM weights (a smoke run of the protocol)."),
    set_: list[str] = typer.Option([], "--set", help="Override a model setting, e.g. --set prompt.in_context_k=0 (repeatable)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass (teacher-forced mode)."),
    generate: bool = typer.Option(False, "--generate", help="Let the model write each answer (one query at a time) instead of the fixed template."),
    queries: str = typer.Option(None, "--queries", help="ReasonSeg/synthetic: 'first' query per image (LISA's protocol, the default on val/test) or 'all'."),
    opt: list[str] = typer.Option([], "--opt", help="Reader option key=value, e.g. --opt n=50 for synthetic, --opt skip_missing=true (repeatable)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N samples."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the metrics and protocol as JSON here, and the per-target JSONL beside it."),
    per_sample: Path = typer.Option(None, "--per-sample", help="Per-target JSONL path (default: OUTPUT with .samples.jsonl)."),
    save_vis: int = typer.Option(0, "--save-vis", min=0, help="Save overlays of the N lowest-IoU targets."),
    vis_dir: Path = typer.Option(None, "--vis-dir", help="Folder for --save-vis (default: beside OUTPUT)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics, protocol and reader warnings as one JSON object on stdout."),
    strict: bool = typer.Option(False, "--strict", help="Refuse to evaluate (exit 1, before the model loads) when any sample has a reader warning: a shape outside the image, no target polygon, a blank query, ...; exit 1 after evaluating when an image turns out unreadable."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Processes to evaluate in (one per GPU; CPU processes when there is no GPU), via torchrun."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
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
    """
    from ..engine.eval_run import EvalRequest, check_outputs, compute_eval, init_distributed_from_env
    from ..engine.loading import load_for_inference

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
    )
    # before any process, sample or model is started: a place that cannot take the results
    check_outputs(req)
    if gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # read and check here first, so bad input stops with one line, not one per process
        _read_and_check(req, checkpoint, report=strict)
        raise typer.Exit(_relaunch(gpus, sys.argv[1:]))
    import torch.distributed as torch_dist

    joined = not torch_dist.is_initialized()  # a group we start here is ours to shut down
    dev = init_distributed_from_env(device) or resolve_device(device)
    joined = joined and torch_dist.is_initialized()
    main = int(os.environ.get("RANK", "0")) == 0
    samples, _ = _read_and_check(req, checkpoint, report=main)
    loaded = load_for_inference(checkpoint, preset, list(set_), dev, resolve_dtype(dtype, dev), seed)
    if loaded.random_weights and main:
        warn(f"{loaded.source}: the numbers only exercise the protocol")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # the dataset name is the user's text: printed as written, never read as Rich markup
    with Progress(TextColumn("evaluating {task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not main) as bar:
        def factory(total: int):
            # the bar counts this process's share; say so when the others' are not in it
            label = dataset if world <= 1 else f"{dataset} (process 1 of {world}, its share)"
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        run = compute_eval(req, loaded, samples, factory)
    if joined:
        # the last collective is behind us; a gloo group left to the interpreter's exit can abort
        # a rank ("terminate called without an active exception") after all the work is done
        torch_dist.destroy_process_group()
    if not main:
        return
    status_file = os.environ.get(_STATUS_ENV)
    try:
        _report_and_write(req, loaded, run, json_out)
    except CoresError as e:
        if not status_file:
            raise
        # under our own launcher a worker's exit 1 makes torchrun print a traceback of its own:
        # the error is one line here, and the status goes to the launching process
        fail(str(e))
        Path(status_file).write_text("1", encoding="utf-8")


def _report_and_write(req, loaded, run, json_out: bool) -> None:
    """Rank 0 after evaluating: the numbers, the warnings, the files; errors last."""
    from ..engine.eval_run import refuse_left_out

    if len(run.left_out) == len(run.samples):
        first, why = next(iter(run.left_out.items()))
        raise CoresError(f"none of the {len(run.samples)} samples could be evaluated, no image could be read (the first: {first}: {why})")
    # the numbers are shown before any file is written, so a failed write loses nothing
    if json_out:
        stdout_line(json.dumps({"dataset": req.dataset, "protocol": run.protocol, "metrics": run.result.metrics, "warnings": run.warnings}))
    _print_table(run.result.metrics, run.protocol, loaded.source)
    if run.left_out:
        _print_left_out(run, req.strict)
    if run.summary is not None and run.summary.affected:
        err_console.print(f"  reader warnings: {run.summary.headline()}; listed above" + (" and in the results JSON" if req.output else ""), markup=False, highlight=False)
    written = _write_or_keep(req, loaded, run, json_out)
    if written:
        err_console.print("wrote " + _describe_written(written), markup=False, highlight=False)
    if req.strict:
        refuse_left_out(run)


def _read_and_check(req, checkpoint: Path | None, report: bool):
    """The samples and their warning summary, after the checks that need them: no output may
    be an input or lie in a folder of the dataset, and ``--strict`` refuses warned samples.
    ``report`` prints the warnings."""
    from ..engine.eval_run import WarningSummary, check_outputs, input_files, limit_samples, protected_folders, read_samples, refuse_warnings

    # inputs are listed from every sample read, before --limit cuts the list
    everything = read_samples(req)
    samples = limit_samples(req, everything)
    check_outputs(req, input_files(req, everything, checkpoint), protected_folders(req, everything))
    summary = WarningSummary.of(samples)
    if report:
        _print_warnings(summary, req.strict)
    if req.strict:
        refuse_warnings(summary)
    return samples, summary


def _write_or_keep(req, loaded, run, json_out: bool) -> list[Path]:
    """Write the outputs; if one fails, say where the computed metrics still are (printing the
    results JSON on stdout when no file and no --json holds them) and exit 1."""
    from ..engine.eval_run import OutputWriteError, results_document, write_outputs

    try:
        return write_outputs(req, loaded, run)
    except OutputWriteError as e:
        if req.output is not None and all(path != req.output for path, _ in e.failed):
            raise CoresError(f"{e}; the metrics were written to {req.output}") from None
        if not json_out:
            stdout_line(json.dumps(results_document(req, loaded, run, None), ensure_ascii=False))
        raise CoresError(f"{e}; the metrics were computed and are in the JSON printed on stdout") from None


def _print_warnings(summary, strict: bool) -> None:
    lines = summary.lines(strict)
    if lines:
        warn(lines[0])
        for line in lines[1:]:
            err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def _print_left_out(run, strict: bool) -> None:
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
