"""The training mixture: sources drawn at their rates, as a deterministic stream of samples.

LISA draws each training sample by picking a dataset *group* at the configured sample rates
(``sem_seg``, ``refer_seg``, ``vqa``, ``reason_seg`` at 9/3/3/1), then one dataset of the group
uniformly, then one sample of it uniformly, independently for every sample. We draw the same
way, but as a pure function of a global sample index: sample ``i`` comes from
``numpy.random.default_rng([seed, i, attempt])`` alone. So

- the stream is the same whatever the number of DataLoader workers or processes;
- resuming continues it exactly: a checkpoint stores how many samples were consumed;
- processes split it without a shuffle (``StreamBatches``): for optimizer step ``k`` the
  ``world × accumulation × micro_batch`` consecutive indices are dealt out micro-batch by
  micro-batch, rank by rank, so no two processes ever train on the same draw.

Answer phrasings and in-context exemplars are drawn from generators seeded by the index too.
Several classes of one image are several QA rounds of one record (the readers group them,
``rounds_per_sample``, at most 3 by default as in LISA).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..data.records import SegSample
from ..data.registry import load_samples
from ..errors import CoresError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
"""A sample that cannot be encoded (too long even without exemplars, unreadable image) is
replaced by another draw for the same index, at most this many times."""


@dataclass
class Source:
    """One mixture entry with its datasets loaded."""

    name: str
    rate: float
    datasets: list[tuple[str, Sequence[SegSample]]]
    within: str = "uniform"

    def __post_init__(self) -> None:
        sizes = [len(s) for _, s in self.datasets]
        if self.within == "size":
            weights = np.asarray(sizes, dtype=np.float64)
        else:
            weights = np.ones(len(sizes), dtype=np.float64)
        self._cum = np.cumsum(weights / weights.sum()).tolist()


class Mixture:
    """Index → record, following the sources' rates. Deterministic by ``seed``."""

    def __init__(self, sources: list[Source], seed: int = 0) -> None:
        sources = [s for s in sources if s.rate > 0]
        if not sources:
            raise CoresError("the training mixture is empty: give at least one source with rate > 0 and datasets")
        for s in sources:
            if not s.datasets:
                raise CoresError(f"mixture source {s.name!r} has rate {s.rate} but no datasets")
            for name, samples in s.datasets:
                if len(samples) == 0:
                    raise CoresError(f"mixture source {s.name!r}: dataset {name} holds no samples")
        self.sources = sources
        self.seed = seed
        rates = np.asarray([s.rate for s in sources], dtype=np.float64)
        self.probabilities = (rates / rates.sum()).tolist()
        self._cum = np.cumsum(self.probabilities).tolist()

    def pick(self, index: int, attempt: int = 0) -> tuple[str, str, SegSample]:
        """(source name, dataset name, record) of sample ``index``."""
        rng = np.random.default_rng([self.seed, index, attempt])
        u_source, u_dataset = rng.random(2)
        source = self.sources[min(bisect.bisect_right(self._cum, u_source), len(self.sources) - 1)]
        d = min(bisect.bisect_right(source._cum, u_dataset), len(source.datasets) - 1)
        name, samples = source.datasets[d]
        return source.name, name, samples[int(rng.integers(len(samples)))]

    def describe(self) -> list[dict[str, Any]]:
        """Per source: rate (normalised) and its datasets with their sizes."""
        return [
            {"source": s.name, "probability": p, "datasets": {n: len(x) for n, x in s.datasets}}
            for s, p in zip(self.sources, self.probabilities)
        ]


def load_mixture(data_cfg: Any, seed: int = 0) -> Mixture:
    """Read every dataset of every source with rate > 0 (``DataConfig``). A missing file fails
    here, before any model is built, with the reader's message naming it."""
    root = Path(data_cfg.root) if data_cfg.root else None
    sources = []
    for name, src in data_cfg.mixture.items():
        if src.rate < 0:
            raise CoresError(f"data.mixture.{name}.rate must not be negative, got {src.rate}")
        if src.rate == 0:
            continue
        loaded = []
        for ds in src.datasets:
            try:
                loaded.append((ds, load_samples(ds, root, **dict(src.options))))
            except CoresError as exc:
                raise CoresError(f"data.mixture.{name}: {exc}") from None
        sources.append(Source(name, src.rate, loaded, src.within))
    return Mixture(sources, seed)


class MixtureDataset(Dataset):
    """Map-style dataset over the infinite stream: ``dataset[i]`` is the encoded sample ``i``.

    ``transform`` is a training :class:`~cores_cli.processing.transform.SampleTransform`; its
    answer and exemplar draws are re-seeded from the index before each call.
    """

    def __init__(self, mixture: Mixture, transform: Any, seed: int = 0) -> None:
        self.mixture = mixture
        self.transform = transform
        self.seed = seed

    def __getitem__(self, index: int):
        last: CoresError | None = None
        for attempt in range(MAX_ATTEMPTS):
            source, dataset, record = self.mixture.pick(index, attempt)
            self.transform.reseed(answers=f"answers:{self.seed}:{index}:{attempt}", exemplars=f"exemplars:{self.seed}:{index}:{attempt}")
            try:
                encoded = self.transform(record)
            except CoresError as exc:
                log.warning("training sample %s (%s) skipped: %s", record.sample_id, dataset, exc)
                last = exc
                continue
            encoded.meta = {**encoded.meta, "mixture_source": source, "mixture_dataset": dataset, "stream_index": index}
            return encoded
        raise CoresError(f"training sample {index}: {MAX_ATTEMPTS} draws in a row could not be encoded; last error: {last}")


class StreamBatches(Sampler[list[int]]):
    """Micro-batches of stream indices for one rank.

    Starting after ``start`` consumed samples, optimizer step ``k`` covers the next
    ``world × accumulation × micro_batch`` indices; its micro-batch ``a`` on rank ``r`` is
    ``start + ((k·accumulation + a)·world + r)·micro_batch + [0, micro_batch)``.
    """

    def __init__(self, start: int, steps: int, micro_batch: int, accumulation: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.start, self.steps = start, steps
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.steps * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        b = self.micro_batch
        for m in range(self.steps * self.accumulation):
            first = self.start + (m * self.world + self.rank) * b
            yield list(range(first, first + b))

    def consumed_after(self, steps_done: int) -> int:
        """Samples consumed by all ranks once ``steps_done`` steps of this sampler have run."""
        return self.start + steps_done * self.accumulation * self.world * self.micro_batch
