"""The benchmark scripts' own logic, run small on the CPU (their figures come from running
them in full; docs/PERFORMANCE.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark, tiny_config


@pytest.fixture(scope="module")
def real_size():
    return load_benchmark("real_size")


def test_the_device_path_reports_every_figure_on_a_tiny_model(real_size):
    figures = real_size.measure_device(tiny_config(), torch.device("cpu"), torch.float32, eval_batch=2, train_batch=1, train_steps=1, eval_repeats=1, peak_tflops=2.0)
    assert figures.device == "cpu" and figures.dtype == "float32"
    assert figures.train_samples_per_s > 0 and figures.eval_samples_per_s > 0
    assert figures.train_peak_bytes is None and figures.eval_peak_bytes is None  # device memory only
    assert figures.counted_flop_per_sample > 0 and figures.prompt_tokens > 0
    # the floor is the estimated FLOPs at the given peak, and the ratio measured time over it
    assert figures.peak_flops == 2e12
    per_sample = 1 / figures.eval_samples_per_s
    assert math.isclose(figures.floor_ratio, per_sample / (figures.estimated_flop_per_sample / 2e12), rel_tol=1e-9)
    assert "samples/s" in real_size.describe_device(figures)


def test_a_cpu_has_no_flop_floor_unless_a_peak_is_given(real_size):
    assert real_size.device_peak_flops(torch.device("cpu"), None) is None
    assert real_size.device_peak_flops(torch.device("cpu"), 100.0) == 100e12


def test_the_device_model_is_the_recipes_at_full_depth_or_the_given_layers(real_size, tmp_path):
    full = real_size.device_model_config(None, None)
    assert (full.mllm.text.num_layers, full.mllm.vision.num_layers, full.sam.encoder_depth) == (32, 24, 32)
    assert full.lora.enabled and full.chain.depth == 2 and full.mllm.path is None
    two = real_size.device_model_config(2, tmp_path)
    assert (two.mllm.text.num_layers, two.mllm.vision.num_layers, two.sam.encoder_depth, list(two.sam.encoder_global_attn_indexes)) == (2, 3, 2, [1])
    assert two.mllm.path == str(tmp_path) and two.sam.checkpoint == str(tmp_path / real_size.SAM_FILE)
