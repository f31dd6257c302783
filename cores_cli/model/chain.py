"""The chain of segmenting (paper §3.1, eq. 2–5): projector β, token refiner R, and the
level-by-level SAM mask-decoder passes.

Shapes below use N = number of targets (chains) in the batch, B = images, C = SAM's prompt
dimension (256 at real size), D = the LLM hidden size, h×w = SAM's embedding grid (64×64 at
real size) and m×m = SAM's low-res mask size (256×256 at real size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from ..config import ChainConfig


class ChainProjector(nn.Module):
    """β: hidden → hidden → C, shared by every level (LISA's ``text_hidden_fcs``)."""

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., C)."""
        return self.fc2(F.relu(self.fc1(hidden)))


def masked_average_pool(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Average of ``features`` (N, C, h, w) under soft ``weights`` (N, 1, h, w) → (N, C)."""
    total = weights.sum(dim=(2, 3)).clamp_min(eps)
    return (features * weights).sum(dim=(2, 3)) / total


class TokenRefiner(nn.Module):
    """R(h, F, m) = h + CA(h, MAP(F, m)) (eq. 4), made non-degenerate and trainable.

    The official code attends over a single prototype, where softmax is identically 1 and the
    attention weights carry no information. Here the token attends over two prototypes, the
    image embedding pooled under the previous mask (foreground) and under its complement
    (background), so what the token takes depends on how it relates to each. Attention is
    blind to the order of its keys, so each prototype also carries a learned type embedding
    (foreground / background): without it, inverting the mask would swap the prototypes and
    leave the output unchanged. The output
    projection starts small (std ``init_scale``), so R starts near identity while every weight
    gets a gradient from the first step.
    """

    def __init__(self, dim: int, num_heads: int, init_scale: float = 1e-3) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_proto = nn.LayerNorm(dim)
        self.kind = nn.Parameter(torch.randn(2, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        nn.init.normal_(self.attn.out_proj.weight, std=init_scale)
        nn.init.zeros_(self.attn.out_proj.bias)

    def prototypes(self, image_embeddings: torch.Tensor, prev_logits: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w), (N, 1, m, m) → (N, 2, C): foreground and background prototypes."""
        grid = image_embeddings.shape[-2:]
        prob = torch.sigmoid(F.interpolate(prev_logits.float(), size=grid, mode="area")).to(image_embeddings.dtype)
        fg = masked_average_pool(image_embeddings, prob)
        bg = masked_average_pool(image_embeddings, 1.0 - prob)
        return torch.stack([fg, bg], dim=1)

    def forward(self, token: torch.Tensor, image_embeddings: torch.Tensor, prev_logits: torch.Tensor) -> torch.Tensor:
        """token (N, C), image_embeddings (N, C, h, w), prev_logits (N, 1, m, m) → (N, C)."""
        protos = self.norm_proto(self.prototypes(image_embeddings, prev_logits)) + self.kind.to(token.dtype)
        query = self.norm_query(token).unsqueeze(1)
        update, _ = self.attn(query, protos, protos, need_weights=False)
        return token + update.squeeze(1)


def image_positional_encoding(sam: Sam) -> torch.Tensor:
    """SAM's dense positional encoding (1, C, h, w) in the model's dtype.

    ``PromptEncoder.get_dense_pe`` builds its coordinate grid in fp32 and fails against bf16
    weights, so the grid is built here and passed through SAM's own encoding.
    """
    layer = sam.prompt_encoder.pe_layer
    gauss = layer.positional_encoding_gaussian_matrix
    h, w = sam.prompt_encoder.image_embedding_size
    grid = torch.ones((h, w), device=gauss.device, dtype=torch.float32)
    y = (grid.cumsum(dim=0) - 0.5) / h
    x = (grid.cumsum(dim=1) - 0.5) / w
    pe = layer._pe_encoding(torch.stack([x, y], dim=-1).to(gauss.dtype))
    return pe.permute(2, 0, 1).unsqueeze(0)


def decode_masks(
    sam: Sam,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> torch.Tensor:
    """One mask-decoder pass for N prompts over B images → low-res logits (N, 1, m, m).

    SAM's decoder repeats one image embedding for every prompt it is given, so LISA calls it
    image by image. Its first step is ``src = image_embedding + dense_prompt``; giving it a zero
    image embedding and each prompt's own image embedding folded into the dense prompt computes
    the same sum for all N prompts in one batched call, through SAM's public API.
    """
    image_pe = image_positional_encoding(sam).to(image_embeddings.dtype)
    zero = image_embeddings.new_zeros((1,) + tuple(image_embeddings.shape[1:]))
    logits, _ = sam.mask_decoder(
        image_embeddings=zero,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense + image_embeddings[image_index],
        multimask_output=False,
    )
    return logits


def segment_chain(
    sam: Sam,
    refiner: TokenRefiner | None,
    cfg: ChainConfig,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    chain_embeddings: torch.Tensor,
) -> list[torch.Tensor]:
    """Run the chain of segmenting.

    Args:
        image_embeddings: (B, C, h, w), computed once per image and reused by every level.
        image_index: (N,) which image each chain belongs to.
        chain_embeddings: (N, T, C), β of the hidden states at the chain tokens, outermost first
            (T = ``len(cfg.tokens)``).

    Returns:
        One (N, 1, m, m) logits tensor per level, the final mask last. Level 0 is prompted with
        its token and SAM's "no mask" dense embedding; level t ≥ 1 with the previous level's
        logits as a soft mask prompt through SAM's own mask downscaling (eq. 2) and the token,
        refined against the previous mask when the refiner is on (eq. 3).
    """
    n = chain_embeddings.shape[0]
    dtype = image_embeddings.dtype
    if not cfg.segmenting:
        # CoS off: one decoder pass prompted with the mean of the chain's embeddings.
        tokens = [chain_embeddings.mean(dim=1)]
    elif chain_embeddings.shape[1] == 1:
        # CoR off (or depth 1): every level reuses the [SEG] embedding.
        tokens = [chain_embeddings[:, 0]] * cfg.depth
    else:
        tokens = [chain_embeddings[:, t] for t in range(chain_embeddings.shape[1])]

    sparse_none, dense_none = sam.prompt_encoder(points=None, boxes=None, masks=None)
    levels: list[torch.Tensor] = []
    for t, token in enumerate(tokens):
        token = token.to(dtype)
        if t == 0:
            sparse = sparse_none.to(dtype).expand(n, -1, -1)
            dense = dense_none.to(dtype).expand(n, -1, -1, -1)
        else:
            prev = levels[-1]
            sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=prev)
            sparse, dense = sparse.to(dtype), dense.to(dtype)
            if refiner is not None:
                token = refiner(token, image_embeddings[image_index], prev)
        prompt = torch.cat([sparse, token.unsqueeze(1)], dim=1)
        levels.append(decode_masks(sam, image_embeddings, image_index, prompt, dense))
    return levels
