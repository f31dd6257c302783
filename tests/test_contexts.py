"""The exemplar library format, its validation, the shipped library and vocabulary, the sampler."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from cores_cli.contexts import (
    QUESTION_FORMAT,
    ExemplarError,
    ExemplarSampler,
    default_library_path,
    default_seeds_path,
    default_vocabulary_path,
    head_noun,
    load_library,
    load_vocabulary,
    make_exemplar,
    names_object,
    object_key,
    render_answer,
    uncovered_classes,
    validate_exemplar,
)
from cores_cli.errors import CoresError

REPO = Path(__file__).resolve().parents[1]


def _valid(**overrides) -> dict:
    ex = make_exemplar("dog paw", "the end of each leg", "at the bottom of the animal", "tough and cushioned with pads and claws", "manual")
    data = asdict(ex)
    data.update(overrides)
    return data


def _reason(data: dict) -> str:
    with pytest.raises(ExemplarError) as info:
        validate_exemplar(data)
    return info.value.reason


# ---- format and validation --------------------------------------------------------------------


def test_make_exemplar_renders_the_paper_example():
    ex = validate_exemplar(_valid())
    assert ex.question == "What is the dog paw in this image? Please output segmentation mask."
    assert ex.answer == "Sure, it appears on the end of each leg. It is tough and cushioned with pads and claws."
    assert ex.render(1) == "Sure, it is tough and cushioned with pads and claws."
    assert ex.render(3) == (
        "Sure, it appears on the end of each leg. It is located at the bottom of the animal. "
        "It is tough and cushioned with pads and claws."
    )
    with pytest.raises(ValueError):
        render_answer(4, "a", "at b", "c")


def test_make_exemplar_turns_sentences_into_clauses():
    ex = make_exemplar("  cup   handle ", "The side of a cup.", "On one  side of the body.", "A curved loop.", "m")
    assert (ex.object, ex.appears_on, ex.location, ex.appearance) == ("cup handle", "the side of a cup", "on one side of the body", "a curved loop")
    assert make_exemplar("tv", "TV stands", "on a wall", "flat", "m").appears_on == "TV stands"  # acronyms stay


@pytest.mark.parametrize(
    "field, text",
    [
        ("appearance", "tough paws with pads"),  # plural
        ("appears_on", "the paw of a dog"),
        ("location", "at the bottom, under each Paw"),  # case
    ],
)
def test_a_level_that_names_the_object_is_rejected(field, text):
    data = _valid(**{field: text})
    data["answer"] = render_answer(2, data["appears_on"], data["location"], data["appearance"])
    assert _reason(data) == "names the object"


def test_naming_handles_irregular_plurals_and_heads():
    assert names_object("five toes on both feet", "human foot")
    assert names_object("sharp white tooth", "dog teeth")
    assert names_object("autumn leaf litter", "leaves")
    assert names_object("two knives", "knife")
    assert not names_object("the end of a dog's leg", "dog paw")  # the whole may be named
    assert head_noun("chest of drawers") == "chest"
    assert head_noun("car side mirror") == "mirror"


def test_object_key_normalises_case_articles_and_plurals():
    assert object_key("The Dog Paws") == object_key("dog paw") == "dog paw"
    assert object_key("dog's paw") == "dog paw"
    assert object_key("water-drops") == object_key("water drops")
    assert object_key("glass") == "glass" and object_key("bus") == "bus"


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"schema_version": 2}, "schema version"),
        ({"extra": "x"}, "unknown field"),
        ({"source": ""}, "empty field"),
        ({"appearance": "round and [SEG]"}, "special token"),
        ({"location": "near\nthe ground"}, "bad text"),
        ({"appearance": "very " * 40 + "round"}, "too long"),
        ({"object": "x" * 61}, "too long"),
        ({"location": "the bottom of the animal"}, "bad clause"),  # "It is located the bottom ..." does not read
        ({"appears_on": "on the end of each leg"}, "bad clause"),
        ({"appearance": "it is tough"}, "bad clause"),
        ({"appearance": "tough."}, "bad clause"),
        ({"question": "What is this?"}, "bad question"),
        ({"answer": "Sure."}, "bad answer"),
    ],
)
def test_validation_reasons(overrides, reason):
    data = _valid(**overrides)
    if set(overrides) & {"appears_on", "location", "appearance"}:
        data["answer"] = render_answer(2, data["appears_on"], data["location"], data["appearance"])
    if "object" in overrides:
        data["question"] = QUESTION_FORMAT.format(object=data["object"])
    assert _reason(data) == reason


def test_missing_field_is_named():
    data = _valid()
    del data["location"]
    with pytest.raises(ExemplarError, match="'location'"):
        validate_exemplar(data)


def test_load_library_names_file_and_line(tmp_path):
    path = tmp_path / "lib.jsonl"
    good = json.dumps(_valid())
    path.write_text(good + "\n\n" + json.dumps(_valid(answer="Sure.")) + "\n")
    with pytest.raises(CoresError, match=r"lib\.jsonl, line 3: answer"):
        load_library(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(CoresError, match="line 2"):
        load_library(path)
    path.write_text("\n")
    with pytest.raises(CoresError, match="holds no exemplars"):
        load_library(path)
    with pytest.raises(CoresError, match="not found"):
        load_library(tmp_path / "missing.jsonl")


def test_a_library_that_is_not_utf8_or_a_folder_is_one_line_naming_it(tmp_path):
    path = tmp_path / "lib.jsonl"
    good = json.dumps(_valid()).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + json.dumps(_valid(source="caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(CoresError, match=r"lib\.jsonl, line 3: not UTF-8 text"):
        load_library(path)
    with pytest.raises(CoresError, match=r"context library .* is a folder"):
        load_library(tmp_path)


def test_predict_with_a_library_that_is_not_utf8_exits_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from cores_cli.cli.app import app

    library = tmp_path / "lib.jsonl"
    library.write_bytes(json.dumps(_valid()).encode() + b"\n\xff\xfe\n")
    args = ["predict", "--example", "--preset", "tiny", "-o", str(tmp_path / "out"), "--context-library", str(library)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: {library}, line 2: not UTF-8 text" in " ".join(result.stderr.split())


def test_a_vocabulary_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_bytes(b'{"schema_version": 1, "datasets": {"caf\xe9": {}}}')
    with pytest.raises(CoresError, match=r"v\.json: not UTF-8 text"):
        load_vocabulary(bad)


# ---- sampler ----------------------------------------------------------------------------------


def test_sampler_draws_distinct_exemplars_reproducibly():
    library = load_library()
    a = [e.object for e in ExemplarSampler(library, seed=3).sample(5)]
    b = [e.object for e in ExemplarSampler(library, seed=3).sample(5)]
    assert a == b and len(set(a)) == 5
    assert ExemplarSampler(library, seed=3).sample(0) == []
    small = library[:2]
    assert sorted(e.object for e in ExemplarSampler(small, seed=0).sample(5)) == sorted(e.object for e in small)
    with pytest.raises(CoresError):
        ExemplarSampler([])


# ---- shipped files ----------------------------------------------------------------------------


def test_shipped_files_resolve_through_the_package_symlink():
    for path, name in ((default_library_path(), "library.jsonl"), (default_seeds_path(), "seeds.jsonl"), (default_vocabulary_path(), "vocabulary.json")):
        assert path.is_file() and "_contexts" in path.parts
        assert path.resolve() == (REPO / "contexts" / name).resolve()


def test_shipped_library_is_large_manual_and_unique():
    library = load_library()  # validates every line
    assert len(library) >= 500
    assert {e.source for e in library} == {"manual"}
    keys = Counter(object_key(e.object) for e in library)
    assert keys.most_common(1)[0][1] == 1, keys.most_common(3)
    # k exemplars share the model's context: they must stay short
    assert max(len(e.render(3)) for e in library) < 400


def test_shipped_vocabulary_has_the_training_sets_class_lists():
    vocab = load_vocabulary()
    sizes = Counter(c.dataset for c in vocab.classes)
    assert sizes == {"coco_stuff": 171, "ade20k": 150, "pascal_part": 93, "partimagenet": 40, "paco_lvis": 531}
    paco = [c for c in vocab.classes if c.dataset == "paco_lvis"]
    assert sum(1 for c in paco if c.part) == 456 and len({c.part for c in paco if c.part}) == 200
    assert vocab.parts_pooled == {"paco_lvis"}
    names = {(c.dataset, c.name): c.object for c in vocab.classes}
    assert names[("coco_stuff", "wall-brick")] == "brick wall"
    assert names[("partimagenet", "Car Tier")] == "car tire"
    assert names[("paco_lvis", "car_(automobile):wheel")] == "car wheel"


def test_shipped_library_covers_the_vocabulary():
    """Coverage rule: every COCO-Stuff, ADE20K, PASCAL-Part and PartImageNet class has an exemplar
    whose object is its phrase; every PACO-LVIS object has one, and every PACO-LVIS part name has
    one on at least one object (456 object:part pairs over 200 part names)."""
    vocab = load_vocabulary()
    missing = uncovered_classes(load_library(), vocab)
    assert missing == [], [f"{c.dataset}:{c.name}" for c in missing[:10]]


def test_coverage_rule_pools_parts_only_where_the_vocabulary_says_so(tmp_path):
    vocab_file = tmp_path / "v.json"
    vocab_file.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "datasets": {
                    "pooled": {"parts_pooled": True, "classes": [
                        {"name": "mug:handle", "object": "mug handle", "whole": "mug", "part": "handle"},
                        {"name": "cup:handle", "object": "cup handle", "whole": "cup", "part": "handle"},
                    ]},
                    "strict": {"classes": [
                        {"name": "jug:handle", "object": "jug handle", "whole": "jug", "part": "handle"},
                    ]},
                },
            }
        )
    )
    vocab = load_vocabulary(vocab_file)
    one = [make_exemplar("mug handle", "the side of a mug", "on one side", "a loop", "manual")]
    assert [c.name for c in uncovered_classes(one, vocab)] == ["jug:handle"]
    assert [c.name for c in uncovered_classes([], vocab)] == ["mug:handle", "cup:handle", "jug:handle"]


def test_seeds_are_valid_manual_exemplars_from_the_library():
    seeds = load_library(default_seeds_path())
    assert len(seeds) >= 4 and {e.source for e in seeds} == {"manual"}
    assert {e.to_json() for e in seeds} <= {e.to_json() for e in load_library()}


def test_bad_vocabulary_files_give_clear_errors(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text("{")
    with pytest.raises(CoresError, match="not valid JSON"):
        load_vocabulary(bad)
    bad.write_text(json.dumps({"schema_version": 1, "datasets": {"x": {"classes": [{"name": "a"}]}}}))
    with pytest.raises(CoresError, match="class 0"):
        load_vocabulary(bad)
    with pytest.raises(CoresError, match="not found"):
        load_vocabulary(tmp_path / "none.json")
