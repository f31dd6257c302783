"""Many images through one loaded model: input collection, output names, per-item errors, and
writes that a reader never sees half done.

Inputs: one image file; a folder (its images, sorted); a glob (``"photos/*.jpg"``); or JSONL on
stdin, one ``{"image": PATH, "query": TEXT, "id": OPTIONAL}`` per line. A bad item (missing or
corrupt image, empty query, malformed line, repeated id, a write that fails) becomes a failed
record; the run goes on.

Outputs per item, in ``out_dir``: ``NAME.mask.png`` (0/255, the image's size and orientation),
``NAME.overlay.png`` (or ``.overlay.jpg``; shrunk to ``--overlay-max-side``) and ``NAME.json``
(the record, which also holds the mask as COCO RLE). ``--no-overlay`` leaves out the overlay,
``--no-png`` every image file; the record's ``outputs`` then holds null for them. ``NAME`` is, for files, the image's path
relative to the folder given (or the fixed folder part of a glob) without its suffix, folders
joined by ``__`` (``a/photo.jpg`` → ``a__photo``); for stdin, the item's ``id`` if given, else the
image's stem. Names are the same on every run of the same inputs. When two items of a run would
share a name (also ignoring case, for case-insensitive file systems) the later one gets a short
hash of what identifies it (``photo-1a2b3c4d``); names above :data:`MAX_NAME_BYTES` are cut and
get the same kind of hash, so no item id is too long for a file name.

Each item's three files are first written completely under temporary names
(``.NAME.mask.png.cores-predict.XXXXXXXX.tmp``: :mod:`cores_cli.fileio`'s pattern with our tag),
then renamed into place with the record last: ``NAME.json`` exists only when its mask and overlay
are in place, so a pipeline that reads records never sees a partial item. An earlier run's record
of the same name is removed before the new files move in, so it never describes a newer mask.
Temporaries that a killed run left behind are removed by the next run in that folder; only ours,
told apart by the tag.

An existing file is replaced only when it is provably one that ``cores predict`` wrote: our PNGs
carry a text chunk ``cores-predict`` (``mask`` or ``overlay``), our JPEG overlays a comment
``cores-predict:overlay``, and our records are recognised by
their shape (``outputs`` naming this NAME's three files). Anything else at an output path (a
ReasonSeg annotation ``NAME.json``, a hand-drawn ``NAME.mask.png``) makes that item fail and stays
byte for byte. The same marks keep earlier outputs out of a folder's or glob's inputs, so that
``--out`` may be the input folder.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import CoresError
from ..fileio import TEMPORARY_PATTERN, OutputLocked, exclusive_directory_lock, probe_writable, staged_file
from ..images import DEFAULT_MAX_PIXELS, LoadedImage, load_image
from ..rle import encode as rle_encode
from ..visualize import DEFAULT_MAX_SIDE, bbox, overlay
from .image_pipeline import PreparedImage
from .predictor import Mode, Prediction, Predictor, reserved_token_in

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
OUTPUT_SUFFIXES = {"mask": ".mask.png", "overlay": ".overlay.png", "json": ".json"}
"""Each item's files by default, in the order they are moved into place: the record last."""

OVERLAY_SUFFIXES = {"png": ".overlay.png", "jpg": ".overlay.jpg"}
"""The overlay's name by ``--overlay-format``."""

_KNOWN_SUFFIXES = (("mask", ".mask.png"), ("overlay", ".overlay.png"), ("overlay", ".overlay.jpg"), ("json", ".json"))
"""Every file name an item can have, whatever the run's options: an earlier run's files of a
kind this run does not write are recognised (and, being ours, removed) by them."""

JPEG_QUALITY = 90


@dataclass(frozen=True)
class OutputOptions:
    """Which files an item gets, and what the record holds."""

    images: bool = True
    """False (``--no-png``): no image file at all, the record (with the mask as COCO RLE) only."""
    overlay: bool = True
    """False (``--no-overlay``): the mask and the record only."""
    overlay_format: str = "png"
    overlay_max_side: int | None = DEFAULT_MAX_SIDE
    levels: bool = False
    """``--levels``: every chain level's mask as COCO RLE in its entry of ``levels``."""

    def suffixes(self) -> dict[str, str]:
        """The files each item gets, by kind, in the order they move into place (record last)."""
        out = {}
        if self.images:
            out["mask"] = OUTPUT_SUFFIXES["mask"]
            if self.overlay:
                out["overlay"] = OVERLAY_SUFFIXES[self.overlay_format]
        out["json"] = OUTPUT_SUFFIXES["json"]
        return out

MAX_NAME_BYTES = 120
"""Longest NAME (UTF-8 bytes). With ``.overlay.png`` and a temporary's
``.….cores-predict.XXXXXXXX.tmp`` it stays well below the 255-byte file-name limit of common file
systems."""

TEMPORARY_TAG = "cores-predict"
"""In the name of each temporary we write (``.NAME.json.cores-predict.k3j_9x2a.tmp``): the next
run removes leftovers with this tag only, never another program's ``.X.json.XXXXXXXX.tmp`` (e.g.
a ``cores eval -o`` writing into the same folder)."""

MARKER_KEY = "cores-predict"
"""The PNG text chunk that marks a mask or overlay as ours; its value is the kind."""

MAX_RECORD_BYTES = 64 * 1024 * 1024
"""A larger ``NAME.json`` is not one of our records (they are a few kB); it is not read."""

_RECORD_KEYS = {"id", "image", "query", "outputs", "model"}
_HASH_CHARS = 8
_GLOB_MAGIC = "*?["
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_STALE_TEMPORARY = re.compile(
    TEMPORARY_PATTERN.format(name=r".+(?:\.mask\.png|\.overlay\.png|\.overlay\.jpg|\.json)\." + re.escape(TEMPORARY_TAG))
)


class OutputWriteError(CoresError):
    """One item's files could not be written (disk full, permission, name too long...)."""


@dataclass
class Job:
    image: str
    query: str | None
    id: str | None = None
    error: str | None = None
    """Set when the input line itself was unusable."""
    name_parts: tuple[str, ...] = ()
    """Where the output name comes from when there is no id: the image's path relative to the
    input's root, folders first, the file name last."""
    line: int | None = None
    """The stdin line number, for JSONL jobs."""


# --------------------------------------------------------------------------- inputs


def jobs_from_argument(image: str, query: str | None) -> list[Job]:
    """A file, a folder or a glob pattern, all with the same query.

    A folder's or glob's files that are outputs of an earlier ``cores predict`` (see
    :func:`is_our_output`) are left out: rerunning with ``--out`` the input folder must not
    predict on the earlier masks. A file named on its own is always taken.
    """
    p = Path(image)
    if p.is_dir():
        found = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        files = sorted(f for f in found if not is_our_output(f))
        if not files:
            ours = f"; the {len(found)} there are outputs of cores predict" if found else ""
            raise CoresError(f"no images in folder {p} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}){ours}")
        return [_file_job(f, p, query) for f in files]
    if not p.exists() and any(c in image for c in _GLOB_MAGIC):
        found = [f for f in expand_glob(image) if f.is_file()]
        files = sorted(f for f in found if not is_our_output(f))
        if not files:
            ours = f"; the {len(found)} matches are outputs of cores predict" if found else ""
            raise CoresError(f"no files match {image!r}{ours}")
        root = glob_root(image)
        return [_file_job(f, root, query) for f in files]
    if not p.exists():
        raise CoresError(f"image not found: {p}")  # before the model loads, not after
    return [_file_job(p, p.parent, query)]


def expand_glob(pattern: str) -> set[Path]:
    """The paths a glob matches, each once; ``**`` is any depth of real folders.

    ``glob.glob(recursive=True)`` follows links to folders under ``**`` with no cycle check: a
    link to ``.`` made it list one image 41 times, two such links never end. Here ``**`` never
    enters a linked folder (a link the pattern names or a single ``*`` matches is still entered:
    that depth is bounded), and, like glob, skips hidden folders.
    """
    parts: list[str] = []
    for part in Path(pattern).parts:
        if not (part == "**" and parts[-1:] == ["**"]):  # "**/**" is "**"
            parts.append(part)
    found = {Path(f) for f in _expand("", parts)}
    # a trailing separator asks for folders only, as in glob (Path drops it from the parts)
    return {f for f in found if f.is_dir()} if pattern.endswith(("/", os.sep)) else found


def _expand(base: str, parts: list[str]) -> Iterator[str]:
    """Matches of ``parts`` under the literal path ``base`` ("" for the current folder)."""
    if "**" not in parts:
        yield from glob.glob(os.path.join(glob.escape(base), *parts)) if parts else [base]
        return
    i = parts.index("**")
    head, rest = parts[:i], parts[i + 1 :]
    starts = glob.glob(os.path.join(glob.escape(base), *head)) if head else [base]
    for start in starts:
        for folder in _real_folders(start or os.curdir):
            if rest:
                yield from _expand(folder, rest)
            else:  # "a/**": every folder and every entry in them, as glob gives it
                yield folder
                yield from glob.glob(os.path.join(glob.escape(folder), "*"))


def _real_folders(top: str) -> Iterator[str]:
    """``top`` (if it is a folder) and every folder below it, not through links, not hidden."""
    if not os.path.isdir(top):
        return
    for folder, subfolders, _ in os.walk(top, followlinks=False):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        yield folder


def glob_root(pattern: str) -> Path:
    """The folder a glob starts from: its components before the first wildcard.

    Names are taken relative to it, not to the matches' common folder, so an item keeps its
    name when other files start or stop matching.
    """
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if any(c in part for c in _GLOB_MAGIC):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _file_job(file: Path, root: Path, query: str | None) -> Job:
    parts = Path(os.path.relpath(file, root)).parts
    return Job(str(file), query, name_parts=(*parts[:-1], Path(parts[-1]).stem))


def jobs_from_jsonl(lines: Iterable[str], default_query: str | None) -> Iterator[Job]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Job(f"<stdin line {n}>", None, error=f"stdin line {n}: not valid JSON ({exc.msg})", line=n)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            yield Job(f"<stdin line {n}>", None, error=f'stdin line {n}: expected {{"image": PATH, "query": TEXT}}', line=n)
            continue
        query = item.get("query", default_query)
        if query is not None and not isinstance(query, str):
            yield Job(item["image"], None, error=f"stdin line {n}: query must be a string", line=n)
            continue
        job_id = item.get("id")
        if job_id is not None and (isinstance(job_id, bool) or not isinstance(job_id, (str, int, float))):
            yield Job(item["image"], None, error=f"stdin line {n}: id must be a string or a number", line=n)
            continue
        if isinstance(job_id, (int, float)):
            job_id = json.dumps(job_id)  # as written: 7 → "7", 1.5 → "1.5"
        yield Job(item["image"], query, id=job_id, name_parts=(Path(item["image"]).stem,), line=n)


# --------------------------------------------------------------------------- output names


class OutputNamer:
    """Distinct output names within a run, the same on every run of the same inputs.

    ``inputs``: the run's image paths known up front; outputs that would land on one of them
    (or on an image of an earlier stdin line) are refused instead of overwriting it.
    """

    def __init__(self, out_dir: Path, inputs: Iterable[str] = (), reserved_tokens: Iterable[str] = (), suffixes: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.suffixes = dict(suffixes or OUTPUT_SUFFIXES)
        self.taken: set[str] = set()
        self.id_lines: dict[str, int | None] = {}
        self.inputs = {_file_key(p) for p in inputs}
        self.reserved_tokens = tuple(reserved_tokens)

    def paths_for(self, job: Job) -> dict[str, Path]:
        """The item's output files by kind. Raises CoresError for an unusable job (checked
        first, so that it takes no name), a repeated id, an output that would overwrite an input
        image, or one that would replace a file that cores predict did not write."""
        check_job(job, self.reserved_tokens)
        self.inputs.add(_file_key(job.image))
        stem = self.name_for(job)
        paths = {kind: self.out_dir / f"{stem}{suffix}" for kind, suffix in self.suffixes.items()}
        for path in paths.values():
            if _file_key(path) in self.inputs:
                raise CoresError(f"{job.image}: its output {path} would overwrite an input image; choose another --out")
        refuse_foreign_files(job.image, paths)
        return paths

    def name_for(self, job: Job) -> str:
        if job.id:
            if job.id in self.id_lines:
                where = f"line {self.id_lines[job.id]}" if self.id_lines[job.id] else "an earlier item"
                raise CoresError(f"stdin line {job.line}: id {job.id!r} was already used on {where}; give each item its own id")
            self.id_lines[job.id] = job.line
            return self._claim(_fit(safe_name(job.id)), job.id)
        base = "__".join(safe_name(p) for p in job.name_parts) if job.name_parts else safe_name(Path(job.image).stem)
        # what tells this item apart when its name is taken: its relative path, or its line
        key = "/".join(job.name_parts) + Path(job.image).suffix if job.line is None else f"stdin line {job.line}"
        return self._claim(_fit(base), key)

    def _claim(self, base: str, key: str) -> str:
        name, n = base, 1
        # casefold: on a case-insensitive file system Photo.json and photo.json are one file
        while name.casefold() in self.taken:
            n += 1
            # a hash of the key first; a counter only if even that name is taken
            name = f"{base}-{_digest(key)}" if n == 2 else f"{base}-{_digest(key)}-{n - 1}"
        self.taken.add(name.casefold())
        return name


def safe_name(name: str) -> str:
    """Letters, digits, ``-``, ``_`` and inner dots only; never hidden (no leading dot)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "item"


def _fit(name: str) -> str:
    data = name.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_NAME_BYTES:
        return name
    head = data[: MAX_NAME_BYTES - _HASH_CHARS - 1].decode("utf-8", "ignore")  # never half a character
    return f"{head}-{_digest(name)}"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]


def _file_key(path: str | Path) -> str:
    return os.path.normcase(os.path.realpath(path))


# --------------------------------------------------------------------------- what is ours


def is_our_output(path: Path, kind: str | None = None) -> bool:
    """Whether ``path`` is a file that cores predict wrote: a regular file (never a link, a
    folder or a FIFO) named like one of our outputs, which is a PNG or JPEG with our marker of
    its kind or a record whose ``outputs`` name this NAME's files. ``kind`` defaults to the
    name's."""
    name = Path(path).name
    suffix = next((sfx for k, sfx in _KNOWN_SUFFIXES if name.endswith(sfx) and kind in (None, k)), None)
    if suffix is None:
        return False
    kind = kind or next(k for k, sfx in _KNOWN_SUFFIXES if sfx == suffix)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return False
        if kind == "json":
            return info.st_size <= MAX_RECORD_BYTES and _is_our_record(Path(path))
        if suffix.endswith(".jpg"):
            return _jpeg_marker(Path(path)) == kind
        return _png_marker(Path(path)) == kind
    except OSError:
        return False


def refuse_foreign_files(image: str, paths: dict[str, Path]) -> None:
    """Raise CoresError when an output path holds anything but one of our own files."""
    for kind, path in paths.items():
        if os.path.lexists(path) and not is_our_output(path, kind):
            raise CoresError(f"{image}: would overwrite {path}, which cores predict did not write; move it away or choose another --out")


def _png_marker(path: Path) -> str | None:
    """The value of our text chunk, read from the chunks before the image data (where PIL puts
    text), without decoding any pixels; None for anything else."""
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG_SIGNATURE:
            return None
        while True:
            header = fh.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"tEXt" and length <= 1024:
                key, _, value = fh.read(length).partition(b"\0")
                if key == MARKER_KEY.encode("latin-1"):
                    return value.decode("latin-1")
                fh.seek(4, os.SEEK_CUR)  # the CRC
            else:
                fh.seek(length + 4, os.SEEK_CUR)


def _jpeg_marker(path: Path) -> str | None:
    """Our kind from a JPEG's comment segment (COM), read from the segments before the scan
    data without decoding any pixels; None for anything else."""
    expected = MARKER_KEY.encode("latin-1") + b":"
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None
        while True:
            header = fh.read(4)
            if len(header) < 4 or header[0] != 0xFF:
                return None
            kind, length = header[1], struct.unpack(">H", header[2:])[0]
            if kind == 0xDA or length < 2:  # start of scan: no comment before it
                return None
            if kind == 0xFE and length <= 1024:
                text = fh.read(length - 2)
                if text.startswith(expected):
                    return text[len(expected) :].decode("latin-1")
            else:
                fh.seek(length - 2, os.SEEK_CUR)


def _jpeg_comment(kind: str) -> bytes:
    return MARKER_KEY.encode("latin-1") + b":" + kind.encode("latin-1")


def _is_our_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(record, dict) or not _RECORD_KEYS <= record.keys() or not isinstance(record["outputs"], dict):
        return False
    stem = path.name[: -len(OUTPUT_SUFFIXES["json"])]
    outputs = record["outputs"]
    if not {"mask", "overlay", "json"} <= outputs.keys():
        return False

    def names_ours(kind: str) -> bool:
        value = outputs[kind]
        if value is None:  # not written (--no-png, --no-overlay); the record itself always is
            return kind != "json"
        # by name only: a folder moved since still holds our records
        return isinstance(value, str) and any(k == kind and Path(value).name == f"{stem}{sfx}" for k, sfx in _KNOWN_SUFFIXES)

    return all(names_ours(k) for k in ("mask", "overlay", "json"))


def _png_info(kind: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(MARKER_KEY, kind)
    return info


# --------------------------------------------------------------------------- the output folder


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it takes files, before any work is done. Raises CoresError."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CoresError(f"--out {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CoresError(f"cannot create the output folder {out_dir}: a file or broken link is in the way") from None
    except OSError as exc:
        raise CoresError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from None
    try:
        probe_writable(out_dir)
    except OSError as exc:
        raise CoresError(f"cannot write in the output folder {out_dir}: {exc.strerror or exc}") from None


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporaries of our outputs that a killed run left in ``out_dir``.

    Only regular files named exactly as this module names them while writing, with our tag
    (``.NAME.mask.png.cores-predict.XXXXXXXX.tmp``, ``.NAME.overlay.png.cores-predict.….tmp``,
    ``.NAME.json.cores-predict.….tmp``) are touched. Call it while holding the folder's lock, so
    that no live run's files are taken.
    """
    removed = []
    for entry in os.scandir(out_dir):
        if _STALE_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def output_dir_lock(out_dir: Path) -> Iterator[None]:
    """Keep a second ``cores predict`` out of ``out_dir`` while this one writes there.

    Two runs would give different items one name, and each would take the other's temporaries
    for leftovers. The lock is an ``flock`` on the folder itself, so it leaves no file in the
    user's folder and the kernel drops it when the process dies, however it dies.
    """
    try:
        with exclusive_directory_lock(out_dir):
            yield
    except OutputLocked:
        raise CoresError(f"{out_dir} is in use by another cores predict; wait for it to finish or choose another --out") from None


# --------------------------------------------------------------------------- signals


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised only where stopping leaves no partial item.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While active, SIGINT and SIGTERM raise :class:`Interrupted`, except inside
    :meth:`deferred` (an item's files moving into place), where they wait for it to end.

    Handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._deferring:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def check(self) -> None:
        """Raise for a signal that arrived during :meth:`deferred`."""
        if self.pending is not None:
            raise Interrupted(self.pending)


# --------------------------------------------------------------------------- one item


@dataclass
class StagedItem:
    """An item whose files are written in full under temporary names, not yet in place."""

    paths: dict[str, Path]
    temporaries: dict[str, Path]
    record: dict = field(default_factory=dict)
    superseded: list[Path] = field(default_factory=list)
    """Names of this item's kinds this run does not write (``NAME.mask.png`` under
    ``--no-png``, ``NAME.overlay.png`` under ``--overlay-format jpg``...): an earlier run's file
    there is removed at commit, if ours, so that the folder holds one run's files per item."""

    def commit(self) -> dict:
        """Move the files into place, the record last; on failure leave none of them."""
        placed: list[Path] = []
        try:
            # Checked again: a file may have appeared while the model ran.
            refuse_foreign_files(self.record.get("image", "?"), self.paths)
        except CoresError:
            self.discard()
            raise
        try:
            # An earlier run's record must not describe the new mask while the files move.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths["json"])
            for path in self.superseded:
                if is_our_output(path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            for kind in self.paths:  # in order: the record last
                os.replace(self.temporaries[kind], self.paths[kind])
                placed.append(self.paths[kind])
        except OSError as exc:
            for path in placed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.discard()
            raise OutputWriteError(_write_failure(self.record.get("image", "?"), exc)) from None
        return self.record

    def discard(self) -> None:
        for tmp in self.temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def prepare_job(
    predictor: Predictor,
    job: Job,
    paths: dict[str, Path],
    mode: Mode = "teacher",
    style: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model_info: dict | None = None,
    options: OutputOptions = OutputOptions(),
    prepared: PreparedImage | None = None,
) -> StagedItem:
    """Predict one job and write its files under temporary names; :meth:`StagedItem.commit`
    puts them in place. Raises CoresError (a failed write is :class:`OutputWriteError`).
    ``prepared``: the job's image already read and made ready for both towers (by a worker of
    :mod:`cores_cli.engine.image_pipeline`); the same prediction, without that work here."""
    check_job(job, predictor.reserved_tokens())
    t0 = time.perf_counter()
    stem = paths["json"].name[: -len(OUTPUT_SUFFIXES["json"])]
    if prepared is None:
        img = load_image(job.image, max_pixels)
        load_s, image_s, image = time.perf_counter() - t0, 0.0, img.pixels
    else:
        img, load_s, image_s, image = prepared.image, prepared.load_s, prepared.preprocess_s, prepared.inputs
    pred = predictor.predict(image, job.query, style=style, mode=mode, sample_id=stem)
    t2 = time.perf_counter()
    superseded = [p for _, sfx in _KNOWN_SUFFIXES if (p := paths["json"].with_name(stem + sfx)) not in paths.values()]
    staged = StagedItem(paths, {}, superseded=superseded)
    try:
        if "mask" in paths:
            mask_image = Image.fromarray(pred.mask.astype(np.uint8) * 255, mode="L")
            # Level 1 compresses a 28 MP mask ~5x faster than PNG's default 6, for ~20% more bytes.
            staged.temporaries["mask"] = _write_temporary(paths["mask"], lambda fh: mask_image.save(fh, format="PNG", compress_level=1, pnginfo=_png_info("mask")))
        if "overlay" in paths:
            overlay_image = Image.fromarray(overlay(img.pixels, pred.level_masks, pred.level_tokens, max_side=options.overlay_max_side))
            if options.overlay_format == "jpg":
                save = lambda fh: overlay_image.save(fh, format="JPEG", quality=JPEG_QUALITY, comment=_jpeg_comment("overlay"))  # noqa: E731
            else:
                save = lambda fh: overlay_image.save(fh, format="PNG", compress_level=1, pnginfo=_png_info("overlay"))  # noqa: E731
            staged.temporaries["overlay"] = _write_temporary(paths["overlay"], save)
        staged.record = _record(job, stem, img, pred, paths, model_info, options.levels)
        t3 = time.perf_counter()
        staged.record["timings_s"] = {
            # with a worker, reading and preparing the image ran there, beside the model
            "load_image": round(load_s, 4),
            "preprocess": round(image_s + pred.timings["preprocess_s"], 4),
            "model": round(pred.timings["model_s"], 4),
            "write": round(t3 - t2, 4),
            "total": round(t3 - t0, 4),
        }
        data = json_text(staged.record, indent=2).encode("utf-8") + b"\n"
        staged.temporaries["json"] = _write_temporary(paths["json"], lambda fh: fh.write(data))
    except OSError as exc:
        staged.discard()
        raise OutputWriteError(_write_failure(job.image, exc)) from None
    except BaseException:  # an interrupt or a bug: no temporaries left behind either way
        staged.discard()
        raise
    return staged


def check_job(job: Job, reserved_tokens: Iterable[str] = ()) -> None:
    """Raise CoresError for a job that cannot run whatever the image: a bad line, no query, a
    query holding one of the model's own tokens (``[SEG]``, ``<image>``, ``</s>``...), which
    would break the prompt the model is given."""
    if job.error:
        raise CoresError(job.error)
    if job.query is None or not job.query.strip():
        raise CoresError(f"{job.image}: the query is empty")
    token = reserved_token_in(job.query, reserved_tokens)
    if token is not None:
        where = f"stdin line {job.line} ({job.image}{f', id {job.id!r}' if job.id else ''})" if job.line else job.image
        raise CoresError(f"{where}: the query contains {token}, a token the model reserves for itself; rephrase it without {token}")


def _record(job: Job, stem: str, img, pred, paths: dict[str, Path], model_info: dict | None, levels_rle: bool = False) -> dict:
    # a kind this run does not write is there as null: the record never names a missing file
    outputs = {k: (str(paths[k].resolve()) if k in paths else None) for k in OUTPUT_SUFFIXES}
    return prediction_record(job.id or stem, str(job.image), job.query, img, pred, outputs, model_info, levels_rle)


def prediction_record(
    item_id: str, image: str, query: str, img: LoadedImage, pred: Prediction, outputs: dict[str, str | None], model_info: dict | None, levels_rle: bool = False
) -> dict:
    """The JSON record of one prediction, as ``cores predict --json`` prints it (``outputs``:
    the files written for it by kind, null for a kind not written). ``mask_rle`` is the final
    mask as COCO RLE (:mod:`cores_cli.rle`), so a pipeline needs no PNG; ``levels_rle`` adds
    each chain level's mask to its entry of ``levels`` the same way."""
    h, w = img.size
    area = int(pred.mask.sum())
    record = {
        "id": item_id,
        "image": image,
        "query": query,
        "question": pred.question,
        "answer": pred.answer,
        "mode": pred.mode,
        "fallback_to_template": pred.fallback,
        "image_size": {"width": w, "height": h},
        "converted_from": img.converted_from,
        "exif_rotated": img.exif_rotated,
        "mask_area": area,
        "mask_fraction": area / float(h * w),
        "bbox": bbox(pred.mask),
        "mask_rle": rle_encode(pred.mask),
        "levels": [
            {"token": tok, "mask_area": int(m.sum()), "bbox": bbox(m), **({"mask_rle": rle_encode(m)} if levels_rle else {})}
            for tok, m in zip(pred.level_tokens, pred.level_masks)
        ],
        "exemplars_used": pred.exemplars_used,
        "query_truncated": pred.query_truncated,
        "outputs": outputs,
        "model": model_info or {},
    }
    if pred.generated_text is not None:
        record["generated_text"] = pred.generated_text
    return record


def json_text(obj: object, indent: int | None = None) -> str:
    """JSON that survives any file name: a path with undecodable bytes (held as lone surrogates)
    is written as a ``\\udcXX`` escape instead of failing to encode."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_temporary(dest: Path, write: Callable) -> Path:
    """Write ``dest``'s content to a temporary beside it (fsynced); returns the temporary.
    An OSError names ``dest``, not the temporary."""
    try:
        with staged_file(dest, tag=TEMPORARY_TAG) as (fh, tmp):
            write(fh)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(dest)) from None
    return tmp


def _write_failure(image: str, exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"{image}: cannot write{where}: {exc.strerror or exc}"
