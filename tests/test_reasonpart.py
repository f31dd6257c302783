"""`cores make-reasonpart` and `reasonpart:DIR`: ReasonPart (paper appendix C) built from small
PartImageNet-like (polygons) and PASCAL-Part-like (RLE, holes) COCO fixtures, with the template
table and against the local OpenAI-compatible server; resume after a real SIGKILL; the written
JSONs read back by the ReasonSeg reader give the source part masks."""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from cores_cli.builders.reasonpart import PROMPT_EXAMPLES, PROMPT_VERSION, QuestionRejected, ReasonPartOptions, choose_parts, load_part_table, make_reasonpart, validate_question
from cores_cli.cli.app import app
from cores_cli.contexts import load_vocabulary
from cores_cli.data.masks import rasterize_shapes
from cores_cli.data.parts import partimagenet_name, pascal_part_name
from cores_cli.data.reasonseg import read_split_dir
from cores_cli.data.reasonseg_writer import mask_to_shapes
from cores_cli.data.registry import load_samples, parse_name, protocol

from fixtures_reasonpart import partimagenet_fixture, pascalpart_fixture, ring
from proc_helpers import kill_after_lines
from openai_server import ChatRequest, OpenAIServer, chat_reply, error_reply, json_reply

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
runner = CliRunner()


def cli(*args, key: str | None = None):
    return runner.invoke(app, ["make-reasonpart", *map(str, args)], env={"OPENAI_API_KEY": key, "OPENAI_BASE_URL": None})


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def pin(tmp_path):
    return partimagenet_fixture(tmp_path / "pin", n_images=6)


@pytest.fixture
def pp(tmp_path):
    return pascalpart_fixture(tmp_path / "pp", n_images=6)


def source_mask(ann_file: Path, image_id, annotation_ids: list) -> np.ndarray:
    """The part's mask decoded straight from the annotation file with pycocotools."""
    data = json.loads(ann_file.read_text())
    img = next(i for i in data["images"] if i["id"] == image_id)
    h, w = img["height"], img["width"]
    out = np.zeros((h, w), np.uint8)
    for a in data["annotations"]:
        if a["id"] not in annotation_ids:
            continue
        seg = a["segmentation"]
        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg["counts"], list):
            rles = [mask_utils.frPyObjects(seg, h, w)]
        else:
            rles = [{"size": seg["size"], "counts": seg["counts"].encode()}]
        for r in rles:
            out |= mask_utils.decode(r).astype(np.uint8)
    return out


# ---- template mode: the whole benchmark offline ---------------------------------------------------


def test_template_mode_builds_both_halves_and_the_reasonseg_reader_gives_the_source_masks(tmp_path, pin, pp):
    out = tmp_path / "rp"
    a = cli("--source", "partimagenet", "--ann", pin.ann, "--images", pin.images, "--out", out, "--questions", "template", "--json")
    assert a.exit_code == 0, a.output
    b = cli("--source", "pascalpart", "--ann", pp.ann, "--images", pp.images, "--out", out, "--questions", "template", "--parts-per-image", "2")
    assert b.exit_code == 0, b.output
    summary = json.loads(a.stdout)
    assert summary["complete"] and summary["total"] == 6 and summary["requests"] == 0 and summary["min_conversion_iou"] == 1.0
    assert "make-reasonpart summary" in a.stderr and "6/6" in a.stderr

    records = manifest(out)
    assert len(records) == 6 + 12
    assert len({(r["split"], r["image_id"]) for r in records}) == 12  # 6 images per half
    assert len({(r["split"], r["name"]) for r in records}) == 18
    for r in records:
        assert r["mode"] == "template" and r["model"] is None and r["template_version"] == 1 and r["prompt_version"] is None
        assert r["question"].endswith("?") and r["conversion_iou"] == 1.0
        assert (out / r["split"] / r["image"]).is_symlink()
    # the PASCAL-Part wheels are rings: their holes are written as "ignore" polygons
    wheels = [r for r in records if r["part_class"] == "bicycle:wheel"]
    assert wheels and all(r["ignore_polygons"] == 2 and r["target_polygons"] == 3 for r in wheels)

    # every JSON, read back by the ReasonSeg reader, gives the part's source mask
    for split, fixture in (("partimagenet", pin), ("pascalpart", pp)):
        samples = read_split_dir(out / split, dataset="reasonpart")
        by_name = {r["name"]: r for r in records if r["split"] == split}
        assert len(samples) == len(by_name)
        for s in samples:
            r = by_name[Path(s.meta["json"]).stem]
            assert s.rounds[0].query == r["question"] and s.rounds[0].style == "sentence"
            src = source_mask(fixture.ann, r["image_id"], r["annotation_ids"])
            drawn = s.rounds[0].target.rasterize(*src.shape)
            iou = ((drawn == 1) & (src == 1)).sum() / ((drawn == 1) | (src == 1)).sum()
            assert iou >= 0.98, (r["name"], iou)
            assert not ((drawn == 255) & (src == 1)).any()  # ignore pixels are never part pixels
            if r["part_class"] == "bicycle:wheel":
                assert (drawn == 255).sum() > 0  # the holes


def test_written_files_have_lisa_s_format(tmp_path, pp):
    out = tmp_path / "rp"
    assert cli("--source", "pascalpart", "--ann", pp.ann, "--images", pp.images, "--out", out, "--questions", "template", "--n", "2").exit_code == 0
    (r, *_rest) = manifest(out)
    raw = (out / "pascalpart" / f"{r['name']}.json").read_text()
    assert not raw.endswith("\n") and raw.isascii() and raw.startswith('{\n  "text": [')
    doc = json.loads(raw)
    assert list(doc)[:3] == ["text", "is_sentence", "shapes"] and doc["is_sentence"] is True and len(doc["text"]) == 1
    for shape in doc["shapes"]:
        assert list(shape) == ["label", "labels", "shape_type", "image_name", "points", "group_id", "group_ids", "flags"]
        assert shape["labels"] == [shape["label"]] and shape["image_name"] == r["image"] and shape["group_ids"] == [None]
        assert len(shape["points"]) >= 3 and all(isinstance(v, float) for p in shape["points"] for v in p)
    assert doc["cores_reasonpart"]["part_class"] == r["part_class"]
    assert set(r) >= {"name", "source", "annotation_file", "image_id", "annotation_ids", "category_id", "part_class", "question", "mode", "model", "seed"}


def test_template_output_is_deterministic_by_seed(tmp_path, pin):
    def build(name: str, seed: int) -> Path:
        out = tmp_path / name
        assert cli("--source", "partimagenet", "--ann", pin.ann, "--images", pin.images, "--out", out,
                   "--questions", "template", "--n", "4", "--seed", seed, "--image-mode", "copy").exit_code == 0
        return out

    def snapshot(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    a, b, c = build("a", 7), build("b", 7), build("c", 8)
    assert snapshot(a) == snapshot(b)
    assert snapshot(a) != snapshot(c)
    assert not any(p.is_symlink() for p in a.rglob("*"))


def test_part_choice_prefers_parts_of_at_least_min_area():
    class P:
        def __init__(self, name, frac):
            self.class_name, self.area_fraction = name, frac

    parts = [P("tiny", 0.001), P("big", 0.2), P("mid", 0.01), P("empty", 0.0), P("small", 0.004)]
    for seed in range(5):
        one = choose_parts(parts, 1, 0.005, random.Random(seed))
        assert one[0].class_name in ("big", "mid")
    three = choose_parts(parts, 3, 0.005, random.Random(0))
    assert {p.class_name for p in three[:2]} == {"big", "mid"} and three[2].class_name == "small"  # largest of the rest
    assert [p.class_name for p in choose_parts(parts, 9, 0.005, random.Random(0))][2:] == ["small", "tiny"]  # never empty ones
    assert [p.class_name for p in choose_parts([P("tiny", 0.001)], 1, 0.005, random.Random(0))] == ["tiny"]


# ---- chat mode against the local OpenAI-compatible server ------------------------------------------


def asked_items(request: ChatRequest) -> list[dict]:
    return json.loads(request.last_user_content)["items"]


def good_question(item: dict) -> str:
    return f"In the test scene, which feature of the {item['object']} would a curious visitor point at first?"


def answer_all(request: ChatRequest):
    return json_reply({"questions": [{"id": it["id"], "question": good_question(it)} for it in asked_items(request)]})


@pytest.fixture
def server():
    with OpenAIServer(answer_all) as srv:
        yield srv


def chat_options(fixture, out: Path, server: OpenAIServer, source: str = "partimagenet", **kw) -> ReasonPartOptions:
    base = dict(source=source, ann=fixture.ann, images=fixture.images, out=out, base_url=server.url, model="test-model",
                backoff=0.001, timeout=60.0, concurrency=1)
    base.update(kw)
    return ReasonPartOptions(**base)


def test_chat_mode_through_the_cli_with_in_context_examples(tmp_path, pin, server):
    out = tmp_path / "rp"
    result = cli("--source", "partimagenet", "--ann", pin.ann, "--images", pin.images, "--out", out, "--base-url", server.url,
                 "--model", "test-model", "--batch-size", "2", "--concurrency", "2", "--temperature", "0.2", "--json", key="k-123")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accepted"] == 6
    chats = server.chat_requests
    assert len(chats) == 3  # 6 images, one part each, 2 items per request
    for r in chats:
        assert r.headers["authorization"] == "Bearer k-123"
        assert r.body["model"] == "test-model" and r.body["temperature"] == 0.2
        assert r.body["response_format"] == {"type": "json_object"}
        assert [m["role"] for m in r.messages] == ["system", "user", "assistant", "user"]
        shots = json.loads(r.messages[1]["content"])["items"]
        answers = json.loads(r.messages[2]["content"])["questions"]
        assert len(shots) == len(answers) == 4 and {a["question"] for a in answers} <= {e[3] for e in PROMPT_EXAMPLES}
        items = asked_items(r)
        assert len(items) == 2 and all(it["object"] in ("fish", "car") for it in items)
        assert not {s["part"] for s in shots} & {it["part"] for it in items}  # no example about a part being asked
    ids = [it["id"] for r in chats for it in asked_items(r)]
    assert len(set(ids)) == len(ids) == 6  # every item asked under an id of its own in the run, not "1", "2" per request
    records = manifest(out)
    assert len(records) == 6 and {r["mode"] for r in records} == {"chat"}
    assert {r["model"] for r in records} == {"test-model"} and {r["prompt_version"] for r in records} == {PROMPT_VERSION}
    assert all(r["question"].startswith("In the test scene") for r in records)
    assert "k-123" not in result.output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"k-123" not in path.read_bytes(), path  # the key is never written anywhere


def test_questions_that_name_the_part_or_break_the_format_are_rejected_and_asked_again(tmp_path, pin, server):
    calls: dict[str, int] = {}

    def handler(request: ChatRequest):
        out = []
        for it in asked_items(request):
            k = f"{it['object']}:{it['part']}"
            calls[k] = calls.get(k, 0) + 1
            # the first try names the part (in the plural), the second answers well
            q = f"Which {it['part']}s of the {it['object']} would you notice first in this scene?" if calls[k] == 1 else good_question(it)
            out.append({"id": it["id"], "question": q})
        out.append({"id": "99", "question": "Which thing was never asked for in this scene?"})
        return json_reply({"questions": out})

    server.handler = handler
    server.enqueue(chat_reply("Sure! Here you go: {not json"))
    summary = make_reasonpart(chat_options(pin, tmp_path / "rp", server, n=3, batch_size=3), "k")
    assert summary.complete and summary.total == 3
    assert summary.rejected["malformed JSON"] == 1
    assert summary.rejected["names the part"] == 3 and summary.rejected["not requested"] >= 1
    assert all(good_question({"object": r["object"]}) == r["question"] for r in manifest(tmp_path / "rp"))


def test_an_item_rejected_on_every_try_is_given_up_and_its_image_replaced(tmp_path, pin, server):
    def handler(request: ChatRequest):
        return json_reply({"questions": [
            {"id": it["id"], "question": "Too short?" if it["object"] == "car" else good_question(it)} for it in asked_items(request)
        ]})

    server.handler = handler
    summary = make_reasonpart(chat_options(pin, tmp_path / "rp", server, n=3, item_attempts=2), "k")
    assert summary.complete and summary.total == 3  # the three fish images
    assert summary.dropped_images >= 1 and summary.rejected["too short"] == 2 * summary.dropped_images  # 2 tries each
    assert summary.dropped_items == summary.dropped_images
    assert {r["object"] for r in manifest(tmp_path / "rp")} == {"fish"}

    starved = make_reasonpart(chat_options(pin, tmp_path / "rp2", server, n=6, item_attempts=1), "k")
    assert not starved.complete and "ran out of images" in starved.message() and "too short" in starved.message()


def test_transient_errors_are_retried_and_a_refusal_stops_the_run(tmp_path, pin, server):
    server.enqueue(error_reply(429, retry_after=0), error_reply(503))
    summary = make_reasonpart(chat_options(pin, tmp_path / "rp", server, n=2, batch_size=2), "k")
    assert summary.complete and summary.retried == {"HTTP 429": 1, "HTTP 503": 1} and summary.requests == 3

    server.handler = lambda r: error_reply(401, "Incorrect API key provided: k-secret-1")
    result = cli("--source", "partimagenet", "--ann", pin.ann, "--images", pin.images, "--out", tmp_path / "rp3",
                 "--base-url", server.url, key="k-secret-1")
    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr and "k-secret-1" not in result.output


def test_a_missing_key_is_an_error_for_a_remote_server_but_not_for_templates(tmp_path, pin):
    args = ["--source", "partimagenet", "--ann", pin.ann, "--images", pin.images, "--out", tmp_path / "rp"]
    remote = cli(*args, "--base-url", "https://api.example.invalid/v1")
    assert remote.exit_code == 1 and "OPENAI_API_KEY is not set" in remote.stderr
    assert cli(*args, "--questions", "template", "--n", "1").exit_code == 0


# ---- resume ------------------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_to_exactly_n_images(tmp_path, server):
    fixture = partimagenet_fixture(tmp_path / "pin", n_images=12)
    n, out, killed_at = 10, tmp_path / "rp", 3
    answered, release = [], threading.Event()

    def handler(request: ChatRequest):
        # Requests after the third wait until the kill: the run is killed with exactly three items
        # written, however fast or slow the machine (no time budget anywhere).
        answered.append(request)
        if len(answered) > killed_at:
            release.wait()
        return answer_all(request)

    server.handler = handler
    cmd = [sys.executable, "-m", "cores_cli", "make-reasonpart", "--source", "partimagenet", "--ann", str(fixture.ann),
           "--images", str(fixture.images), "--out", str(out), "--n", str(n), "--base-url", server.url,
           "--batch-size", "1", "--concurrency", "1", "--backoff", "0.001"]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    mf = out / "manifest.jsonl"
    try:
        kill_after_lines(cmd, mf, killed_at, env, tmp_path)  # SIGKILL: no clean-up code runs
    finally:
        release.set()
    done = manifest(out)
    assert len(done) == killed_at
    with open(mf, "ab") as fh:  # what a write cut short by a crash would leave
        fh.write(b'{"name": "torn')
    split = out / "partimagenet"
    # a user's files, one named like an item: never listed nor begun by make-reasonpart, so they stay
    users = {split / "orphan__fish_fin.json": b"{}", split / "orphan__fish_fin.jpg": b""}
    for path, data in users.items():
        path.write_bytes(data)
    requests_before = len(server.chat_requests)

    summary = make_reasonpart(chat_options(fixture, out, server, n=n), "k")

    assert summary.complete and summary.torn_tail_removed and summary.orphans_removed == 0
    assert summary.existing == len(done) and summary.accepted == n - len(done)
    records = manifest(out)
    assert len(records) == n == len({r["image_id"] for r in records}) == len({r["name"] for r in records})
    assert mf.read_bytes().endswith(b"\n")
    assert all(path.read_bytes() == data for path, data in users.items())
    assert sorted(p.stem for p in split.glob("*.json")) == sorted([r["name"] for r in records] + ["orphan__fish_fin"])
    # (a request torn by the kill may be recorded late, with no body: it asked nothing)
    asked_after = [it for r in server.chat_requests[requests_before:] if r.body for it in asked_items(r)]
    assert len(asked_after) == n - len(done)  # nothing already written was asked for again
    assert [r["name"] for r in records[: len(done)]] == [r["name"] for r in done]

    count = len(server.chat_requests)
    again = make_reasonpart(chat_options(fixture, out, server, n=n), "k")  # a finished run asks nothing
    assert again.complete and again.accepted == 0 and len(server.chat_requests) == count


def test_resume_adds_the_missing_parts_of_an_image_and_drops_stale_lines(tmp_path, pp):
    out = tmp_path / "rp"
    opts = dict(source="pascalpart", ann=pp.ann, images=pp.images, out=out, questions="template")
    make_reasonpart(ReasonPartOptions(n=3, parts_per_image=1, **opts))
    first = manifest(out)
    (out / "pascalpart" / f"{first[0]['name']}.json").unlink()  # its line is now stale
    summary = make_reasonpart(ReasonPartOptions(n=3, parts_per_image=2, **opts))
    assert summary.complete and summary.stale_lines_removed == 1
    records = manifest(out)
    per_image = {}
    for r in records:
        per_image.setdefault(r["image_id"], set()).add(r["part_class"])
    assert len(per_image) == 3 and all(len(v) == 2 for v in per_image.values())


# ---- mistakes --------------------------------------------------------------------------------------


def test_user_mistakes_exit_with_one_line(tmp_path, pin, pp):
    def run(*args):
        r = cli(*args, "--out", tmp_path / "o", "--questions", "template")
        lines = r.stderr.strip().splitlines()
        assert "Traceback" not in r.output and len(lines) == 1, r.output
        return r.exit_code, lines[0]

    code, line = run("--source", "partimagenet", "--ann", tmp_path / "nope.json", "--images", pin.images)
    assert code == 1 and "file not found" in line and "nope.json" in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    code, line = run("--source", "partimagenet", "--ann", bad, "--images", pin.images)
    assert code == 1 and "has no key 'annotations'" in line
    data = json.loads(pin.ann.read_text())
    del data["images"][2]["height"]
    bad.write_text(json.dumps(data))
    code, line = run("--source", "partimagenet", "--ann", bad, "--images", pin.images)
    assert code == 1 and "images[2] has no key 'height'" in line
    code, line = run("--source", "partimagenet", "--ann", pp.ann, "--images", pp.images)
    assert code == 1 and "--source pascalpart" in line
    code, line = run("--source", "pascalpart", "--ann", pin.ann, "--images", pin.images)
    assert code == 1 and "--source partimagenet" in line
    next(pin.images.rglob("*.JPEG")).unlink()
    code, line = run("--source", "partimagenet", "--ann", pin.ann, "--images", pin.images)
    assert code == 1 and "1 of 6 images are missing" in line and "--skip-missing" in line
    code, line = run("--source", "partimagenet", "--ann", pin.ann, "--images", pin.images, "--n", "9", "--skip-missing")
    assert code == 1 and "only 5 images" in line
    assert not (tmp_path / "o").exists()  # nothing was written by a refused run


@pytest.mark.parametrize(
    ("option", "wrong", "choices"),
    [
        ("--source", "partimage", ("partimagenet", "pascalpart")),
        ("--questions", "templates", ("chat", "template")),
        ("--image-mode", "softlink", ("symlink", "hardlink", "copy")),
        ("--holes", "keep", ("ignore", "fill")),
    ],
)
def test_a_value_outside_an_options_choices_is_typers_usage_error(tmp_path, pin, option, wrong, choices):
    """Typer checks each choice once, at the command line: exit 2, naming the option, the value
    and the choices, before anything is read or written."""
    args = {"--source": "partimagenet", "--questions": "template", option: wrong}
    r = cli(*(x for pair in args.items() for x in pair), "--ann", pin.ann, "--images", pin.images, "--out", tmp_path / "o")
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stderr).split())  # the error box, its lines joined
    listed = ", ".join(f"'{c}'" for c in choices)
    assert r.exit_code == 2 and "Usage:" in text, r.output
    assert f"Invalid value for '{option}'" in text and f"'{wrong}' is not one of {listed}" in text, text
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_help_lists_each_options_choices():
    r = runner.invoke(app, ["make-reasonpart", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for choices in ("partimagenet|pascalpart", "chat|template", "symlink|hardlink|copy", "ignore|fill"):
        assert choices in r.stdout, r.stdout


# ---- validation, table, polygons -----------------------------------------------------------------


def test_validate_question():
    ok = "In the oceanic scene, which functional feature aids fish in steering and stability?"
    assert validate_question("  " + ok.replace(" ", "\n", 1), "fin") == ok
    for text, part, names, reason in [
        ("Which fins help the fish steer through the currents?", "fin", (), "names the part"),
        ("Which part of the car shows you the traffic in the Mirror?", "side mirror", (), "names the part"),
        ("Which round parts of the car hold its tyres on the road?", "tire", ("tyre",), "names the part"),
        ("Which feet carry the person across the room?", "foot", (), "names the part"),
        ("Which part helps the fish steer in the currents.", "fin", (), "not a question"),
        ("Which part steers?", "fin", (), "too short"),
        ("Which " + "very " * 60 + "part?", "fin", (), "too long"),
        ("Which part of the fish is [SEG] in this scene?", "fin", (), "special token"),
        ("", "fin", (), "empty question"),
        (None, "fin", (), "empty question"),
    ]:
        with pytest.raises(QuestionRejected) as exc:
            validate_question(text, part, names)
        assert exc.value.reason == reason, text
    assert validate_question("Which part of the car would you finish polishing last at the car wash?", "fin")  # word level


def test_the_shipped_table_covers_every_part_class_with_valid_questions():
    table = load_part_table()
    vocab = load_vocabulary()
    for source, ds, parse in (("partimagenet", "partimagenet", partimagenet_name), ("pascalpart", "pascal_part", pascal_part_name)):
        names = [c.name for c in vocab.classes if c.dataset == ds]
        assert len(names) == {"partimagenet": 40, "pascalpart": 93}[source]
        for name in names:
            entry = table.get(source, name)
            assert entry is not None, name
            assert len(entry.questions) >= 3 and len(set(entry.questions)) == len(entry.questions), name
            part = parse({"name": name})[1]
            for q in entry.questions:
                validate_question(q, part, entry.names)  # never names the part
                assert "{" not in q
    for obj, part, _others, q in PROMPT_EXAMPLES:
        validate_question(q, part)


def test_mask_to_polygons_is_exact_with_ignore_holes_and_measured_with_filled_holes():
    """The IoU of the target pixels LISA's rasteriser draws from the written polygons with the
    source mask, on random masks with noise, several components, holes and islands in holes."""
    rng = np.random.default_rng(0)
    import cv2

    ious = {"ignore": [], "fill": []}
    for t in range(120):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            cv2.fillPoly(m, [rng.uniform(0, [w, h], (int(rng.integers(3, 10)), 2)).astype(np.int32)], 1)
        if t % 3 == 0:
            m ^= (rng.random((h, w)) < 0.05).astype(np.uint8)
        if t % 4 == 0:
            m |= ring(h, w, h // 2, w // 2, min(h, w) // 3, min(h, w) // 5)
        for holes in ious:
            drawn = rasterize_shapes(mask_to_shapes(m, holes), h, w)
            union = ((drawn == 1) | (m == 1)).sum()
            ious[holes].append(1.0 if union == 0 else ((drawn == 1) & (m == 1)).sum() / union)
            if holes == "ignore":
                assert ((drawn == 255) == (((drawn != 1)) & (m == 0) & (drawn != 0))).all()
    assert min(ious["ignore"]) == 1.0
    assert min(ious["fill"]) < 0.95  # filling holes is measurably worse on masks with holes
    wheel = ring(64, 96, 32, 48, 14, 9)
    filled = rasterize_shapes(mask_to_shapes(wheel, "fill"), 64, 96)
    assert ((filled == 1) & (wheel == 1)).sum() / ((filled == 1) | (wheel == 1)).sum() < 0.7  # a wheel's hole is big


# ---- eval and the registry -------------------------------------------------------------------------


def test_eval_reads_the_output_and_reports_giou_and_ciou(tmp_path, pin, pp):
    out = tmp_path / "rp"
    for source, fx in (("partimagenet", pin), ("pascalpart", pp)):
        assert cli("--source", source, "--ann", fx.ann, "--images", fx.images, "--out", out, "--questions", "template", "--n", "2").exit_code == 0
    result = runner.invoke(app, ["eval", "--dataset", f"reasonpart:{out}", "--preset", "tiny", "--json", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["protocol"]["samples"] == 4 and data["metrics"]["n"] == 4
    assert data["metrics"]["giou"] is not None and data["metrics"]["ciou"] is not None and data["metrics"]["miou"] is None
    assert "ReasonPart" in data["protocol"]["what"] and "gIoU" in result.stderr
    half = load_samples(f"reasonpart:{out / 'pascalpart'}")
    assert len(half) == 2 and all(s.sample_id.startswith("reasonpart/pascalpart/") for s in half)


def test_registry_names_and_errors(tmp_path):
    assert parse_name("reasonpart:/data/a:b/rp").split == "/data/a:b/rp"
    assert not parse_name("reasonpart:rp").needs_data_root
    assert "first question" in protocol("reasonpart:rp") and "every question" in protocol("reasonpart:rp", queries="all")
    with pytest.raises(Exception, match="folder not found"):
        load_samples(f"reasonpart:{tmp_path / 'missing'}")
    with pytest.raises(Exception, match="no split folder"):
        load_samples(f"reasonpart:{tmp_path}")


def test_polygon_conversion_is_exact_on_real_coco_masks(realdata):
    """Real COCO polygons, a crowd RLE and compressed-RLE results (../shared/realdata), read in
    place: the ReasonSeg polygons draw back every mask exactly (holes as ignore)."""
    inst = json.loads((realdata / "coco/mmdet_coco_dummy/instances_val2017.json").read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in inst["images"]}
    masks = []
    for a in inst["annotations"]:
        h, w = sizes[a["image_id"]]
        seg = a["segmentation"]
        rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else [mask_utils.frPyObjects(seg, h, w)]
        masks.append(np.bitwise_or.reduce([mask_utils.decode(r) for r in rles]))
    results = json.loads((realdata / "coco/cocoapi_results/instances_val2014_fakesegm100_results.json").read_text())
    for r in results[:80]:
        masks.append(mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}))
    with_holes = 0
    for m in masks:
        shapes = mask_to_shapes(m)
        with_holes += any(s.label == "ignore" for s in shapes)
        drawn = rasterize_shapes(shapes, *m.shape)
        assert ((drawn == 1) == (m == 1)).all()
    assert with_holes >= 1


def test_the_library_takes_the_choices_values_and_names_a_wrong_one(tmp_path):
    """A library caller may pass "symlink" or ImageMode.symlink; a value outside the choices is
    a CoresError naming the option, as on the command line."""
    from cores_cli.builders.reasonpart import ImageMode, QuestionMode, ReasonPartOptions, place_image
    from cores_cli.errors import CoresError

    src = tmp_path / "a.jpg"
    src.write_bytes(b"jpeg")
    place_image(src, tmp_path / "by_value.jpg", "symlink")
    place_image(src, tmp_path / "by_member.jpg", ImageMode.hardlink)
    assert (tmp_path / "by_value.jpg").is_symlink() and os.path.samefile(tmp_path / "by_member.jpg", src)
    with pytest.raises(CoresError, match=r"unknown --image-mode 'bogus'; choose symlink, hardlink or copy"):
        place_image(src, tmp_path / "c.jpg", "bogus")
    options = ReasonPartOptions(source="pascalpart", ann=src, images=tmp_path, out=tmp_path / "out", questions="template")
    assert options.questions is QuestionMode.template
    with pytest.raises(CoresError, match=r"unknown --questions 'nope'; choose chat or template"):
        ReasonPartOptions(source="pascalpart", ann=src, images=tmp_path, out=tmp_path / "out", questions="nope")
