"""`cores predict`: segment what a question refers to, for one image or thousands.

The output folder is checked (and locked against a second run) before the model loads. Each
item's record appears only after its mask and overlay are in place; SIGINT and SIGTERM discard
the item in progress and exit 130 / 143; see :mod:`cores_cli.engine.batch_predict` for names and
the write protocol.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..bundled import EXAMPLE_QUERY, example_image
from ..errors import CoresError
from ..images import DEFAULT_MAX_PIXELS
from .common import clean_errors, err_console, fail, stdout_line, use_threads, warn


class ModeChoice(str, Enum):
    teacher = "teacher"
    generate = "generate"


class OverlayFormat(str, Enum):
    png = "png"
    jpg = "jpg"


class StyleChoice(str, Enum):
    auto = "auto"
    sentence = "sentence"
    phrase = "phrase"


@clean_errors
def predict(
    image: str = typer.Argument(None, help="An image, a folder of images, a quoted glob like 'photos/*.jpg', or - to read JSONL lines {\"image\": ..., \"query\": ..., \"id\": ...} from stdin."),
    query: str = typer.Argument(None, help="The question or description, e.g. \"what gives dogs their sense of smell?\". With stdin JSONL it is the default for lines without a query."),
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="A cores checkpoint directory (see `cores train`), or a cores train run directory (its checkpoints/best, else the latest step), or a Hugging Face Hub id (org/name or org/name@revision) holding one (LISA and original LLaVA weights: convert them once with `cores import`); default: the tiny model shipped with cores, trained on the synthetic benchmark."),
    preset: str = typer.Option(None, "--preset", help="Build a preset with RANDOM weights instead (tiny, llava-1.5-7b, llava-1.5-13b): for smoke runs only."),
    set_: list[str] = typer.Option([], "--set", help="Override a model setting, e.g. --set prompt.in_context_k=0 (repeatable)."),
    out: Path = typer.Option(Path("cores_out"), "--out", "-o", help="Folder for NAME.mask.png, NAME.overlay.png (or .jpg) and NAME.json. NAME: the image's path under the folder or glob given, without suffix, folders joined by __ (a/photo.jpg -> a__photo); for stdin the id, else the stem. A name two items would share gets a short hash (photo-1a2b3c4d) on the later one. Only files cores predict wrote are replaced; any other file at an output name makes that item fail."),
    json_out: bool = typer.Option(False, "--json", help="Print each record as one JSON line on stdout (failed items as {\"image\", \"error\"})."),
    mode: ModeChoice = typer.Option(ModeChoice.teacher, "--mode", help="teacher: the fixed answer template, one pass (LISA's protocol). generate: the model writes its answer; falls back to the template when it emits no chain."),
    style: StyleChoice = typer.Option(StyleChoice.auto, "--query-style", help="phrase: wrapped as 'What is X in this image?'; sentence: used as written; auto: by its form."),
    context_library: Path = typer.Option(None, "--context-library", help="In-context exemplar library (JSONL); default: the model's, else the shipped one."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch. Default: this process's share of the CPUs that are idle now (OMP_NUM_THREADS, when set, is kept)."),
    workers: int = typer.Option(None, "--workers", min=0, help="Processes that read and prepare images ahead of the model, beside it. 0: in this process, one at a time. Default: on a GPU every idle CPU but one (at most 8); on the CPU one per 4 idle CPUs (at most 2), since the model needs them more."),
    quantize: str = typer.Option(None, "--quantize", help="8bit or 4bit: load the LLaVA through bitsandbytes, as LISA's --load_in_8bit/--load_in_4bit (CUDA; pip install 'cores\\[quantize]')."),
    device_map: str = typer.Option(None, "--device-map", help="auto: spread the LLaVA over the visible GPUs (a 13B model on two smaller GPUs)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse images larger than this many pixels (checked before decoding)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the in-context exemplar draw (and a preset's random weights)."),
    example: bool = typer.Option(False, "--example", help="Run on the bundled example image and its query."),
    levels: bool = typer.Option(False, "--levels", help="Put every chain level's mask (as COCO RLE) in its entry of the record's levels; the final mask is always in mask_rle."),
    no_png: bool = typer.Option(False, "--no-png", help="Write no image files (neither mask nor overlay), only NAME.json: the mask is in its mask_rle (COCO RLE); outputs.mask and outputs.overlay are null."),
    no_overlay: bool = typer.Option(False, "--no-overlay", help="Write the mask and the record, no overlay (outputs.overlay is null)."),
    overlay_format: OverlayFormat = typer.Option(None, "--overlay-format", help="png (default) or jpg (NAME.overlay.jpg, about 8 times smaller)."),
    # the default is visualize.DEFAULT_MAX_SIDE, not imported here: cores --help loads no OpenCV
    overlay_max_side: int = typer.Option(None, "--overlay-max-side", min=16, help="Shrink overlays to at most this many pixels on the long side (default 1280, which keeps a 28 MP photo's PNG overlay under ~2 MB); the mask keeps the image's size. Images up to 256 px are enlarged for display."),
) -> None:
    """Segment what QUERY refers to in IMAGE; write the mask, an overlay and a JSON record.

    \b
    Examples:
      cores predict dog.jpg "what gives dogs their sense of smell?" -c runs/cores-7b
      cores predict photos/ "the food with the most vitamin C" -c runs/cores-7b --json > out.jsonl
      cat jobs.jsonl | cores predict - -c runs/cores-7b --json

    An item's NAME.json is written last, once its mask and overlay are in place: a folder never
    holds a record without its files. An existing file is replaced only if cores predict wrote
    it (an annotation NAME.json beside the image stays as it is), and a folder's earlier outputs
    are never taken as inputs, so --out may be the input folder.

    Exit status: 0 when every item succeeded, 1 when any failed (the others are still written),
    2 for a usage mistake, 130 / 143 when stopped by SIGINT / SIGTERM (the item in progress is
    discarded; the finished ones stay).
    """
    from ..engine.batch_predict import Interrupted, OutputOptions, jobs_from_argument, jobs_from_jsonl, prepare_output_dir
    from ..engine.predict_run import PredictOutcome, PredictRequest, run_predict

    if example:
        if image is not None:
            raise fail("--example runs the bundled image; do not give IMAGE as well", code=2)
        image, query = str(example_image()), query or EXAMPLE_QUERY
    if overlay_format is not None and (no_png or no_overlay):
        raise fail(f"--overlay-format has no overlay to apply to with {'--no-png' if no_png else '--no-overlay'}", code=2)
    if image is None:
        raise fail("give an IMAGE (file, folder, glob or - for JSONL on stdin) and a QUERY; see cores predict --help", code=2)
    if image == "-":
        jobs = jobs_from_jsonl(sys.stdin, query)
        total = None
    else:
        if query is None:
            raise fail("missing QUERY: what should be segmented?", code=2)
        if not query.strip():
            raise CoresError("the query is empty")
        jobs = jobs_from_argument(image, query)
        total = len(jobs)
    prepare_output_dir(out)  # a bad --out fails now, not after the model has loaded

    from ..visualize import DEFAULT_MAX_SIDE

    fmt = (overlay_format or OverlayFormat.png).value
    options = OutputOptions(not no_png, not no_overlay, fmt, overlay_max_side or DEFAULT_MAX_SIDE, levels)
    request = PredictRequest(out, checkpoint, preset, list(set_), device, dtype, context_library, seed, mode.value, style.value, max_pixels, options, quantize, device_map, workers)
    outcome = PredictOutcome()
    try:
        use_threads(threads)
        run_predict(request, jobs, total, _View(json_out), outcome)
    except Interrupted as exc:
        n = len(outcome.done)
        written = f"{n} item{'s' if n != 1 else ''} written to {out}" if n else "nothing written"
        raise fail(f"stopped by {exc.signal_name}: {written}; no item was left half written", code=exc.exit_code) from None

    if not json_out:
        for r in outcome.done:
            files = "  ".join(f"{kind if kind != 'json' else 'record'} {path}" for kind, path in r["outputs"].items() if path is not None)
            stdout_line(f"{r['image']}: {files}  (area {r['mask_fraction']:.1%})")
    if outcome.total == 0:
        raise fail("no input items (stdin was empty)")
    if outcome.failed:
        # one item: its own error line already says everything
        n = outcome.total
        raise fail(f"{len(outcome.failed)} of {n} items failed; {len(outcome.done)} written to {out}") if n > 1 else typer.Exit(1)


class _View:
    """What a run shows: a progress bar for several items, errors and warnings on stderr, and
    with --json each record (or failure) as one line on stdout as soon as it is final."""

    def __init__(self, json_out: bool) -> None:
        self.json_out = json_out
        self.bar: Progress | None = None
        self.task = None

    def warning(self, message: str) -> None:
        warn(message)

    def started(self, total: int | None) -> None:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar = Progress(*columns, console=err_console, disable=not (total is None or total > 1), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("predicting", total=total)

    def item_done(self, record: dict) -> None:
        from ..engine.batch_predict import json_text

        if self.json_out:
            stdout_line(json_text(record))
        self.bar.advance(self.task)

    def item_failed(self, job, error: CoresError) -> None:
        from ..engine.batch_predict import json_text

        fail(str(error))
        if self.json_out:
            stdout_line(json_text({"image": job.image, "id": job.id, "error": str(error)}))
        self.bar.advance(self.task)

    def finished(self) -> None:
        if self.bar is not None:
            self.bar.stop()
