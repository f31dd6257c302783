"""`cores make-reasonpart` never loses or silently corrupts anything (issue 11): it removes only
files it wrote itself (a journal records each item's files before they exist), refuses inputs and
output that overlap and a second writer on one --out, checks the annotation file up front
(duplicate ids, sizes, image paths outside --images) and counts what it leaves out, and matches
chat replies to the request they answer by ids unique in the run.

Everything runs in-process (CliRunner or the library): no test waits for a clock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cores_cli.builders.reasonpart import ReasonPartOptions, make_reasonpart, prepare
from cores_cli.cli.app import app
from cores_cli.data.parts import load_parts
from cores_cli.errors import CoresError

from fixtures_reasonpart import noise_jpeg, partimagenet_fixture
from openai_server import ChatRequest, OpenAIServer, json_reply

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
runner = CliRunner()
LOCK = ".make-reasonpart.lock"  # the lock file inside --out (spelled out: the tests also run on old code)


def cli(*args, key: str | None = None):
    return runner.invoke(app, ["make-reasonpart", *map(str, args)], env={"OPENAI_API_KEY": key, "OPENAI_BASE_URL": None})


def template(fixture, out, *more):
    return cli("--source", "partimagenet", "--ann", fixture.ann, "--images", fixture.images, "--out", out, "--questions", "template", *more)


def one_line_error(result) -> str:
    """The run was refused with a clean one-line error (no traceback); that line."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, byte for byte (symlinks by target)."""
    return {
        str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def edit_ann(fixture, change) -> None:
    data = json.loads(fixture.ann.read_text())
    change(data)
    fixture.ann.write_text(json.dumps(data))


@pytest.fixture
def pin(tmp_path):
    return partimagenet_fixture(tmp_path / "pin", n_images=6)


# ---- item 1: only files it wrote are ever removed --------------------------------------------------


def test_a_first_run_keeps_every_file_of_the_user_in_the_split_folder(tmp_path, pin):
    split = tmp_path / "rp" / "partimagenet"
    split.mkdir(parents=True)
    users = {
        "notes.txt": b"my notes\n",
        ".notes.tmp": b"a dotfile ending in .tmp",
        "zzz__fish_fin.json": b'{"text": ["mine"]}',  # named like an item, but no item of --ann
        "n01440764_9999__fish_fin.jpg": b"\xff\xd8 not ours",
    }
    for name, data in users.items():
        (split / name).write_bytes(data)

    result = template(pin, tmp_path / "rp", "--json")

    assert result.exit_code == 0, result.output
    assert {name: (split / name).read_bytes() for name in users} == users
    summary = json.loads(result.stdout)
    assert summary["orphans_removed"] == 0 and summary["stale_lines_removed"] == 0 and summary["total"] == 6


def test_moved_source_images_keep_the_written_items_and_their_links_follow(tmp_path, pin):
    out = tmp_path / "rp"
    assert template(pin, out, "--n", "4").exit_code == 0
    written = snapshot(out / "partimagenet")
    moved = pin.images.with_name("val_moved")
    pin.images.rename(moved)  # every image link of the output now dangles

    again = cli("--source", "partimagenet", "--ann", pin.ann, "--images", moved, "--out", out, "--questions", "template", "--n", "4", "--json")

    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["relinked"] == 4 and summary["stale_lines_removed"] == 0 and summary["total"] == 4
    after = snapshot(out / "partimagenet")
    assert {k: v for k, v in after.items() if k.endswith(".json")} == {k: v for k, v in written.items() if k.endswith(".json")}
    assert len(manifest(out)) == 4
    for link in (out / "partimagenet").glob("*.jpg"):
        assert link.resolve().parent.parent == moved.resolve()  # n0.../ under the new folder


def test_a_missing_source_image_never_costs_a_written_item(tmp_path, pin):
    out = tmp_path / "rp"
    assert template(pin, out, "--n", "6").exit_code == 0
    first = manifest(out)[0]
    src = Path(first["src"])
    hidden = src.with_name("hidden")
    src.rename(hidden)  # e.g. a network share that is briefly away

    again = template(pin, out, "--n", "5", "--skip-missing", "--json")
    assert again.exit_code == 0, again.output
    assert (out / "partimagenet" / f"{first['name']}.json").is_file()
    assert json.loads(again.stdout)["dangling"] == 1 and len(manifest(out)) == 6
    hidden.rename(src)
    assert template(pin, out, "--n", "6").exit_code == 0  # and nothing blocks a later run


class Killed(BaseException):
    """Stands for a SIGKILL between the two writes of an item (no clean-up code may catch it)."""


def killed_before_the_third_manifest_line(monkeypatch, opts: dict) -> str:
    """Run until the third item's image and JSON are written but not its manifest line, as a kill
    between the two would leave it; the name of that unlisted item."""
    import cores_cli.builders.reasonpart as rb

    real_append = rb.append_line
    manifest_lines = []

    def append_then_die(path, line):
        if Path(path).name == "manifest.jsonl":
            if len(manifest_lines) == 2:
                raise Killed
            manifest_lines.append(line)
        real_append(path, line)

    with monkeypatch.context() as m:
        m.setattr(rb, "append_line", append_then_die)
        with pytest.raises(Killed):
            make_reasonpart(ReasonPartOptions(**opts))
    listed = {r["name"] for r in manifest(opts["out"])}
    (unlisted,) = [p.stem for p in (opts["out"] / "partimagenet").glob("*.json") if p.stem not in listed]
    return unlisted


def test_resume_removes_only_the_files_of_the_item_a_killed_run_began(tmp_path, pin, monkeypatch):
    out, split = tmp_path / "rp", tmp_path / "rp" / "partimagenet"
    opts = dict(source="partimagenet", ann=pin.ann, images=pin.images, out=out, questions="template", image_mode="copy", n=4)
    unlisted = killed_before_the_third_manifest_line(monkeypatch, opts)
    (split / f".{unlisted}.json.k1ll3d_x.tmp").write_bytes(b"{")  # a temporary a kill mid-write leaves
    users = {"notes.txt": b"mine", ".notes.tmp": b"mine too", "orphan__fish_fin.json": b"{}"}
    for name, data in users.items():
        (split / name).write_bytes(data)

    summary = make_reasonpart(ReasonPartOptions(**opts))

    assert summary.complete and summary.orphans_removed == 1 and summary.existing == 2
    assert {name: (split / name).read_bytes() for name in users} == users
    assert not list(split.glob(".*.json.*.tmp"))
    names = sorted(r["name"] for r in manifest(out))
    assert len(names) == 4 and sorted(p.stem for p in split.glob("*.json")) == sorted(names + ["orphan__fish_fin"])
    assert sorted(p.name for p in split.glob("*.jpg")) == sorted(f"{n}.jpg" for n in names)


def test_a_begun_item_s_file_the_user_replaced_is_not_removed(tmp_path, pin, monkeypatch):
    out, split = tmp_path / "rp", tmp_path / "rp" / "partimagenet"
    opts = dict(source="partimagenet", ann=pin.ann, images=pin.images, out=out, questions="template", n=4)
    unlisted = killed_before_the_third_manifest_line(monkeypatch, opts)
    theirs = {split / f"{unlisted}.json": b'{"text": ["edited by hand"]}', split / f"{unlisted}.jpg": b"their own picture"}
    for path, data in theirs.items():
        path.unlink()
        path.write_bytes(data)

    with pytest.raises(CoresError, match="did not write"):  # it is where an item goes: refused, not replaced
        make_reasonpart(ReasonPartOptions(**opts))
    assert {path: path.read_bytes() for path in theirs} == theirs


def test_a_file_of_the_user_where_an_item_would_go_is_an_error_and_survives(tmp_path, pin):
    split = tmp_path / "rp" / "partimagenet"
    split.mkdir(parents=True)
    theirs = split / "n01440764_1000__fish_head.json"  # image n01440764_1000, class "Fish Head"
    theirs.write_bytes(b'{"text": ["my own question"]}')

    line = one_line_error(template(pin, tmp_path / "rp"))

    assert "did not write" in line and theirs.name in line
    assert theirs.read_bytes() == b'{"text": ["my own question"]}'
    assert sorted(p.name for p in split.iterdir()) == [theirs.name]
    assert not (tmp_path / "rp" / "manifest.jsonl").exists()


def _flat_images(fixture, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for p in fixture.images.rglob("*.JPEG"):
        shutil.copyfile(p, folder / p.name)


@pytest.mark.parametrize(
    "case", ["images in OUT/split", "images linked to OUT/split", "OUT/split linked to the inputs", "OUT inside images", "ann in OUT/split", "OUT is a file"]
)
def test_overlapping_inputs_and_output_are_refused_and_nothing_is_touched(tmp_path, pin, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    images, ann, out = pin.images, pin.ann, tmp_path / "rp"
    if case == "images in OUT/split":  # flat PartImageNet images right where the items would go
        images = out / "partimagenet"
        _flat_images(pin, images)
    elif case == "images linked to OUT/split":
        _flat_images(pin, out / "partimagenet")
        images = tmp_path / "link"
        images.symlink_to(out / "partimagenet")
    elif case == "OUT/split linked to the inputs":  # the split folder itself is a link to the user's data
        out.mkdir()
        (out / "partimagenet").symlink_to(pin.ann.parent, target_is_directory=True)
    elif case == "OUT inside images":
        out = pin.images / "rp"
    elif case == "ann in OUT/split":  # `--out .` run from the folder that holds partimagenet/val.json
        ann = Path("partimagenet") / "val.json"
        ann.parent.mkdir()
        shutil.copyfile(pin.ann, ann)
        out = Path(".")
    elif case == "OUT is a file":
        out.write_bytes(b"not a folder")
    before = snapshot(tmp_path)

    result = cli("--source", "partimagenet", "--ann", ann, "--images", images, "--out", out, "--questions", "template")

    line = one_line_error(result)
    assert ("--images" in line or "--ann" in line or "--out" in line), line
    assert snapshot(tmp_path) == before


def test_out_may_be_the_folder_that_holds_the_annotation_file_and_the_images(tmp_path, pin, monkeypatch):
    monkeypatch.chdir(pin.ann.parent)  # pin/val.json and pin/val/{wnid}/...
    before = snapshot(pin.ann.parent)

    result = cli("--source", "partimagenet", "--ann", "val.json", "--images", "val", "--out", ".", "--questions", "template", "--n", "2")

    assert result.exit_code == 0, result.output
    after = snapshot(pin.ann.parent)
    assert {k: after[k] for k in before} == before
    assert len(manifest(pin.ann.parent)) == 2


# ---- item 8: one writer per --out --------------------------------------------------------------------


@contextlib.contextmanager
def another_run_holds(lock: Path):
    """What a running make-reasonpart holds (cores_cli.fileio.exclusive_lock): an flock on the lock
    file with the holder's pid in it. An flock belongs to an open file, so a holder in this process
    locks out a run in this process too; taken by hand so that the test also runs on code without."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def test_a_second_writer_on_one_out_is_refused_naming_the_holder(tmp_path, pin):
    out = tmp_path / "rp"
    out.mkdir()
    with another_run_holds(out / LOCK):
        line = one_line_error(template(pin, out))
        assert "another make-reasonpart run" in line and f"process {os.getpid()}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing was written or repaired
    assert template(pin, out, "--n", "2").exit_code == 0  # once it is released, a run goes ahead


def test_a_build_holds_the_lock_from_prepare_to_close(tmp_path, pin):
    opts = ReasonPartOptions(source="partimagenet", ann=pin.ann, images=pin.images, out=tmp_path / "rp", questions="template", n=2)
    with prepare(opts) as build:
        with pytest.raises(CoresError, match="being written by another make-reasonpart run"):
            prepare(opts)
        assert build.run().complete
    with prepare(opts) as again:
        assert again.summary.existing == 2


# ---- items 4 and 12: the annotation file is checked up front -----------------------------------------


def test_duplicate_image_ids_are_an_error_not_masks_drawn_on_another_image(tmp_path, pin):
    edit_ann(pin, lambda d: d["images"][3].update(id=d["images"][1]["id"]))
    line = one_line_error(template(pin, tmp_path / "rp"))
    assert str(pin.ann) in line and "images[1] and images[3] have the same id 2" in line
    assert not (tmp_path / "rp").exists()


def test_duplicate_category_ids_are_an_error(tmp_path, pin):
    edit_ann(pin, lambda d: d["categories"][2].update(id=d["categories"][0]["id"]))
    line = one_line_error(template(pin, tmp_path / "rp"))
    assert "categories[0] and categories[2] have the same id 0" in line


@pytest.mark.parametrize("name", ["absolute", "../x.JPEG", "sub/../../x.JPEG"])
def test_a_file_name_outside_images_is_an_error(tmp_path, pin, name):
    outside = tmp_path / "elsewhere" / "secret.JPEG"
    noise_jpeg(outside, 60, 80, seed=9)
    file_name = str(outside) if name == "absolute" else name
    edit_ann(pin, lambda d: d["images"][0].update(file_name=file_name))
    line = one_line_error(template(pin, tmp_path / "rp"))
    assert "images[0] (id 1) key 'file_name'" in line and ("absolute" in line or "'..'" in line)
    assert not (tmp_path / "rp").exists()


@pytest.mark.parametrize("value", ["tall", 0, -60, 60.5, None])
def test_a_size_that_is_not_a_positive_whole_number_is_one_line_naming_file_key_and_image(tmp_path, pin, value):
    edit_ann(pin, lambda d: d["images"][2].update(height=value))
    line = one_line_error(template(pin, tmp_path / "rp"))
    assert str(pin.ann) in line and "images[2] (id 3) key 'height'" in line and repr(value) in line


def test_an_impossible_size_or_a_nul_in_a_file_name_is_one_line(tmp_path, pin):
    edit_ann(pin, lambda d: d["images"][2].update(height=10**12))  # would allocate terabytes of mask
    line = one_line_error(template(pin, tmp_path / "rp"))
    assert "images[2] (id 3) says 80×1000000000000 pixels" in line
    edit_ann(pin, lambda d: d["images"][2].update(height=60, file_name="a\0b.JPEG"))
    line = one_line_error(template(pin, tmp_path / "rp"))
    assert "images[2] (id 3) key 'file_name'" in line and "NUL" in line


def test_warnings_about_written_images_are_counted_in_the_summary(tmp_path, pin):
    edit_ann(pin, lambda d: [im.update(height=120, width=160) for im in d["images"]])  # files are 80×60
    result = template(pin, tmp_path / "rp", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["annotation_warnings"] == {"written images with a size_mismatch warning (see the manifest)": 6}


def test_the_training_readers_share_the_checks(tmp_path, pin):
    base = tmp_path / "vlpart" / "partimagenet"
    base.mkdir(parents=True)
    shutil.copytree(pin.images, base / "val")
    data = json.loads(pin.ann.read_text())
    data["images"][2]["height"] = "tall"
    (base / "val.json").write_text(json.dumps(data))
    with pytest.raises(CoresError, match=r"images\[2\] \(id 3\) key 'height' is 'tall'"):
        load_parts("partimagenet", tmp_path, "val")
    data["images"][2]["height"] = 60.0  # a whole number written as a float is fine
    (base / "val.json").write_text(json.dumps(data))
    assert len(load_parts("partimagenet", tmp_path, "val")) == 6


def test_annotations_with_dangling_references_are_left_out_and_counted_in_the_summary(tmp_path, pin):
    def add(d):
        d["annotations"].append({**d["annotations"][0], "id": 900, "image_id": 999})
        d["annotations"].append({**d["annotations"][0], "id": 901, "category_id": 77})
        d["annotations"].append({**d["annotations"][1], "id": d["annotations"][0]["id"]})  # an id given twice

    edit_ann(pin, add)
    result = template(pin, tmp_path / "rp", "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["annotation_warnings"]
    assert warnings == {
        "annotation ids given twice (kept)": 1,
        "annotations naming an unknown category id (left out)": 1,
        "annotations naming an unknown image id (left out)": 1,
    }
    assert "annotation warnings" in result.stderr


# ---- item 5: a reply counts only for the request it answers ----------------------------------------


def test_a_replayed_reply_from_another_request_is_rejected_and_asked_again(tmp_path, pin):
    first: dict = {}

    def handler(request: ChatRequest):
        items = json.loads(request.last_user_content)["items"]
        reply = {"questions": [
            {"id": it["id"], "question": f"In the test scene, which feature of the {it['object']} would a visitor point at first?"}
            for it in items
        ]}
        if not first:
            first.update(reply=reply, object=items[0]["object"])
        elif "replayed" not in first and items[0]["object"] != first["object"]:
            first["replayed"] = items[0]["object"]
            return json_reply(first["reply"])  # the first request's reply (about a fish, say), sent for a car
        return json_reply(reply)

    with OpenAIServer(handler) as server:
        opts = ReasonPartOptions(source="partimagenet", ann=pin.ann, images=pin.images, out=tmp_path / "rp", n=4, base_url=server.url,
                                 model="test-model", batch_size=1, concurrency=1, backoff=0.001)
        summary = make_reasonpart(opts, "k")

    assert first.get("replayed")
    records = manifest(tmp_path / "rp")
    assert len(records) == 4
    for r in records:  # every question is about its own item's object
        assert f"feature of the {r['object']} " in r["question"], r
    assert summary.complete and summary.rejected["not requested"] == 1


def test_a_manifest_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    from cores_cli.builders.reasonpart import read_journal, read_manifest

    for read, name in ((read_manifest, "manifest.jsonl"), (read_journal, ".make-reasonpart.journal")):
        bad = tmp_path / name
        bad.write_bytes(b'{"name": "caf\xe9"}\n')
        with pytest.raises(CoresError, match=f"{name}: not UTF-8 text"):
            read(bad)
        assert bad.read_bytes() == b'{"name": "caf\xe9"}\n'
