"""Training step time with and without the SAM image-embedding cache.

    python benchmarks/train_step_cache.py [--steps 8] [--recipe bench-cache] [--json]

What it does, in one process:

1. Counts forward FLOPs per sample of the paper's model (SAM ViT-H encoder at 1024², LLaMA-7B,
   CLIP ViT-L/14-336, one SAM decoder pass) and of the recipe's scaled-down model, so the
   reader can check that the encoder : LLM proportion matches (SAM's parts are counted with
   ``torch.utils.flop_counter`` on the ``meta`` device, the transformers by formula; both LLMs
   at the measured mean length of the preset's training conversations unless ``--tokens``).
2. Builds the recipe's model and a DeepSpeed engine exactly as ``cores train`` does, warms the
   cache with one pass over the recipe's images, then alternates training steps without and
   with the cache (same engine, same batches stream), so machine load affects both alike.
3. Prints the median step times and their ratio (the speed-up).

The numbers and the command are in docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cores_cli.config import ModelConfig, TextArch, VisionArch, llava_15_7b  # noqa: E402
from cores_cli.engine.train_config import load_recipe  # noqa: E402


def sam_flops(model_cfg: ModelConfig) -> tuple[float, float]:
    """Forward FLOPs of SAM's image encoder (one image) and of one mask-decoder pass."""
    from cores_cli.model.sam import build_sam

    cfg = model_cfg.sam
    g, c = cfg.embedding_size, cfg.prompt_embed_dim
    with torch.device("meta"):
        sam = build_sam(cfg)
        with FlopCounterMode(display=False) as fc:
            sam.image_encoder(torch.empty(1, 3, cfg.image_size, cfg.image_size))
        encoder = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            sam.mask_decoder(
                image_embeddings=torch.empty(1, c, g, g),
                image_pe=torch.empty(1, c, g, g),
                sparse_prompt_embeddings=torch.empty(1, 2, c),
                dense_prompt_embeddings=torch.empty(1, c, g, g),
                multimask_output=False,
            )
        decoder = fc.get_total_flops()
    return float(encoder), float(decoder)


def llm_flops(t: TextArch, tokens: int) -> float:
    """Llama forward FLOPs on ``tokens`` tokens (2 per multiply-add; the lm_head runs on the
    answer tokens only and is left out)."""
    d, kv = t.hidden_size, t.hidden_size * t.num_kv_heads // t.num_heads
    per_layer = 2 * tokens * (2 * d * d + 2 * d * kv + 3 * d * t.intermediate_size) + 4 * tokens * tokens * d
    return float(t.num_layers * per_layer)


def clip_flops(v: VisionArch) -> float:
    n = (v.image_size // v.patch_size) ** 2 + 1
    d = v.hidden_size
    per_layer = 2 * n * (4 * d * d + 2 * d * v.intermediate_size) + 4 * n * n * d
    return float(v.num_layers * per_layer + 2 * (n - 1) * 3 * v.patch_size**2 * d)


def cost_table(model_cfg: ModelConfig, tokens: int) -> dict[str, float]:
    enc, dec = sam_flops(model_cfg)
    llm = llm_flops(model_cfg.mllm.text, tokens)
    return {
        "sam_encoder": enc,
        "llm": llm,
        "clip": clip_flops(model_cfg.mllm.vision),
        "sam_decoder_pass": dec,
        "tokens": tokens,
        "encoder_to_llm": enc / llm,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="bench-cache")
    parser.add_argument("--steps", type=int, default=8, help="Measured steps per mode (after warm-up).")
    parser.add_argument("--warmup", type=int, default=2, help="Unmeasured steps per mode first.")
    parser.add_argument("--tokens", type=int, default=None, help="Sequence length for the paper model's LLM (default: the measured mean length of this preset's training conversations, which have the same parts: system prompt, exemplar, image tokens, 3 QA rounds).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override (repeatable).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe, args.overrides)

    from cores_cli.processing.mixture import MixtureDataset, load_mixture
    from cores_cli.processing.transform import SampleTransform, collate
    from cores_cli.engine import deepspeed_setup as ds
    from cores_cli.engine.distributed import init_distributed
    from cores_cli.engine.embedding_cache import attach_embedding_cache
    from cores_cli.engine.loading import exemplar_sampler
    from cores_cli.model.builder import build_model

    cfg = recipe.train
    device = torch.device("cpu")
    dist = init_distributed(device, start_alone=True, deepspeed=True)
    torch.manual_seed(cfg.seed)
    model = build_model(recipe.model)
    if cfg.gradient_checkpointing:
        model.llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mixture = load_mixture(recipe.data, cfg.seed)
    images = sum(len(s) for src in mixture.sources for _, s in src.datasets)
    transform = SampleTransform.for_model(model, exemplar_sampler(model, None, cfg.seed), train=True, seed=cfg.seed)
    data = MixtureDataset(mixture, transform, cfg.seed)
    b = cfg.micro_batch_size
    total = args.warmup + args.steps
    batches = [collate([data[i * b + j] for j in range(b)], model.tokenizer.pad_token_id) for i in range(2 * total)]
    seq = statistics.mean(int(x.attention_mask.sum(1).float().mean()) for x in batches)
    bench = cost_table(model.cfg, int(round(seq)))
    real = cost_table(llava_15_7b(), args.tokens or int(round(seq)))

    with tempfile.TemporaryDirectory(prefix="cores-sam-cache-") as cache_dir:
        cache = attach_embedding_cache(model, cache_dir)
        cached_encode = model.encode_images
        engine = ds.build_engine(model, cfg, 10**6, torch.float32, dist.device)
        # warm the cache: every image of the recipe's data once
        with torch.no_grad():
            for i in range(0, images, b):
                model.encode_images(torch.stack([transform(r).sam_image for r in _records(mixture)[i : i + b]]))
        times: dict[str, list[float]] = {"no_cache": [], "cache": []}
        encoder_s: list[float] = []
        for i, batch in enumerate(batches):
            mode = "cache" if i % 2 else "no_cache"
            if mode == "cache":
                model.encode_images = cached_encode
            else:
                del model.encode_images  # back to CoresModel.encode_images
            t0 = time.perf_counter()
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            dt = time.perf_counter() - t0
            if i // 2 >= args.warmup:
                times[mode].append(dt)
        model.encode_images = cached_encode
        with torch.no_grad():
            for batch in batches[: 2 * args.warmup]:
                t0 = time.perf_counter()
                type(model).encode_images(model, batch.sam_images)
                encoder_s.append(time.perf_counter() - t0)
        stats = {"hits": cache.stats.hits, "misses": cache.stats.misses}

    no_cache, with_cache = statistics.median(times["no_cache"]), statistics.median(times["cache"])
    result = {
        "command": "python benchmarks/train_step_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "recipe": args.recipe,
        "micro_batch_size": b,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "torch_threads": torch.get_num_threads(),
        "flops_paper_model": real,
        "flops_bench_model": bench,
        "encoder_s_per_batch": statistics.median(encoder_s),
        "step_s_no_cache": no_cache,
        "step_s_cache": with_cache,
        "speedup": no_cache / with_cache,
        "time_saved": 1 - with_cache / no_cache,
        "cache": stats,
        "steps_per_mode": args.steps,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(_report(result))
    return 0


def _records(mixture):
    return [r for src in mixture.sources for _, s in src.datasets for r in s]


def _report(r: dict) -> str:
    p, q = r["flops_paper_model"], r["flops_bench_model"]
    lines = [
        "forward FLOPs per sample          paper model (ViT-H, LLaVA-7B)   this preset",
        f"  SAM image encoder               {p['sam_encoder']:.3e}                    {q['sam_encoder']:.3e}",
        f"  LLM on {p['tokens']} / {q['tokens']} tokens          {p['llm']:.3e}                    {q['llm']:.3e}",
        f"  CLIP vision tower               {p['clip']:.3e}                    {q['clip']:.3e}",
        f"  one SAM decoder pass            {p['sam_decoder_pass']:.3e}                    {q['sam_decoder_pass']:.3e}",
        f"  encoder : LLM                   {p['encoder_to_llm']:.3f}                          {q['encoder_to_llm']:.3f}",
        "",
        f"training step, {r['micro_batch_size']} samples, gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
        f"{r['torch_threads']} thread(s), median of {r['steps_per_mode']} steps each:",
        f"  without cache   {r['step_s_no_cache']:.3f} s",
        f"  with cache      {r['step_s_cache']:.3f} s   (SAM encoder alone: {r['encoder_s_per_batch']:.3f} s per batch)",
        f"  speed-up        {r['speedup']:.2f}×   ({r['time_saved']:.0%} of the step time saved)",
        f"  cache           {r['cache']['hits']} hits, {r['cache']['misses']} misses",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
