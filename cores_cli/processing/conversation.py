"""Conversation building and encoding (docs/MODEL.md): the LLaVA v1 template, in-context
exemplars, answers carrying the chain tokens, labels on answer tokens only, and truncation
that never removes a chain token.

The text is ``{system} USER: {q} ASSISTANT: {a}</s>USER: ...``: exemplars come first as earlier
rounds without image (paper Fig. 3), then the real rounds, the first of which carries
``<image>\\n``. Labels are -100 everywhere except the real rounds' answers and their ``</s>``.
The single ``<image>`` placeholder is expanded to the vision tower's token count, as the HF
processor does, so chain tokens are found by id and no offset arithmetic is ever needed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from ..config import CHAIN_TOKENS, ChainConfig, PromptConfig
from ..contexts import Exemplar
from ..data.records import QueryStyle
from ..errors import CoresError
from ..ignore_values import IGNORE_INDEX
from ..model.mllm import IMAGE_TOKEN, IMAGE_WRAP_TOKENS

if TYPE_CHECKING:
    from ..model.cores import CoresModel

SHORT_QUESTION = "What is {query} in this image? Please output segmentation mask."
LONG_QUESTION = "{query} Please output segmentation mask."

IMAGE_START, IMAGE_END = IMAGE_WRAP_TOKENS

LISA_ANSWERS = ("[SEG].", "It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].")
"""LISA's answers: its ``validate()`` teacher-forces ``[SEG].`` (index 0, what eval and predict
use); training samples among all five (its ANSWER_LIST)."""

# Answer phrasings per chain. Index 0 is the fixed phrasing of eval and predict; training
# samples among all (docs/ARCHITECTURE.md). The depth-2/3 wording follows the exemplars' rendering.
ANSWER_TEMPLATES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("[SEG]",): (
        "Sure, it is [SEG].",
        "Sure, [SEG].",
        "It is [SEG].",
        "Sure, the segmentation result is [SEG].",
    ),
    ("[LOC]", "[SEG]"): (
        "Sure, it appears on [LOC]. It is [SEG].",
        "It appears on [LOC]. It is [SEG].",
        "Sure, it is usually found on [LOC]. It is [SEG].",
        "Sure, it typically appears on [LOC]. It is [SEG].",
    ),
    ("[LOC]", "[POS]", "[SEG]"): (
        "Sure, it appears on [LOC]. It is located [POS]. It is [SEG].",
        "It appears on [LOC]. It is located [POS]. It is [SEG].",
        "Sure, it is usually found on [LOC]. It lies [POS]. It is [SEG].",
        "Sure, it typically appears on [LOC]. It is located [POS]. It is [SEG].",
    ),
}


def answers_for(chain: ChainConfig, template: str = "cores") -> tuple[str, ...]:
    """The answer phrasings of a chain under a prompt template (index 0: eval and predict)."""
    if template == "lisa":
        return LISA_ANSWERS
    return ANSWER_TEMPLATES[chain.tokens]


def format_question(query: str, style: QueryStyle, template: str = "cores") -> str:
    if template == "lisa":
        # LISA's validate(): the text as given, after a space that follows the image line
        return " " + (SHORT_QUESTION if style == "phrase" else LONG_QUESTION).format(query=query)
    query = " ".join(query.split())
    if style == "phrase":
        return SHORT_QUESTION.format(query=query)
    if query.lower().endswith("segmentation mask."):
        return query
    return LONG_QUESTION.format(query=query)


def system_text(prompt: PromptConfig) -> str:
    return f"{prompt.system} {prompt.cores_suffix}".strip()


@dataclass
class Round:
    question: str
    answer: str | None
    """None = the prompt stops after ``ASSISTANT:`` (generation)."""
    supervised: bool = True


def render(system: str, exemplars: list[tuple[str, str]], rounds: list[Round], image_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation text and the character spans of the supervised answers (+ ``</s>``).
    ``image_token`` is the text that stands for the image (``<image>``, or it wrapped in
    ``<im_start>`` … ``<im_end>``)."""
    text = system + " "
    spans: list[tuple[int, int]] = []
    for q, a in exemplars:
        text += f"USER: {q} ASSISTANT: {a}</s>"
    for i, r in enumerate(rounds):
        q = f"{image_token}\n{r.question}" if i == 0 else r.question
        text += f"USER: {q} ASSISTANT:"
        if r.answer is None:
            break
        start = len(text) + 1
        text += f" {r.answer}</s>"
        if r.supervised:
            spans.append((start, len(text)))
    return text, spans


@dataclass
class Encoded:
    """Token ids with the image placeholder expanded, and their labels."""

    input_ids: list[int]
    labels: list[int]
    exemplars_used: int
    query_truncated: bool
    text: str = field(repr=False)


@dataclass
class ConversationEncoder:
    """Turns (queries, answers, exemplars) into model-ready ids under the token budget."""

    tokenizer: PreTrainedTokenizerBase
    prompt: PromptConfig
    chain: ChainConfig
    image_token: str
    num_image_tokens: int
    image_start_end: bool = False

    @classmethod
    def for_model(cls, model: CoresModel) -> ConversationEncoder:
        """The encoder of ``model``: its tokenizer, prompt and chain settings, and as many
        image tokens as its vision tower gives."""
        cfg = model.cfg
        return cls(model.tokenizer, cfg.prompt, cfg.chain, IMAGE_TOKEN, model.num_image_tokens, cfg.mllm.image_start_end)

    @property
    def image_text(self) -> str:
        """What stands for the image in the conversation text."""
        return f"{IMAGE_START}{self.image_token}{IMAGE_END}" if self.image_start_end else self.image_token

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def encode(
        self,
        questions: list[str],
        answers: list[str] | None,
        exemplars: list[Exemplar],
        sample_id: str = "",
    ) -> Encoded:
        """``answers`` None: a generation prompt for the first question (ends at ``ASSISTANT:``).

        Over budget: drop exemplars one by one, then shorten the longest question word by word;
        if the answers alone do not fit, raise a clear error (never a silent skip).
        """
        ex = [(e.question, e.render(self.chain.depth if self.chain.reasoning else 1)) for e in exemplars]
        qs = list(questions)
        budget = self.prompt.max_text_tokens
        attempt = self._encode(qs, answers, ex)
        while len(attempt.input_ids) - self.num_image_tokens + 1 > budget and ex:
            ex = ex[:-1]
            attempt = self._encode(qs, answers, ex)
        truncated = False
        while len(attempt.input_ids) - self.num_image_tokens + 1 > budget:
            longest = max(range(len(qs)), key=lambda i: len(qs[i].split()))
            words = qs[longest].split()
            if len(words) <= 1:
                raise CoresError(
                    f"sample {sample_id or '?'}: the answers alone need more than "
                    f"prompt.max_text_tokens={budget} tokens; raise the budget"
                )
            qs[longest] = " ".join(words[: max(1, int(len(words) * 0.8))])
            truncated = True
            attempt = self._encode(qs, answers, ex)
        attempt.query_truncated = truncated
        return attempt

    def _encode(self, questions: list[str], answers: list[str] | None, exemplars: list[tuple[str, str]]) -> Encoded:
        if answers is None:
            rounds = [Round(questions[0], None)]
        else:
            if len(answers) != len(questions):
                raise ValueError("one answer per question is needed")
            rounds = [Round(q, a) for q, a in zip(questions, answers)]
        text, spans = render(system_text(self.prompt), exemplars, rounds, self.image_text)
        if self.prompt.template == "lisa":
            ids, offsets = encode_as_slow_llama(self.tokenizer, text, STRIPPED_BY_SLOW_LLAMA)
        else:
            enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        for i, (s, e) in enumerate(offsets):
            if any(s < se and e > ss for ss, se in spans):
                labels[i] = ids[i]
        image_id = self.image_token_id
        if ids.count(image_id) != 1:
            raise CoresError(f"the question must not contain the image token {self.image_token!r}")
        at = ids.index(image_id)
        n = self.num_image_tokens
        ids = ids[:at] + [image_id] * n + ids[at + 1 :]
        labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
        return Encoded(ids, labels, len(exemplars), False, text)


STRIPPED_BY_SLOW_LLAMA = frozenset({*IMAGE_WRAP_TOKENS, *CHAIN_TOKENS})
"""Tokens LISA's tokenizer (transformers 4.31's slow LlamaTokenizer) added as plain added tokens:
it strips the whitespace on both sides of them."""


def encode_as_slow_llama(tokenizer: PreTrainedTokenizerBase, text: str, stripped: frozenset[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` as LISA's tokenizer makes them, with any fast
    Llama tokenizer: the text is split at the special and added tokens; the whitespace on both
    sides of a ``stripped`` token is dropped (``"ASSISTANT: [SEG]."`` → ``ASSISTANT:``, ``[SEG]``,
    ``.``; ``"<im_end>\n What"`` → ``<im_end>``, ``What``); every piece between is encoded on its
    own, with SentencePiece's prefix space (legacy mode); a BOS comes first. Splitting at
    ``<image>`` without stripping is LLaVA's ``tokenizer_image_token``, which encodes the text on
    each side of the image separately. The fast tokenizer run on the whole text instead keeps
    a ``▁`` before ``[SEG]`` (the position LISA reads) and the newline after ``<im_end>``."""
    names = sorted({*tokenizer.all_special_tokens, *stripped, IMAGE_TOKEN} - {""}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names))
    pieces: list[list] = []  # [start, end, is_token]
    at = 0
    for match in pattern.finditer(text):
        pieces.append([at, match.start(), False])
        pieces.append([match.start(), match.end(), True])
        at = match.end()
    pieces.append([at, len(text), False])
    for i, (start, end, is_token) in enumerate(pieces):
        if not (is_token and text[start:end] in stripped):
            continue
        if i > 0 and not pieces[i - 1][2]:
            left = pieces[i - 1]
            while left[1] > left[0] and text[left[1] - 1].isspace():
                left[1] -= 1
        if i + 1 < len(pieces) and not pieces[i + 1][2]:
            right = pieces[i + 1]
            while right[0] < right[1] and text[right[0]].isspace():
                right[0] += 1
    ids, offsets = [tokenizer.bos_token_id], [(0, 0)]
    for start, end, is_token in pieces:
        if start == end:
            continue
        if is_token:
            ids.append(tokenizer.convert_tokens_to_ids(text[start:end]))
            offsets.append((start, end))
            continue
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(enc["input_ids"])
        offsets.extend((start + a, start + b) for a, b in enc["offset_mapping"])
    return ids, offsets


def pick_answers(chain: ChainConfig, n_rounds: int, rng: random.Random | None, fixed_index: int, template: str = "cores") -> list[str]:
    """Training draws a phrasing per round; eval and predict use the fixed one."""
    templates = answers_for(chain, template)
    if rng is None:
        return [templates[fixed_index % len(templates)]] * n_rounds
    return [rng.choice(templates) for _ in range(n_rounds)]
