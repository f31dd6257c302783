"""The predict path: generate mode with a usable chain, and the template fallback."""

from __future__ import annotations

import numpy as np
from conftest import build_tiny, scene_sample

from cores_cli.engine.predictor import Predictor, guess_style


def test_generated_answer_with_a_chain_is_used_as_written(monkeypatch):
    model = build_tiny()
    predictor = Predictor(model)
    answer = "Sure, it typically appears on [LOC]. It is [SEG].</s>"
    ids = model.tokenizer.encode(answer, add_special_tokens=False)
    monkeypatch.setattr(model, "generate_answers", lambda batch, n: [ids])
    pixels = scene_sample().image_array
    pred = predictor.predict(pixels, "what lets the vehicle roll?", mode="generate")
    assert not pred.fallback
    assert pred.answer == "Sure, it typically appears on [LOC]. It is [SEG]."
    assert len(pred.level_masks) == 2 and pred.mask.shape == pixels.shape[:2]
    # the generated text differs from the template, so the chain tokens' context differs too
    teacher = predictor.predict(pixels, "what lets the vehicle roll?")
    assert teacher.answer == "Sure, it appears on [LOC]. It is [SEG]."


def test_answers_without_a_complete_chain_fall_back(monkeypatch):
    model = build_tiny("chain.depth=3")
    predictor = Predictor(model)
    pixels = scene_sample().image_array
    for text in ["I cannot see it.</s>", "It appears on [LOC]. It is [SEG].</s>", "[SEG] [SEG]</s>"]:
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        monkeypatch.setattr(model, "generate_answers", lambda batch, n, ids=ids: [ids])
        pred = predictor.predict(pixels, "what shines?", mode="generate")
        assert pred.fallback, text
        assert pred.answer == "Sure, it appears on [LOC]. It is located [POS]. It is [SEG]."
        assert len(pred.level_masks) == 3


def test_real_generation_runs_and_predictions_are_repeatable():
    model = build_tiny("prompt.in_context_k=1")
    from cores_cli.contexts import ExemplarSampler, make_exemplar

    lib = [make_exemplar(f"thing {i}", "a table", "in the middle", f"shape number {i}", "manual") for i in range(5)]
    predictor = Predictor(model, ExemplarSampler(lib, 0), seed=0)
    pixels = scene_sample().image_array
    a = predictor.predict(pixels, "the red part", mode="generate")
    assert a.generated_text is not None
    b = predictor.predict(pixels, "the red part", mode="generate")
    assert a.generated_text == b.generated_text and np.array_equal(a.mask, b.mask)
    assert a.exemplars_used == 1


def test_query_style_guess():
    assert guess_style("what gives dogs their sense of smell?") == "sentence"
    assert guess_style("the dog's nose") == "phrase"
    assert guess_style("segment the thing that keeps the rain off the people standing outside") == "sentence"
