"""On-disk cache of SAM image embeddings, for training with a frozen image encoder.

SAM's preprocessing is deterministic and its image encoder is frozen in the paper's setting,
so an image's embedding never changes during a run, yet the encoder (ViT-H at 1024², about
3 TMACs a pass) runs for every draw of every image. The cache stores each embedding once.

Key: BLAKE2b of (cache format, a fingerprint of the image encoder's weights, the input's dtype
and shape, and the input itself). The input is named by the processor's digest of it (SHA-256
of the resized uint8 pixels and the normalisation, :func:`~cores_cli.processing.transform.sam_input_digest`:
about a fifth of the bytes of the float tensor, and no copy of it), or, for a batch that carries
no digests, by the exact bytes of the float tensor. Anything that changes the encoder's input or
its weights therefore changes the key; a stale entry cannot be hit. Entries
are safetensors files (``ab/abcdef….safetensors``) written atomically, so several processes
may share one folder. The cache refuses to attach when the image encoder is trainable
(``sam_image_encoder`` in ``model.train_extra``): its embeddings would go stale at every step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import CoresError
from ..fileio import atomic_write_bytes

CACHE_FORMAT = "cores-sam-embedding-v2"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    # numpy has no bfloat16: hash the raw bytes through a same-size integer view
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view).numpy().tobytes()


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A digest of the encoder's weights (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in encoder.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0


class EmbeddingCache:
    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.stats = CacheStats()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CoresError(f"cannot create the embedding cache folder {self.directory}: {exc}") from None

    def key(self, image: torch.Tensor, digest: str | None = None) -> str:
        """Key of one preprocessed SAM input (3, S, S), named by the processor's ``digest`` of
        it when there is one, else by its bytes."""
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{CACHE_FORMAT}|{self.fingerprint}|{image.dtype}|{tuple(image.shape)}|".encode())
        h.update(f"digest:{digest}".encode() if digest else b"tensor:" + _tensor_bytes(image))
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return load_bytes(data)["embedding"]
        except (SafetensorError, KeyError, ValueError):
            # a foreign or damaged file: recompute (and overwrite) rather than fail the run
            self.stats.errors += 1
            return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        atomic_write_bytes(self.path(key), save_bytes({"embedding": embedding.detach().to("cpu").contiguous()}))

    def encode(self, images: torch.Tensor, compute, digests: list[str] | None = None) -> torch.Tensor:
        """Embeddings of ``images`` (B, 3, S, S): cached ones read, the others computed with
        ``compute(subset)`` and stored. ``digests``: the processor's, one per image."""
        keys = [self.key(img, digests[i] if digests else None) for i, img in enumerate(images)]
        found = [self.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            fresh = compute(images[missing])
            for j, i in enumerate(missing):
                self.put(keys[i], fresh[j])
                found[i] = fresh[j]
        dtype = found[missing[0]].dtype if missing else found[0].dtype
        return torch.stack([t.to(device=images.device, dtype=dtype) for t in found])


def attach_embedding_cache(model, directory: str | Path) -> EmbeddingCache:
    """Route ``model.encode_images`` through a cache in ``directory``.

    The wrapper is an instance attribute over ``CoresModel.encode_images``, so parameter names,
    checkpoints and every other call path stay as they are.
    """
    encoder = model.sam.image_encoder
    if "sam_image_encoder" in model.cfg.train_extra or any(p.requires_grad for p in encoder.parameters()):
        raise CoresError(
            "the SAM embedding cache needs a frozen image encoder, but sam_image_encoder is trainable "
            "(model.train_extra); turn train.embedding_cache off or freeze the encoder"
        )
    cache = EmbeddingCache(directory, encoder_fingerprint(encoder))
    original = model.encode_images

    def encode_images(sam_images: torch.Tensor, digests: list[str] | None = None) -> torch.Tensor:
        return cache.encode(sam_images, original, digests)

    model.encode_images = encode_images
    model.embedding_cache = cache
    return cache


def detach_embedding_cache(model) -> None:
    if "encode_images" in vars(model):
        del model.encode_images
    vars(model).pop("embedding_cache", None)
