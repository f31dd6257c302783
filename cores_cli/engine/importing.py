"""``cores import``: an original-format checkpoint in, a cores checkpoint out.

Two source formats (docs/MODEL.md, "Imported checkpoints"):

- ``lisa``: the merged HF directory LISA's ``merge_lora_weights_and_save_hf_model.py`` writes:
  LLaMA (``model.layers.*``, ``lm_head``), a linear ``model.mm_projector``, SAM under
  ``model.visual_model``, β as ``model.text_hidden_fcs.0.{0,2}``, a tokenizer with ``[SEG]`` and
  ``<im_start>``/``<im_end>``. LISA strips the CLIP tower before saving: it comes from the CLIP
  directory the config names (``mm_vision_tower``) or ``--clip``. The result is a depth-1
  (``[SEG]``) model with LISA's prompt, its hidden state before ``[SEG]`` and its answer.
- ``llava``: liuhaotian's original LLaVA (v0/v1: linear projector, v1.5: ``mlp2x_gelu``), the
  multimodal LLM only; SAM comes from ``--sam`` (the official ``sam_vit_*.pth``); β, the refiner
  and the chain-token rows start fresh. A base to train CoReS from (``cores-7b-v0``).

The output has the layout ``cores export`` writes: ``OUT/llava/`` (an HF LLaVA directory, loadable
by transformers alone), ``config.json`` (``mllm.path: llava``), ``tokenizer/`` and
``weights.safetensors`` (SAM, β, refiner, chain-token rows). Every source tensor is mapped or
dropped for a stated reason; anything else, anything missing and any shape that differs is an
error naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import CHAIN_TOKENS, SAM_PRESETS, MllmConfig, ModelConfig, SamConfig, TextArch, VisionArch, replace
from ..configio import apply_overrides
from ..errors import CheckpointError, CoresError
from ..fileio import atomic_directory
from ..hub import local_or_hub
from ..model.builder import build_model
from ..model.chain import ChainProjector, TokenRefiner
from ..model.mllm import IMAGE_TOKEN, IMAGE_WRAP_TOKENS, add_chain_tokens, check_single_tokens, llava_config, read_tokenizer_dir, source_format_of
from ..model.sam import EncoderShape, read_sam_checkpoint
from .checkpoint import FORMAT, stored_shapes, write_checkpoint_files
from .source_weights import SourceWeights

FORMATS = ("lisa", "llava")
IMPORT_ENTRIES = frozenset({"config.json", "tokenizer", "weights.safetensors", "llava"})
"""What an import writes: the only names ``--overwrite`` replaces."""
SHARD_BYTES = 4 * 1024**3


# ------------------------------------------------------------------------------ key mapping


@dataclass(frozen=True)
class Rule:
    """Source keys starting with ``prefix`` go to ``target`` (``llava``, ``sam``, ``projector``)
    under ``replacement`` + the rest of the key, or are dropped (``target`` None) for ``why``."""

    prefix: str
    target: str | None
    replacement: str = ""
    why: str = ""
    formats: tuple[str, ...] = FORMATS


_DERIVED = "a buffer transformers recomputes from the config"
VISION_TOWER = "model.vision_tower."
"""Where transformers' LLaVA holds the CLIP vision model's own names."""
_CLIP_TEXT = "CLIP's text half and projections: LLaVA reads the vision tower's hidden states only"

SOURCE_RULES: tuple[Rule, ...] = (
    Rule("model.vision_tower.vision_tower.vision_model.embeddings.position_ids", None, why=_DERIVED),
    Rule("model.vision_tower.vision_model.embeddings.position_ids", None, why=_DERIVED),
    # self-trained LLaVA (CLIPVisionTower wrapping CLIPVisionModel), and the v0-era bare tower
    Rule("model.vision_tower.vision_tower.vision_model.", "llava", VISION_TOWER),
    Rule("model.vision_tower.vision_model.", "llava", VISION_TOWER),
    Rule("model.embed_tokens.", "llava", "model.language_model.embed_tokens."),
    Rule("model.layers.", "llava", "model.language_model.layers."),
    Rule("model.norm.", "llava", "model.language_model.norm."),
    Rule("lm_head.", "llava", "lm_head."),
    Rule("model.mm_projector.weight", "llava", "model.multi_modal_projector.linear_1.weight"),
    Rule("model.mm_projector.bias", "llava", "model.multi_modal_projector.linear_1.bias"),
    Rule("model.mm_projector.0.", "llava", "model.multi_modal_projector.linear_1."),
    Rule("model.mm_projector.2.", "llava", "model.multi_modal_projector.linear_2."),
    Rule("model.visual_model.", "sam", "", formats=("lisa",)),
    Rule("model.text_hidden_fcs.0.0.", "projector", "fc1.", formats=("lisa",)),
    Rule("model.text_hidden_fcs.0.2.", "projector", "fc2.", formats=("lisa",)),
)

CLIP_RULES: tuple[Rule, ...] = (
    Rule("vision_model.embeddings.position_ids", None, why=_DERIVED),
    Rule("embeddings.position_ids", None, why=_DERIVED),
    # CLIPModel and transformers-4 CLIPVisionModel saves, then transformers-5 CLIPVisionModel's
    Rule("vision_model.", "llava", VISION_TOWER),
    *(Rule(part, "llava", VISION_TOWER + part) for part in ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")),
    Rule("text_model.", None, why=_CLIP_TEXT),
    Rule("visual_projection.", None, why=_CLIP_TEXT),
    Rule("text_projection.", None, why=_CLIP_TEXT),
    Rule("logit_scale", None, why=_CLIP_TEXT),
)

_ROTARY = re.compile(r"(^|\.)rotary_emb\.(original_)?inv_freq$")


@dataclass
class KeyPlan:
    """Where every tensor of one source goes: (target, new name) per source name, the drops
    with their reasons, and what no rule covers."""

    mapped: dict[str, tuple[str, str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def into(self, target: str) -> dict[str, str]:
        """New name → source name, for one target."""
        return {new: old for old, (t, new) in self.mapped.items() if t == target}


def plan_keys(names: list[str], rules: tuple[Rule, ...], fmt: str) -> KeyPlan:
    plan = KeyPlan()
    for name in names:
        if _ROTARY.search(name):
            plan.dropped[name] = _DERIVED
            continue
        rule = next((r for r in rules if fmt in r.formats and name.startswith(r.prefix)), None)
        if rule is None:
            plan.unmapped.append(name)
        elif rule.target is None:
            plan.dropped[name] = rule.why
        else:
            plan.mapped[name] = (rule.target, rule.replacement + name[len(rule.prefix) :])
    return plan


def _named(keys: list[str], limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------ the sources


@dataclass
class Source:
    """An original-format checkpoint directory: its config, weights and format."""

    path: Path
    config: dict
    fmt: str
    weights: SourceWeights

    @classmethod
    def open(cls, path: str | Path, fmt: str = "auto") -> Source:
        directory = Path(path)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{directory} has no config.json: not a checkpoint directory")
        config = _read_json(config_file)
        detected = source_format_of(config)
        if fmt == "auto":
            if detected is None:
                raise CheckpointError(_unknown_format(config_file, config))
            fmt = detected
        elif fmt not in FORMATS:
            raise CoresError(f"unknown --format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(config.get(key), int):
                raise CheckpointError(f"{config_file} has no integer {key}: not a LLaMA-based {fmt} config")
        if "delta" in str(config.get("_name_or_path", "")).lower() or "delta" in directory.name.lower():
            raise CheckpointError(
                f"{directory} looks like LLaVA delta weights (liuhaotian published v0 as a difference to LLaMA): "
                f"apply them to the LLaMA weights first with LLaVA's apply_delta, then import the result"
            )
        return cls(directory, config, fmt, SourceWeights(directory))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _unknown_format(config_file: Path, config: dict) -> str:
    if isinstance(config, dict) and config.get("format") == FORMAT:
        return f"{config_file.parent} is already a cores checkpoint: use it with -c as it is"
    if isinstance(config, dict) and "text_config" in config:
        return f"{config_file.parent} is an HF LLaVA directory (llava-hf layout): use it as the base with --set mllm.path={config_file.parent}, no import needed"
    return (
        f"{config_file} is neither LISA's (architectures LISAForCausalLM, out_dim) nor original LLaVA's "
        f"(mm_vision_tower, mm_hidden_size): pass --format lisa or --format llava if it is one of them"
    )


@dataclass
class ClipSource:
    """The CLIP vision tower: an HF ``CLIPVisionModel`` or ``CLIPModel`` directory."""

    path: Path
    vision: dict
    weights: SourceWeights
    preprocessor: dict

    @classmethod
    def open(cls, ref: str | Path) -> ClipSource:
        path = local_or_hub(ref, "CLIP tower")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"CLIP tower {ref}: no config.json in {path} (pass --clip with an HF CLIP directory, e.g. openai/clip-vit-large-patch14)")
        config = _read_json(config_file)
        vision = config.get("vision_config") if config.get("model_type") == "clip" else config
        if not isinstance(vision, dict) or vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise CheckpointError(f"{config_file} is not a CLIP model (model_type clip or clip_vision_model)")
        pre = path / "preprocessor_config.json"
        preprocessor = _read_json(pre) if pre.is_file() else {}
        return cls(path, vision, SourceWeights(path), preprocessor)

    def arch(self) -> VisionArch:
        v, default = self.vision, VisionArch()
        return VisionArch(
            hidden_size=v.get("hidden_size", default.hidden_size),
            intermediate_size=v.get("intermediate_size", default.intermediate_size),
            num_layers=v.get("num_hidden_layers", default.num_layers),
            num_heads=v.get("num_attention_heads", default.num_heads),
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", default.patch_size),
            projection_dim=v.get("projection_dim", default.projection_dim),
            hidden_act=v.get("hidden_act", default.hidden_act),
        )


# ------------------------------------------------------------------------------ the result


@dataclass
class ImportReport:
    """What an import did, for the summary the command prints."""

    source: str
    fmt: str
    out: str
    mapped: int
    dropped: dict[str, int]
    """Reason → number of source tensors dropped for it."""
    added_tokens: list[str]
    decisions: list[str]
    """Settings read from the source (projector kind, image tokens, hidden position...)."""

    def lines(self) -> list[str]:
        out = [f"imported {self.fmt} checkpoint {self.source} → {self.out}: {self.mapped} tensors mapped"]
        out += [f"  dropped {n}: {why}" for why, n in sorted(self.dropped.items())]
        if self.added_tokens:
            out.append(f"  tokens added: {' '.join(self.added_tokens)}")
        out += [f"  {d}" for d in self.decisions]
        return out


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    fmt: str = "auto",
    clip: str | Path | None = None,
    sam: str | Path | None = None,
    sam_preset: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Convert ``src`` into a cores checkpoint at ``out`` (atomically) and say what was done.
    ``progress(done, total)`` is called as the LLaVA tensors are written (the long part)."""
    src_path = local_or_hub(src, "source checkpoint")
    source = Source.open(src_path, fmt)
    plan = plan_keys(source.weights.keys(), SOURCE_RULES, source.fmt)
    if plan.unmapped:
        raise CheckpointError(f"{source.path}: {len(plan.unmapped)} tensor(s) of no known {source.fmt} part: {_named(plan.unmapped)}")
    clip_ref = clip or source.config.get("mm_vision_tower") or source.config.get("vision_tower")
    if clip_ref is None:
        raise CoresError(f"{source.path / 'config.json'} names no CLIP tower (mm_vision_tower): pass --clip DIR_OR_HUB_ID")
    clip_source = ClipSource.open(clip_ref)
    if source.fmt == "llava" and sam is None:
        raise CoresError("an original LLaVA checkpoint has no SAM: pass --sam with the official sam_vit_h_4b8939.pth (or another SAM .pth)")
    if source.fmt == "lisa" and sam is not None:
        raise CoresError("a LISA checkpoint carries its own SAM (fine-tuned mask decoder): --sam is for --format llava")
    dest = Path(out)
    check_import_target([source.path, clip_source.path, *([Path(sam)] if sam else [])], dest, overwrite)

    decisions: list[str] = []
    tokenizer, added = _tokenizer(source, decisions)
    sam_state = _sam_state(source, plan, sam)
    sam_cfg = _sam_config(sam_state, sam_preset, source.path if sam is None else Path(sam))
    projector = _projector_kind(plan, source.path)
    mllm = _mllm_config(source, clip_source, tokenizer, projector, decisions)
    cfg = _model_config(source.fmt, sam_cfg, mllm, overrides or [], decisions)
    report = ImportReport(str(src), source.fmt, str(dest), 0, {}, added, decisions)
    for why in plan.dropped.values():
        report.dropped[why] = report.dropped.get(why, 0) + 1

    with atomic_directory(dest) as tmp:
        llava_dir = tmp / "llava"
        llava_dir.mkdir()
        report.mapped = _write_llava(llava_dir, source, clip_source, plan, cfg, tokenizer, report, progress)
        tokenizer.save_pretrained(llava_dir)
        tensors = _cores_tensors(cfg, source, plan, sam_state, tokenizer, seed)
        report.mapped += sum(1 for t, _ in plan.mapped.values() if t in ("sam", "projector"))
        # the stored config names the HF directory relative to the checkpoint (movable as a whole)
        _check_against_model(replace(cfg, mllm=replace(cfg.mllm, path=str(llava_dir))), tokenizer, tensors)
        write_checkpoint_files(tmp, cfg, tokenizer, tensors, extra={"imported_from": str(src), "source_format": source.fmt})
    source.weights.close()
    clip_source.weights.close()
    return report


def check_import_target(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """``out`` may not overlap an input, and an existing ``out`` is replaced only with
    ``overwrite`` and only when it is an earlier import (nothing in it that an import does not write)."""
    target = out.resolve()
    for path in inputs:
        p = path.resolve()
        if target == p or p in target.parents or target in p.parents:
            raise CoresError(f"the output {out} overlaps the input {path}: choose a directory outside it")
    if not out.exists():
        return
    if not overwrite:
        raise CoresError(f"{out} exists: pass --overwrite to replace an earlier import, or choose another directory")
    config = out / "config.json"
    try:
        extra = json.loads(config.read_text(encoding="utf-8")).get("extra", {})
    except (OSError, ValueError, AttributeError):
        extra = {}
    entries = {p.name for p in out.iterdir()} if out.is_dir() else {"?"}
    if not isinstance(extra, dict) or "imported_from" not in extra or not entries <= IMPORT_ENTRIES:
        raise CoresError(f"{out} is not an earlier import (--overwrite replaces only what `cores import` wrote): choose another directory")


# ------------------------------------------------------------------------------ the parts


def _tokenizer(source: Source, decisions: list[str]):
    """The source tokenizer as a fast one, with ``<image>`` and the chain tokens added (ids of
    tokens it has, LISA's ``[SEG]`` among them, are kept)."""
    try:
        tok = read_tokenizer_dir(source.path)
    except CheckpointError as exc:
        if (source.path / "tokenizer.model").is_file():
            try:
                import google.protobuf  # noqa: F401
                import sentencepiece  # noqa: F401
            except ImportError:
                raise CheckpointError(f"{source.path} has a SentencePiece tokenizer (tokenizer.model): converting it needs the sentencepiece and protobuf packages (pip install sentencepiece protobuf)") from None
        raise exc
    before = set(tok.get_vocab())
    if IMAGE_TOKEN not in before:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    add_chain_tokens(tok)
    if source.config.get("mm_use_im_start_end"):
        check_single_tokens(tok, IMAGE_WRAP_TOKENS, source.path, "mm_use_im_start_end")
    added = [t for t in (IMAGE_TOKEN, *CHAIN_TOKENS) if t not in before]
    kept = [f"{t}={tok.convert_tokens_to_ids(t)}" for t in CHAIN_TOKENS if t in before]
    if kept:
        decisions.append(f"kept the source's {' '.join(kept)} (its trained rows become the chain-token rows)")
    return tok, added


def _sam_state(source: Source, plan: KeyPlan, sam: str | Path | None) -> dict[str, torch.Tensor]:
    if sam is None:
        return {new: source.weights[old] for new, old in plan.into("sam").items()}
    return read_sam_checkpoint(sam)


def _sam_config(state: dict[str, torch.Tensor], preset: str | None, where: Path) -> SamConfig:
    if preset is not None:
        try:
            return SAM_PRESETS[preset]()
        except KeyError:
            raise CoresError(f"unknown --sam-preset {preset!r}; choose from {', '.join(SAM_PRESETS)}") from None
    shape = EncoderShape.of_state(state)
    variant = shape.variant() if shape else None
    if variant is None:
        found = shape.describe() if shape else "no SAM image encoder"
        raise CheckpointError(f"{where}: the SAM weights are {found}, not an official ViT-H/L/B: pass --sam-preset with its configuration")
    return SAM_PRESETS[variant]()


def _projector_kind(plan: KeyPlan, where: Path) -> str:
    """``linear`` (v0/v1, LISA) or ``mlp2x_gelu`` (1.5), from the weights: LISA's 13B config says
    mlp2x_gelu while its code builds (and its weights hold) a linear layer."""
    names = set(plan.into("llava"))
    if "model.multi_modal_projector.linear_2.weight" in names:
        return "mlp2x_gelu"
    if "model.multi_modal_projector.linear_1.weight" in names:
        return "linear"
    raise CheckpointError(f"{where}: no mm_projector weights (model.mm_projector.weight, or .0/.2 for mlp2x_gelu)")


def _mllm_config(source: Source, clip: ClipSource, tok, projector: str, decisions: list[str]) -> MllmConfig:
    c = source.config
    if c.get("rope_scaling") or c.get("rope_theta", 10000.0) != 10000.0:
        raise CheckpointError(f"{source.path / 'config.json'}: rope_scaling / rope_theta other than LLaMA's are not supported by the importer")
    text = TextArch(
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        vocab_size=0,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
    )
    vision = clip.arch()
    # LLaVA's code reads mm_vision_select_layer with a default of -1
    layer = c.get("mm_vision_select_layer", -1)
    select = {"patch": "default", "cls_patch": "full"}.get(c.get("mm_vision_select_feature", "patch"))
    if select is None:
        raise CheckpointError(f"{source.path / 'config.json'}: mm_vision_select_feature {c.get('mm_vision_select_feature')!r} is not patch or cls_patch")
    image_mode = "pad" if c.get("image_aspect_ratio") == "pad" else "crop"
    mean = tuple(clip.preprocessor.get("image_mean", MllmConfig().image_mean))
    std = tuple(clip.preprocessor.get("image_std", MllmConfig().image_std))
    mllm = MllmConfig(
        path="llava",
        text=text,
        vision=vision,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=layer,
        vision_feature_select_strategy=select,
        image_mode=image_mode,
        image_start_end=bool(c.get("mm_use_im_start_end", False)),
        projector=projector,
        image_mean=mean,
        image_std=std,
    )
    n = mllm.num_image_tokens
    decisions.append(
        f"projector {projector}; CLIP {vision.image_size} px ({n} image tokens, layer {layer}, {image_mode} to square)"
        f"{', <im_start>/<im_end> around them' if mllm.image_start_end else ''}"
    )
    return mllm


def _model_config(fmt: str, sam: SamConfig, mllm: MllmConfig, overrides: list[str], decisions: list[str]) -> ModelConfig:
    base = ModelConfig(preset=f"imported-{fmt}", sam=sam, mllm=mllm)
    cfg = replace(base, lora=replace(base.lora, enabled=False))
    if fmt == "lisa":
        cfg = replace(
            cfg,
            chain=replace(cfg.chain, depth=1, hidden_at="predicting"),
            prompt=replace(cfg.prompt, template="lisa", cores_suffix="", in_context_k=0),
        )
        decisions.append("LISA's settings: chain [SEG] (depth 1), hidden state read before [SEG], its questions and [SEG]. answer, no exemplars")
    try:
        return apply_overrides(cfg, overrides)
    except CoresError as exc:
        raise CoresError(f"--set: {exc}") from None


def _write_llava(
    folder: Path, source: Source, clip: ClipSource, plan: KeyPlan, cfg: ModelConfig, tok, report: ImportReport, progress: Callable[[int, int], None] | None = None
) -> int:
    """The HF LLaVA directory: config.json and safetensors shards, written shard by shard."""
    embed = source.weights["model.embed_tokens.weight"]
    # the tokenizer may have grown past the source's rows (never shrink: vocabularies are padded)
    src_rows, dtype = int(embed.shape[0]), embed.dtype
    rows = max(src_rows, len(tok))
    del embed  # read again, in its turn, when its shard is written
    hf = llava_config(cfg.mllm, rows, cfg.mllm.image_token_index, tok.pad_token_id)
    hf.text_config.bos_token_id, hf.text_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    hf.dtype = dtype
    expected = _meta_shapes(hf)

    clip_plan = plan_keys(clip.weights.keys(), CLIP_RULES, source.fmt)
    if clip_plan.unmapped:
        raise CheckpointError(f"{clip.path}: {len(clip_plan.unmapped)} tensor(s) that are not CLIP's: {_named(clip_plan.unmapped)}")
    for why in clip_plan.dropped.values():
        report.dropped[why] = report.dropped.get(why, 0) + 1
    own = plan.into("llava")
    from_clip = {new: old for new, old in clip_plan.into("llava").items() if new not in own}
    if any(name.startswith("model.vision_tower.") for name in own):
        report.decisions.append(f"vision tower taken from the source's own weights (not {clip.path})")

    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for new, old in own.items():
        makers[new] = _reader(source.weights, old)
    for new, old in from_clip.items():  # at the CLIP file's own precision: a copy, not a cast
        makers[new] = _reader(clip.weights, old)
    if cfg.mllm.projector == "linear":
        width = cfg.mllm.text.hidden_size
        makers["model.multi_modal_projector.linear_2.weight"] = lambda: torch.eye(width, dtype=dtype)
        makers["model.multi_modal_projector.linear_2.bias"] = lambda: torch.zeros(width, dtype=dtype)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in makers and rows > src_rows:
            makers[name] = _grown(makers[name], rows)

    missing = sorted(set(expected) - set(makers))
    unexpected = sorted(set(makers) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_named(missing)}"] if missing else []) + ([f"no place for {_named(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source.path}: the weights do not make a complete LLaVA ({'; '.join(parts)})")
    hf.save_pretrained(folder)
    files = _write_shards(folder, expected, makers, lambda name: own.get(name) or from_clip.get(name) or name, source.path, progress)
    if len(files) > 1:
        weight_map = {name: file.name for file, names in files.items() for name in names}
        total = sum(file.stat().st_size for file in files)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return len(own) + len(from_clip)


def _write_shards(
    folder: Path,
    expected: dict[str, tuple[int, ...]],
    makers: dict[str, Callable[[], torch.Tensor]],
    origin: Callable[[str], str],
    where: Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[Path, list[str]]:
    """Safetensors shards of at most SHARD_BYTES, each written and freed as soon as it is full,
    so that no more than one shard of the model is ever in memory; named as transformers names
    them (``model.safetensors``, or ``model-0000i-of-0000n.safetensors``)."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        path = folder / f".shard-{len(written) + 1:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for done, name in enumerate(expected, start=1):  # the model's own order
        tensor = makers[name]()
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{where}: {origin(name)} has shape {tuple(tensor.shape)}, the config makes it {expected[name]}")
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
        if progress is not None:
            progress(done, len(expected))
    if shard:
        flush()
    n = len(written)
    files: dict[Path, list[str]] = {}
    for i, (path, names) in enumerate(written, start=1):
        final = folder / ("model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
        path.rename(final)
        files[final] = names
    return files


def _meta_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _reader(weights: SourceWeights, name: str) -> Callable[[], torch.Tensor]:
    return lambda: weights[name]


def _grown(read: Callable[[], torch.Tensor], rows: int) -> Callable[[], torch.Tensor]:
    """New rows at the mean of the old ones (LLaVA's and LISA's choice for added tokens)."""

    def make() -> torch.Tensor:
        old = read()
        extra = old.float().mean(0, keepdim=True).expand(rows - old.shape[0], -1).to(old.dtype)
        return torch.cat([old, extra])

    return make


def _cores_tensors(cfg: ModelConfig, source: Source, plan: KeyPlan, sam_state: dict[str, torch.Tensor], tok, seed: int) -> dict[str, torch.Tensor]:
    """weights.safetensors: SAM (all of it), β, the refiner and the chain-token rows."""
    tensors = {f"sam.{k}": v.contiguous() for k, v in sam_state.items()}
    hidden, dim = cfg.mllm.text.hidden_size, cfg.sam.prompt_embed_dim
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh_projector = ChainProjector(hidden, dim)
        refiner = TokenRefiner(dim, cfg.chain.refiner_heads, cfg.chain.refiner_init_scale)
    finally:
        torch.random.set_rng_state(generator_state)
    given = plan.into("projector")
    if given:
        projector = {k: source.weights[old].float() for k, old in given.items()}
    else:
        projector = fresh_projector.state_dict()
    tensors.update({f"projector.{k}": v.contiguous() for k, v in projector.items()})
    tensors.update({f"refiner.{k}": v.contiguous() for k, v in refiner.state_dict().items()})
    embed = source.weights["model.embed_tokens.weight"]
    head = source.weights["lm_head.weight"]
    ids = [tok.convert_tokens_to_ids(t) for t in CHAIN_TOKENS]
    tensors["token_rows.token_ids"] = torch.tensor(ids, dtype=torch.long)
    tensors["token_rows.embed"] = _rows(embed, ids)
    tensors["token_rows.head"] = _rows(head, ids)
    return tensors


def _rows(matrix: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The matrix's rows for ``ids``, the mean row for ids past its end (tokens just added)."""
    mean = matrix.float().mean(0).to(matrix.dtype)
    return torch.stack([matrix[i] if i < matrix.shape[0] else mean for i in ids]).contiguous()


def _check_against_model(cfg: ModelConfig, tok, tensors: dict[str, torch.Tensor]) -> None:
    """The written tensors are exactly what the checkpoint loader will ask for (names, shapes):
    checked on a model built on ``meta``, so nothing is allocated."""
    model = build_model(cfg, load_base_weights=False, tokenizer=tok, device="meta")
    wanted = stored_shapes(model)
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(tensors) if tuple(tensors[k].shape) != wanted[k])
    if missing or extra or wrong:
        parts = [f"{what}: {_named(keys)}" for what, keys in (("missing", missing), ("unexpected", extra), ("shape", wrong)) if keys]
        raise CheckpointError(f"the converted weights do not fit the model ({'; '.join(parts)})")


