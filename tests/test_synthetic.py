"""Synthetic hierarchical benchmark: determinism, query wording, look-alike parts, and exact
agreement between in-memory records and the ReasonSeg files written to disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cores_cli.data import synthetic
from cores_cli.data.masks import LabelmePolygonMask
from cores_cli.data.reasonseg import load_reasonseg, read_split_dir
from cores_cli.data.synthetic import (
    CONTAINERS,
    PART_WORDS,
    QUERIES,
    generate_item,
    load_synthetic,
    main,
    write_split,
)
from cores_cli.errors import CoresError

from fixtures_data import lisa_oracle_mask


def test_same_seed_same_item_and_disjoint_streams():
    a, b = generate_item("val", 3, seed=0), generate_item("val", 3, seed=0)
    assert np.array_equal(a.image, b.image) and a.texts == b.texts and a.target == b.target
    assert not np.array_equal(a.image, generate_item("val", 3, seed=1).image)
    assert not np.array_equal(a.image, generate_item("test", 3, seed=0).image)
    assert not np.array_equal(a.image, generate_item("train", 3, seed=0).image)


def test_larger_n_extends_smaller_n():
    small, large = load_synthetic("val", n=4), load_synthetic("val", n=9)
    assert [s.sample_id for s in small] == [s.sample_id for s in large[:4]]
    assert all(np.array_equal(x.image_array, y.image_array) for x, y in zip(small, large))


def test_every_part_has_short_and_long_queries_that_never_name_a_part():
    words = re.compile(r"\b(" + "|".join(PART_WORDS) + r")\b", re.IGNORECASE)
    for kind, cdef in CONTAINERS.items():
        for part in cdef.parts:
            bank = QUERIES[(kind, part.name)]
            assert len(bank["short"]) >= 3 and len(bank["long"]) >= 3
            for text in bank["short"] + bank["long"]:
                assert not words.search(text), (kind, part.name, text)
            assert all(t.endswith("?") for t in bank["long"])
            assert not any(t.endswith("?") for t in bank["short"])
    assert set(QUERIES) == {(k, p.name) for k, c in CONTAINERS.items() for p in c.parts}


def test_records_masks_and_metadata():
    samples = load_synthetic("val", n=60)
    assert len(samples) == 60 and all(len(s.rounds) == 1 for s in samples)  # eval: first query
    styles = {s.rounds[0].style for s in samples}
    assert styles == {"sentence", "phrase"}
    for s in samples:
        assert s.image_array.shape == (128, 128, 3) and s.image_array.dtype == np.uint8
        assert s.rounds[0].style == ("sentence" if s.meta["is_sentence"] else "phrase")
        target = s.rounds[0].target.rasterize(128, 128)
        container = s.meta["container_mask"].rasterize(128, 128)
        assert set(np.unique(target)) == {0, 1}
        assert ((target == 1) & (container == 0)).sum() == 0  # the part lies in its container
        assert (container == 1).sum() > (target == 1).sum()
        assert s.meta["part"] in {p.name for p in CONTAINERS[s.meta["container"]].parts}


def test_targets_are_large_enough_for_low_resolution_masks():
    fractions = [(s.rounds[0].target.rasterize(128, 128) == 1).mean() for s in load_synthetic("val", n=200)]
    assert np.median(fractions) > 0.03
    assert np.mean(np.asarray(fractions) >= 0.01) > 0.9


def test_look_alike_parts_appear_elsewhere_in_the_scene():
    """Most targets share their colour with a part of another container or a loose shape, so
    appearance alone cannot find the target: only the container around it can."""
    hits = 0
    for i in range(150):
        item = generate_item("val", i)
        target = LabelmePolygonMask(item.target).rasterize(128, 128) == 1
        colour = np.median(item.image[target], axis=0)
        similar = (np.abs(item.image.astype(int) - colour).max(axis=2) < 30) & ~target
        hits += similar.sum() > 40
    assert hits / 150 > 0.5


def test_train_defaults_to_all_queries_and_subsets():
    train = load_synthetic("train", n=10)
    assert all(len(s.rounds) == s.meta["num_texts"] == 3 for s in train)
    assert len({r.target for r in train[0].rounds}) == 1  # phrasings of one target
    short = load_synthetic("test", n=40, subset="short")
    long_ = load_synthetic("test", n=40, subset="long")
    assert len(short) + len(long_) == 40
    assert all(s.rounds[0].style == "phrase" for s in short)
    assert all(s.rounds[0].style == "sentence" for s in long_)
    chunks = load_synthetic("train", n=2, rounds_per_sample=2)
    assert [len(s.rounds) for s in chunks] == [2, 1, 2, 1]


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_written_files_read_back_identically(tmp_path, fmt):
    n = 16
    dest = write_split(tmp_path, "val", n=n, seed=5, image_format=fmt)
    assert dest == tmp_path / "val"
    assert len(list(dest.glob(f"*.{fmt}"))) == len(list(dest.glob("*.json"))) == n
    memory = load_synthetic("val", n=n, seed=5, queries="all")
    disk = read_split_dir(dest, queries="all")
    assert [Path(s.image_path).stem for s in disk] == [s.sample_id.split("/")[-1] for s in memory]
    for m, d in zip(memory, disk):
        assert [(r.query, r.style) for r in m.rounds] == [(r.query, r.style) for r in d.rounds]
        assert np.array_equal(m.rounds[0].target.rasterize(128, 128), d.rounds[0].target.rasterize(128, 128))
        assert np.array_equal(m.meta["container_mask"].rasterize(128, 128), d.meta["container_mask"].rasterize(128, 128))
        for key in ("container", "part", "is_sentence", "num_texts", "image_size"):
            assert m.meta[key] == d.meta[key], key
        assert "warnings" not in d.meta
        pixels = np.asarray(Image.open(d.image_path).convert("RGB"))
        if fmt == "png":
            assert np.array_equal(pixels, m.image_array)
        else:
            # lossy, but every part keeps its colour
            inside = m.rounds[0].target.rasterize(128, 128) == 1
            assert np.abs(pixels[inside].mean(0) - m.image_array[inside].mean(0)).max() < 4


def test_written_json_is_what_lisa_reads(tmp_path):
    dest = write_split(tmp_path, "test", n=6, seed=0)
    for sample in read_split_dir(dest):
        anno = json.loads(Path(sample.meta["json"]).read_text())
        assert list(anno)[:3] == ["text", "is_sentence", "shapes"]
        assert all(s["label"] == "target" for s in anno["shapes"])
        assert anno["cores_synthetic"]["container_shapes"]
        mask = sample.rounds[0].target.rasterize(128, 128)
        assert mask.any() and np.array_equal(mask, lisa_oracle_mask(anno, 128, 128))


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_split(tmp_path / "a", "val", n=5, seed=2)
    b = write_split(tmp_path / "b", "val", n=5, seed=2)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 10
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = write_split(tmp_path / "c", "val", n=5, seed=3)
    assert (a / files[1]).read_bytes() != (c / files[1].replace("_s2_", "_s3_")).read_bytes()


def test_command_line_writes_a_readable_split(tmp_path, capsys):
    out = tmp_path / "reason_seg" / "Synthetic"
    assert main(["--out", str(out), "--split", "val", "--n", "7", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 7 samples to" in printed and str(out / "val") in printed
    samples = load_reasonseg(tmp_path, "val", folder="Synthetic")
    assert len(samples) == 7 and samples[0].dataset == "synthetic"
    # rewriting replaces the split as a whole (no stale files from a larger run)
    assert main(["--out", str(out), "--split", "val", "--n", "3"]) == 0
    assert len(list((out / "val").glob("*.json"))) == 3
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--split", "nope"])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(CoresError, match="unknown synthetic split"):
        load_synthetic("dev")
    with pytest.raises(CoresError, match="image_size"):
        load_synthetic("val", n=1, image_size=8)


def test_other_image_sizes_scale_the_scene():
    (s,) = load_synthetic("val", n=1, image_size=256)
    assert s.image_array.shape == (256, 256, 3)
    assert (s.rounds[0].target.rasterize(256, 256) == 1).sum() > 0


def test_default_split_sizes():
    # generation speed is a benchmark's business (docs/PERFORMANCE.md), not a timed test's
    assert synthetic.DEFAULT_SIZES == {"train": 2000, "val": 200, "test": 200}
