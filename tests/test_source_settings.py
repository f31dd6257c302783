"""The settings imported checkpoints rely on (issue 14): LISA's question and answer wording,
<im_start>/<im_end> around the image tokens, the hidden state at the predicting position, and
a linear (LLaVA-v0/v1) projector held exactly in the MLP's place."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_tiny, make_batch, scene_sample, tiny_config

from cores_cli.config import ChainConfig
from cores_cli.errors import CheckpointError, ConfigError
from cores_cli.model.builder import build_model
from cores_cli.model.mllm import add_chain_tokens, build_llava, build_tiny_tokenizer
from cores_cli.processing.conversation import LISA_ANSWERS, ConversationEncoder, format_question, pick_answers

N_IMAGE = 16


def wrapped_tokenizer():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<im_start>", "<im_end>"]}, replace_extra_special_tokens=False)
    add_chain_tokens(tok)
    return tok


def test_lisa_questions_are_its_validate_strings_with_the_space_after_the_image_line():
    assert format_question("the dog's  nose", "phrase", "lisa") == " What is the dog's  nose in this image? Please output segmentation mask."
    assert format_question("What helps it smell?", "sentence", "lisa") == " What helps it smell? Please output segmentation mask."
    # cores's own wording is unchanged
    assert format_question("What helps it smell?", "sentence") == "What helps it smell? Please output segmentation mask."


def test_lisa_eval_answer_is_seg_dot_and_training_draws_its_five_answers():
    chain = ChainConfig(depth=1)
    assert pick_answers(chain, 2, None, 0, "lisa") == ["[SEG].", "[SEG]."]
    drawn = set(pick_answers(chain, 200, random.Random(0), 0, "lisa"))
    assert drawn == set(LISA_ANSWERS) and len(LISA_ANSWERS) == 5


def test_the_lisa_template_needs_the_seg_only_chain():
    with pytest.raises(ConfigError, match=r"prompt\.template.*chain\.depth=1"):
        tiny_config("prompt.template=lisa")
    assert tiny_config("prompt.template=lisa", "chain.depth=1").prompt.template == "lisa"


def test_a_lisa_prompt_reads_exactly_as_lisas_validate_builds_it():
    tok = wrapped_tokenizer()
    cfg = tiny_config("prompt.template=lisa", "chain.depth=1", "prompt.cores_suffix=", "mllm.image_start_end=true")
    enc = ConversationEncoder(tok, cfg.prompt, cfg.chain, "<image>", N_IMAGE, image_start_end=True)
    out = enc.encode([format_question("the car", "phrase", "lisa")], ["[SEG]."], [])
    assert out.text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
        "and polite answers to the human's questions. USER: <im_start><image><im_end>\n What is the car in this image? "
        "Please output segmentation mask. ASSISTANT: [SEG].</s>"
    )
    ids = out.input_ids
    start, image, end = (tok.convert_tokens_to_ids(t) for t in ("<im_start>", "<image>", "<im_end>"))
    at = ids.index(start)
    assert ids[at + 1 : at + 1 + N_IMAGE] == [image] * N_IMAGE and ids[at + 1 + N_IMAGE] == end
    assert ids.count(image) == N_IMAGE


def test_image_start_end_without_those_tokens_fails_at_build_time_in_one_line():
    tok = build_tiny_tokenizer()  # a tokenizer given (as a checkpoint's or a directory's is) is not changed
    with pytest.raises(CheckpointError, match=r"no <im_start> token, which mllm.image_start_end needs") as err:
        build_model(tiny_config("mllm.image_start_end=true"), tokenizer=tok)
    assert "\n" not in str(err.value)


def test_a_random_weights_model_adds_the_wrap_tokens_to_its_built_in_tokenizer():
    model = build_model(tiny_config("mllm.image_start_end=true"))
    assert all(len(model.tokenizer.encode(t, add_special_tokens=False)) == 1 for t in ("<im_start>", "<im_end>"))


def test_the_v0_preset_builds_at_full_size_on_meta():
    from cores_cli.config import preset
    from cores_cli.model.builder import build_on_meta

    model = build_on_meta(preset("llava-7b-v0"))
    assert model.num_image_tokens == 256 and model.clip_size == 224
    assert model.llava.config.projector_hidden_act == "linear"
    assert model.llava.config.text_config.max_position_embeddings == 2048


def test_a_model_with_image_start_end_runs_and_puts_the_wrap_tokens_around_the_image():
    torch.manual_seed(0)
    model = build_model(tiny_config("mllm.image_start_end=true"), tokenizer=wrapped_tokenizer())
    batch = make_batch(model, [scene_sample()])
    row = batch.input_ids[0].tolist()
    start, end = (model.tokenizer.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_end>"))
    image = model.image_token_id
    assert row[row.index(start) + 1 : row.index(end)] == [image] * model.num_image_tokens
    out = model(batch)
    assert torch.isfinite(out.loss)


def test_hidden_at_predicting_reads_the_position_before_each_chain_token():
    model = build_tiny("chain.hidden_at=predicting").eval()
    hidden = torch.randn(2, 30, model.llava.config.text_config.hidden_size)
    positions = [[[5, 9]], [[20, 29]]]
    got = model.chain_embeddings(hidden, positions)
    want = model.projector(torch.stack([hidden[0, [4, 8]], hidden[1, [19, 28]]]))
    assert torch.equal(got, want)
    model.cfg = tiny_config()  # the default reads at the token itself
    assert torch.equal(model.chain_embeddings(hidden, positions), model.projector(torch.stack([hidden[0, [5, 9]], hidden[1, [20, 29]]])))


def test_hidden_at_changes_the_masks_of_the_same_weights():
    torch.manual_seed(0)
    token = build_tiny().eval()
    predicting = build_tiny("chain.hidden_at=predicting").eval()
    predicting.load_state_dict(token.state_dict())
    batch = make_batch(token, [scene_sample()])
    with torch.no_grad():
        a, b = token(batch, compute_loss=False).final_logits, predicting(batch, compute_loss=False).final_logits
    assert not torch.allclose(a, b)


def test_a_linear_projector_computes_exactly_its_first_layer():
    cfg = tiny_config("mllm.projector=linear").mllm
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    llava = build_llava(cfg, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    projector = llava.model.multi_modal_projector
    assert llava.config.projector_hidden_act == "linear"
    x = torch.randn(3, 5, cfg.vision.hidden_size)
    assert torch.equal(projector(x), projector.linear_1(x))
    for dtype in (torch.bfloat16,):
        projector.to(dtype)
        assert torch.equal(projector(x.to(dtype)), projector.linear_1(x.to(dtype)))
