"""Checkpoint directories (docs/TRAINING.md), written atomically and read without unpickling.

Layout::

    config.json            {"format": "cores-checkpoint", "format_version": 1, "model": ModelConfig, ...}
    tokenizer/             the tokenizer, with the chain tokens (tokenizer.json: no pickle)
    adapter/               LoRA in peft's format (adapter_config.json + adapter_model.safetensors)
    weights.safetensors    every other weight that is not in the base files the config names:
                           β, refiner, SAM mask decoder, chain token rows, parts listed in
                           ``train_extra``, and the whole SAM / LLaVA when the config names no
                           base file for them (the tiny preset)

LLaVA tensors are stored under ``llava.`` + their plain transformers names (no peft wrapping),
so the same names serve the export to a standalone HF directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import ModelConfig, replace
from ..configio import from_dict, to_dict
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_directory
from ..model.builder import build_model
from ..model.cores import TRAINABLE_GROUPS, CoresModel, _group_of
from ..model.mllm import LlavaLoading, lora_target_regex, not_hf_llava_hint, read_tokenizer_dir

FORMAT = "cores-checkpoint"
FORMAT_VERSION = 1
_PEFT_PREFIX = "mllm.base_model.model."

CHANGEABLE_ON_LOAD = ("prompt", "loss", "mllm.path", "mllm.tokenizer", "sam.checkpoint", "lora.dropout", "chain.refiner_init_scale")
"""Config keys (or whole sections) an override may change when a trained checkpoint is loaded:
where its base weights lie, how the prompt is built, and settings that only matter while
training (loss weights, dropout, the refiner's init). Every other key decides a tensor's shape
or what the trained weights mean (``chain.depth``, ``chain.reasoning``, ``sam.*``, ``lora.r``,
``mllm.image_mode``, ...): a checkpoint trained at depth 2 run at depth 3 loads without a
shape error and predicts nonsense, so such an override is refused."""


@dataclass
class CheckpointReport:
    """What loading matched. ``missing`` are expected tensors the files lack (an error unless
    asked otherwise); ``unexpected`` are tensors the model has no place for (reported)."""

    path: str
    tensors: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: {self.tensors} tensors"
        if self.missing:
            s += f", {len(self.missing)} missing (e.g. {self.missing[0]})"
        if self.unexpected:
            s += f", {len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})"
        return s


def canonical_name(key: str) -> str:
    """Model state-dict key → checkpoint key (LLaVA keys unwrapped from peft)."""
    if key.startswith(_PEFT_PREFIX):
        return "llava." + key[len(_PEFT_PREFIX) :].replace(".base_layer.", ".")
    if key.startswith("mllm."):
        return "llava." + key[len("mllm.") :]
    return key


def _stored_keys(model: CoresModel) -> dict[str, str]:
    """Checkpoint key → model key, for every tensor ``weights.safetensors`` must hold."""
    cfg = model.cfg
    trainable = set(TRAINABLE_GROUPS) | set(cfg.train_extra)
    out = {}
    for key in model.state_dict():
        if "lora_" in key:
            continue
        if key.startswith("sam."):
            embedded = not cfg.sam.checkpoint
        elif key.startswith("mllm."):
            embedded = not cfg.mllm.path
        else:
            embedded = True  # projector, refiner, chain token rows: ours alone
        if embedded or _group_of(key) in trainable:
            out[canonical_name(key)] = key
    return out


def save_checkpoint(model: CoresModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (a kill mid-write leaves the old one whole)."""
    dest = Path(path)
    state = model.state_dict()
    with atomic_directory(dest) as tmp:
        tensors = {ck: state[mk].detach().to("cpu").contiguous() for ck, mk in _stored_keys(model).items()}
        write_checkpoint_files(tmp, model.cfg, model.tokenizer, tensors, extra)
        if isinstance(model.mllm, PeftModel):
            adapter = tmp / "adapter"
            adapter.mkdir()
            model.mllm.peft_config["default"].save_pretrained(str(adapter))
            lora = get_peft_model_state_dict(model.mllm, save_embedding_layers=False)
            save_file({k: v.detach().to("cpu").contiguous() for k, v in lora.items()}, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


def write_checkpoint_files(folder: Path, cfg: ModelConfig, tokenizer, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    """config.json, tokenizer/ and weights.safetensors of a checkpoint, into ``folder`` (which
    the caller makes atomic); ``tensors`` are keyed by checkpoint names."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "cores_version": __version__, "model": to_dict(cfg)}
    if extra:
        meta["extra"] = extra
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(folder / "tokenizer")
    save_file(tensors, str(folder / "weights.safetensors"), metadata={"format": FORMAT})


def stored_shapes(model: CoresModel) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every tensor ``weights.safetensors`` must hold for ``model``
    (works on a model built on ``meta``)."""
    state = model.state_dict()
    return {ck: tuple(state[mk].shape) for ck, mk in _stored_keys(model).items()}


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"a checkpoint is a directory, got a file: {p}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"not a cores checkpoint (no config.json): {p}")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = not_hf_llava_hint(p)
        raise CheckpointError(hint or f"{cfg_file} is not a cores checkpoint config (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {meta.get('format_version')!r}, this cores reads {FORMAT_VERSION}")
    try:
        return from_dict(ModelConfig, meta.get("model", {}), "model")
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _changeable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CHANGEABLE_ON_LOAD)


def check_overrides(stored: ModelConfig, wanted: ModelConfig, where: str | Path) -> None:
    """Refuse a config for a checkpoint that differs from the one it was trained with in a key
    outside :data:`CHANGEABLE_ON_LOAD`, naming the key."""
    old, new = to_dict(stored), to_dict(wanted)
    refused = [k for k in _changed_keys(old, new) if not _changeable(k)]
    if refused:
        key = refused[0]
        before, after = _lookup(old, key), _lookup(new, key)
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])})" if len(refused) > 1 else ""
        raise CheckpointError(
            f"{key}={after!r} does not fit checkpoint {where}, trained with {key}={before!r}{more}: it would change "
            f"the architecture or what the trained weights mean; on a checkpoint only {', '.join(k + ('.*' if '.' not in k else '') for k in CHANGEABLE_ON_LOAD)} can be changed"
        )


def _lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None


def resolve_base_paths(cfg: ModelConfig, checkpoint_dir: Path) -> ModelConfig:
    """Base-weight paths written relative (an export's ``llava/``) are relative to the
    checkpoint directory, so a checkpoint can be moved or copied whole."""

    def fix(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        return str(checkpoint_dir / value)

    mllm = replace(cfg.mllm, path=fix(cfg.mllm.path), tokenizer=fix(cfg.mllm.tokenizer))
    return replace(cfg, mllm=mllm, sam=replace(cfg.sam, checkpoint=fix(cfg.sam.checkpoint)))


def load_checkpoint(
    path: str | Path,
    overrides: ModelConfig | None = None,
    allow_missing: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    llava_loading: LlavaLoading | None = None,
) -> tuple[CoresModel, CheckpointReport]:
    """Build the model a checkpoint describes at ``dtype`` (position buffers fp32, see
    ``model.precision``) directly on ``device`` (default: the current device), and load its
    weights into it.

    ``overrides`` replaces the stored config (e.g. with ``--set`` changes of base paths); it may
    differ from the stored one only in :data:`CHANGEABLE_ON_LOAD`. Relative base paths in the
    config are read relative to the checkpoint directory.
    """
    p = Path(path)
    stored = read_checkpoint_config(p)
    if overrides is not None:
        check_overrides(stored, overrides, p)
    cfg = resolve_base_paths(overrides or stored, p)
    tok_dir = p / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint {p} has no tokenizer/tokenizer.json")
    tokenizer = read_tokenizer_dir(tok_dir)
    weights = _read_safetensors(p / "weights.safetensors")
    model = build_model(cfg, load_base_weights=True, tokenizer=tokenizer, dtype=dtype, device=device, llava_loading=llava_loading)

    expected = _stored_keys(model)
    state = model.state_dict()
    for ck, tensor in weights.items():
        mk = expected.get(ck)
        if mk is not None and state[mk].shape != tensor.shape:
            raise CheckpointError(f"{p}: tensor {ck} has shape {tuple(tensor.shape)}, the model expects {tuple(state[mk].shape)}")
    to_load = {expected[ck]: t for ck, t in weights.items() if ck in expected}
    model.load_state_dict(to_load, strict=False)
    report = CheckpointReport(
        path=str(p),
        tensors=len(weights),
        missing=sorted(ck for ck in expected if ck not in weights),
        unexpected=sorted(ck for ck in weights if ck not in expected),
    )
    if isinstance(model.mllm, PeftModel):
        _load_adapter(model, p / "adapter", report)
    if report.missing and not allow_missing:
        raise CheckpointError(f"checkpoint is incomplete: {report.summary()}")
    return model, report


@dataclass
class InitReport:
    """What ``load_initial_weights`` took from a checkpoint."""

    path: str
    loaded: int
    skipped: list[str]
    """Checkpoint tensors not taken: another shape, or chain-token rows for other token ids."""

    def summary(self) -> str:
        text = f"initialised from {self.path}: {self.loaded} tensors"
        if self.skipped:
            text += f"; {len(self.skipped)} not taken (another shape or meaning), e.g. {self.skipped[0]}"
        return text


def load_initial_weights(model: CoresModel, path: str | Path, required: tuple[str, ...] = ()) -> InitReport:
    """Start a new training run from a checkpoint's own weights (``train.init_from``; e.g. an
    imported LISA: its SAM, β and [SEG] rows): every tensor of ``weights.safetensors`` whose
    name and shape the model shares is copied in, the rest of the model keeps its
    initialisation. Chain-token rows are taken only when both mean the same token ids. Every
    model tensor whose checkpoint name starts with one of ``required`` must come from it (e.g.
    ``sam.`` when no SAM file is configured)."""
    p = Path(path)
    read_checkpoint_config(p)  # a clear error for what is not a cores checkpoint
    weights = _read_safetensors(p / "weights.safetensors")
    state = model.state_dict()
    names = {canonical_name(k): k for k in state if "lora_" not in k}
    ids = weights.get("token_rows.token_ids")
    same_tokens = ids is not None and torch.equal(ids.to(state["token_rows.token_ids"].device), state["token_rows.token_ids"])
    take, skipped = {}, []
    for ck, tensor in weights.items():
        mk = names.get(ck)
        if mk is None:
            continue
        if tuple(state[mk].shape) != tuple(tensor.shape) or (ck.startswith("token_rows.") and not same_tokens):
            skipped.append(ck)
            continue
        take[mk] = tensor
    if not take:
        raise CheckpointError(f"train.init_from {p}: no tensor of it fits this model (names or shapes all differ)")
    lacking = sorted(ck for ck, mk in names.items() if ck.startswith(required) and mk not in take)
    if lacking:
        raise CheckpointError(f"train.init_from {p} lacks {len(lacking)} tensor(s) the model needs from it, e.g. {lacking[0]}: set model.sam.checkpoint to SAM's .pth")
    model.load_state_dict(take, strict=False)
    return InitReport(str(p), len(take), sorted(skipped))


def _load_adapter(model: CoresModel, adapter: Path, report: CheckpointReport) -> None:
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint has LoRA enabled but no {cfg_file}")
    saved = _read_adapter_config(cfg_file)
    want = model.cfg.lora
    r, alpha, targets = saved.get("r"), saved.get("lora_alpha"), saved.get("target_modules")
    if (r, alpha, targets) != (want.r, want.alpha, lora_target_regex(want)):
        raise CheckpointError(
            f"{cfg_file}: LoRA r={r}, alpha={alpha}, target_modules={targets!r} does not match the config's "
            f"r={want.r}, alpha={want.alpha}, target_modules={lora_target_regex(want)!r}"
        )
    lora = _read_safetensors(adapter / "adapter_model.safetensors")
    expected = set(get_peft_model_state_dict(model.mllm, save_embedding_layers=False))
    try:
        result = set_peft_model_state_dict(model.mllm, lora)
    except RuntimeError as exc:
        raise CheckpointError(f"{adapter}: LoRA weights do not fit the model: {str(exc).splitlines()[0]}") from None
    report.tensors += len(lora)
    report.missing += sorted("adapter/" + k for k in expected - set(lora))
    report.unexpected += sorted("adapter/" + k for k in result.unexpected_keys)


def _read_adapter_config(cfg_file: Path) -> dict:
    """peft's ``adapter_config.json`` as plain data. Read here rather than with
    ``LoraConfig.from_pretrained``, which takes a JSON list, a string or an empty object without
    a word (or with a TypeError deep inside), so a broken file gets one line that names it."""
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise CheckpointError(f'{cfg_file} is not a peft LoRA config (a JSON object with "peft_type": "LORA")')
    return data
