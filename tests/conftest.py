"""Shared test fixtures. Tests run on the CPU with tiny presets and no network."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _realdata_dir() -> Path | None:
    env = os.environ.get("CORES_REALDATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "realdata", REPO / ".." / ".." / "shared" / "realdata"]:
        if cand.is_dir():
            return cand.resolve()
    return None


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


@contextlib.contextmanager
def in_process_training():
    """Training in this process (a one-process gloo group, one thread: tiny ops are as fast,
    and immune to the oversubscription a busy machine causes); afterwards the group is torn
    down and the environment restored, so later tests see a plain process."""
    import torch
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_benchmark(name: str):
    """A script of ``benchmarks/`` imported as a module (they are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def invoke_cli(*args, input=None):
    """``cores ARGS`` in this process; an unexpected exception is raised, not hidden."""
    from typer.testing import CliRunner

    from cores_cli.cli.app import app

    result = CliRunner().invoke(app, [*map(str, args)], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def invoke_predict(*args, input=None):
    """``cores predict ARGS`` in this process; an unexpected exception is raised, not hidden."""
    return invoke_cli("predict", *args, input=input)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub lays it out, offline (HF_HUB_OFFLINE=1):
    ``offline_hub(repo_id, directory)`` puts a copy of ``directory`` there as the repo's main."""
    import shutil

    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    # huggingface_hub reads its environment once, on import
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    def put(repo_id: str, directory: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        shutil.copytree(directory, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return put


def error_lines(result) -> list[str]:
    """The ``error:`` lines of a command's stderr; a traceback fails the test."""
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real third-party sample files (../shared/realdata), read in place, never copied."""
    path = _realdata_dir()
    if path is None:
        pytest.skip("../shared/realdata not found (set CORES_REALDATA)")
    return path


# --------------------------------------------------------------------------- model fixtures

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cores_cli.config import ModelConfig, tiny  # noqa: E402
from cores_cli.configio import apply_overrides  # noqa: E402


def tiny_config(*overrides: str) -> ModelConfig:
    """The tiny preset, with ``a.b=c`` overrides; in-context exemplars off unless asked for,
    so tests do not depend on the shipped library's contents."""
    return apply_overrides(tiny(), ["prompt.in_context_k=0", *overrides])


def tiny_recipe(run_dir, *overrides: str):
    """The tiny-synthetic recipe made small for a test run in this process: CPU, 4 scenes, no
    workers, no TensorBoard, then ``overrides``."""
    from cores_cli.engine.train_config import load_recipe

    return load_recipe(
        "tiny-synthetic",
        [
            "train.device=cpu",
            f"train.run_dir={run_dir}",
            "data.num_workers=0",
            "data.mixture.synthetic.options={n: 4}",
            "data.val.options={n: 4}",
            "train.tensorboard=false",
            *overrides,
        ],
    )


def build_tiny(*overrides: str, seed: int = 0):
    from cores_cli.model.builder import build_model

    torch.manual_seed(seed)
    return build_model(tiny_config(*overrides))


def scene_sample(sample_id: str = "s0", seed: int = 0, rounds: int = 1, size: tuple[int, int] = (96, 128)):
    """An image with a bright rectangle on noise, and rounds asking for it."""
    from cores_cli.data.records import ArrayMask, QARound, SegSample

    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = (230, 40, 40)
    mask = np.zeros((h, w), np.uint8)
    mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    qs = ["what lets the vehicle roll?", "the red part", "what shines at night?"]
    styles = ["sentence", "phrase", "sentence"]
    rr = tuple(QARound(qs[i % 3], ArrayMask(mask if i % 2 == 0 else 1 - mask), styles[i % 3]) for i in range(rounds))
    return SegSample(sample_id, f"{sample_id}.png", rr, image_array=img)


def make_batch(model, samples, train: bool = False, seed: int = 0):
    from cores_cli.processing.transform import SampleTransform, collate

    tr = SampleTransform.for_model(model, train=train, seed=seed)
    return collate([tr(s) for s in samples], model.tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny checkpoint whose LoRA B matrices are non-zero (so LoRA matters)."""
    from cores_cli.engine.checkpoint import save_checkpoint

    model = build_tiny(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")
