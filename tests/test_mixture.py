"""The training mixture: rates, determinism, the per-rank stream and its continuation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from conftest import scene_sample

from cores_cli.processing.mixture import Mixture, MixtureDataset, Source, StreamBatches, load_mixture
from cores_cli.engine.train_config import DataConfig, MixtureSource
from cores_cli.errors import CoresError


def _samples(prefix: str, n: int):
    return [scene_sample(f"{prefix}{i}", i) for i in range(n)]


def _paper_like(seed: int = 0) -> Mixture:
    sem = Source("sem_seg", 9, [("ade", _samples("ade", 50)), ("coco", _samples("coco", 5))])
    ref = Source("refer_seg", 3, [("refcoco", _samples("rc", 20))])
    rea = Source("reason_seg", 1, [("reason", _samples("rs", 3))])
    return Mixture([sem, ref, rea], seed)


def test_sources_follow_their_rates():
    mix = _paper_like()
    n = 13000
    counts: dict[str, int] = {}
    datasets: dict[str, int] = {}
    for i in range(n):
        source, dataset, _ = mix.pick(i)
        counts[source] = counts.get(source, 0) + 1
        datasets[dataset] = datasets.get(dataset, 0) + 1
    expected = {"sem_seg": 9 / 13, "refer_seg": 3 / 13, "reason_seg": 1 / 13}
    for name, p in expected.items():
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(counts[name] / n - p) < 4 * sd, (name, counts[name] / n, p)
    # inside a source every dataset is equally likely (LISA), whatever its size
    ratio = datasets["ade"] / datasets["coco"]
    assert 0.9 < ratio < 1.1, ratio


def test_within_size_weights_datasets_by_their_size():
    mix = Mixture([Source("s", 1, [("big", _samples("b", 90)), ("small", _samples("s", 10))], within="size")], seed=3)
    big = sum(mix.pick(i)[1] == "big" for i in range(4000))
    assert abs(big / 4000 - 0.9) < 0.03


def test_draws_are_a_function_of_seed_and_index():
    a, b, c = _paper_like(seed=1), _paper_like(seed=1), _paper_like(seed=2)
    ids = lambda m, idx: [m.pick(i)[2].sample_id for i in idx]  # noqa: E731
    assert ids(a, range(200)) == ids(b, range(200))
    assert ids(a, range(200)) != ids(c, range(200))
    # order of access does not matter (workers, processes and resumes see the same draw)
    assert ids(a, [150, 3, 77]) == [ids(b, range(200))[i] for i in (150, 3, 77)]


def test_zero_rate_sources_are_never_read_and_empty_mixtures_are_errors():
    mix = Mixture([Source("on", 1, [("a", _samples("a", 2))]), Source("off", 0, [])])
    assert {mix.pick(i)[0] for i in range(50)} == {"on"}
    with pytest.raises(CoresError, match="empty"):
        Mixture([Source("off", 0, [("a", _samples("a", 2))])])
    with pytest.raises(CoresError, match="holds no samples"):
        Mixture([Source("on", 1, [("a", [])])])


def test_stream_batches_split_ranks_without_overlap_and_continue_after_a_resume():
    b, acc, world, steps = 2, 3, 4, 5
    per_rank = [list(StreamBatches(0, steps, b, acc, r, world)) for r in range(world)]
    flat = [i for rank in per_rank for batch in rank for i in batch]
    assert sorted(flat) == list(range(steps * acc * world * b))  # every index once
    sampler = StreamBatches(0, steps, b, acc, 1, world)
    # resuming after 2 steps continues exactly where the uninterrupted stream is
    resumed = StreamBatches(sampler.consumed_after(2), steps - 2, b, acc, 1, world)
    assert list(resumed) == list(sampler)[2 * acc :]
    assert len(sampler) == steps * acc


def test_dataset_retries_a_sample_that_cannot_be_encoded():
    mix = Mixture([Source("s", 1, [("a", _samples("a", 5))])], seed=0)
    calls = []

    def transform(record):
        calls.append(record.sample_id)
        if len(calls) == 1:
            raise CoresError("too long")
        return SimpleNamespace(meta={})

    transform.reseed = lambda answers, exemplars: None
    out = MixtureDataset(mix, transform, seed=0)[7]
    assert len(calls) == 2 and out.meta["stream_index"] == 7 and out.meta["mixture_source"] == "s"


def test_load_mixture_names_the_source_and_the_missing_files(tmp_path):
    cfg = DataConfig(root=str(tmp_path), mixture={"reason_seg": MixtureSource(1.0, ("reasonseg:train",))})
    with pytest.raises(CoresError, match=r"data\.mixture\.reason_seg: .*ReasonSeg"):
        load_mixture(cfg)
    ok = DataConfig(mixture={"synthetic": MixtureSource(1.0, ("synthetic:train",), options={"n": 3})})
    assert load_mixture(ok).describe()[0]["datasets"] == {"synthetic:train": 3}
