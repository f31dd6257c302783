"""Predict masks for (image, query) pairs with a loaded model: the library API behind
``cores predict``.

Teacher-forced by default: the fixed answer template (with its chain tokens) is in the input,
one forward pass, as LISA's ``validate()`` does. ``mode="generate"`` lets the LLM write its
answer; when that answer does not hold exactly one complete chain, the template is used
instead and the prediction says so (``fallback=True``), so the user always gets a mask.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..config import CHAIN_TOKENS
from ..contexts import ExemplarSampler
from ..data.conversation import ConversationEncoder
from ..data.records import ArrayMask, QARound, QueryStyle, SegSample
from ..data.transform import EncodedSample, SampleTransform, collate
from ..errors import CoresError
from ..model.cores import CoresModel, postprocess_masks
from ..model.mllm import IMAGE_TOKEN

Mode = Literal["teacher", "generate"]


@dataclass
class Prediction:
    """One query's result. Masks are bool (H, W) at the image's original (upright) size."""

    question: str
    answer: str
    mode: Mode
    fallback: bool
    level_tokens: list[str]
    """The chain token behind each level, outermost first (``mean`` when CoS is off)."""
    level_masks: list[np.ndarray]
    """One mask per chain level; the last is the final mask."""
    generated_text: str | None = None
    exemplars_used: int = 0
    query_truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.level_masks[-1]


def reserved_token_in(query: str, tokens: Iterable[str]) -> str | None:
    """The first of ``tokens`` that ``query`` holds, else None. The tokenizer turns such text
    into the token itself: a ``[SEG]`` in a question would become a second chain, an
    ``<image>`` a second image slot."""
    return next((t for t in tokens if t and t in query), None)


def guess_style(query: str) -> QueryStyle:
    """A question or instruction is a sentence; a few words without end punctuation a phrase."""
    q = query.strip()
    return "sentence" if q.endswith(("?", ".", "!")) or len(q.split()) > 6 else "phrase"


class Predictor:
    def __init__(
        self,
        model: CoresModel,
        exemplars: ExemplarSampler | None = None,
        seed: int = 0,
        max_new_tokens: int = 64,
    ) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        encoder = ConversationEncoder(model.tokenizer, self.cfg.prompt, self.cfg.chain, "<image>", model.num_image_tokens)
        self.exemplars = exemplars
        self.transform = SampleTransform(self.cfg, encoder, exemplars, model.clip_size, train=False, with_targets=False)
        self.param = next(model.parameters())
        self._reserved: tuple[str, ...] | None = None

    def _fresh_exemplars(self) -> None:
        # The same exemplars for every query of a run: a prediction does not depend on what
        # was predicted before it, and reruns give the same masks.
        if self.exemplars is not None:
            self.exemplars.rng = random.Random(self.seed)

    def reserved_tokens(self) -> tuple[str, ...]:
        """Text a query must not hold: the chain tokens, ``<image>`` and the tokenizer's other
        special tokens (``<s>``, ``</s>``, ``<unk>``...), longest first so that a message names
        ``</s>`` rather than a shorter token inside it."""
        if self._reserved is None:
            tok = self.model.tokenizer
            special = set(CHAIN_TOKENS) | {IMAGE_TOKEN} | set(getattr(tok, "all_special_tokens", []))
            special |= {str(t) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
            self._reserved = tuple(sorted((t for t in special if t.strip()), key=lambda t: (-len(t), t)))
        return self._reserved

    def level_tokens(self) -> list[str]:
        chain = self.cfg.chain
        if not chain.segmenting:
            return ["mean"]
        return list(chain.tokens) if len(chain.tokens) == chain.depth else ["[SEG]"] * chain.depth

    @torch.no_grad()
    def predict(
        self,
        pixels: np.ndarray,
        query: str,
        style: QueryStyle | Literal["auto"] = "auto",
        mode: Mode = "teacher",
        sample_id: str = "",
        exemplar_key: str | None = None,
    ) -> Prediction:
        """``pixels``: uint8 (H, W, 3), upright. ``exemplar_key`` makes the exemplar draw a
        function of that key (evaluation); by default every query gets the run's seeded draw."""
        if not query or not query.strip():
            raise CoresError("the query is empty")
        style = guess_style(query) if style == "auto" else style
        h, w = pixels.shape[:2]
        sample = SegSample(sample_id or "query", sample_id or "query", (QARound(query, ArrayMask(np.zeros((1, 1), np.uint8)), style),), image_array=pixels)
        t0 = time.perf_counter()
        self._fresh_exemplars()
        generated_text, fallback = None, False
        enc = None
        if mode == "generate":
            enc, generated_text = self._generated(sample, exemplar_key)
            fallback = enc is None
        if enc is None:
            self._fresh_exemplars()
            enc = self.transform(sample, pixels, exemplar_key=exemplar_key)
        t1 = time.perf_counter()
        batch = collate([enc], self.model.tokenizer.pad_token_id).to(self.param.device, self.param.dtype)
        out = self.model(batch, compute_loss=False)
        levels = torch.cat(out.level_logits, dim=0)  # (T, 1, m, m): one target
        full = postprocess_masks(levels, enc.input_size, (h, w), self.cfg.sam.image_size)
        masks = [m.cpu().numpy() > 0 for m in full]
        t2 = time.perf_counter()
        answer = generated_text if (mode == "generate" and not fallback) else enc.answers[0]
        return Prediction(
            question=enc.questions[0],
            answer=_clean_answer(answer),
            mode=mode,
            fallback=fallback,
            level_tokens=self.level_tokens(),
            level_masks=masks,
            generated_text=generated_text,
            exemplars_used=enc.exemplars_used,
            query_truncated=enc.query_truncated,
            timings={"preprocess_s": t1 - t0, "model_s": t2 - t1},
        )

    def _generated(self, sample: SegSample, exemplar_key: str | None) -> tuple[EncodedSample | None, str]:
        """Let the LLM answer; return the teacher-style sample with its own answer, or None
        when the answer holds no usable chain."""
        prompt = self.transform(sample, sample.image_array, generate=True, exemplar_key=exemplar_key)
        batch = collate([prompt], self.model.tokenizer.pad_token_id, padding_side="left").to(self.param.device, self.param.dtype)
        new_ids = self.model.generate_answers(batch, self.max_new_tokens)[0]
        text = self.model.tokenizer.decode(new_ids, skip_special_tokens=False)
        ids = prompt.input_ids + new_ids
        try:
            self.model.chain_positions(torch.tensor([ids]), [1])
        except CoresError:
            return None, text
        enc = EncodedSample(**{**prompt.__dict__, "input_ids": ids, "labels": [-100] * len(ids), "answers": [text]})
        return enc, text


def _clean_answer(text: str) -> str:
    return text.replace("</s>", "").strip()
