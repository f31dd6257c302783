"""SAM from the segment-anything package: builders for any size, and ``.pth`` loading.

The parts are segment-anything's own classes (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder`` with a ``TwoWayTransformer``); :func:`build_sam` only chooses their sizes from
a :class:`~cores_cli.config.SamConfig`, so ``vit_h``/``vit_l``/``vit_b`` match the official
registry exactly and the ``tiny`` preset is the same architecture, scaled down.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ..config import SAM_PRESETS, SamConfig
from ..errors import CheckpointError
from .tensor_files import load_pth


def build_sam(cfg: SamConfig) -> Sam:
    """A randomly initialised SAM of the configured size, on the current default device.

    Build under ``with torch.device("meta"):`` to get the architecture without memory.
    """
    grid = cfg.image_size // cfg.patch_size
    image_encoder = ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        mlp_ratio=4,
        out_chans=cfg.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_embed_dim,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_num_heads,
        ),
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    )


@dataclass
class LoadReport:
    """What a state-dict load matched; ``missing``/``unexpected`` are parameter names."""

    source: str
    loaded: int
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        parts = [f"{self.source}: loaded {self.loaded} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})")
        return ", ".join(parts)


def load_state_dict_reported(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Load what matches and report the rest, instead of a silent ``strict=False``.

    Shape mismatches are errors: a checkpoint for another model size must not half-load.
    """
    own = module.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(own[key].shape)} (is the checkpoint for another model size?)"
            )
    result = module.load_state_dict(state, strict=False)
    missing = sorted(result.missing_keys)
    unexpected = sorted(result.unexpected_keys)
    return LoadReport(source, len(state) - len(unexpected), missing, unexpected)


def read_sam_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official ``sam_vit_*.pth`` (a plain state dict), read without
    unpickling code; CheckpointError for a missing, unreadable or non-tensor file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"SAM checkpoint not found: {p}")
    try:
        state = load_pth(p)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"SAM checkpoint {p} could not be read safely: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"SAM checkpoint {p} is not a state dict of tensors")
    return state


def load_sam_checkpoint(sam: Sam, path: str | Path) -> LoadReport:
    """Load an official ``sam_vit_*.pth`` (a plain state dict) without unpickling code."""
    p = Path(path)
    state = read_sam_checkpoint(p)
    check_encoder_variant(sam, state, p)
    report = load_state_dict_reported(sam, state, str(p))
    if report.missing:
        raise CheckpointError(f"SAM checkpoint {p} does not fit this SAM size: {report.summary()}")
    return report


OFFICIAL_VARIANTS = ("vit_h", "vit_l", "vit_b")


@dataclass(frozen=True)
class EncoderShape:
    """What tells SAM's official image encoders apart: their width and their number of blocks."""

    width: int
    depth: int

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor]) -> EncoderShape | None:
        patch = state.get("image_encoder.patch_embed.proj.weight")
        blocks = {int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.") and k.split(".")[2].isdigit()}
        return cls(int(patch.shape[0]), max(blocks) + 1) if patch is not None and patch.ndim == 4 and blocks else None

    @classmethod
    def of_model(cls, sam: Sam) -> EncoderShape:
        return cls(sam.image_encoder.patch_embed.proj.out_channels, len(sam.image_encoder.blocks))

    @classmethod
    def of_config(cls, cfg: SamConfig) -> EncoderShape:
        return cls(cfg.encoder_embed_dim, cfg.encoder_depth)

    def variant(self) -> str | None:
        """``vit_h``/``vit_l``/``vit_b`` for an official size, else None."""
        return next((name for name in OFFICIAL_VARIANTS if EncoderShape.of_config(SAM_PRESETS[name]()) == self), None)

    def describe(self) -> str:
        name = self.variant()
        label = f"ViT-{name[len('vit_'):].upper()}" if name else "an encoder"
        return f"{label} (width {self.width}, {self.depth} blocks)"


def variant_settings(name: str) -> str:
    """The ``--set`` options that configure an official SAM variant."""
    cfg = SAM_PRESETS[name]()
    indexes = ",".join(str(i) for i in cfg.encoder_global_attn_indexes)
    return (
        f"--set sam.encoder_embed_dim={cfg.encoder_embed_dim} --set sam.encoder_depth={cfg.encoder_depth} "
        f"--set sam.encoder_num_heads={cfg.encoder_num_heads} --set sam.encoder_global_attn_indexes=[{indexes}]"
    )


def check_encoder_variant(sam: Sam, state: dict[str, torch.Tensor], path: Path) -> None:
    """An official ``.pth`` of another variant than the model's (ViT-B weights for a ViT-H
    config) fails before any tensor is compared, with the settings that would fit it. Other
    sizes are left to the shape check, which has no variant to suggest."""
    stored, wanted = EncoderShape.of_state(state), EncoderShape.of_model(sam)
    if stored is None or stored == wanted or stored.variant() is None:
        return
    name = stored.variant()
    raise CheckpointError(
        f"SAM checkpoint {path} is {stored.describe()}, but the model is configured for {wanted.describe()}: "
        f"configure {name} with {variant_settings(name)}, or pass {f'a sam_{wanted.variant()}_*.pth' if wanted.variant() else 'a checkpoint of the configured size'}"
    )
