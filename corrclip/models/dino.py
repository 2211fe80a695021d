"""DINO ViT/8 backbones (the reference ViT expressed with timm) and CorrCLIP's q+k patch features.

CorrCLIP runs DINO on every CLIP-normalized window, hooks the last block's qkv projection and uses
F = q + k (CLS dropped, L2-normalized per token) as the patch affinity features. Only the last
block's norm1 and qkv influence F, so `DinoFeatures` stops there instead of running the whole block.
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from corrclip.models.bicubic import plus_tenth_step, resize_grid
from corrclip.models.checkpoints import WeightsError, fetch, load_into, load_state_dict, seeded

PATCH = 8
IMG_SIZE = 224  # pretrained resolution: a 28x28 position grid plus the CLS position

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (embed_dim, depth, num_heads, official checkpoint URL or None)
PRESETS: dict[str, tuple[int, int, int, str | None]] = {
    "dino_vitb8": (768, 12, 12,
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_vits8": (384, 12, 6,
                   "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "tiny": (64, 2, 2, None),
}
WEIGHTS_FLAG = "--dino-weights"
# DINO's training checkpoints keep the backbone under one of these (the teacher is what DINO evaluates).
NESTED_KEYS = ("teacher", "student", "model", "state_dict")


def _architecture(name: str) -> VisionTransformer:
    embed_dim, depth, num_heads, _ = PRESETS[name]
    return VisionTransformer(
        img_size=IMG_SIZE, patch_size=PATCH, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU,
        num_classes=0, class_token=True, global_pool="token",
    )


def _backbone_only(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strips DDP's "module." and MultiCropWrapper's "backbone." prefixes; drops the DINO head if present."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        # A training checkpoint: the projection head ("head.*") is not part of the backbone.
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _read_checkpoint(path: str) -> dict[str, Tensor]:
    # DINO's full training checkpoints also pickle their argparse.Namespace; allowing that one plain
    # class keeps weights_only=True loading (no arbitrary code) while accepting those files.
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = load_state_dict(path, nested_keys=NESTED_KEYS)
    return _backbone_only(sd)


def build_dino(
    name: str, weights: str = "official", *, device: str | torch.device = "cpu"
) -> VisionTransformer:
    """Builds a DINO ViT/8 ("dino_vitb8", "dino_vits8" or the test-size "tiny") in eval mode.

    weights: "official" (downloaded once into the torch hub cache), "random" (seeded), or a local
    checkpoint path in the official format (.pth flat or wrapped, or .safetensors).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown DINO backbone {name!r}; choose one of {sorted(PRESETS)}")
    # Read the checkpoint first: a missing download or a bad file fails before a ViT-B is built.
    sd, source = None, weights
    if weights == "official":
        url = PRESETS[name][3]
        if url is None:
            raise WeightsError(
                f"{name!r} has no official checkpoint; use weights='random' or pass {WEIGHTS_FLAG} PATH"
            )
        source = str(fetch(url, WEIGHTS_FLAG))
        sd = _read_checkpoint(source)
    elif weights != "random":
        sd = _read_checkpoint(weights)
    with seeded(0):
        vit = _architecture(name)
    if sd is not None:
        load_into(vit, sd, source)
    return vit.to(device).eval()


def interpolate_pos_embed_dino(pos_embed: Tensor, h: int, w: int, patch: int) -> Tensor:
    """Resizes [1, 1+N0, C] position embeddings to an h x w pixel input the way DINO's reference does.

    The reference keeps the table untouched only when the patch count matches AND the input is
    square; otherwise it resizes bicubically with a *scale factor* of (cells + 0.1) / sqrt(N0) per
    axis. The +0.1 makes floor() land on the cell count, but it also shifts the sampling positions
    (the step is sqrt(N0) / (cells + 0.1)), so resizing to size=(rows, cols) would not reproduce it.
    The keep-or-resize choice is a tensor select of the step (a step of exactly 1 reproduces the
    table bit for bit), not a Python branch, so an exported graph serves both cases.
    """
    n0, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = math.sqrt(n0)
    rows, cols = h // patch, w // patch

    def scalar(v: int) -> Tensor:
        # float64 like the reference's Python floats; the step is cast to the compute dtype at the end.
        return torch.full((), v, dtype=torch.float64, device=pos_embed.device)

    keep = (scalar(rows) * scalar(cols) == n0) & (scalar(h) == scalar(w))
    compute = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    table = pos_embed[0, 1:].to(compute).reshape(int(side), int(side), dim)
    grid = resize_grid(table, rows, cols, plus_tenth_step(rows, side, keep, compute),
                       plus_tenth_step(cols, side, keep, compute))  # [rows, cols, dim]
    grid = grid.reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def clip_to_imagenet(x: Tensor) -> Tensor:
    """Undoes CLIP's normalization and applies ImageNet's, in x's dtype (the research code's order)."""
    shape = (1, 3, 1, 1)
    clip_mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(shape)
    clip_std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(shape)
    in_mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(shape)
    in_std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(shape)
    return (x * clip_std + clip_mean - in_mean) / in_std


class DinoFeatures(nn.Module):
    """CLIP-normalized windows [B, 3, h, w] -> L2-normalized q+k patch features [B, (h/8)*(w/8), C]."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.patch = vit.patch_embed.proj.kernel_size[0]
        self.embed_dim = vit.embed_dim

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """The feature grid (rows, cols) for an h x w window."""
        return h // self.patch, w // self.patch

    def forward(self, windows: Tensor) -> Tensor:
        _, _, h, w = windows.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"window sides must be multiples of {self.patch}, got {h}x{w}")
        vit = self.vit
        x = clip_to_imagenet(windows).to(vit.patch_embed.proj.weight.dtype)
        # The conv directly: timm's PatchEmbed would insist on the 224x224 pretraining size.
        x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + interpolate_pos_embed_dino(vit.pos_embed, h, w, self.patch)
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))  # [B, 1+n, 3C]: q, k, v with heads concatenated, unscaled
        c = self.embed_dim
        feats = qkv[..., :c] + qkv[..., c:2 * c]
        if feats.dtype in (torch.float16, torch.bfloat16):
            # Region merging and the scope rule decide on these: normalize in fp32 (corrclip/precision.py).
            feats = feats.float()
        return F.normalize(feats[:, 1:], dim=-1)
