"""One numeric policy for training and eval/predict (parameters in the run's dtype, position
buffers in fp32), and models built at the run's dtype without an fp32 copy first."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, in_process_training, make_batch, scene_sample

from cores_cli.engine.checkpoint import save_checkpoint
from cores_cli.engine.loading import load_for_inference
from cores_cli.model.precision import cast_for_run, is_position_buffer, position_buffers

CPU = torch.device("cpu")
POSITION_NAMES = ("inv_freq", "original_inv_freq", "positional_encoding_gaussian_matrix")


def assert_run_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every float parameter and ordinary buffer in ``dtype``; every position buffer fp32."""
    wrong = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
    wrong += [n for n, b in model.named_buffers() if b.is_floating_point() and b.dtype != (torch.float32 if is_position_buffer(n) else dtype)]
    assert not wrong, f"{len(wrong)} tensors break the policy, e.g. {wrong[:3]}"
    found = {n.rsplit(".", 1)[-1] for n in position_buffers(model)}
    assert found == set(POSITION_NAMES)


def test_cast_for_run_keeps_positions_fp32_and_exact():
    model = build_tiny()
    before = {n: b.clone() for n, b in position_buffers(model).items()}
    cast_for_run(model, torch.bfloat16)
    assert_run_dtypes(model, torch.bfloat16)
    for name, buf in position_buffers(model).items():
        assert torch.equal(buf, before[name]), name


def test_rotary_frequencies_rounded_to_bf16_are_recomputed_not_widened():
    model = build_tiny()
    exact = {n: b.clone() for n, b in position_buffers(model).items() if n.endswith("inv_freq")}
    model.to(torch.bfloat16)  # what a plain .to(dtype) did before: frequencies rounded
    cast_for_run(model, torch.bfloat16)
    for name, buf in position_buffers(model).items():
        if name.endswith("inv_freq"):
            assert buf.dtype == torch.float32 and torch.equal(buf, exact[name]), name


def test_train_and_eval_preparation_give_the_same_masks_and_losses(tmp_path):
    """The same weights prepared by the trainer (cast + DeepSpeed ZeRO-2 bf16) and by the
    eval/predict loader (checkpoint → load_for_inference at bf16) compute the same numbers."""
    from cores_cli.engine import deepspeed_setup as ds
    from cores_cli.engine.distributed import init_distributed
    from cores_cli.engine.train_config import load_recipe
    from cores_cli.engine.trainer import prepare_for_training

    weights = build_tiny("lora.dropout=0.0", seed=3)
    with torch.no_grad():  # LoRA B starts at zero: make LoRA part of the comparison
        for name, p in weights.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ckpt = save_checkpoint(weights, tmp_path / "ckpt")
    batch = make_batch(weights, [scene_sample("a", seed=0), scene_sample("b", seed=1)])

    evaluated = load_for_inference(ckpt, None, [], CPU, torch.bfloat16).model
    assert_run_dtypes(evaluated, torch.bfloat16)
    with torch.no_grad():
        eval_out = evaluated(batch.to(CPU, torch.bfloat16))

    recipe = load_recipe("tiny-synthetic", ["train.device=cpu", "train.precision=bf16", "train.zero_stage=2", f"train.run_dir={tmp_path / 'run'}"])
    trained = copy.deepcopy(weights)
    with in_process_training():
        init_distributed(CPU, start_alone=True, deepspeed=True)
        prepare_for_training(trained, torch.bfloat16, CPU)
        trained.configure_trainable()
        engine = ds.build_engine(trained, recipe.train, 1, torch.bfloat16, CPU)
        assert_run_dtypes(engine.module, torch.bfloat16)
        with torch.no_grad():
            train_out = engine(batch.to(CPU, torch.bfloat16))

    assert len(train_out.level_logits) == len(eval_out.level_logits) >= 2
    for level_train, level_eval in zip(train_out.level_logits, eval_out.level_logits, strict=True):
        assert level_train.dtype == level_eval.dtype == torch.bfloat16
        assert torch.equal(level_train, level_eval)  # the same kernels on the same tensors: exact
    assert set(eval_out.loss_parts()) >= {"loss", "ce", "bce", "dice"}
    assert train_out.loss_parts() == pytest.approx(eval_out.loss_parts(), rel=0, abs=0)


# ------------------------------------------------------------------ building at the run's dtype


@pytest.fixture
def fp32_parameters_created(monkeypatch):
    """Element counts of the fp32 parameters any module registers while the test runs (an fp32
    copy of the model on the way to bf16 would register them)."""
    created: list[int] = []
    register = torch.nn.Module.register_parameter

    def watched(self, name, param):
        if param is not None and param.dtype == torch.float32:
            created.append(param.numel())
        return register(self, name, param)

    monkeypatch.setattr(torch.nn.Module, "register_parameter", watched)
    return created


def lora_elements(model) -> int:
    """LoRA is on in these builds: the adapters are created at the run's dtype too (peft's
    ``autocast_adapter_dtype`` off), not widened to fp32 and cast back."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_a_bf16_build_creates_no_fp32_parameter(fp32_parameters_created):
    from conftest import tiny_config

    from cores_cli.model.builder import build_model

    model = build_model(tiny_config(), dtype=torch.bfloat16)
    assert fp32_parameters_created == [] and lora_elements(model) > 0
    assert_run_dtypes(model, torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_a_bf16_build_loads_the_llava_directory_and_sam_at_bf16(tmp_path, monkeypatch, fp32_parameters_created):
    """The HF directory goes to transformers with dtype=bfloat16 (no fp32 model in between), the
    SAM ``.pth`` goes into bf16 parameters, and its position matrix stays exact in fp32."""
    from dataclasses import replace

    from transformers import LlavaForConditionalGeneration

    from cores_cli.config import tiny
    from cores_cli.model.builder import build_model
    from cores_cli.model.mllm import build_llava, build_tiny_tokenizer
    from cores_cli.model.sam import build_sam

    cfg = tiny()
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    build_llava(cfg.mllm, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id).save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    sam_state = build_sam(cfg.sam).state_dict()
    torch.save(sam_state, tmp_path / "sam.pth")
    fp32_parameters_created.clear()  # the fixtures above were written in fp32 on purpose

    calls = []
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("dtype"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    real_style = replace(cfg, mllm=replace(cfg.mllm, path=str(tmp_path / "llava")), sam=replace(cfg.sam, checkpoint=str(tmp_path / "sam.pth")))
    model = build_model(real_style, dtype=torch.bfloat16)

    assert calls == [torch.bfloat16]
    assert fp32_parameters_created == [] and lora_elements(model) > 0
    assert_run_dtypes(model, torch.bfloat16)
    gauss = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    assert torch.equal(model.sam.state_dict()[gauss], sam_state[gauss])
    weight = "mask_decoder.output_upscaling.0.weight"
    assert torch.equal(model.sam.state_dict()[weight], sam_state[weight].to(torch.bfloat16))


def test_the_default_build_is_fp32_as_before():
    model = build_tiny()
    assert_run_dtypes(model, torch.float32)
