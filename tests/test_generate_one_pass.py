"""Generate mode in one LLM pass: the chain's hidden states come from the generation itself,
and give the same masks as rerunning prompt and answer teacher-forced (the former path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny, load_benchmark, scene_sample
from transformers import LogitsProcessor, LogitsProcessorList

from cores_cli.engine.predictor import Predictor, Query
from cores_cli.processing.transform import collate

STATE_TOLERANCE = 1e-5  # fp32 on the CPU: cached attention against the full pass, float noise only


class ForcedAnswer(LogitsProcessor):
    """Greedy decoding that writes ``ids``: the model still runs every step and is fed every
    token, as when it writes the answer itself."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[input_ids.shape[1] - self.prompt_length]] = 0
        return forced


def force_answer(monkeypatch, model, text: str) -> list[int]:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    generate = model.mllm.generate

    def forced(**kwargs):
        return generate(**kwargs, logits_processor=LogitsProcessorList([ForcedAnswer(ids)]))

    monkeypatch.setattr(model.mllm, "generate", forced)
    return ids


class Spy:
    """Records each forward's chain embeddings and counts language passes (``language_hidden``)."""

    def __init__(self, monkeypatch, model) -> None:
        self.chains: list[torch.Tensor] = []
        self.language_passes = 0
        forward, language_hidden = model.forward, model.language_hidden

        def spy_forward(batch, compute_loss=True, hidden=None):
            out = forward(batch, compute_loss, hidden)
            self.chains.append(out.chain_embeddings)
            return out

        def spy_language(batch):
            self.language_passes += 1
            return language_hidden(batch)

        monkeypatch.setattr(model, "forward", spy_forward)
        monkeypatch.setattr(model, "language_hidden", spy_language)


def both_ways(monkeypatch, model, pixels, query, exemplars=None):
    """The one-pass prediction and the two-pass one, with their chain embeddings and language
    passes."""
    spy = Spy(monkeypatch, model)
    predictor = Predictor(model, exemplars, max_new_tokens=32)
    one = predictor.predict(pixels, query, mode="generate")
    one_passes = spy.language_passes
    predictor._one_pass = False
    two = predictor.predict(pixels, query, mode="generate")
    return one, two, spy.chains, one_passes, spy.language_passes - one_passes


def assert_same(one, two, chains) -> None:
    assert one.generated_text == two.generated_text and one.answer == two.answer
    assert one.fallback == two.fallback and one.level_tokens == two.level_tokens and one.mode == two.mode == "generate"
    assert len(one.level_masks) == len(two.level_masks)
    for a, b in zip(one.level_masks, two.level_masks):
        assert a.dtype == bool and np.array_equal(a, b)
    torch.testing.assert_close(chains[0], chains[1], atol=STATE_TOLERANCE, rtol=0)


def test_the_shipped_model_answers_in_one_pass_with_the_same_masks(monkeypatch):
    from cores_cli.bundled import EXAMPLE_QUERY, example_image
    from cores_cli.engine.checkpoint import load_checkpoint
    from cores_cli.engine.loading import embedded_checkpoint, exemplar_sampler
    from cores_cli.images import load_image

    model, _ = load_checkpoint(embedded_checkpoint())
    pixels = load_image(example_image()).pixels
    one, two, chains, one_passes, two_passes = both_ways(monkeypatch, model, pixels, EXAMPLE_QUERY, exemplar_sampler(model, None, 0))
    # the shipped model writes its chain itself (no template fallback)
    assert not one.fallback and "[LOC]" in one.generated_text and "[SEG]" in one.generated_text
    assert_same(one, two, chains)
    assert (one_passes, two_passes) == (0, 1)


@pytest.mark.parametrize("hidden_at", ["token", "predicting"])
def test_a_deeper_chain_gets_the_states_the_teacher_forced_pass_gives(monkeypatch, hidden_at):
    model = build_tiny("chain.depth=3", f"chain.hidden_at={hidden_at}")
    force_answer(monkeypatch, model, "Sure, it appears on [LOC]. It is located [POS]. It is [SEG].</s>")
    one, two, chains, one_passes, two_passes = both_ways(monkeypatch, model, scene_sample().image_array, "what shines?")
    assert not one.fallback and len(one.level_masks) == 3
    assert_same(one, two, chains)
    assert (one_passes, two_passes) == (0, 1)


def test_a_chain_at_the_start_of_the_answer_reads_the_last_prompt_state(monkeypatch):
    model = build_tiny("chain.depth=3", "chain.hidden_at=predicting")
    force_answer(monkeypatch, model, "[LOC] [POS] [SEG]</s>")
    one, two, chains, one_passes, _ = both_ways(monkeypatch, model, scene_sample().image_array, "the red part")
    assert not one.fallback and one_passes == 0
    assert_same(one, two, chains)


@pytest.mark.parametrize(("hidden_at", "reruns"), [("token", 1), ("predicting", 0)])
def test_an_answer_cut_right_after_its_chain(monkeypatch, hidden_at, reruns):
    # no end token: generation stops at max_new_tokens on [SEG], which it predicted but never
    # fed back, so its own state ("token") is unknown and the answer is rerun; the state that
    # predicted it is known
    model = build_tiny(f"chain.hidden_at={hidden_at}")
    ids = force_answer(monkeypatch, model, "It is [LOC] on [SEG]")
    spy = Spy(monkeypatch, model)
    predictor = Predictor(model, max_new_tokens=len(ids))
    one = predictor.predict(scene_sample().image_array, "the red part", mode="generate")
    assert not one.fallback and one.generated_text.endswith("[SEG]")
    assert spy.language_passes == reruns
    predictor._one_pass = False
    two = predictor.predict(scene_sample().image_array, "the red part", mode="generate")
    assert_same(one, two, spy.chains)


def test_an_answer_without_a_chain_still_falls_back_to_the_template(monkeypatch):
    model = build_tiny("chain.depth=3")
    force_answer(monkeypatch, model, "I cannot see it.</s>")
    one, two, chains, _, _ = both_ways(monkeypatch, model, scene_sample().image_array, "what shines?")
    assert one.fallback and one.answer == "Sure, it appears on [LOC]. It is located [POS]. It is [SEG]."
    assert_same(one, two, chains)


def test_left_padded_rows_get_their_own_states(monkeypatch):
    model = build_tiny()
    ids = force_answer(monkeypatch, model, "It is [LOC] on [SEG].</s>")
    predictor = Predictor(model)
    image = predictor.transform.image(scene_sample().image_array)
    prompts = [predictor._encode(image, Query(q), generate=True) for q in ("the red part", "what lets the vehicle roll when it moves?")]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    answers = model.generate_answers(collate(prompts, model.tokenizer.pad_token_id, padding_side="left"), 32)
    for prompt, answer in zip(prompts, answers):
        assert list(answer) == ids
        # every answer token but the end token was fed back
        assert answer.states.shape[0] == len(prompt.input_ids) + len(ids) - 1
        row = prompt.with_answer(prompt.input_ids + list(answer), "")
        teacher = model.language_hidden(collate([row], model.tokenizer.pad_token_id))[0]
        torch.testing.assert_close(answer.states, teacher[: answer.states.shape[0]], atol=STATE_TOLERANCE, rtol=0)


def test_the_benchmark_times_each_query_both_ways(monkeypatch):
    bench = load_benchmark("generate_speed")
    model = build_tiny()
    force_answer(monkeypatch, model, "It is [LOC] on [SEG].</s>")
    spy = Spy(monkeypatch, model)
    items = [(scene_sample(seed=i).image_array, [Query("the red part")]) for i in range(2)]
    ways, ratios = bench.round_trip(Predictor(model), items)
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert spy.language_passes == 2  # the two-pass way only, once per query
    (one_s, one), (two_s, two) = ways[True], ways[False]
    assert one_s > 0 and two_s > 0
    for a, b in zip(one, two):
        assert not a.fallback and all(np.array_equal(x, y) for x, y in zip(a.level_masks, b.level_masks))
