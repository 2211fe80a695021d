"""SAM (segment_anything) for CorrCLIP's region masks: builders, preprocessing and export-friendly graphs.

The graphs split SAM the way the automatic mask generator uses it: the image encoder runs once per image,
the prompt encoder + mask decoder run over batches of single-point prompts. Both wrappers hold only tensor
ops so that they can be exported to ONNX unchanged.
"""

from __future__ import annotations

import copy
import os
from functools import partial

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from corrclip.models.checkpoints import WeightsError, fetch, load_into, load_state_dict, seeded

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
WEIGHTS_FLAG = "--sam-weights"

IMAGE_SIZE = 1024  # the AMG pipeline and the decoder graph assume a 64x64 embedding
PATCH_SIZE = 16

# encoder width, depth, heads, global-attention blocks, output (= prompt) channels
_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...], int]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11), 256),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), 256),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), 256),
    "tiny": (64, 2, 2, (1,), 32),  # tests and smoke runs only
}


def _sam_arch(kind: str) -> Sam:
    width, depth, heads, global_attn, dim = _ARCHS[kind]
    image_encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=width,
        img_size=IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn,
        window_size=14,
        out_chans=dim,
    )
    prompt_encoder, mask_decoder = sam_prompt_modules(kind)
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def sam_prompt_modules(kind: str) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM `kind`'s prompt encoder and mask decoder alone (randomly initialized), e.g. to test decoders."""
    dim = _ARCHS[kind][-1]
    tiny = kind == "tiny"
    grid = IMAGE_SIZE // PATCH_SIZE
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(grid, grid),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=dim, mlp_dim=64 if tiny else 2048, num_heads=2 if tiny else 8
        ),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=dim if tiny else 256,
    )
    return prompt_encoder, mask_decoder


def _kind_of(sd: dict[str, torch.Tensor]) -> str | None:
    """Guesses which SAM size a state dict belongs to, for the error message only."""
    w = sd.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    return next((k for k, a in _ARCHS.items() if a[0] == w.shape[0]), None)


def build_sam(kind: str, weights: str = "official", *, device: str | torch.device = "cpu") -> Sam:
    """Builds SAM `kind` ("vit_b", "vit_l", "vit_h" or "tiny") in eval mode on `device`.

    weights: "official" (fetched once into the torch hub cache), "random" (seeded, reproducible)
    or the path of a local state-dict file (.pth/.pt or .safetensors).
    """
    if kind not in _ARCHS:
        raise ValueError(f"unknown SAM kind {kind!r}; expected one of {sorted(_ARCHS)}")
    if weights == "official" and kind not in SAM_FILES:
        raise WeightsError(f"SAM {kind!r} has no official checkpoint: use weights='random' or a local file")
    sd = None
    if weights != "random":  # read the file first: fail fast, before building a large model
        path = fetch(SAM_URL + SAM_FILES[kind], WEIGHTS_FLAG) if weights == "official" else weights
        sd = load_state_dict(path, nested_keys=("model", "state_dict"))
    with seeded(0):
        sam = _sam_arch(kind)
    if sd is not None:
        found = _kind_of(sd)
        hint = f" (looks like SAM {found!r})" if found not in (None, kind) else ""
        load_into(sam, sd, f"{os.fspath(path)}{hint}, given as SAM {kind!r} weights,")
    return sam.to(device).eval()


def sam_preprocess(sam: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """Does what SamPredictor.set_image does before the encoder: resize, normalize, pad.

    image: HxWx3 uint8 RGB. Returns the [1,3,1024,1024] input on sam's device and the resized (h, w).
    """
    return preprocess_image(image, sam.image_encoder.img_size, sam.pixel_mean, sam.pixel_std)


def preprocess_image(image: np.ndarray, img_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """sam_preprocess from the constants alone (for exported encoders): [1,3,S,S] on the constants' device."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    # PIL resize (the library's choice) so that embeddings match SamPredictor bit for bit
    resized = ResizeLongestSide(img_size).apply_image(image)
    x = torch.as_tensor(resized, device=pixel_mean.device).permute(2, 0, 1).contiguous()[None]
    # Sam.preprocess: normalize in float32, zero-pad bottom and right to the square input
    x = (x - pixel_mean.view(-1, 1, 1)) / pixel_std.view(-1, 1, 1)
    x = torch.nn.functional.pad(x, (0, img_size - x.shape[-1], 0, img_size - x.shape[-2]))
    return x, (int(resized.shape[0]), int(resized.shape[1]))


class SamEncoder(nn.Module):
    """image [B,3,1024,1024] (from sam_preprocess) -> image embeddings [B,C,64,64]."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class SamDecoder(nn.Module):
    """Point prompts -> three low-res mask logits per prompt and their predicted IoUs.

    Same arithmetic as PromptEncoder (points only, no box, no mask input) + MaskDecoder with
    multimask output, but with the label-dependent embedding written as `where`s instead of
    boolean-mask assignments, so it exports cleanly. Logits stay at 256x256: upsampling to the
    image size happens outside the graph, which would otherwise bake in the export-time size.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        n = point_coords.shape[0]
        gh, gw = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, gh, gw)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=dense_pe(pe).to(pe.no_mask_embed.weight.dtype),
            sparse_prompt_embeddings=embed_points(pe, point_coords, point_labels),
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )


def dense_pe(pe: PromptEncoder) -> torch.Tensor:
    """PromptEncoder.get_dense_pe() [1, C, h, w], in float32 also when the weights are bf16 (the library
    then multiplies its float32 grid by a bf16 matrix and fails)."""
    if pe.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32:
        return pe.get_dense_pe()
    return copy.deepcopy(pe.pe_layer).float()(pe.image_embedding_size)[None]


def embed_points(pe: PromptEncoder, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """PromptEncoder._embed_points with pad=True, as `where`s: [P, k, 2] pixels, [P, k] labels -> [P, k+1, C].

    Shifts to pixel centres, appends one "not a point" at (0, 0) and normalizes in the caller's dtype
    (float64 in the AMG), then encodes in float32 as the library does, even when the weights are bf16.
    """
    h, w = pe.input_image_size
    coords = point_coords + 0.5
    coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
    coords = coords / torch.tensor([w, h], dtype=coords.dtype, device=coords.device)
    labels = point_labels.to(torch.float32)
    labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)[..., None]
    # PositionEmbeddingRandom._pe_encoding, with its Gaussian matrix read in float32
    coords = (2 * coords.to(torch.float32) - 1) @ pe.pe_layer.positional_encoding_gaussian_matrix.float()
    coords = 2 * np.pi * coords
    sparse = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)
    sparse = torch.where(labels == -1, pe.not_a_point_embed.weight, sparse)
    sparse = sparse + torch.where(labels == 0, pe.point_embeddings[0].weight, 0.0)
    sparse = sparse + torch.where(labels == 1, pe.point_embeddings[1].weight, 0.0)
    return sparse.to(pe.point_embeddings[0].weight.dtype)
