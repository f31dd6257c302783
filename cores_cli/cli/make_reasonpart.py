"""`cores make-reasonpart`: build the ReasonPart benchmark (paper appendix C)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..builders.chat_loop import format_counts
from ..builders.chat_settings import resolve_api_key
from ..builders.reasonpart import HoleMode, ImageMode, PartDataset, QuestionMode, ReasonPartOptions, ReasonPartSummary, prepare
from . import chat_run as chat
from .common import clean_errors


@clean_errors
def make_reasonpart(
    source: PartDataset = typer.Option(..., "--source", help="partimagenet or pascalpart: how to read --ann's category names and image paths."),
    ann: Path = typer.Option(..., "--ann", help="COCO-format part annotation file (PartImageNet val.json, PASCAL-Part val.json, ...)."),
    images: Path = typer.Option(..., "--images", help="Image folder of that annotation file (PartImageNet: {wnid}/ subfolders or flat)."),
    out: Path = typer.Option(..., "--out", help="Output folder: OUT/SPLIT/NAME.jpg + NAME.json (ReasonSeg format) and OUT/manifest.jsonl."),
    n: int = typer.Option(None, "--n", min=1, help="Images in the benchmark (default: every image with a part); a failed image is replaced by the next."),
    split: str = typer.Option(None, "--split", help="Folder inside OUT (default: the --source name, so one OUT holds both halves)."),
    questions: QuestionMode = typer.Option(QuestionMode.chat, "--questions", help="chat: ask the chat model; template: the shipped part→function table (no key, no network)."),
    parts_per_image: int = typer.Option(1, "--parts-per-image", min=1, help="Part classes asked about per image (one item each)."),
    min_area: float = typer.Option(0.005, "--min-area", min=0.0, max=0.999, help="Prefer parts covering at least this fraction of the image."),
    seed: int = typer.Option(0, "--seed", help="Image order, part choice and template phrasing."),
    image_mode: ImageMode = typer.Option(ImageMode.symlink, "--image-mode", help="symlink (absolute), hardlink or copy the images into OUT/SPLIT."),
    holes: HoleMode = typer.Option(HoleMode.ignore, "--holes", help="Holes inside a part: ignore (255, exact target) or fill (counted as part)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out images named in --ann but missing from --images."),
    model: str = chat.MODEL,
    base_url: str = chat.BASE_URL,
    temperature: float = chat.TEMPERATURE,
    concurrency: int = chat.CONCURRENCY,
    batch_size: int = typer.Option(4, "--batch-size", min=1, max=20, help="Items (image, part) asked for per request."),
    few_shot: int = typer.Option(4, "--few-shot", min=0, max=8, help="In-context example questions shown per request."),
    attempts: int = typer.Option(3, "--attempts", min=1, help="Times one item is asked for before it is given up."),
    timeout: float = chat.TIMEOUT,
    retries: int = chat.RETRIES,
    backoff: float = chat.BACKOFF,
    max_failures: int = chat.MAX_FAILURES,
    max_barren: int = chat.MAX_BARREN,
    max_consecutive: int = chat.MAX_CONSECUTIVE,
    json_mode: bool = chat.JSON_MODE,
    table: Path = typer.Option(None, "--table", help="Part→function table: template questions and the words that name each part (default: the shipped one)."),
    json_output: bool = chat.JSON_OUTPUT,
) -> None:
    """Write reasoning questions about object parts in ReasonSeg format (ReasonPart, paper appendix C).

    For each image, one part class (or --parts-per-image) is chosen, preferring parts that cover at least --min-area of the image; a chat model, shown in-context examples, writes a question that needs reasoning and does not name the part (a question that names it is rejected and asked again); the part's mask becomes ReasonSeg polygons. Resumable (run the same command again), concurrent, with a summary; one run at a time per OUT, and only files it wrote are ever replaced or removed; exits non-zero, saying why, when --n images could not be written. Evaluate with: cores eval --dataset reasonpart:OUT

    Example: cores make-reasonpart --source partimagenet --ann val.json --images val/ --out reasonpart/
    """
    settings = chat.chat_settings(model, base_url, temperature, concurrency, timeout, retries, backoff, max_failures, max_barren, json_mode, seed, max_consecutive)
    options = ReasonPartOptions(
        source=source, ann=ann, images=images, out=out, n=n, split=split, parts_per_image=parts_per_image,
        min_area=min_area, questions=questions, image_mode=image_mode, holes=holes, batch_size=batch_size,
        few_shot=few_shot, item_attempts=attempts, skip_missing=skip_missing, table=table, **settings,
    )
    api_key = resolve_api_key(base_url, command="make-reasonpart --questions chat") if questions is QuestionMode.chat else None
    # mistakes in options and files are reported before the bar; the build holds OUT's lock
    with prepare(options, api_key) as build:
        summary = chat.run_with_progress("making reasonpart (images)", build.summary.target, build.run)
    chat.finish(summary, _summary_table(summary), json_output)


def _summary_table(s: ReasonPartSummary):
    """The run in rows; request rows only when a chat model was asked."""
    iou = "" if s.min_conversion_iou is None else f"{s.min_conversion_iou:.4f}"
    repairs = s.stale_lines_removed + s.orphans_removed + s.relinked
    rows = chat.common_rows(s, "images already written")
    if s.mode != "chat":
        rows = [r for r in rows if r[0] not in ("failed requests", "retries")]
    rows += [
        ("items (image, part)", s.items, f"{s.items_existing} before, {s.items_written} new"),
        ("images passed over", sum(s.skipped.values()), format_counts(s.skipped)),
        ("items given up", s.dropped_items, f"{s.dropped_images} images replaced" if s.dropped_images else ""),
        ("repairs", repairs, f"{s.stale_lines_removed} stale manifest lines, {s.orphans_removed} unfinished items removed, "
         f"{s.relinked} image links pointed at --images" if repairs else ""),
        ("annotation warnings", sum(s.annotation_warnings.values()), format_counts(s.annotation_warnings)),
        *([("image links dangling", s.dangling, "written items whose source image is not under --images")] if s.dangling else []),
        ("min polygon IoU", iou, "written polygons vs source mask (this run)"),
    ]
    if s.mode == "chat":
        rows.append(("HTTP requests", s.requests, ""))
    return chat.summary_table(f"make-reasonpart summary ({s.split}, questions by {s.mode})", rows)
