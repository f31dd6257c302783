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


# --- keys named by the processor's digest (issue 16 item 6) -----------------------------------

REAL_PHOTOS = [
    "lisa_demo/imgs/car_speed.jpg",
    "quirks/exif_orientation/Landscape_6.jpg",  # EXIF-rotated: the digest is of the upright image
    "quirks/exif_orientation/Landscape_8.jpg",
    "coco/labelme_instance_segmentation/data_annotated/2011_000003.jpg",
]


def digest_inputs(model, realdata):
    """SAM inputs with their digests: real photos, synthetic scenes, a copy, a flip and a
    one-pixel change (what must miss)."""
    from cores_cli.images import load_image
    from cores_cli.processing.transform import SampleTransform, sample_pixels

    tr = SampleTransform.for_model(model, sam_digests=True)
    pixels = [load_image(realdata / p).pixels for p in REAL_PHOTOS]
    pixels += [sample_pixels(scene_sample("a", 0)), sample_pixels(scene_sample("b", 1))]
    changed = pixels[0].copy()
    changed[0, 0, 0] ^= 1
    pixels += [pixels[1].copy(), pixels[4][:, ::-1].copy(), changed]
    return [tr.image(p) for p in pixels]


def test_digest_keys_hit_and_miss_exactly_where_tensor_keys_do(tmp_path, realdata):
    model = build_tiny()
    cache = attach_embedding_cache(model, tmp_path)
    images = digest_inputs(model, realdata)
    assert all(len(im.sam_digest) == 64 for im in images)
    by_tensor = [cache.key(im.sam_image) for im in images]
    by_digest = [cache.key(im.sam_image, im.sam_digest) for im in images]
    same_tensor = [[a == b for b in by_tensor] for a in by_tensor]
    same_digest = [[a == b for b in by_digest] for a in by_digest]
    assert same_digest == same_tensor
    copy, flip, changed = len(images) - 3, len(images) - 2, len(images) - 1
    assert by_digest[copy] == by_digest[1] and by_digest[flip] != by_digest[4]
    # a one-pixel change of a 0.3 MP photo may vanish in the resize to the tiny preset's SAM
    # input (both ways then agree that it hits); at the real 1024 side it misses
    assert (by_digest[changed] == by_digest[0]) == torch.equal(images[changed].sam_image, images[0].sam_image)
    # the input's dtype is part of the key, as before
    im = images[0]
    assert cache.key(im.sam_image, im.sam_digest) != cache.key(im.sam_image.to(torch.bfloat16), im.sam_digest)


def test_the_digest_names_the_normalisation_and_the_size():
    import numpy as np

    from cores_cli.processing.transform import sam_input_digest

    small = np.zeros((4, 6, 3), np.uint8)
    base = sam_input_digest(small, 8, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert base == sam_input_digest(small.copy(), 8, (1, 2, 3), (4, 5, 6))
    assert base != sam_input_digest(small, 16, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert base != sam_input_digest(small, 8, (1.5, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert base != sam_input_digest(small, 8, (1.0, 2.0, 3.0), (4.0, 5.0, 7.0))
    assert base != sam_input_digest(np.zeros((6, 4, 3), np.uint8), 8, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))  # same bytes, other shape


def test_a_training_batch_is_cached_under_its_digests(tmp_path):
    """The processor's digests travel in the batch to the cache: the entries written are the
    digest keys, a second pass hits them all, and the result is the uncached one."""
    from cores_cli.processing.transform import SampleTransform, collate

    model = build_tiny("lora.dropout=0.0")
    tr = SampleTransform.for_model(model, train=True, seed=0, sam_digests=True)
    batch = collate([tr(scene_sample("a", 0, rounds=2)), tr(scene_sample("b", 1))], model.tokenizer.pad_token_id)
    assert batch.sam_digests is not None and len(batch.sam_digests) == batch.sam_images.shape[0] == 2
    plain = model(batch)
    cache = attach_embedding_cache(model, tmp_path)
    first, second = model(batch), model(batch)
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    assert torch.equal(first.loss, plain.loss) and torch.equal(second.loss, plain.loss)
    written = {p.name for p in tmp_path.rglob("*.safetensors")}
    assert written == {f"{cache.key(img, d)}.safetensors" for img, d in zip(batch.sam_images, batch.sam_digests)}
