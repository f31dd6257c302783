"""Predict masks for (image, query) pairs with a loaded model: the one inference path behind
``cores predict``, ``cores eval`` and the Python API.

Teacher-forced by default: the fixed answer template (with its chain tokens) is in the input,
one forward pass for a whole batch of images and their queries, as LISA's ``validate()`` does;
the queries of one image share one SAM image-encoder pass. ``mode="generate"`` lets the LLM
write each answer (one query at a time) and reads the chain's hidden states from that same
generation (one LLM pass); when that answer does not hold exactly one complete chain, the
template is used instead and the prediction says so (``fallback=True``), so the user always
gets a mask.

The input is an image's pixels and its :class:`Query` objects: no record, no target.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..config import CHAIN_TOKENS
from ..contexts import ExemplarSampler
from ..data.records import QueryStyle
from ..errors import CoresError
from ..model.cores import CoresModel, postprocess_masks
from ..model.mllm import IMAGE_TOKEN
from ..processing.transform import EncodedSample, ImageInputs, SampleTransform, collate

Mode = Literal["teacher", "generate"]


@dataclass(frozen=True)
class Query:
    """One question about an image: what a prediction takes."""

    text: str
    style: QueryStyle | Literal["auto"] = "auto"
    """``sentence`` (a question or instruction), ``phrase`` (a few words), or ``auto`` to guess."""
    name: str = ""
    """Names the query in error messages (``cores predict``: the output's stem)."""
    exemplar_key: str | None = None
    """With a key, the in-context exemplars drawn are a function of the key alone (evaluation:
    the same whatever the batch or the number of processes); without one every query gets the
    run's seeded draw."""


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
    """One mask per chain level; the last is the final mask (only that one with ``final_only``)."""
    generated_text: str | None = None
    exemplars_used: int = 0
    query_truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    """``preprocess_s`` and ``model_s``: this query's share of its batch."""

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
        self.exemplars = exemplars
        self.transform = SampleTransform.for_model(model, exemplars, with_targets=False)
        self.param = next(model.parameters())
        self._reserved: tuple[str, ...] | None = None
        self._one_pass = True
        """Generate mode reuses the generation's hidden states; False reruns prompt and answer
        teacher-forced (the former two-pass path, kept for benchmarks/generate_speed.py and the
        tests that compare the two)."""

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

    def predict(
        self,
        pixels: np.ndarray | ImageInputs,
        query: str,
        style: QueryStyle | Literal["auto"] = "auto",
        mode: Mode = "teacher",
        sample_id: str = "",
        exemplar_key: str | None = None,
    ) -> Prediction:
        """One query about one image. ``pixels``: uint8 (H, W, 3), upright, or the image already
        made ready (:meth:`predict_images`)."""
        if not query or not query.strip():
            raise CoresError("the query is empty")
        return self.predict_images([(pixels, [Query(query, style, sample_id, exemplar_key)])], mode)[0][0]

    @torch.no_grad()
    def predict_images(
        self,
        items: Sequence[tuple[np.ndarray | ImageInputs, Sequence[Query]]],
        mode: Mode = "teacher",
        final_only: bool = False,
    ) -> list[list[Prediction]]:
        """Every query of every (pixels, queries) item: the predictions in the same nesting.
        Teacher-forced, all of them run as one batch; generated, one query at a time. A blank
        query is asked as it is (a dataset's blank sentence is scored, as LISA scores it).
        An image may come already made ready by ``self.transform.image`` (elsewhere: in a worker
        process of :mod:`cores_cli.engine.image_pipeline`); ``preprocess_s`` then counts the
        conversations only."""
        t0 = time.perf_counter()
        images = [pixels if isinstance(pixels, ImageInputs) else self.transform.image(pixels) for pixels, _ in items]
        if mode == "generate":
            return [[self._generated(image, q, final_only) for q in queries] for image, (_, queries) in zip(images, items)]
        rows = []
        for i, (image, (_, queries)) in enumerate(zip(images, items)):
            shared = f"image-{i}" if len(queries) > 1 else ""
            rows.extend(self._encode(image, q, image_key=shared) for q in queries)
        predictions = iter(self._run(rows, t0, final_only))
        return [[next(predictions) for _ in queries] for _, queries in items]

    def _encode(self, image: ImageInputs, query: Query, generate: bool = False, image_key: str = "") -> EncodedSample:
        if query.exemplar_key is None and self.exemplars is not None:
            # The same exemplars for every query of a run: a prediction does not depend on what
            # was predicted before it, and reruns give the same masks.
            self.exemplars.reseed()
        style = guess_style(query.text) if query.style == "auto" else query.style
        return self.transform.encode_queries(
            image, [(query.text, style)], query.name or "query", generate=generate, exemplar_key=query.exemplar_key, image_key=image_key
        )

    def _run(self, rows: list[EncodedSample], t0: float, final_only: bool, hidden: torch.Tensor | None = None) -> list[Prediction]:
        """One teacher-forced forward pass over ``rows`` (one target each); with ``hidden``, the
        language pass is skipped and the chain's states are read from it."""
        t1 = time.perf_counter()
        batch = collate(rows, self.model.tokenizer.pad_token_id).to(self.param.device, self.param.dtype)
        out = self.model(batch, compute_loss=False, hidden=hidden)
        levels = out.level_logits[-1:] if final_only else out.level_logits
        image_size = self.cfg.sam.image_size
        masks = []
        for t, row in enumerate(rows):
            logits = torch.cat([level[t : t + 1] for level in levels], dim=0)  # (T, 1, m, m)
            masks.append([m.cpu().numpy() > 0 for m in postprocess_masks(logits, row.input_size, row.original_size, image_size)])
        t2 = time.perf_counter()
        share = {"preprocess_s": (t1 - t0) / len(rows), "model_s": (t2 - t1) / len(rows)}
        tokens = self.level_tokens()[-1:] if final_only else self.level_tokens()
        return [
            Prediction(
                question=row.questions[0],
                answer=_clean_answer(row.answers[0]),
                mode="teacher",
                fallback=False,
                level_tokens=tokens,
                level_masks=row_masks,
                exemplars_used=row.exemplars_used,
                query_truncated=row.query_truncated,
                timings=dict(share),
            )
            for row, row_masks in zip(rows, masks)
        ]

    def _generated(self, image: ImageInputs, query: Query, final_only: bool) -> Prediction:
        """Let the LLM answer and take the chain's states from that generation (SAM's passes
        only); the template when the answer holds no usable chain. ``preprocess_s`` includes
        the generation."""
        t0 = time.perf_counter()
        prompt = self._encode(image, query, generate=True)
        batch = collate([prompt], self.model.tokenizer.pad_token_id, padding_side="left").to(self.param.device, self.param.dtype)
        new_ids = self.model.generate_answers(batch, self.max_new_tokens)[0]
        text = self.model.tokenizer.decode(new_ids, skip_special_tokens=False)
        ids = prompt.input_ids + new_ids
        try:
            positions = self.model.chain_positions(torch.tensor([ids]), [1])
        except CoresError:
            pred = self._run([self._encode(image, query)], t0, final_only)[0]
            pred.fallback = True
        else:
            # answers handed in from elsewhere (a plain list of ids) carry no states
            states = getattr(new_ids, "states", None) if self._one_pass else None
            # an answer cut by max_new_tokens right after its chain ends on a token never fed
            # back, whose state the generation did not compute: then the answer is rerun whole
            if states is not None and states.shape[0] < self.model.states_needed(positions):
                states = None
            hidden = None if states is None else states.unsqueeze(0)
            pred = self._run([prompt.with_answer(ids, text)], t0, final_only, hidden=hidden)[0]
        pred.mode = "generate"
        pred.generated_text = text
        return pred


def _clean_answer(text: str) -> str:
    return text.replace("</s>", "").strip()
