"""Hugging Face Hub ids (``org/name`` or ``org/name@revision``) resolved to local snapshots.

Everything goes through ``huggingface_hub.snapshot_download``, so its cache (``HF_HOME``,
``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE=1`` are honoured; a token is read from the environment
only (``HF_TOKEN``), never from an option, a file we write or a log. Each failure is one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CoresError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` or ``org/name@revision``: two path parts, nothing that only a path has."""
    return bool(_HUB_ID.match(ref)) and ".." not in ref


def split_hub_id(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` → (``org/name``, ``rev``); no revision → None (the default branch)."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.yaml")
"""What a model directory needs (configs, safetensors weights, tokenizers); a repository's
other files (TensorFlow/Flax copies of the weights, images, ...) are never downloaded."""
PICKLE_WEIGHTS = ("*.json", "*.bin")
"""PyTorch ``.bin`` weights, fetched only for a repository that has no safetensors."""


def model_snapshot(ref: str, what: str) -> Path:
    """A model repository's snapshot: its safetensors weights, or its ``.bin`` ones when it has
    none (LISA's releases), never both."""
    path = snapshot(ref, what, MODEL_FILES)
    if not any(path.rglob("*.safetensors")):
        path = snapshot(ref, what, PICKLE_WEIGHTS)
    return path


def snapshot(ref: str, what: str, allow_patterns: tuple[str, ...] | None = MODEL_FILES) -> Path:
    """The local snapshot of Hub repository ``ref``, fetched when online (only the files
    ``allow_patterns`` match). ``what`` names the thing in errors (``checkpoint``,
    ``mllm.path``, ``CLIP tower``...)."""
    repo_id, revision = split_hub_id(ref)
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise CoresError(f"{what} not found: {ref} (no such directory, and huggingface_hub is not installed to look it up on the Hub)") from None
    try:
        # False, not None: huggingface_hub would fall back to a token saved by `hf auth login`
        token = os.environ.get("HF_TOKEN") or False
        patterns = list(allow_patterns) if allow_patterns else None
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise CoresError(
            f"{what} not found: no directory {ref!r} here, and the Hub repository {shown} is not in the cache "
            f"({hub_cache()}) while offline (HF_HUB_OFFLINE=1 or no network): download it once online, or unset HF_HUB_OFFLINE"
        ) from None
    except RevisionNotFoundError:
        raise CoresError(f"{what} not found: the Hub repository {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CoresError(f"{what} not found: no directory {ref!r} here, and no Hub repository {repo_id} (or it is private or gated: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CoresError(f"{what} {ref}: could not fetch it from the Hub: {detail}") from None


def hub_cache() -> str:
    """Where huggingface_hub keeps its cache, for messages."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")


def local_or_hub(ref: str | Path, what: str) -> Path:
    """``ref`` itself when it exists here or cannot be a Hub id; else its Hub snapshot."""
    path = Path(ref)
    if path.exists() or not looks_like_hub_id(os.fspath(ref)):
        return path
    return model_snapshot(os.fspath(ref), what)
