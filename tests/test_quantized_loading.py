"""Quantized (bitsandbytes) and device-mapped loading for inference: the options reach
transformers as LISA's --load_in_8bit / --load_in_4bit would, the LLaVA they place is left
alone, and without CUDA (or bitsandbytes) they fail at once in one line. The CUDA path itself
needs a GPU, which these tests do not have: it has not been run yet (docs/INSTALL.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import cores_cli
from cores_cli.config import tiny
from cores_cli.engine.loading import check_llava_loading
from cores_cli.errors import ConfigError, CoresError
from cores_cli.model.builder import build_model
from cores_cli.model.mllm import IMAGE_TOKEN, LlavaLoading, build_llava, build_tiny_tokenizer, load_llava
from cores_cli.model.precision import cast_for_run


def test_the_options_become_transformers_bitsandbytes_settings():
    eight = LlavaLoading("8bit").from_pretrained_kwargs(torch.bfloat16)
    assert eight["quantization_config"].load_in_8bit and "device_map" not in eight
    four = LlavaLoading("4bit", "auto").from_pretrained_kwargs(torch.float16)
    config = four["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.float16
    assert four["device_map"] == "auto"
    assert LlavaLoading().from_pretrained_kwargs(torch.float32) == {} and not LlavaLoading().managed


@pytest.mark.parametrize("kwargs,message", [({"quantize": "3bit"}, r"quantize must be one of 8bit, 4bit, got '3bit'"), ({"device_map": "cuda:0"}, r"device_map must be one of auto")])
def test_unknown_values_are_refused_naming_the_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LlavaLoading(**kwargs)


def test_without_cuda_both_fail_at_once_in_one_line():
    for kwargs, shown in (({"quantize": "8bit"}, "--quantize 8bit"), ({"device_map": "auto"}, "--device-map auto")):
        with pytest.raises(CoresError, match=rf"{shown} needs a CUDA GPU .* this run is on cpu") as err:
            cores_cli.load(device="cpu", **kwargs)
        assert "\n" not in str(err.value)


def test_quantizing_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(CoresError, match=r'--quantize 4bit needs bitsandbytes: pip install "cores\[quantize\]"'):
        check_llava_loading(LlavaLoading("4bit"), torch.device("cuda"))
    check_llava_loading(LlavaLoading(device_map="auto"), torch.device("cuda"))  # accelerate only: no bitsandbytes needed


def test_a_model_without_an_hf_llava_directory_cannot_be_quantized():
    with pytest.raises(ConfigError, match=r"applies to an HF LLaVA directory \(mllm.path\)"):
        build_model(tiny_config(), llava_loading=LlavaLoading(device_map="auto"))


def test_load_llava_hands_the_settings_to_from_pretrained(tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    tok = build_tiny_tokenizer()
    build_llava(tiny().mllm, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id).save_pretrained(tmp_path / "llava")
    seen = {}
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        # bitsandbytes needs CUDA: load plainly, the settings having been seen
        plain = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
        return original(cls, path, **plain)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    load_llava(tmp_path / "llava", torch.bfloat16, LlavaLoading("8bit", "auto"))
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16


def test_a_placed_llava_is_neither_cast_nor_moved():
    model = build_model(tiny_config())
    before = {n: p.dtype for n, p in model.mllm.named_parameters()}
    cast_for_run(model, torch.bfloat16, skip=(model.mllm,))
    assert {n: p.dtype for n, p in model.mllm.named_parameters()} == before == {n: torch.float32 for n in before}
    assert {p.dtype for p in model.sam.parameters()} == {torch.bfloat16}
    assert model.projector.fc1.weight.dtype == model.refiner.norm_query.weight.dtype == torch.bfloat16
    # β takes the LLM's states on its own device and dtype (a device map may end elsewhere)
    hidden = torch.randn(1, 12, model.llava.config.text_config.hidden_size, dtype=torch.float32)
    out = model.chain_embeddings(hidden.to(torch.bfloat16), [[[3, 7]]])
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, model.cfg.sam.prompt_embed_dim)


def test_the_commands_refuse_quantizing_on_a_machine_without_cuda(tmp_path):
    from conftest import error_lines, invoke_cli

    from cores_cli.bundled import EXAMPLE_QUERY, example_image

    for args in (
        ["predict", example_image(), EXAMPLE_QUERY, "-o", tmp_path / "p", "--quantize", "8bit", "--device", "cpu"],
        ["eval", "--dataset", "synthetic:val", "--limit", "2", "--device-map", "auto", "--device", "cpu"],
    ):
        result = invoke_cli(*args)
        assert result.exit_code == 1, result.stderr
        (line,) = error_lines(result)
        assert "needs a CUDA GPU" in line
    result = invoke_cli("predict", example_image(), EXAMPLE_QUERY, "-o", tmp_path / "q", "--quantize", "2bit")
    assert result.exit_code != 0 and "quantize must be one of 8bit, 4bit" in result.stderr
    result = invoke_cli("eval", "--dataset", "synthetic:val", "--limit", "2", "--device-map", "auto", "--gpus", "2")
    (line,) = error_lines(result)
    assert "cannot be combined with --gpus" in line
