"""One batched SAM mask-decoder call per chain level against LISA's one call per image, in
training steps of the tiny-synthetic recipe on the CPU.

    python benchmarks/decoder_batching.py --steps 6 --repeats 3

Both ways train the same model from the same weights on the same batch (8 synthetic scenes with
their question rounds, as the recipe draws them); a step is forward, loss, backward and an AdamW
update of the recipe's trainable parts. "per image" replaces ``chain.decode_masks`` by the loop
LISA runs (the decoder once per image, with that image's prompts); the losses of the first step
are compared to show the two compute the same thing. The two ways alternate over ``--repeats``
rounds; medians reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cores_cli.data.registry import load_samples  # noqa: E402
from cores_cli.engine.train_config import load_recipe  # noqa: E402
from cores_cli.model import chain  # noqa: E402
from cores_cli.model.builder import build_model  # noqa: E402
from cores_cli.processing.transform import SampleTransform, collate  # noqa: E402

BATCHED = chain.decode_masks


def per_image(sam, image_embeddings, image_index, sparse, dense):
    """LISA's way: the decoder once per image, over the prompts of that image."""
    image_pe = chain.image_positional_encoding(sam).to(image_embeddings.dtype)
    out = [None] * sparse.shape[0]
    for b in image_index.unique().tolist():
        rows = (image_index == b).nonzero(as_tuple=True)[0]
        logits, _ = sam.mask_decoder(
            image_embeddings=image_embeddings[b : b + 1], image_pe=image_pe, sparse_prompt_embeddings=sparse[rows], dense_prompt_embeddings=dense[rows], multimask_output=False
        )
        for j, n in enumerate(rows.tolist()):
            out[n] = logits[j]
    return torch.stack(out)


def steps(model, batch, n: int, decode) -> tuple[float, float]:
    """Samples/s over ``n`` training steps with ``decode``, and the first step's loss."""
    chain.decode_masks = decode  # segment_chain looks it up in its module
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    first = None
    start = time.perf_counter()
    for _ in range(n):
        loss = model(batch).loss
        first = loss.detach().item() if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    chain.decode_masks = BATCHED
    return batch.input_ids.shape[0] * n / elapsed, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    recipe = load_recipe("tiny-synthetic")
    torch.manual_seed(0)
    base = build_model(recipe.model).train()
    samples = load_samples("synthetic:train", n=8)
    batch = collate([SampleTransform.for_model(base, train=True, seed=0)(s) for s in samples], base.tokenizer.pad_token_id)
    rates = {"batched": [], "per image": []}
    losses = {}
    for _ in range(args.repeats):
        for name, decode in (("batched", BATCHED), ("per image", per_image)):
            model = copy.deepcopy(base)
            rate, loss = steps(model, batch, args.steps, decode)
            rates[name].append(rate)
            losses[name] = loss
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "samples_per_step": int(batch.input_ids.shape[0]),
        "targets_per_step": int(batch.target_row_index.shape[0]),
        "chain_depth": recipe.model.chain.depth,
        "samples_per_s": {k: round(v, 1) for k, v in medians.items()},
        "speedup": round(medians["batched"] / medians["per image"], 2),
        "rates": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "first_loss": losses,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
