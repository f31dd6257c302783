"""Trainable embedding and output rows for the chain tokens only.

LISA trains the whole ``embed_tokens`` and ``lm_head`` so that three new rows can learn:
2 × 32k × 4096 weights plus their Adam state for 3 × 2 × 4096 useful numbers. Here the rows of
the chain tokens live in this small module and are patched into the frozen matrices' outputs
by forward hooks, which also act inside ``generate``. The frozen matrices' own rows for these
ids are never read, so a reload does not depend on how they were initialised.
"""

from __future__ import annotations

import torch
from torch import nn


class ChainTokenRows(nn.Module):
    """Rows for ``token_ids``: ``embed`` (n, D) replaces the input embedding, ``head`` (n, D)
    the output logits ``h @ head.T`` at those ids."""

    def __init__(self, token_ids: list[int], embed_init: torch.Tensor, head_init: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.embed = nn.Parameter(embed_init.detach().clone())
        self.head = nn.Parameter(head_init.detach().clone())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_model(cls, token_ids: list[int], input_embeddings: nn.Embedding, output_embeddings: nn.Linear) -> ChainTokenRows:
        """Start each row at the mean of the frozen matrix's rows (deterministic, in-distribution)."""
        n = len(token_ids)
        embed = input_embeddings.weight.detach().float().mean(0, keepdim=True).expand(n, -1)
        head = output_embeddings.weight.detach().float().mean(0, keepdim=True).expand(n, -1)
        dtype = input_embeddings.weight.dtype
        return cls(token_ids, embed.to(dtype), head.to(dtype))

    def attach(self, input_embeddings: nn.Embedding, output_embeddings: nn.Linear) -> None:
        self.detach_hooks()
        self._handles = [
            input_embeddings.register_forward_hook(self._embed_hook),
            output_embeddings.register_forward_hook(self._head_hook),
        ]

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _embed_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        # slot[i] = position of id i in token_ids, or -1 for every other id
        matches = ids.unsqueeze(-1) == self.token_ids.to(ids.device)  # (..., n)
        if not bool(matches.any()):
            return output
        slot = matches.float().argmax(-1)
        is_chain = matches.any(-1, keepdim=True)
        return torch.where(is_chain, self.embed.to(device=output.device, dtype=output.dtype)[slot], output)

    def _head_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0]
        # .to(device): under a device map the embedding and lm_head may sit on other GPUs than these rows
        logits = hidden @ self.head.to(device=hidden.device, dtype=hidden.dtype).t()
        return output.index_copy(-1, self.token_ids.to(output.device), logits.to(output.dtype))

    def write_into(self, input_embeddings: nn.Embedding, output_embeddings: nn.Linear) -> None:
        """Copy the rows into the plain matrices (export to a standalone HF model)."""
        with torch.no_grad():
            input_embeddings.weight[self.token_ids] = self.embed.to(input_embeddings.weight.dtype)
            output_embeddings.weight[self.token_ids] = self.head.to(output_embeddings.weight.dtype)
