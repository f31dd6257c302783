"""``cores import``: LISA's merged checkpoints and original LLaVA weights become cores
checkpoints that predict what the source architecture predicts (issue 14).

The sources are tiny directories written with the real key names and config fields
(``tests/source_formats.py``); the reference is LISA's teacher-forced forward written there from
LISA's definition, not from cores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from source_formats import (
    IMAGE_TOKEN_INDEX,
    build_tiny_sam,
    lisa_preprocess,
    lisa_reference_forward,
    read_checkpoint_dir,
    write_clip_dir,
    write_clip_full_dir,
    write_lisa_dir,
    write_llava_original_dir,
)

from cores_cli.engine.checkpoint import load_checkpoint
from cores_cli.engine.importing import import_checkpoint
from cores_cli.errors import CheckpointError, CoresError
from cores_cli.model.cores import postprocess_masks
from cores_cli.processing.transform import SampleTransform, collate


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    clip = write_clip_dir(root / "clip", seed=1)
    lisa = write_lisa_dir(root / "lisa-7b", clip, seed=2, seg_first=False)  # LISA-7B-v1's token order, .bin shards
    return root, clip, lisa


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    _, _, lisa = sources
    out = tmp_path_factory.mktemp("imports") / "lisa"
    report = import_checkpoint(lisa.path, out, sam_preset="tiny")
    return out, report


def _photo(h: int = 60, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(5)
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    img[10:40, 20:60] = (220, 50, 40)
    return img


def _ours(model, pixels: np.ndarray, question: str, style: str):
    """Our teacher-forced pass for one question: input ids, the chain embedding, final logits."""
    transform = SampleTransform.for_model(model, with_targets=False)
    image = transform.image(pixels)
    enc = transform.encode_queries(image, [(question, style)], "q")
    batch = collate([enc], model.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(batch, compute_loss=False)
    logits = postprocess_masks(out.final_logits, image.input_size, image.original_size, model.cfg.sam.image_size)[0]
    return image, enc.input_ids, out.chain_embeddings[0], logits


# ------------------------------------------------------------------------------ LISA


def test_an_imported_lisa_checkpoint_predicts_what_lisa_computes(sources, imported):
    _, clip, lisa = sources
    out, _ = imported
    model, _ = load_checkpoint(out)
    model.eval()
    pixels = _photo()
    for question, style in (("the red car", "phrase"), ("What part of the car touches the road?", "sentence")):
        image, ids, chain, logits = _ours(model, pixels, question, style)
        ref = lisa_reference_forward(lisa, clip, image.sam_image[None], image.clip_image[None], image.input_size, image.original_size, question, style)
        # the same tokens, with LISA's placeholder standing where our image tokens are
        n = model.num_image_tokens
        p = ref.input_ids.index(IMAGE_TOKEN_INDEX)
        assert ids == ref.input_ids[:p] + [model.image_token_id] * n + ref.input_ids[p + 1 :]
        # β of the hidden state before [SEG], then SAM: LISA's numbers
        torch.testing.assert_close(chain[0], ref.seg_embedding[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_our_preprocessing_matches_lisas_on_this_photo(imported):
    out, _ = imported
    model, _ = load_checkpoint(out)
    image = SampleTransform.for_model(model, with_targets=False).image(_photo())
    sam, clip, size = lisa_preprocess(_photo(), model.cfg.sam.image_size, model.clip_size)
    assert size == image.input_size
    torch.testing.assert_close(image.sam_image, sam[0], rtol=0, atol=1e-4)
    # CLIP's bicubic resize: PIL's, as LISA's transformers 4.31 processor; allow its rounding
    assert (image.clip_image - clip[0]).abs().max() < 0.05


def test_every_lisa_tensor_lands_in_the_import_unchanged(sources, imported):
    _, clip, lisa = sources
    out, report = imported
    hf = read_checkpoint_dir(out / "llava")
    cores = load_file(str(out / "weights.safetensors"))
    src = lisa.state_dict
    rows = src["model.embed_tokens.weight"].shape[0]
    for key, tensor in src.items():
        if key.startswith("model.visual_model."):
            got = cores["sam." + key[len("model.visual_model.") :]]
        elif key.startswith("model.text_hidden_fcs.0."):
            got = cores["projector." + {"0": "fc1", "2": "fc2"}[key.split(".")[3]] + "." + key.split(".")[-1]]
        elif key == "model.mm_projector.weight":
            got = hf["model.multi_modal_projector.linear_1.weight"]
        elif key == "model.mm_projector.bias":
            got = hf["model.multi_modal_projector.linear_1.bias"]
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            name = "model.language_model.embed_tokens.weight" if key.startswith("model.") else key
            got = hf[name][:rows]
        else:
            got = hf["model.language_model." + key[len("model.") :]]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
    # the linear projector's second layer is the identity; the tower is the CLIP directory's
    width = src["model.norm.weight"].shape[0]
    assert torch.equal(hf["model.multi_modal_projector.linear_2.weight"].float(), torch.eye(width))
    clip_weights = load_file(str(clip / "model.safetensors"))
    for key, tensor in clip_weights.items():
        name = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        assert hf["model.vision_tower." + name].dtype == tensor.dtype and torch.equal(hf["model.vision_tower." + name], tensor), key
    # [SEG] keeps LISA's trained rows; the added tokens start at the mean row
    seg = lisa.seg_token_id
    ids = cores["token_rows.token_ids"].tolist()
    assert torch.equal(cores["token_rows.embed"][ids.index(seg)], src["model.embed_tokens.weight"][seg])
    assert torch.equal(cores["token_rows.head"][ids.index(seg)], src["lm_head.weight"][seg])
    assert report.added_tokens == ["<image>", "[LOC]", "[POS]"]
    assert hf["model.language_model.embed_tokens.weight"].shape[0] == rows + 3


def test_the_import_is_a_cores_checkpoint_with_lisas_settings(imported):
    out, _ = imported
    meta = json.loads((out / "config.json").read_text())
    model = meta["model"]
    assert model["mllm"]["path"] == "llava" and model["lora"]["enabled"] is False
    assert (model["chain"]["depth"], model["chain"]["hidden_at"], model["prompt"]["template"]) == (1, "predicting", "lisa")
    assert model["mllm"]["image_start_end"] is True and model["mllm"]["projector"] == "linear"
    assert meta["extra"]["source_format"] == "lisa"
    # the HF directory stands alone
    from transformers import LlavaForConditionalGeneration

    assert isinstance(LlavaForConditionalGeneration.from_pretrained(out / "llava"), LlavaForConditionalGeneration)


def test_a_lisa_13b_style_directory_in_safetensors_with_a_full_clip_model_imports(tmp_path):
    clip_vision = write_clip_dir(tmp_path / "clip-v", seed=3)
    clip_full = write_clip_full_dir(tmp_path / "clip-full", seed=3, vision_dir=clip_vision)
    lisa = write_lisa_dir(tmp_path / "lisa-13b", clip_full, seed=4, seg_first=True, fmt="safetensors", shards=3)
    report = import_checkpoint(lisa.path, tmp_path / "out", sam_preset="tiny")
    assert report.dropped.get("CLIP's text half and projections: LLaVA reads the vision tower's hidden states only", 0) > 0
    model, _ = load_checkpoint(tmp_path / "out")
    assert model.chain_token_ids["[SEG]"] == lisa.seg_token_id == 1000


# ------------------------------------------------------------------------------ original LLaVA


@pytest.mark.parametrize("version", ["v0", "v1", "v1.5"])
def test_original_llava_weights_import_with_an_exact_projector(version, sources, tmp_path):
    _, clip, _ = sources
    llava = write_llava_original_dir(tmp_path / "llava-src", version, seed=6, clip_dir=clip)
    sam = tmp_path / "sam.pth"
    torch.save(build_tiny_sam().state_dict(), sam)
    import_checkpoint(llava.path, tmp_path / "out", sam=sam, sam_preset="tiny")
    model, _ = load_checkpoint(tmp_path / "out")
    src = read_checkpoint_dir(llava.path)
    projector = model.llava.model.multi_modal_projector
    x = torch.randn(2, 3, projector.linear_1.in_features)
    if version in ("v0", "v1"):
        reference = x @ src["model.mm_projector.weight"].float().t() + src["model.mm_projector.bias"].float()
        assert model.cfg.mllm.projector == "linear" and model.cfg.mllm.image_start_end == (version == "v0")
    else:
        hidden = torch.nn.functional.gelu(x @ src["model.mm_projector.0.weight"].float().t() + src["model.mm_projector.0.bias"].float())
        reference = hidden @ src["model.mm_projector.2.weight"].float().t() + src["model.mm_projector.2.bias"].float()
        assert model.cfg.mllm.projector == "mlp2x_gelu" and model.cfg.mllm.image_mode == "pad"
    with torch.no_grad():
        got = projector.float()(x)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    # every source tensor is in the HF directory unchanged
    hf = read_checkpoint_dir(tmp_path / "out" / "llava")
    renamed = {"model.mm_projector.weight": "model.multi_modal_projector.linear_1.weight", "model.mm_projector.bias": "model.multi_modal_projector.linear_1.bias"}
    for key, tensor in src.items():
        if key.startswith("model.mm_projector."):
            name = renamed.get(key) or key.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.").replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
        elif key.startswith("lm_head."):
            name = key
        else:
            name = "model.language_model." + key[len("model.") :]
        stored = hf[name][: tensor.shape[0]] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else hf[name]
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), key
    # a CoReS base: the default chain, fresh β
    assert model.cfg.chain.depth == 2 and model.cfg.prompt.template == "cores"


def test_an_original_llava_with_its_own_vision_tower_uses_it(sources, tmp_path):
    _, clip, _ = sources
    llava = write_llava_original_dir(tmp_path / "src", "v1.5", seed=7, clip_dir=clip, with_vision_tower=True)
    sam = tmp_path / "sam.pth"
    torch.save(build_tiny_sam().state_dict(), sam)
    report = import_checkpoint(llava.path, tmp_path / "out", sam=sam, sam_preset="tiny")
    assert any("vision tower taken from the source" in d for d in report.decisions)
    hf = read_checkpoint_dir(tmp_path / "out" / "llava")
    src = read_checkpoint_dir(llava.path)
    key = "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(hf["model.vision_tower.embeddings.patch_embedding.weight"], src[key])


# ------------------------------------------------------------------------------ errors


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _rewrite_index(path: Path, change) -> None:
    """Change the tensors of every .bin shard with ``change(name, state)``."""
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = torch.load(path / shard, weights_only=True)
        change(state)
        torch.save(state, path / shard)
        for name in list(index["weight_map"]):
            if index["weight_map"][name] == shard and name not in state:
                del index["weight_map"][name]
        index["weight_map"].update({name: shard for name in state})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_a_missing_tensor_is_named(sources, tmp_path):
    _, _, lisa = sources
    src = _copy(lisa.path, tmp_path / "src")
    _rewrite_index(src, lambda state: state.pop("model.layers.1.mlp.up_proj.weight", None))
    with pytest.raises(CheckpointError, match=r"missing model\.language_model\.layers\.1\.mlp\.up_proj\.weight") as err:
        import_checkpoint(src, tmp_path / "out", sam_preset="tiny")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_an_unknown_tensor_is_named(sources, tmp_path):
    _, _, lisa = sources
    src = _copy(lisa.path, tmp_path / "src")

    def add(state):
        if "lm_head.weight" in state:
            state["model.seg_decoder.extra.weight"] = torch.zeros(2)

    _rewrite_index(src, add)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) of no known lisa part: model\.seg_decoder\.extra\.weight"):
        import_checkpoint(src, tmp_path / "out", sam_preset="tiny")


def test_a_tensor_of_the_wrong_shape_is_named(sources, tmp_path):
    _, _, lisa = sources
    src = _copy(lisa.path, tmp_path / "src")

    def shrink(state):
        if "model.layers.0.self_attn.q_proj.weight" in state:
            state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:-1]

    _rewrite_index(src, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight has shape \(63, 64\), the config makes it \(64, 64\)"):
        import_checkpoint(src, tmp_path / "out", sam_preset="tiny")
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_says_what_was_looked_for(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"neither LISA's .* nor original LLaVA's .*: pass --format"):
        import_checkpoint(src, tmp_path / "out")


def test_an_hf_llava_directory_is_pointed_to_mllm_path(imported, tmp_path):
    out, _ = imported
    with pytest.raises(CheckpointError, match=r"HF LLaVA directory .* --set mllm.path="):
        import_checkpoint(out / "llava", tmp_path / "again")


def test_an_original_llava_needs_a_sam(sources, tmp_path):
    _, clip, _ = sources
    llava = write_llava_original_dir(tmp_path / "src", "v0", seed=6, clip_dir=clip)
    with pytest.raises(CoresError, match=r"pass --sam"):
        import_checkpoint(llava.path, tmp_path / "out", sam_preset="tiny")


def test_the_output_never_overlaps_the_source_nor_replaces_a_foreign_directory(sources, imported, tmp_path):
    _, _, lisa = sources
    with pytest.raises(CoresError, match=r"overlaps the input"):
        import_checkpoint(lisa.path, lisa.path / "converted", sam_preset="tiny")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CoresError, match=r"exists: pass --overwrite"):
        import_checkpoint(lisa.path, mine, sam_preset="tiny")
    with pytest.raises(CoresError, match=r"not an earlier import"):
        import_checkpoint(lisa.path, mine, sam_preset="tiny", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_lisa_directory_given_to_predict_says_to_import_it(sources, tmp_path):
    from conftest import error_lines, invoke_predict

    _, _, lisa = sources
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(_photo()).save(image)
    result = invoke_predict(image, "the car", "-c", lisa.path, "-o", tmp_path / "pred")
    assert result.exit_code != 0
    (line,) = error_lines(result)
    assert "is a LISA checkpoint" in line and "cores import" in line


# ------------------------------------------------------------------------------ the command


def test_import_then_predict_and_eval_from_the_command_line(sources, tmp_path):
    from conftest import invoke_cli
    from PIL import Image

    root, clip, lisa = sources
    llava = write_llava_original_dir(tmp_path / "llava-v0", "v0", seed=8, clip_dir=clip)
    sam = tmp_path / "sam.pth"
    torch.save(build_tiny_sam().state_dict(), sam)
    image = tmp_path / "img.png"
    Image.fromarray(_photo()).save(image)
    for name, args in (("lisa", [lisa.path]), ("v0", [llava.path, "--sam", sam])):
        out = tmp_path / f"imported-{name}"
        result = invoke_cli("import", args[0], out, "--sam-preset", "tiny", *args[1:])
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == str(out)
        assert "tensors mapped" in result.stderr
        result = invoke_cli("predict", image, "what part of the car touches the road?", "-c", out, "-o", tmp_path / f"pred-{name}", "--json")
        assert result.exit_code == 0, result.stderr
        record = json.loads(result.stdout.splitlines()[-1])
        assert record["answer"] == ("[SEG]." if name == "lisa" else "Sure, it appears on [LOC]. It is [SEG].")
        assert (tmp_path / f"pred-{name}" / "img.mask.png").is_file()
        result = invoke_cli("eval", "-c", out, "--dataset", "synthetic:val", "--limit", "8", "--output", tmp_path / f"eval-{name}")
        assert result.exit_code == 0, result.stderr


def test_import_of_an_unknown_directory_is_one_error_line(tmp_path):
    from conftest import error_lines, invoke_cli

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = invoke_cli("import", src, tmp_path / "out")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "neither LISA's" in line


def test_predict_and_import_take_hub_ids_from_an_offline_cache(sources, imported, offline_hub, tmp_path):
    from conftest import error_lines, invoke_cli
    from PIL import Image

    _, clip, lisa = sources
    out, _ = imported
    offline_hub("someone/cores-lisa-tiny", out)
    image = tmp_path / "img.png"
    Image.fromarray(_photo()).save(image)
    result = invoke_cli("predict", image, "the red car", "-c", "someone/cores-lisa-tiny", "-o", tmp_path / "pred", "--json")
    assert result.exit_code == 0, result.stderr
    local = invoke_cli("predict", image, "the red car", "-c", out, "-o", tmp_path / "pred-local", "--json")
    assert local.exit_code == 0, local.stderr
    assert (tmp_path / "pred" / "img.mask.png").read_bytes() == (tmp_path / "pred-local" / "img.mask.png").read_bytes()
    # a LISA-format repository: import it from its id (the CLIP tower by id too)
    offline_hub("xinlai/LISA-tiny", lisa.path)
    offline_hub("openai/clip-tiny", clip)
    result = invoke_cli("import", "xinlai/LISA-tiny", tmp_path / "from-hub", "--clip", "openai/clip-tiny", "--sam-preset", "tiny")
    assert result.exit_code == 0, result.stderr
    # ...and given to predict as it is, it says to import it
    result = invoke_cli("predict", image, "the red car", "-c", "xinlai/LISA-tiny", "-o", tmp_path / "pred2")
    (line,) = error_lines(result)
    assert "is a LISA checkpoint" in line and "cores import" in line
    result = invoke_cli("predict", image, "the red car", "-c", "nobody/missing", "-o", tmp_path / "pred3")
    (line,) = error_lines(result)
    assert "not in the cache" in line and "HF_HUB_OFFLINE" in line


def test_a_large_model_is_written_in_several_shards_equal_to_one(sources, imported, tmp_path, monkeypatch):
    import cores_cli.engine.importing as importing

    _, _, lisa = sources
    single, _ = imported
    monkeypatch.setattr(importing, "SHARD_BYTES", 64 * 1024)
    import_checkpoint(lisa.path, tmp_path / "sharded", sam_preset="tiny")
    llava = tmp_path / "sharded" / "llava"
    index = json.loads((llava / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((llava / s).is_file() for s in shards)
    assert not list(llava.glob(".shard-*"))
    sharded, whole = read_checkpoint_dir(llava), read_checkpoint_dir(single / "llava")
    assert sharded.keys() == whole.keys()
    assert all(torch.equal(tensor, whole[name]) for name, tensor in sharded.items())


def test_llava_delta_weights_are_refused_with_the_fix(sources, tmp_path):
    _, clip, _ = sources
    llava = write_llava_original_dir(tmp_path / "LLaVA-7b-delta-v0", "v0", seed=6, clip_dir=clip)
    with pytest.raises(CheckpointError, match=r"delta weights .* apply_delta"):
        import_checkpoint(llava.path, tmp_path / "out", sam=tmp_path / "sam.pth", sam_preset="tiny")


def test_a_hub_id_with_a_revision_resolves_that_snapshot(imported, offline_hub, tmp_path):
    from cores_cli.engine.loading import resolve_checkpoint

    out, _ = imported
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = offline_hub("someone/cores-rev", out, commit=commit)
    assert resolve_checkpoint(f"someone/cores-rev@{commit}") == snapshot
    with pytest.raises(CoresError, match=r"someone/cores-rev@0000000000000000000000000000000000000000 is not in the cache"):
        resolve_checkpoint("someone/cores-rev@" + "0" * 40)


def test_the_import_reports_its_progress_tensor_by_tensor(sources, tmp_path):
    _, _, lisa = sources
    calls: list[tuple[int, int]] = []
    import_checkpoint(lisa.path, tmp_path / "out", sam_preset="tiny", progress=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1 and [done for done, _ in calls] == list(range(1, totals.pop() + 1))
    assert calls[-1][0] == len(read_checkpoint_dir(tmp_path / "out" / "llava"))  # one call per tensor written
