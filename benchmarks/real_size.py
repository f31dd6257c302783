"""The real-size path on this machine: a full-size LLaVA-1.5-7B + SAM ViT-H base, and its load.

    python benchmarks/real_size.py --write-base /tmp/base7b        # ~15.4 GB of random weights
    python benchmarks/real_size.py --measure /tmp/base7b           # peak RSS and wall time of loading it
    python benchmarks/real_size.py --measure /tmp/base7b --json
    python benchmarks/real_size.py --device cuda                   # throughput of the full-size model on a GPU
    python benchmarks/real_size.py --device cuda --measure /tmp/base7b   # ... on the base's weights

``--write-base DIR`` writes an HF-format LLaVA-1.5-7B directory (config.json as
llava-hf/llava-1.5-7b-hf has it, a Llama-style tokenizer built offline with ``<image>`` at 32000 and
``<pad>`` at 32001, safetensors shards of random bf16 weights with the key names and shapes of
transformers' ``LlavaForConditionalGeneration``) and ``DIR/sam_vit_h_random.pth``, a random SAM
ViT-H state dict with the official key names. Tensors are created and written one shard at a
time, so the whole model is never in memory. Nothing is downloaded.

``--measure DIR`` loads that base in a fresh process per way of loading (so each peak is its own):

- ``predict``: what ``cores predict --preset llava-1.5-7b --set mllm.path=DIR --set
  sam.checkpoint=DIR/sam_vit_h_random.pth --dtype bf16`` runs (``load_for_inference``, CPU);
- ``train``: what one training process of the ``cores-7b`` recipe builds at its GPU precision
  (bf16, LoRA on): the trainer's model build, then ``prepare_for_training`` on the CPU.

Each child reports its peak RSS (``VmHWM``), the RSS of the imports alone, the wall time of the
load and the bytes of the tensors the loaded model holds; the budget is peak RSS ≤ 1.2 × those bytes.

``--layers N`` times training steps of the real-width model with N layers per stack in fp32 on
the CPU, per layer, and extrapolates to the full depth.

``--device DEVICE`` builds the ``cores-7b`` recipe's model (full depth, or ``--layers N``) directly
on the device at ``--dtype`` (bf16 on CUDA), with random weights or the ``--measure`` base's, and
reports training samples/s (forward, backward, AdamW, gradient checkpointing), teacher-forced eval
samples/s at ``--eval-batch`` (8) through the Predictor, the peak device memory of each, and the
eval time per sample over its FLOP floor (SAM ViT-H encoder ≈ 6 TFLOP + 2 × LLM parameters ×
prompt tokens, at the device's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SHARD_BYTES = 4 * 1024**3
"""Shards of about 4 GiB, as transformers' save_pretrained writes them (5 GB at most)."""

SAM_FILE = "sam_vit_h_random.pth"
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
BUDGET_RATIO = 1.2
WAYS = ("predict", "train")


# ------------------------------------------------------------------------------ the tokenizer


def build_llama_style_tokenizer():
    """The Llama-2-style tokenizer cores builds offline (``<image>`` 32000, ``<pad>`` 32001)."""
    from cores_cli.model.mllm import build_llama_style_tokenizer as build

    fast = build()
    ids = (fast.convert_tokens_to_ids("<image>"), fast.convert_tokens_to_ids("<pad>"))
    if ids != (IMAGE_TOKEN_ID, PAD_TOKEN_ID):
        raise RuntimeError(f"<image>/<pad> got ids {ids}, llava-hf has {(IMAGE_TOKEN_ID, PAD_TOKEN_ID)}")
    return fast


# ------------------------------------------------------------------------------ writing the base


def llava_hf_config():
    """config.json of llava-hf/llava-1.5-7b-hf: the preset's architecture, its token ids and
    its padded vocabulary of 32064."""
    import torch

    from cores_cli.config import llava_15_7b
    from cores_cli.model.mllm import llava_config

    mllm = llava_15_7b().mllm
    config = llava_config(mllm, mllm.text.vocab_size, IMAGE_TOKEN_ID, PAD_TOKEN_ID)
    config.pad_token_id = PAD_TOKEN_ID
    config.dtype = torch.bfloat16
    return config


def meta_shapes(module_factory) -> dict[str, tuple[tuple[int, ...], object]]:
    """Name → (shape, dtype) of every tensor in the state dict of a module built on ``meta``."""
    import torch

    with torch.device("meta"):
        module = module_factory()
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], dtype):
    """Weights of a plausible scale (norms at 1, the rest N(0, 0.02)): the values do not matter
    for loading, but a later forward pass on them should stay finite."""
    import torch

    if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight", "pre_layrnorm.weight", "post_layernorm.weight")):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, dtype=torch.float32) * 0.02).to(dtype)


def plan_shards(shapes: dict[str, tuple[tuple[int, ...], object]], element_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in shapes.items():
        nbytes = element_bytes * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_llava(out: Path) -> int:
    """The HF LLaVA directory; returns the bytes of its weights."""
    import gc

    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    config = llava_hf_config()
    config.save_pretrained(out)
    build_llama_style_tokenizer().save_pretrained(out)
    shapes = meta_shapes(lambda: LlavaForConditionalGeneration(config))
    shards = plan_shards(shapes, 2)
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        start = time.perf_counter()
        tensors = {name: random_tensor(name, shapes[name][0], torch.bfloat16) for name in names}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / filename, metadata={"format": "pt"})
        del tensors
        gc.collect()
        weight_map.update({name: filename for name in names})
        total += nbytes
        print(f"  {filename}: {len(names)} tensors, {nbytes / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    return total


def write_sam(path: Path) -> int:
    """A random SAM ViT-H state dict in fp32, as the official ``sam_vit_h_4b8939.pth`` stores it
    (2.56 GB: small enough to hold whole while torch.save writes it)."""
    import torch

    from cores_cli.config import sam_vit_h
    from cores_cli.model.sam import build_sam

    shapes = meta_shapes(lambda: build_sam(sam_vit_h()))
    state = {name: random_tensor(name, shape, dtype) for name, (shape, dtype) in shapes.items()}
    torch.save(state, path)
    return sum(t.numel() * t.element_size() for t in state.values())


def write_base(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    llava_bytes = write_llava(out)
    sam_bytes = write_sam(out / SAM_FILE)
    print(f"wrote {out}: LLaVA {llava_bytes / 1e9:.2f} GB bf16, SAM {sam_bytes / 1e9:.2f} GB fp32 ({out / SAM_FILE}) in {time.perf_counter() - start:.0f} s")


# ------------------------------------------------------------------------------ compute at real width

FULL_DEPTH = {"llm": 32, "clip": 24, "sam_windowed": 28, "sam_global": 4}
"""LLaVA-1.5-7B's 32 Llama layers and 24 CLIP layers; SAM ViT-H's 32 blocks, 4 of them global."""


@dataclass
class ComputeFigures:
    layers: int
    step_s: float
    """Forward + backward of one teacher-forced training step, one image (median of the repeats)."""
    forward_s: float
    backward_s: float
    tokens: int
    per_layer_s: dict[str, float]
    """Forward (and, for the LLM, backward) seconds of one layer of each stack."""
    extrapolated_step_s: float
    """The step with every stack at its full depth: the measured step plus the missing layers."""


class LayerClock:
    """Seconds spent inside each module of a list, forward and backward, via hooks."""

    def __init__(self, modules, backward: bool) -> None:
        self.forward = [0.0] * len(modules)
        self.backward = [0.0] * len(modules)
        self._handles = []
        for i, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._start(i)))
            self._handles.append(module.register_forward_hook(self._stop(i, self.forward)))
            if backward:
                self._handles.append(module.register_full_backward_pre_hook(self._start(i)))
                self._handles.append(module.register_full_backward_hook(self._stop(i, self.backward)))
        self._started: dict[int, float] = {}

    def _start(self, i: int):
        def hook(*_):
            self._started[i] = time.perf_counter()

        return hook

    def _stop(self, i: int, into: list[float]):
        def hook(*_):
            into[i] += time.perf_counter() - self._started.pop(i)

        return hook

    def reset(self) -> None:
        # in place: the hooks hold these very lists
        self.forward[:] = [0.0] * len(self.forward)
        self.backward[:] = [0.0] * len(self.backward)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def real_width_config(layers: int):
    """llava-1.5-7b at its real widths and token counts with ``layers`` layers per stack (CLIP
    one more: ``vision_feature_layer=-2`` needs a layer below the last); SAM's last block is
    global, the others windowed, as in ViT-H. The tokenizer is the built-in one (its ids lie
    inside the 32000-row vocabulary)."""
    from cores_cli.config import llava_15_7b
    from cores_cli.configio import apply_overrides

    return apply_overrides(
        llava_15_7b(),
        [
            "prompt.in_context_k=0",
            f"mllm.text.num_layers={layers}",
            "mllm.text.vocab_size=32000",
            f"mllm.vision.num_layers={layers + 1}",
            "mllm.image_token_index=null",
            f"sam.encoder_depth={layers}",
            f"sam.encoder_global_attn_indexes=[{layers - 1}]",
        ],
    )


def one_photo_sample():
    """A 1024×768 image with a rectangle to find: the size of a typical photo."""
    import numpy as np

    from cores_cli.data.records import ArrayMask, QARound, SegSample

    rng = np.random.default_rng(0)
    img = rng.integers(0, 80, (768, 1024, 3), dtype=np.uint8)
    mask = np.zeros((768, 1024), np.uint8)
    mask[200:450, 300:700] = 1
    img[mask == 1] = (230, 40, 40)
    return SegSample("photo", "photo.png", (QARound("what lets the vehicle roll?", ArrayMask(mask), "sentence"),), image_array=img)


def measure_compute(layers: int, repeats: int) -> ComputeFigures:
    """Teacher-forced training steps (forward, loss, backward into LoRA and the other trainable
    parts) of the real-width model in fp32 on the CPU, one image per step."""
    import statistics

    import torch

    from cores_cli.model.builder import build_model
    from cores_cli.processing.transform import SampleTransform, collate

    torch.manual_seed(0)
    model = build_model(real_width_config(layers)).train()
    batch = collate([SampleTransform.for_model(model, train=True, seed=0)(one_photo_sample())], model.tokenizer.pad_token_id)
    inner = model.llava.model
    clocks = {
        "llm": LayerClock(inner.language_model.layers, backward=True),
        "clip": LayerClock(inner.vision_tower.encoder.layers, backward=False),
        "sam": LayerClock(model.sam.image_encoder.blocks, backward=False),
    }
    steps, forwards, backwards, per_layer_runs = [], [], [], []
    for _ in range(repeats + 1):  # the first step warms up and is not counted
        for clock in clocks.values():
            clock.reset()
        start = time.perf_counter()
        out = model(batch)
        mid = time.perf_counter()
        out.loss.backward()
        end = time.perf_counter()
        model.zero_grad(set_to_none=True)
        steps.append(end - start)
        forwards.append(mid - start)
        backwards.append(end - mid)
        llm, clip, sam = clocks["llm"], clocks["clip"], clocks["sam"]
        per_layer_runs.append(
            {
                "llm_forward": statistics.mean(llm.forward),
                "llm_backward": statistics.mean(llm.backward),
                "clip_forward": statistics.mean(clip.forward),
                "sam_windowed_forward": statistics.mean(sam.forward[:-1]) if layers > 1 else float("nan"),
                "sam_global_forward": sam.forward[-1],
            }
        )
    for clock in clocks.values():
        clock.close()
    measured = per_layer_runs[1:]
    per_layer = {key: statistics.median(run[key] for run in measured) for key in measured[0]}
    step = statistics.median(steps[1:])
    windowed = per_layer["sam_windowed_forward"] if layers > 1 else per_layer["sam_global_forward"]
    missing = (
        (FULL_DEPTH["llm"] - layers) * (per_layer["llm_forward"] + per_layer["llm_backward"])
        + (FULL_DEPTH["clip"] - (layers + 1)) * per_layer["clip_forward"]
        + (FULL_DEPTH["sam_windowed"] - (layers - 1)) * windowed
        + (FULL_DEPTH["sam_global"] - 1) * per_layer["sam_global_forward"]
    )
    return ComputeFigures(
        layers=layers,
        step_s=step,
        forward_s=statistics.median(forwards[1:]),
        backward_s=statistics.median(backwards[1:]),
        tokens=int(batch.input_ids.shape[1]),
        per_layer_s=per_layer,
        extrapolated_step_s=step + missing,
    )


def describe_compute(c: ComputeFigures) -> str:
    rows = "\n".join(f"  {name}: {seconds:.2f} s per layer" for name, seconds in c.per_layer_s.items())
    return (
        f"real width, {c.layers} layer(s) per stack, fp32, CPU, 1 image ({c.tokens} LLM tokens): "
        f"training step {c.step_s:.1f} s per image (forward {c.forward_s:.1f} s, backward {c.backward_s:.1f} s)\n{rows}\n"
        f"  extrapolated to 32 LLM layers, 24 CLIP layers, 32 SAM blocks: {c.extrapolated_step_s:.0f} s per image"
    )


# ------------------------------------------------------------------------------ throughput on a device

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A6000": 155.0, "RTX 4090": 165.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
substring of ``torch.cuda.get_device_name()``; SXM figures for H100/H200 (``--peak-tflops``
overrides, e.g. 756 for an H100 PCIe)."""

SAM_VIT_H_ENCODER_FLOP = 6e12
"""The issue's estimate of one SAM ViT-H image-encoder pass at 1024 px (≈ 3 TMAC)."""


@dataclass
class DeviceFigures:
    device: str
    device_name: str
    dtype: str
    layers: str
    """``full`` (32 LLM layers, 24 CLIP, 32 SAM blocks) or the reduced depth per stack."""
    train_batch: int
    train_steps: int
    train_samples_per_s: float
    train_peak_bytes: int | None
    """Peak device memory during training (``torch.cuda.max_memory_allocated``; None on the CPU)."""
    eval_batch: int
    eval_samples_per_s: float
    eval_peak_bytes: int | None
    eval_preprocess_s_per_sample: float
    """Of the eval time, what decoding-free preprocessing (SAM and CLIP inputs) takes per sample."""
    prompt_tokens: float
    """Mean LLM sequence length of the eval batch (image tokens included)."""
    counted_flop_per_sample: float
    """FLOPs of one eval sample counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    estimated_flop_per_sample: float
    """The floor's FLOPs: SAM ViT-H encoder ≈ 6 TFLOP (scaled to the encoder's width and depth)
    + 2 × LLM parameters × prompt tokens."""
    peak_flops: float | None
    floor_ratio: float | None
    """Measured eval seconds per sample over the FLOP floor (estimated FLOPs at the bf16 peak)."""


def device_peak_flops(device, override_tflops: float | None) -> float | None:
    import torch

    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None


def device_model_config(layers: int | None, base: Path | None):
    """The ``cores-7b`` recipe's model (LLaVA-1.5-7B + SAM ViT-H, LoRA, depth-2 chain, one
    exemplar); at full depth unless ``layers`` is given; on the base's weights when given,
    else random weights."""
    from cores_cli.configio import apply_overrides
    from cores_cli.engine.train_config import load_recipe

    model = load_recipe("cores-7b", []).model
    changes = []
    if layers is not None:
        changes += [
            f"mllm.text.num_layers={layers}",
            f"mllm.vision.num_layers={layers + 1}",
            f"sam.encoder_depth={layers}",
            f"sam.encoder_global_attn_indexes=[{layers - 1}]",
        ]
    if base is not None:
        changes += [f"mllm.path={base}", f"sam.checkpoint={base / SAM_FILE}"]
    else:
        changes += ["mllm.image_token_index=null"]
    return apply_overrides(model, changes)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_device(
    cfg,
    device,
    dtype,
    tokenizer=None,
    train_batch: int = 2,
    train_steps: int = 3,
    eval_batch: int = 8,
    eval_repeats: int = 3,
    gradient_checkpointing: bool = True,
    peak_tflops: float | None = None,
) -> DeviceFigures:
    """Eval (teacher-forced, ``eval_batch`` photos with one question each, through the
    Predictor as ``cores eval`` runs it) and training steps (forward, loss, backward, AdamW on
    the trainable parts, gradient checkpointing as the recipe has it; plain torch AdamW, as
    DeepSpeed may be absent) of ``cfg``'s model built on ``device`` at ``dtype``. One warm-up
    of each is not timed."""
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cores_cli.engine.loading import exemplar_sampler
    from cores_cli.engine.predictor import Predictor, Query
    from cores_cli.model.builder import build_model
    from cores_cli.processing.transform import SampleTransform, collate

    torch.manual_seed(0)
    load_weights = bool(cfg.mllm.path)
    model = build_model(cfg, load_base_weights=load_weights, tokenizer=tokenizer, dtype=dtype, device=device)
    sample = one_photo_sample()
    pixels = sample.image_array

    # ---- eval
    predictor = Predictor(model, exemplar_sampler(model, None, 0), seed=0)
    items = [(pixels, [Query(sample.rounds[0].query, "sentence", name=f"q{i}", exemplar_key=f"q{i}")]) for i in range(eval_batch)]
    _reset_peak(device)
    predictor.predict_images(items, "teacher")  # warm-up
    times = []
    for _ in range(eval_repeats):
        _sync(device)
        start = time.perf_counter()
        predictor.predict_images(items, "teacher")
        _sync(device)
        times.append(time.perf_counter() - start)
    eval_peak = _peak_bytes(device)
    eval_s = statistics.median(times)
    start = time.perf_counter()
    for _ in range(eval_batch):
        predictor.transform.image(pixels)
    preprocess_s = (time.perf_counter() - start) / eval_batch
    image = predictor.transform.image(pixels)
    encoded = [predictor.transform.encode_queries(image, [(q.text, q.style)], q.name, exemplar_key=q.exemplar_key) for _, (q,) in items]
    prompt_tokens = statistics.mean(len(e.input_ids) for e in encoded)
    with FlopCounterMode(display=False) as counter:
        predictor.predict_images(items[:1], "teacher")
    counted = float(counter.get_total_flops())
    llm = model.llava.model.language_model
    llm_params = sum(p.numel() for p in llm.parameters()) + model.llava.get_output_embeddings().weight.numel()
    # ViT-H's figure scaled to this encoder (FLOPs grow with width squared and with depth)
    sam_flop = SAM_VIT_H_ENCODER_FLOP * (cfg.sam.encoder_embed_dim / 1280) ** 2 * cfg.sam.encoder_depth / 32
    estimated = sam_flop + 2 * llm_params * prompt_tokens

    # ---- training
    model.train()
    if gradient_checkpointing:
        model.llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    transform = SampleTransform.for_model(model, exemplar_sampler(model, None, 0), train=True, seed=0)
    batch = collate([transform(sample) for _ in range(train_batch)], model.tokenizer.pad_token_id).to(device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    _reset_peak(device)
    steps = []
    for _ in range(train_steps + 1):
        _sync(device)
        start = time.perf_counter()
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        steps.append(time.perf_counter() - start)
    train_peak = _peak_bytes(device)
    step_s = statistics.median(steps[1:])

    peak = device_peak_flops(device, peak_tflops)
    per_sample = eval_s / eval_batch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return DeviceFigures(
        device=str(device),
        device_name=name,
        dtype=str(dtype).removeprefix("torch."),
        layers="full" if cfg.mllm.text.num_layers == 32 else f"{cfg.mllm.text.num_layers}-layer",
        train_batch=train_batch,
        train_steps=train_steps,
        train_samples_per_s=train_batch / step_s,
        train_peak_bytes=train_peak,
        eval_batch=eval_batch,
        eval_samples_per_s=eval_batch / eval_s,
        eval_peak_bytes=eval_peak,
        eval_preprocess_s_per_sample=preprocess_s,
        prompt_tokens=float(prompt_tokens),
        counted_flop_per_sample=counted,
        estimated_flop_per_sample=float(estimated),
        peak_flops=peak,
        floor_ratio=(per_sample / (estimated / peak)) if peak else None,
    )


# ------------------------------------------------------------------------------ measuring a load


@dataclass
class LoadFigures:
    way: str
    wall_s: float
    peak_rss_bytes: int
    """VmHWM: the largest resident set of the process, imports included."""
    import_rss_bytes: int
    """The resident set after importing torch, transformers and cores, before loading."""
    end_rss_bytes: int
    end_rss_anon_bytes: int
    end_rss_file_bytes: int
    weight_bytes: int
    """Bytes of the parameters and buffers the loaded model holds (bf16, positions fp32)."""
    touched_peak_rss_bytes: int
    """VmHWM after reading every page of every weight once, as the first forward pass does."""
    touched_rss_file_bytes: int
    """Of the resident set then, the pages that are the safetensors files' own (memory-mapped)."""
    touch_s: float

    @property
    def ratio(self) -> float:
        """Peak RSS of the ready-to-run model (every weight resident) over the weight bytes."""
        return self.touched_peak_rss_bytes / self.weight_bytes


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model_bytes(model) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def load_once(way: str, base: Path) -> LoadFigures:
    """Load the base the way ``way`` names, in this process (meant to be a fresh one)."""
    import torch

    from cores_cli.engine.loading import load_for_inference
    from cores_cli.engine.train_config import load_recipe
    from cores_cli.engine.trainer import _build_model, prepare_for_training

    import_rss = _status_bytes("VmRSS")
    start = time.perf_counter()
    if way == "predict":
        overrides = [f"mllm.path={base}", f"sam.checkpoint={base / SAM_FILE}"]
        model = load_for_inference(None, "llava-1.5-7b", overrides, torch.device("cpu"), torch.bfloat16).model
    elif way == "train":
        recipe = load_recipe("cores-7b", [f"model.mllm.path={base}", f"model.sam.checkpoint={base / SAM_FILE}"])
        # the recipe's precision on its GPUs (train_dtype: bf16 there; fp32 on a CPU run)
        model = _build_model(recipe, None, torch.bfloat16)
        prepare_for_training(model, torch.bfloat16, torch.device("cpu"))
    else:
        raise ValueError(f"unknown way of loading {way!r}; choose from {', '.join(WAYS)}")
    wall = time.perf_counter() - start
    load_peak, end_rss, end_anon, end_file = (_status_bytes(f) for f in ("VmHWM", "VmRSS", "RssAnon", "RssFile"))
    start = time.perf_counter()
    touch_every_page(model)
    touch = time.perf_counter() - start
    return LoadFigures(
        way=way,
        wall_s=wall,
        peak_rss_bytes=load_peak,
        import_rss_bytes=import_rss,
        end_rss_bytes=end_rss,
        end_rss_anon_bytes=end_anon,
        end_rss_file_bytes=end_file,
        weight_bytes=_model_bytes(model),
        touched_peak_rss_bytes=_status_bytes("VmHWM"),
        touched_rss_file_bytes=_status_bytes("RssFile"),
        touch_s=touch,
    )


def touch_every_page(model) -> None:
    """Read one element per 4 KiB page of every parameter and buffer. transformers leaves
    weights whose dtype matches the file as views of the memory-mapped safetensors, so right
    after loading most of them are not resident yet; the first forward pass reads them all,
    and this is the footprint a running model has."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            flat = tensor.detach().reshape(-1)
            step = max(1, 4096 // tensor.element_size())
            float(flat[::step].float().sum())


def measure_in_child(way: str, base: Path) -> LoadFigures:
    argv = [sys.executable, __file__, "--load-once", way, str(base)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return LoadFigures(**json.loads(out.stdout.strip().splitlines()[-1]))


GIB = 1024**3


def describe(f: LoadFigures) -> str:
    verdict = "within" if f.ratio <= BUDGET_RATIO else "OVER"
    return (
        f"{f.way}: weights {f.weight_bytes / GIB:.2f} GiB; peak RSS {f.touched_peak_rss_bytes / GIB:.2f} GiB with every weight resident "
        f"(ratio {f.ratio:.3f}, {verdict} the {BUDGET_RATIO} budget), of it {f.touched_rss_file_bytes / GIB:.2f} GiB mapped from the files; "
        f"load {f.wall_s:.1f} s (peak RSS {f.peak_rss_bytes / GIB:.2f} GiB, after {f.end_rss_bytes / GIB:.2f} GiB: "
        f"anon {f.end_rss_anon_bytes / GIB:.2f}, file {f.end_rss_file_bytes / GIB:.2f}; imports alone {f.import_rss_bytes / GIB:.2f}), "
        f"reading every page {f.touch_s:.1f} s"
    )


def describe_device(f: DeviceFigures) -> str:
    def mem(b: int | None) -> str:
        return f"{b / GIB:.1f} GiB" if b is not None else "n/a on the CPU"

    floor = (
        f"{f.floor_ratio:.1f}× the FLOP floor ({f.estimated_flop_per_sample / 1e12:.2f} TFLOP at {f.peak_flops / 1e12:.0f} TFLOP/s)"
        if f.floor_ratio is not None
        else "no FLOP-floor ratio (no bf16 peak known for this device: --peak-tflops)"
    )
    return (
        f"{f.device_name} ({f.device}), {f.dtype}, {f.layers} model:\n"
        f"  training: {f.train_samples_per_s:.2f} samples/s (micro-batch {f.train_batch}, median of {f.train_steps} steps), peak memory {mem(f.train_peak_bytes)}\n"
        f"  eval (teacher-forced, batch {f.eval_batch}): {f.eval_samples_per_s:.2f} samples/s, {1 / f.eval_samples_per_s * 1000:.0f} ms per sample "
        f"(of it preprocessing {f.eval_preprocess_s_per_sample * 1000:.0f} ms), peak memory {mem(f.eval_peak_bytes)}\n"
        f"  {f.prompt_tokens:.0f} LLM tokens per sample; {f.counted_flop_per_sample / 1e12:.2f} TFLOP counted per sample; {floor}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-base", type=Path, metavar="DIR", help="Write the random full-size base into DIR.")
    parser.add_argument("--measure", type=Path, metavar="DIR", help="Measure loading the base in DIR.")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="Which loads to measure.")
    parser.add_argument("--layers", type=int, metavar="N", help="Time training steps of the real-width model with N layers per stack (fp32, CPU).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed steps for --layers (after one warm-up step).")
    parser.add_argument("--device", help="Measure training and eval throughput on this device (cuda, cuda:N, cpu): "
                        "the cores-7b model at full depth (or --layers N), on the --measure base's weights when given, else random.")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="With --device: the compute dtype (default bf16 on CUDA, fp32 on the CPU).")
    parser.add_argument("--eval-batch", type=int, default=8, help="With --device: teacher-forced eval batch (default 8).")
    parser.add_argument("--train-batch", type=int, default=2, help="With --device: training micro-batch (default 2, the recipe's).")
    parser.add_argument("--peak-tflops", type=float, help="With --device: the device's dense bf16 peak, when its name is not in the table.")
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON object.")
    parser.add_argument("--load-once", nargs=2, metavar=("WAY", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_once:
        way, base = args.load_once
        print(json.dumps(asdict(load_once(way, Path(base)))))
        return 0
    if args.device:
        return run_device(args, parser)
    if not (args.write_base or args.measure or args.layers):
        parser.error("give --write-base DIR, --measure DIR, --layers N and/or --device DEVICE")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be 1 or more")
    if args.write_base:
        write_base(args.write_base)
    if args.measure:
        figures = [measure_in_child(way, args.measure) for way in args.ways]
        if args.json:
            print(json.dumps({f.way: {**asdict(f), "ratio": f.ratio} for f in figures}))
        else:
            for f in figures:
                print(describe(f))
    if args.layers:
        compute = measure_compute(args.layers, args.repeats)
        print(json.dumps(asdict(compute)) if args.json else describe_compute(compute))
    return 0


def run_device(args, parser) -> int:
    import torch

    from cores_cli.runtime import resolve_device

    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be 1 or more")
    base = args.measure
    cfg = device_model_config(args.layers, base)
    tokenizer = None if base else build_llama_style_tokenizer()
    figures = measure_device(
        cfg, device, dtype, tokenizer, train_batch=args.train_batch, train_steps=args.repeats, eval_batch=args.eval_batch, eval_repeats=args.repeats, peak_tflops=args.peak_tflops
    )
    print(json.dumps(asdict(figures)) if args.json else describe_device(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
