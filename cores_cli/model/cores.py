"""CoresModel: LLaVA's chain of reasoning driving SAM's chain of segmenting.

``forward`` is teacher-forced (the answer with its chain tokens is in the input, one pass, as in
LISA's training and ``validate()``); ``generate_answers`` lets the LLM write its answers and
keeps the last-layer hidden states it computed on the way, which ``forward(hidden=...)`` takes in
place of a second language pass. The model takes device and dtype from its own parameters;
callers move it once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from segment_anything.modeling import Sam
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from ..config import CHAIN_TOKENS, ModelConfig
from ..errors import CoresError
from ..ignore_values import IGNORE, IGNORE_INDEX
from .chain import ChainProjector, TokenRefiner, segment_chain
from .inputs import Batch
from .losses import answer_cross_entropy, dice_loss, sigmoid_bce
from .token_rows import ChainTokenRows

TRAINABLE_GROUPS = ("lora", "chain_token_rows", "projector", "refiner", "sam_mask_decoder")


@dataclass
class CoresOutput:
    """What a forward pass gives. N targets, T levels, m×m SAM low-res masks, S SAM input side."""

    level_logits: list[torch.Tensor]
    """T tensors (N, 1, m, m): the chain's masks, outermost first; the last is the final mask."""
    chain_embeddings: torch.Tensor
    """(N, T_tokens, C): β of the hidden states at the chain tokens."""
    loss: torch.Tensor | None = None
    loss_ce: torch.Tensor | None = None
    loss_bce: torch.Tensor | None = None
    loss_dice: torch.Tensor | None = None
    loss_intermediate: torch.Tensor | None = None

    @property
    def final_logits(self) -> torch.Tensor:
        """(N, 1, m, m)."""
        return self.level_logits[-1]

    def loss_parts(self) -> dict[str, float]:
        parts = {"loss": self.loss, "ce": self.loss_ce, "bce": self.loss_bce, "dice": self.loss_dice, "intermediate": self.loss_intermediate}
        return {k: float(v.detach()) for k, v in parts.items() if v is not None}


class AnswerIds(list):
    """One generated answer: its new token ids (a plain ``list[int]`` to every caller) and
    ``states``, the last-layer hidden states (P + K, D) the generation computed for the row's P
    prompt tokens and its first K answer tokens (every token fed back into the model, so all but
    the last, which was only predicted). The same quantity as :meth:`CoresModel.language_hidden`
    at those positions, up to the float noise of cached attention; None when unknown."""

    def __init__(self, ids: list[int], states: torch.Tensor | None = None) -> None:
        super().__init__(ids)
        self.states = states


class CoresModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        sam: Sam,
        mllm: LlavaForConditionalGeneration | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        token_rows: ChainTokenRows,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sam = sam
        self.mllm = mllm
        self.tokenizer = tokenizer
        hidden = self.llava.config.text_config.hidden_size
        dim = cfg.sam.prompt_embed_dim
        self.projector = ChainProjector(hidden, dim)
        self.refiner = TokenRefiner(dim, cfg.chain.refiner_heads, cfg.chain.refiner_init_scale)
        self.token_rows = token_rows
        token_rows.attach(self.llava.get_input_embeddings(), self.llava.get_output_embeddings())
        self.chain_token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAIN_TOKENS}
        self.configure_trainable()

    # ------------------------------------------------------------------ structure

    @property
    def llava(self) -> LlavaForConditionalGeneration:
        return self.mllm.get_base_model() if isinstance(self.mllm, PeftModel) else self.mllm

    @property
    def num_image_tokens(self) -> int:
        vc = self.llava.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + 1 if self.llava.config.vision_feature_select_strategy == "full" else n

    @property
    def clip_size(self) -> int:
        return int(self.llava.config.vision_config.image_size)

    @property
    def image_token_id(self) -> int:
        return int(self.llava.config.image_token_index)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one named group (trainable or not)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in self.named_parameters():
            groups.setdefault(_group_of(name), []).append((name, p))
        return groups

    def configure_trainable(self) -> None:
        """The paper's trainable set (LoRA, chain token rows, β, refiner, SAM mask decoder) plus
        ``cfg.train_extra``; everything else frozen."""
        extra = set(self.cfg.train_extra)
        for group, params in self.parameter_groups().items():
            trainable = group in TRAINABLE_GROUPS or group in extra
            for _, p in params:
                p.requires_grad_(trainable)

    # ------------------------------------------------------------------ passes

    def encode_images(self, sam_images: torch.Tensor, digests: list[str] | None = None) -> torch.Tensor:
        """SAM image encoder, once per image: (B, 3, S, S) → (B, C, h, w). ``digests`` (the
        processor's, one per image) name the inputs for an attached embedding cache."""
        encoder = self.sam.image_encoder
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(needs_grad):
            return encoder(sam_images)

    def language_hidden(self, batch: Batch) -> torch.Tensor:
        """Last-layer hidden states (B, L, D)."""
        out = self.llava.model(
            input_ids=batch.input_ids,
            pixel_values=batch.clip_images,
            attention_mask=batch.attention_mask,
            use_cache=False,
        )
        return out.last_hidden_state

    def chain_positions(self, input_ids: torch.Tensor, expected_counts: list[int]) -> list[list[list[int]]]:
        """Positions of each chain's tokens, per sample: ``[sample][chain] -> [pos, ...]``.

        A chain is the run of chain tokens ending at ``[SEG]``; each must spell exactly
        ``cfg.chain.tokens``. The number of chains must equal the number of targets, so a
        train/eval mismatch in masks per sample is an error, never a silent misalignment.
        """
        expected = [self.chain_token_ids[t] for t in self.cfg.chain.tokens]
        id_set = torch.tensor(list(self.chain_token_ids.values()), device=input_ids.device)
        seg = self.chain_token_ids["[SEG]"]
        result = []
        for b in range(input_ids.shape[0]):
            row = input_ids[b]
            positions = torch.isin(row, id_set).nonzero(as_tuple=True)[0].tolist()
            chains, current = [], []
            for pos in positions:
                current.append(pos)
                if int(row[pos]) == seg:
                    chains.append(current)
                    current = []
            for c in chains:
                got = [int(row[p]) for p in c]
                if got != expected:
                    names = self.tokenizer.convert_ids_to_tokens(got)
                    raise CoresError(f"sample {b}: chain {' '.join(names)} does not match the configured chain {' '.join(self.cfg.chain.tokens)}")
            if current or len(chains) != expected_counts[b]:
                raise CoresError(f"sample {b}: {len(chains)} complete chains in the text but {expected_counts[b]} targets")
            result.append(chains)
        return result

    @property
    def _state_shift(self) -> int:
        return 1 if self.cfg.chain.hidden_at == "predicting" else 0

    def states_needed(self, positions: list[list[list[int]]]) -> int:
        """How many leading hidden-state positions :meth:`chain_embeddings` reads for ``positions``."""
        return max(p for chains in positions for chain in chains for p in chain) - self._state_shift + 1

    def chain_embeddings(self, hidden: torch.Tensor, positions: list[list[list[int]]]) -> torch.Tensor:
        """Gather hidden states at the chain tokens (or, with ``chain.hidden_at: predicting``, at
        the positions just before them, whose outputs predict them) and project: → (N, T_tokens, C)."""
        shift = self._state_shift
        rows = [hidden[b, torch.tensor(chain, device=hidden.device) - shift] for b, chains in enumerate(positions) for chain in chains]
        # a LLaVA spread over several GPUs ends on another device than β and SAM
        return self.projector(torch.stack(rows).to(self.projector.fc1.weight.device))

    def forward(self, batch: Batch, compute_loss: bool = True, hidden: torch.Tensor | None = None) -> CoresOutput:
        """``hidden``: last-layer states (B, ≥ ``states_needed``, D) already computed for these
        rows (a generation's, :class:`AnswerIds`), in place of the language pass; inference only."""
        if hidden is not None and compute_loss and batch.targets is not None:
            raise ValueError("precomputed hidden states are for inference: the text loss needs the language pass")
        counts = torch.bincount(batch.target_row_index, minlength=batch.input_ids.shape[0]).tolist()
        positions = self.chain_positions(batch.input_ids, counts)
        image_embeddings = self.encode_images(batch.sam_images, batch.sam_digests)
        if hidden is None:
            hidden = self.language_hidden(batch)
        chain = self.chain_embeddings(hidden, positions)
        refiner = self.refiner if self.cfg.chain.refiner else None
        levels = segment_chain(self.sam, refiner, self.cfg.chain, image_embeddings, batch.target_image_index, chain)
        out = CoresOutput(level_logits=levels, chain_embeddings=chain)
        if compute_loss and batch.targets is not None:
            self._add_losses(out, hidden, batch)
        return out

    def _add_losses(self, out: CoresOutput, hidden: torch.Tensor, batch: Batch) -> None:
        w = self.cfg.loss
        # Text CE on answer tokens only: position i predicts token i + 1.
        shifted = batch.labels[:, 1:]
        where = shifted != IGNORE_INDEX
        logits = self.llava.lm_head(hidden[:, :-1][where])
        out.loss_ce = answer_cross_entropy(logits, shifted[where])
        size = batch.targets.shape[-1]
        valid = (batch.targets != IGNORE).float()
        target = (batch.targets == 1).float()

        def mask_terms(level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            up = F.interpolate(level.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            return sigmoid_bce(up, target, valid), dice_loss(up, target, valid)

        out.loss_bce, out.loss_dice = mask_terms(out.final_logits)
        total = w.ce * out.loss_ce + w.bce * out.loss_bce + w.dice * out.loss_dice
        if w.intermediate > 0 and len(out.level_logits) > 1:
            inter = [mask_terms(level) for level in out.level_logits[:-1]]
            out.loss_intermediate = torch.stack([w.bce * b + w.dice * d for b, d in inter]).mean()
            total = total + w.intermediate * out.loss_intermediate
        out.loss = total

    # ------------------------------------------------------------------ inference helpers

    @torch.no_grad()
    def generate_answers(self, batch: Batch, max_new_tokens: int = 64) -> list[AnswerIds]:
        """Greedy answers for a left-padded prompt batch: the new token ids per row, each with
        the hidden states the generation computed (:class:`AnswerIds`), so that the chain's
        states need no second pass over prompt and answer."""
        steps: list[torch.Tensor] = []
        owner = threading.get_ident()

        def keep(module: nn.Module, args: tuple, output) -> None:
            # the module language_hidden reads, so the same layer and final norm: called once
            # for the whole prompt, then once per token fed back; another thread's calls on a
            # shared model are not this generation's
            if threading.get_ident() == owner:
                steps.append(output.last_hidden_state)

        handle = self.llava.model.register_forward_hook(keep)
        try:
            out = self.mllm.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.clip_images,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        finally:
            handle.remove()
        new = out[:, batch.input_ids.shape[1] :]
        eos = self.tokenizer.eos_token_id
        # one forward per generated token; any other count (a generation strategy that runs
        # the model differently) leaves the states unaligned, so they are not offered
        aligned = len(steps) == new.shape[1] and new.shape[1] > 0
        rows = []
        for r, row in enumerate(new.tolist()):
            ids = row[: row.index(eos) + 1] if eos in row else row
            states = None
            if aligned:
                prompt = steps[0][r, batch.attention_mask[r].to(steps[0].device).bool()]
                fed = [s[r, -1] for s in steps[1 : min(len(ids), len(steps))]]
                states = torch.cat([prompt, torch.stack(fed)]) if fed else prompt
            rows.append(AnswerIds(ids, states))
        return rows


_UNUSED_DECODER_PARTS = (
    "sam.mask_decoder.iou_prediction_head.",
    *(f"sam.mask_decoder.output_hypernetworks_mlps.{i}." for i in range(1, 4)),
)


# Parameter name → trainable group, first match wins: (group, name prefixes, name parts).
_GROUP_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("lora", (), ("lora_",)),
    ("chain_token_rows", ("token_rows.",), ()),
    ("projector", ("projector.",), ()),
    ("refiner", ("refiner.",), ()),
    # Single-mask output never reads SAM's three multimask heads or its IoU head: their
    # gradients are identically zero, so they are frozen rather than given optimizer state.
    ("sam_mask_decoder_unused", _UNUSED_DECODER_PARTS, ()),
    ("sam_mask_decoder", ("sam.mask_decoder.",), ()),
    ("sam_image_encoder", ("sam.image_encoder.",), ()),
    ("sam_prompt_encoder", ("sam.prompt_encoder.",), ()),
    ("vision_tower", (), (".vision_tower.",)),
    ("mm_projector", (), (".multi_modal_projector.",)),
)


def _group_of(name: str) -> str:
    for group, prefixes, parts in _GROUP_RULES:
        if name.startswith(prefixes) or any(part in name for part in parts):
            return group
    return "llm"


def postprocess_masks(low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """SAM's post-processing: (K, 1, m, m) logits → (K, H, W) logits at the original size."""
    x = F.interpolate(low_res.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, size=original_size, mode="bilinear", align_corners=False)[:, 0]
