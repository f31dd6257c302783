"""The CoReS model on the tiny preset: shapes, gradients, learning, the refiner, the ablation
switches of the paper's Table 3, and one SAM image-encoder pass per image."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_batch, scene_sample

from cores_cli.model.cores import TRAINABLE_GROUPS


def _decoder_calls(model):
    """Record the sparse prompts given to SAM's mask decoder, call by call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs["sparse_prompt_embeddings"].detach().clone())

    handle = model.sam.mask_decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_output_shapes_and_one_mask_per_level(depth):
    model = build_tiny(f"chain.depth={depth}")
    batch = make_batch(model, [scene_sample("a", 0, rounds=2), scene_sample("b", 1, rounds=1)])
    out = model(batch)
    m = model.cfg.sam.mask_size
    assert len(out.level_logits) == depth
    for level in out.level_logits:
        assert level.shape == (3, 1, m, m)
    tokens = {1: 1, 2: 2, 3: 3}[depth]
    assert out.chain_embeddings.shape == (3, tokens, model.cfg.sam.prompt_embed_dim)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_answer_template_carries_the_chain_tokens_of_its_depth():
    for depth, chain in [(1, ["[SEG]"]), (2, ["[LOC]", "[SEG]"]), (3, ["[LOC]", "[POS]", "[SEG]"])]:
        model = build_tiny(f"chain.depth={depth}")
        batch = make_batch(model, [scene_sample()])
        ids = batch.input_ids[0].tolist()
        found = [model.tokenizer.convert_ids_to_tokens(i) for i in ids if i in model.chain_token_ids.values()]
        assert found == chain


def test_gradients_reach_every_trainable_part_and_no_frozen_one():
    model = build_tiny("chain.depth=3")
    model.train()
    batch = make_batch(model, [scene_sample("a", 0, rounds=2), scene_sample("b", 1)], train=True)
    # LoRA starts with B = 0, so A's gradient is exactly zero until B has taken one step.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model(batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    groups = model.parameter_groups()
    assert set(TRAINABLE_GROUPS) <= set(groups)
    for group, params in groups.items():
        for name, p in params:
            if group in TRAINABLE_GROUPS:
                assert p.requires_grad, name
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
            else:
                assert not p.requires_grad, name
                assert p.grad is None, f"frozen {name} got a gradient"
    # the chain token rows: [LOC], [POS] and [SEG] each get their own gradient
    rows = model.token_rows
    assert (rows.embed.grad.abs().sum(1) > 0).all()
    assert (rows.head.grad.abs().sum(1) > 0).all()


def test_frozen_parts_are_the_papers():
    model = build_tiny()
    frozen = {g for g, ps in model.parameter_groups().items() if not any(p.requires_grad for _, p in ps)}
    assert frozen == {"sam_image_encoder", "sam_prompt_encoder", "sam_mask_decoder_unused", "vision_tower", "mm_projector", "llm"}
    model = build_tiny("train_extra=[sam_image_encoder,vision_tower]")
    trainable = {g for g, ps in model.parameter_groups().items() if all(p.requires_grad for _, p in ps)}
    assert {"sam_image_encoder", "vision_tower"} <= trainable


def test_a_few_steps_on_one_sample_lower_the_loss():
    model = build_tiny()
    model.train()
    batch = make_batch(model, [scene_sample("a", 3, rounds=1)], train=True, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    parts = []
    for _ in range(20):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        parts.append(out.loss_parts())
    first, last = parts[0], parts[-1]
    assert last["loss"] < 0.85 * first["loss"], (first, last)
    assert last["ce"] < first["ce"] - 0.3  # the answer text is being learned
    assert last["bce"] < 0.3 * first["bce"]  # and the mask
    assert last["dice"] < 0.5 * first["dice"]


def test_refiner_output_depends_on_the_previous_mask():
    model = build_tiny()
    refiner = model.refiner
    torch.manual_seed(0)
    token = torch.randn(2, 64)
    emb = torch.randn(2, 64, 8, 8)
    mask_a = torch.full((2, 1, 32, 32), -8.0)
    mask_a[:, :, :16] = 8.0
    mask_b = -mask_a
    with torch.no_grad():
        ra, rb = refiner(token, emb, mask_a), refiner(token, emb, mask_b)
    # near identity at init...
    assert (ra - token).abs().max() < 0.05
    # ...yet already a function of the mask, including which side of it is the object
    # (an inverted mask swaps the two prototypes)
    assert (ra - rb).abs().max() > 1e-4
    # and the attention is not degenerate: two prototypes, weights that vary with the token
    protos = refiner.prototypes(emb, mask_a)
    assert protos.shape == (2, 2, 64)
    assert not torch.allclose(protos[:, 0], protos[:, 1])
    with torch.no_grad():
        q = refiner.norm_query(token).unsqueeze(1)
        k = refiner.norm_proto(protos) + refiner.kind
        _, weights = refiner.attn(q, k, k, need_weights=True)
    assert weights.shape == (2, 1, 2)
    assert not torch.allclose(weights[0], weights[1])


def test_refiner_trains_its_weights_change():
    model = build_tiny()
    model.train()
    before = {n: p.detach().clone() for n, p in model.refiner.named_parameters()}
    batch = make_batch(model, [scene_sample("a", 0)], train=True)
    opt = torch.optim.AdamW(model.refiner.parameters(), lr=1e-3)
    model(batch).loss.backward()
    opt.step()
    changed = [n for n, p in model.refiner.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)


def test_cor_off_reuses_the_seg_embedding_at_every_level():
    model = build_tiny("chain.depth=2", "chain.reasoning=false", "chain.refiner=false")
    batch = make_batch(model, [scene_sample()])
    ids = batch.input_ids[0]
    assert (ids == model.chain_token_ids["[LOC]"]).sum() == 0
    assert (ids == model.chain_token_ids["[SEG]"]).sum() == 1
    calls, handle = _decoder_calls(model)
    out = model(batch)
    handle.remove()
    assert len(out.level_logits) == 2 and len(calls) == 2
    assert torch.equal(calls[0][:, -1], calls[1][:, -1])  # the same token prompts both levels
    assert torch.equal(calls[0][:, -1], out.chain_embeddings[:, 0])


def test_cor_on_prompts_each_level_with_its_own_token():
    model = build_tiny("chain.depth=2", "chain.refiner=false")
    batch = make_batch(model, [scene_sample()])
    calls, handle = _decoder_calls(model)
    out = model(batch)
    handle.remove()
    assert torch.equal(calls[0][:, -1], out.chain_embeddings[:, 0])  # [LOC]
    assert torch.equal(calls[1][:, -1], out.chain_embeddings[:, 1])  # [SEG]
    assert not torch.equal(calls[0][:, -1], calls[1][:, -1])


def test_cos_off_is_one_pass_with_the_mean_of_the_chain():
    model = build_tiny("chain.depth=3", "chain.segmenting=false")
    batch = make_batch(model, [scene_sample()])
    calls, handle = _decoder_calls(model)
    out = model(batch)
    handle.remove()
    assert len(out.level_logits) == 1 and len(calls) == 1
    assert out.chain_embeddings.shape[1] == 3
    assert torch.allclose(calls[0][:, -1], out.chain_embeddings.mean(1))


def test_refiner_switch_changes_only_the_later_levels_token():
    on = build_tiny("chain.depth=2", seed=0)
    off = build_tiny("chain.depth=2", "chain.refiner=false", seed=0)
    off.load_state_dict(on.state_dict())
    batch = make_batch(on, [scene_sample()])
    calls_on, h1 = _decoder_calls(on)
    calls_off, h2 = _decoder_calls(off)
    out_on, out_off = on(batch), off(batch)
    h1.remove(), h2.remove()
    assert torch.equal(calls_on[0], calls_off[0])  # level 0 is the same
    assert torch.equal(calls_off[1][:, -1], out_off.chain_embeddings[:, 1])  # unrefined
    assert not torch.equal(calls_on[1][:, -1], calls_off[1][:, -1])  # refined
    assert torch.allclose(out_on.level_logits[0], out_off.level_logits[0])


def test_later_levels_take_the_previous_mask_as_a_dense_prompt():
    model = build_tiny("chain.depth=2", "chain.refiner=false")
    batch = make_batch(model, [scene_sample()])
    dense = []
    handle = model.sam.mask_decoder.register_forward_pre_hook(lambda m, a, k: dense.append(k["dense_prompt_embeddings"].detach().clone()), with_kwargs=True)
    out = model(batch)
    handle.remove()
    # the decoder receives dense prompt + image embedding (one batched call; see decode_masks)
    image = model.encode_images(batch.sam_images)[batch.target_image_index]
    no_mask = model.sam.prompt_encoder.no_mask_embed.weight.reshape(-1)
    assert torch.allclose((dense[0] - image)[0, :, 0, 0], no_mask, atol=1e-6)
    expected = model.sam.prompt_encoder.mask_downscaling(out.level_logits[0])
    assert torch.allclose(dense[1] - image, expected, atol=1e-5)


def test_in_context_switch_adds_exemplars_to_the_prompt_only():
    from cores_cli.contexts import ExemplarSampler, make_exemplar
    from cores_cli.ignore_values import IGNORE_INDEX
    from cores_cli.processing.transform import SampleTransform

    lib = [make_exemplar("dog paw", "the end of each leg", "at the bottom of the body", "tough and cushioned with pads", "manual")]
    texts = {}
    for k in (0, 1):
        model = build_tiny(f"prompt.in_context_k={k}")
        tr = SampleTransform.for_model(model, ExemplarSampler(lib, 0))
        e = tr(scene_sample())
        texts[k] = (model.tokenizer.decode(e.input_ids), [t for t in e.labels if t != IGNORE_INDEX])
    assert "dog paw" not in texts[0][0]
    assert "What is the dog paw in this image?" in texts[1][0]
    assert "It is tough and cushioned with pads." in texts[1][0]
    assert texts[0][1] == texts[1][1]  # the exemplar is never supervised


def test_sam_image_encoder_runs_once_per_image_at_depth_3():
    model = build_tiny("chain.depth=3")
    seen = []
    handle = model.sam.image_encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    batch = make_batch(model, [scene_sample("a", 0, rounds=3), scene_sample("b", 1, rounds=2)])
    out = model(batch)
    out.loss.backward()
    handle.remove()
    assert seen == [2]  # one call, two images, for 5 targets × 3 levels


def test_chain_count_must_match_targets():
    from cores_cli.errors import CoresError

    model = build_tiny()
    batch = make_batch(model, [scene_sample("a", 0, rounds=2)])
    batch.target_row_index = batch.target_row_index[:1]
    with pytest.raises(CoresError, match="2 complete chains in the text but 1 targets"):
        model(batch)


def test_model_follows_its_parameters_dtype():
    model = build_tiny().to(torch.bfloat16)
    batch = make_batch(model, [scene_sample()]).to("cpu", torch.bfloat16)
    out = model(batch)
    assert out.final_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)


def test_batched_decoder_pass_equals_sams_image_by_image_calls():
    from cores_cli.model.chain import decode_masks, image_positional_encoding

    model = build_tiny()
    sam = model.sam
    torch.manual_seed(0)
    emb = torch.randn(3, 64, 8, 8)
    index = torch.tensor([0, 2, 2, 1, 0])
    sparse = torch.randn(5, 1, 64)
    dense = torch.randn(5, 64, 8, 8)
    batched = decode_masks(sam, emb, index, sparse, dense)
    for n in range(5):
        b = int(index[n])
        one, _ = sam.mask_decoder(emb[b : b + 1], image_positional_encoding(sam), sparse[n : n + 1], dense[n : n + 1], multimask_output=False)
        assert torch.allclose(batched[n], one[0], atol=1e-5), n
