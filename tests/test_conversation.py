"""Prompt building: the LLaVA v1 template, chain tokens as single ids, answer-only labels,
image token expansion and truncation that never removes the answer."""

from __future__ import annotations

import pytest

from cores_cli.config import tiny
from cores_cli.configio import apply_overrides
from cores_cli.contexts import make_exemplar
from cores_cli.processing.conversation import ConversationEncoder, format_question
from cores_cli.errors import CoresError
from cores_cli.model.mllm import add_chain_tokens, build_tiny_tokenizer

N_IMAGE = 16


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    add_chain_tokens(tok)
    return tok


def encoder(tokenizer, *overrides):
    cfg = apply_overrides(tiny(), list(overrides))
    return ConversationEncoder(tokenizer, cfg.prompt, cfg.chain, "<image>", N_IMAGE)


EX = [
    make_exemplar("dog paw", "the end of each leg", "at the bottom of the body", "tough and cushioned", "manual"),
    make_exemplar("bird beak", "the front of the head", "ahead of the eyes", "hard and pointed", "manual"),
]


def test_tiny_tokenizer_is_deterministic_and_keeps_chain_tokens_whole(tokenizer):
    again = build_tiny_tokenizer()
    add_chain_tokens(again)
    assert again.get_vocab() == tokenizer.get_vocab()
    for t in ("[LOC]", "[POS]", "[SEG]", "<image>"):
        assert len(tokenizer.encode(t, add_special_tokens=False)) == 1
    ids = tokenizer.encode("It is [SEG].", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("[SEG]") in ids


def test_template_and_labels(tokenizer):
    enc = encoder(tokenizer).encode(["What lets it roll? Please output segmentation mask."], ["Sure, it appears on [LOC]. It is [SEG]."], EX[:1])
    text = enc.text
    assert text.startswith("A chat between a curious human")
    assert "To realize segmentation, the assistant guesses" in text
    assert text.index("What is the dog paw in this image?") < text.index("<image>")
    assert "USER: <image>\nWhat lets it roll? Please output segmentation mask. ASSISTANT: Sure, it appears on [LOC]. It is [SEG].</s>" in text
    supervised = tokenizer.decode([t for t in enc.labels if t != -100])
    assert supervised.strip() == "Sure, it appears on [LOC]. It is [SEG].</s>"
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == N_IMAGE
    assert all(l == -100 for i, l in zip(enc.input_ids, enc.labels) if i == image_id)
    assert len(enc.input_ids) == len(enc.labels)


def test_several_rounds_are_all_supervised_and_the_image_comes_once(tokenizer):
    enc = encoder(tokenizer).encode(["Q1?", "Q2?"], ["It is [SEG].", "Sure, [SEG]."], [])
    assert enc.text.count("<image>") == 1
    supervised = tokenizer.decode([t for t in enc.labels if t != -100])
    assert supervised.count("[SEG]") == 2 and supervised.count("</s>") == 2


def test_generation_prompt_ends_at_the_assistant_turn(tokenizer):
    enc = encoder(tokenizer).encode(["Q?"], None, [])
    assert enc.text.endswith("ASSISTANT:")
    assert all(l == -100 for l in enc.labels)


def test_truncation_drops_exemplars_first_then_shortens_the_query(tokenizer):
    long_query = " ".join(["word"] * 60) + " Please output segmentation mask."
    answer = ["Sure, it appears on [LOC]. It is [SEG]."]
    full = encoder(tokenizer).encode([long_query], answer, EX)
    text_tokens = len(full.input_ids) - N_IMAGE + 1
    one_less = encoder(tokenizer, f"prompt.max_text_tokens={text_tokens - 1}").encode([long_query], answer, EX)
    assert one_less.exemplars_used == 1 and not one_less.query_truncated
    none_fit = encoder(tokenizer, "prompt.max_text_tokens=110").encode([long_query], answer, EX)
    assert none_fit.exemplars_used == 0 and none_fit.query_truncated
    assert len(none_fit.input_ids) - N_IMAGE + 1 <= 110
    assert none_fit.text.count("[LOC]") == 1 and none_fit.text.count("[SEG]") == 1  # the chain survives
    with pytest.raises(CoresError, match="answers alone need more than prompt.max_text_tokens=20"):
        encoder(tokenizer, "prompt.max_text_tokens=20").encode([long_query], answer, EX)


def test_exemplar_answers_follow_the_chain_depth(tokenizer):
    d3 = encoder(tokenizer, "chain.depth=3").encode(["Q?"], ["A [LOC] [POS] [SEG]"], EX[:1])
    assert "It is located at the bottom of the body." in d3.text
    d1 = encoder(tokenizer, "chain.depth=1").encode(["Q?"], ["It is [SEG]."], EX[:1])
    assert "ASSISTANT: Sure, it is tough and cushioned.</s>" in d1.text and "ASSISTANT: Sure, it appears on" not in d1.text


def test_question_forms():
    assert format_question("the dog's nose", "phrase") == "What is the dog's nose in this image? Please output segmentation mask."
    assert format_question("What helps it smell?", "sentence") == "What helps it smell? Please output segmentation mask."
    already = "Where to wash hands in this image? Please output segmentation mask."
    assert format_question(already, "sentence") == already


def test_a_query_holding_the_image_token_is_refused(tokenizer):
    with pytest.raises(CoresError, match="must not contain the image token"):
        encoder(tokenizer).encode(["look <image> here"], ["It is [SEG]."], [])
