"""The on-disk SAM image-embedding cache: same results, encoder skipped, keys that cannot go stale."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_batch, scene_sample

from cores_cli.engine.embedding_cache import attach_embedding_cache, detach_embedding_cache
from cores_cli.errors import CoresError


@pytest.fixture(autouse=True)
def one_thread():
    # tiny ops: one thread is as fast, and immune to oversubscription on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder_calls(model):
    calls = []
    handle = model.sam.image_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls, handle


def test_cached_training_forward_equals_the_uncached_one_and_skips_the_encoder(tmp_path):
    model = build_tiny("lora.dropout=0.0")
    model.train()
    batch = make_batch(model, [scene_sample("a", 0, rounds=2), scene_sample("b", 1)], train=True)
    plain = model(batch)
    cache = attach_embedding_cache(model, tmp_path / "cache")
    calls, handle = encoder_calls(model)
    first = model(batch)  # misses: computes and stores
    second = model(batch)  # hits: no encoder pass at all
    handle.remove()
    assert calls == [2]
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    for out in (first, second):
        assert torch.equal(out.loss, plain.loss)
        assert all(torch.equal(a, b) for a, b in zip(out.level_logits, plain.level_logits))
    second.loss.backward()  # gradients flow through everything after the encoder
    assert model.projector.fc1.weight.grad is not None
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    detach_embedding_cache(model)
    calls, handle = encoder_calls(model)
    model(batch)
    handle.remove()
    assert calls == [2]


def test_keys_change_with_the_encoder_weights_and_the_input(tmp_path):
    a, b = build_tiny(seed=0), build_tiny(seed=1)
    ca, cb = attach_embedding_cache(a, tmp_path), attach_embedding_cache(b, tmp_path)
    img = make_batch(a, [scene_sample("a", 0)]).sam_images[0]
    assert ca.key(img) != cb.key(img)  # other weights, other key: a shared folder cannot mix them
    assert ca.key(img) != ca.key(img.flip(-1))
    assert ca.key(img) != ca.key(img.to(torch.bfloat16))
    assert ca.key(img) == attach_embedding_cache(build_tiny(seed=0), tmp_path).key(img.clone())


def test_a_damaged_entry_is_recomputed(tmp_path):
    model = build_tiny()
    cache = attach_embedding_cache(model, tmp_path)
    batch = make_batch(model, [scene_sample("a", 0)])
    want = model.encode_images(batch.sam_images)
    path = cache.path(cache.key(batch.sam_images[0]))
    path.write_bytes(b"not safetensors")
    got = model.encode_images(batch.sam_images)
    assert torch.equal(got, want) and cache.stats.errors == 1


def test_refused_when_the_image_encoder_trains(tmp_path):
    with pytest.raises(CoresError, match="frozen image encoder"):
        attach_embedding_cache(build_tiny("train_extra=[sam_image_encoder]"), tmp_path)
