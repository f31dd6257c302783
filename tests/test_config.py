"""Typed configs: presets, JSON/YAML round trips, --set overrides and their errors."""

from __future__ import annotations

import json

import pytest

from cores_cli.config import PRESETS, ModelConfig, load_model_config, preset, save_model_config
from cores_cli.configio import apply_overrides, from_dict, to_dict
from cores_cli.errors import ConfigError


def test_presets_exist_with_their_defining_numbers():
    assert set(PRESETS) == {"tiny", "llava-1.5-7b", "llava-1.5-13b", "llava-7b-v0"}
    v0 = preset("llava-7b-v0").mllm
    assert (v0.num_image_tokens, v0.projector, v0.image_start_end, v0.text.rms_norm_eps) == (256, "linear", True, 1e-6)
    seven = preset("llava-1.5-7b")
    assert seven.sam.encoder_embed_dim == 1280 and seven.sam.image_size == 1024
    assert seven.mllm.text.hidden_size == 4096 and seven.mllm.num_image_tokens == 576
    assert preset("llava-1.5-13b").mllm.text.hidden_size == 5120
    t = preset("tiny")
    assert t.mllm.path is None and t.sam.checkpoint is None and t.sam.mask_size == 32
    # paper defaults
    assert (t.chain.depth, t.prompt.in_context_k) == (2, 1)
    assert (t.loss.ce, t.loss.bce, t.loss.dice) == (1.0, 2.0, 0.5)
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules) == (8, 16, 0.05, ("q_proj", "v_proj"))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_and_load_round_trip(tmp_path, suffix):
    cfg = apply_overrides(preset("tiny"), ["chain.depth=3", "prompt.in_context_k=4", "train_extra=[llm, vision_tower]"])
    path = tmp_path / f"model{suffix}"
    save_model_config(cfg, path)
    assert load_model_config(config_file=path) == cfg


def test_overrides_parse_values_by_type():
    cfg = apply_overrides(
        preset("tiny"),
        ["chain.refiner=false", "loss.dice=1", "mllm.path=/data/llava", "lora.target_modules=q_proj,k_proj,v_proj", "sam.checkpoint=null"],
    )
    assert cfg.chain.refiner is False
    assert cfg.loss.dice == 1.0 and isinstance(cfg.loss.dice, float)
    assert cfg.mllm.path == "/data/llava"
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.sam.checkpoint is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("chain.dpeth=3", "no key 'chain.dpeth'"),
        ("chain.depth=4", "chain.depth must be 1, 2 or 3"),
        ("chain.depth=two", "chain.depth: expected an integer"),
        ("chain.refiner=maybe", "expected true or false"),
        ("mllm.image_mode=stretch", "is not one of 'crop', 'pad'"),
        ("train_extra=[everything]", "unknown part 'everything'"),
        ("nodot", "not of the form key.path=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("tiny"), [override])


def test_file_may_nest_the_model_under_a_key_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  chain:\n    depth: 1\n")
    assert load_model_config("tiny", path).chain.depth == 1
    path.write_text("model:\n  chian:\n    depth: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'chian'"):
        load_model_config("tiny", path)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(config_file=tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="config file not found"):
        load_model_config(config_file=tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'llava-9b'"):
        load_model_config("llava-9b")


def test_every_table3_row_is_a_config():
    rows = {
        "LISA (depth 1)": ["chain.depth=1", "prompt.in_context_k=0"],
        "CoS only": ["chain.reasoning=false"],
        "CoR only": ["chain.segmenting=false"],
        "CoR + CoS": ["prompt.in_context_k=0"],
        "CoReS w/o refiner": ["chain.refiner=false"],
        "CoReS": [],
    }
    built = {name: apply_overrides(preset("tiny"), o) for name, o in rows.items()}
    assert built["CoS only"].chain.tokens == ("[SEG]",) and built["CoS only"].chain.levels == 2
    assert built["CoR only"].chain.tokens == ("[LOC]", "[SEG]") and built["CoR only"].chain.levels == 1
    assert built["LISA (depth 1)"].chain.levels == 1
    assert len({json.dumps(to_dict(c), sort_keys=True) for c in built.values()}) == len(rows)


def test_from_dict_round_trip_is_exact():
    cfg = preset("llava-1.5-13b")
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
