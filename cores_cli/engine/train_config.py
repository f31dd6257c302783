"""Training recipes: ``{model: ModelConfig, train: TrainConfig, data: DataConfig}``.

A recipe is a YAML/JSON file (or the name of one shipped in ``cores_cli/recipes/``). Its
``model`` section starts from the preset named by ``model.preset`` and overrides it key by key;
``train`` and ``data`` start from the defaults below. ``--set train.lr=1e-4`` style overrides
apply last; an unknown key or an ill-typed value is an error that names the key.

The defaults are LISA's / CoReS's (``train_ds.py`` of both, and the CoReS appendix): AdamW with
lr 3e-4, betas (0.9, 0.95), no weight decay, 100 warm-up steps then linear decay, gradient
clipping 1.0, ZeRO-2, bf16 on GPU, 2 samples per GPU × 10 accumulation steps, at most 3 classes
per sample, and the LISA dataset mixture without VQA (semantic/part 9, referring 3, ReasonSeg 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..config import ModelConfig, preset
from ..configio import FieldError, apply_overrides, dump_text, from_dict, read_mapping, to_dict
from ..errors import ConfigError


@dataclass
class MixtureSource:
    """One entry of the mixture: datasets drawn together at one rate (LISA's ``sem_seg``,
    ``refer_seg``, ``reason_seg`` groups)."""

    rate: float = 1.0
    """Relative weight of this source among all sources (normalised; 0 = off, files never read)."""
    datasets: tuple[str, ...] = ()
    """Registry names, e.g. ``ade20k:train``, ``refcoco:unc:train``, ``synthetic:train``."""
    within: Literal["uniform", "size"] = "uniform"
    """How a dataset is picked inside the source: ``uniform`` (LISA: every dataset equally often,
    whatever its size) or ``size`` (proportional to its number of samples)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Reader options for every dataset of this source (e.g. ``rounds_per_sample``, ``n``)."""

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise FieldError("rate", f"must be 0 (off) or more, got {self.rate}")


def _paper_mixture() -> dict[str, MixtureSource]:
    return {
        "sem_seg": MixtureSource(
            9.0, ("ade20k:train", "cocostuff:train", "pascalpart:train", "pacolvis:train", "mapillary:train")
        ),
        "refer_seg": MixtureSource(3.0, ("refclef:unc:train", "refcoco:unc:train", "refcoco+:unc:train", "refcocog:umd:train")),
        "reason_seg": MixtureSource(1.0, ("reasonseg:train",)),
    }


@dataclass
class ValidationConfig:
    dataset: str | None = "reasonseg:val"
    """Registry name of the validation set; None = no validation (and no ``best/``)."""
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    mode: Literal["teacher", "generate"] = "teacher"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass
class DataConfig:
    root: str | None = None
    """Folder holding the datasets in LISA's layout (not needed for ``synthetic:*``)."""
    mixture: dict[str, MixtureSource] = field(default_factory=_paper_mixture)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise FieldError("num_workers", f"must be 0 or more, got {self.num_workers}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/cores"
    """Checkpoints, metrics and the resolved recipe go here."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``--gpus 0`` sets ``cpu``; ``auto`` = CUDA when visible."""
    steps: int = 5000
    """Optimizer steps in total (LISA: 10 epochs × 500 steps)."""
    micro_batch_size: int = 2
    """Samples per process per forward pass."""
    grad_accumulation: int = 10
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["warmup_decay", "warmup_constant", "warmup_cosine"] = "warmup_decay"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    """The decay ends at ``lr * min_lr_ratio`` (DeepSpeed's WarmupDecayLR: 0)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto`` = bf16 on GPU, fp32 on CPU."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0, 1 or 2 (2 also runs on the CPU here)."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in backward (less memory, ~30 % more compute)."""
    save_every: int = 500
    keep_checkpoints: int = 2
    """Step checkpoints kept besides ``best/`` (the oldest are removed; 0 = keep all)."""
    eval_every: int = 500
    """Validate every this many steps and at the end (0 = only at the end)."""
    log_every: int = 10
    """Without a terminal: one progress line every this many steps (metrics.jsonl gets every step)."""
    embedding_cache: str | None = None
    """Folder for cached SAM image embeddings (frozen image encoder only); None = off."""
    require_pretrained: bool = True
    """Refuse to start without ``model.mllm.path`` and ``model.sam.checkpoint`` (a random-weight
    7B run is always a mistake); the tiny recipes set it false. SAM may come from
    ``init_from`` instead."""
    init_from: str | None = None
    """A cores checkpoint (directory, run directory or Hub id) whose weights a new run starts
    from where names and shapes match, e.g. an imported LISA (its SAM, β and [SEG] rows); the
    LLaVA base still comes from ``model.mllm.path``. Ignored when resuming."""
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] | None = None
    """Where metrics go (``engine/trackers.py``): ``jsonl`` (``RUN/metrics.jsonl``, always
    written), ``tensorboard`` (``RUN/tensorboard/``), ``wandb`` (Weights & Biases; honours
    ``WANDB_MODE=offline``). A listed backend that is not installed stops the run at once.
    None = ``jsonl``, plus TensorBoard when it is installed."""
    tensorboard: bool = True
    """Deprecated, use ``report_to``: read only when ``report_to`` is unset, where false leaves
    TensorBoard out. Kept because every earlier run's ``recipe.yaml`` holds it."""

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "must be at least 1"),
            (self.micro_batch_size >= 1, "micro_batch_size", "must be at least 1"),
            (self.grad_accumulation >= 1, "grad_accumulation", "must be at least 1"),
            (self.lr > 0, "lr", "must be positive"),
            (self.eps > 0, "eps", "must be positive"),
            (self.weight_decay >= 0, "weight_decay", "must be 0 or more"),
            (self.warmup_steps >= 0, "warmup_steps", "must be 0 or more"),
            (self.grad_clip >= 0, "grad_clip", "must be 0 (off) or more"),
            (self.zero_stage in (0, 1, 2), "zero_stage", "must be 0, 1 or 2 (stage 3 partitions the weights, which checkpoints and validation here do not support)"),
            (self.save_every >= 1, "save_every", "must be at least 1"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", "must be 0 (keep all) or more"),
            (self.eval_every >= 0, "eval_every", "must be 0 or more"),
            (self.log_every >= 1, "log_every", "must be at least 1"),
            (len(self.betas) == 2, "betas", "must be two numbers"),
            (all(0.0 <= b < 1.0 for b in self.betas), "betas", "must each be in [0, 1)"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]"),
        ]
        for ok, key, reason in checks:
            if not ok:
                raise FieldError(key, reason)
        if self.report_to is not None:
            if not self.tensorboard and "tensorboard" in self.report_to:
                raise FieldError("tensorboard", "is false but train.report_to lists tensorboard: drop train.tensorboard (deprecated), report_to decides")
            # jsonl first and always (the run directory's own record), each backend once
            self.report_to = list(dict.fromkeys(["jsonl", *self.report_to]))


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def samples_per_step(self) -> int:
        """Per process; multiply by the world size for the global batch."""
        return self.train.micro_batch_size * self.train.grad_accumulation


RECIPE_PACKAGE = "cores_cli.recipes"


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in the package (``--config NAME``)."""
    folder = resources.files(RECIPE_PACKAGE)
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def recipe_path(name_or_path: str | Path) -> Path:
    """A file path as given, or the shipped recipe of that name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix not in (".yaml", ".yml", ".json") and len(p.parts) == 1:
        shipped = resources.files(RECIPE_PACKAGE) / f"{p.name}.yaml"
        if shipped.is_file():
            return Path(str(shipped))
    raise ConfigError(f"recipe not found: {name_or_path} (a YAML/JSON file, or one of the shipped recipes: {', '.join(shipped_recipes())})")


def recipe_from_mapping(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Build a recipe from plain data, then apply ``a.b=c`` overrides."""
    unknown = sorted(set(data) - {"model", "train", "data"})
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; a recipe has the sections model, train, data")
    overrides = list(overrides)
    model_data = dict(data.get("model") or {})
    # The preset is resolved before the other model keys apply, so `--set model.preset=...`
    # must be known first; the remaining overrides go through the typed path below.
    for item in [o for o in overrides if o.split("=", 1)[0].strip() == "model.preset"]:
        model_data["preset"] = item.split("=", 1)[1].strip()
        overrides.remove(item)
    base = to_dict(preset(model_data["preset"])) if model_data.get("preset") not in (None, "custom") else to_dict(ModelConfig())
    merged = {"model": _deep_merge(base, model_data), "train": data.get("train") or {}, "data": data.get("data") or {}}
    recipe = from_dict(Recipe, merged)
    return apply_overrides(recipe, overrides)


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or a shipped name) and apply ``--set`` overrides."""
    return recipe_from_mapping(read_mapping(recipe_path(name_or_path)), overrides)


def recipe_text(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what a run directory keeps, and what ``--resume`` reads)."""
    return dump_text(recipe, "yaml")
