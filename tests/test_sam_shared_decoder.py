"""The shared-image SAM decoder equals segment_anything's MaskDecoder (multimask output, as the AMG uses it)."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d

from corrclip.models.checkpoints import seeded
from corrclip.models.sam import SamDecoder, sam_prompt_modules
from corrclip.models.sam_shared_decoder import MaskFactors, SharedDecoder


def decoder_parts(kind: str) -> SimpleNamespace:
    """SAM `kind`'s prompt encoder and mask decoder, randomly initialized, with random LayerNorm gains and
    biases as well (their defaults, 1 and 0, would hide a misplaced gamma or beta), and mask logits scaled
    up to the size of real SAM's (tens), where a 1e-4 tolerance is a relative 1e-5 or so."""
    with seeded(0):
        pe, md = sam_prompt_modules(kind)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in md.modules():
            if isinstance(m, (torch.nn.LayerNorm, LayerNorm2d)):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=g))
        for mlp in md.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30)
    return SimpleNamespace(prompt_encoder=pe.eval(), mask_decoder=md.eval())


@pytest.fixture(scope="module")
def parts() -> dict[str, SimpleNamespace]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return {kind: decoder_parts(kind) for kind in ("tiny", "vit_b")}


def prompts(n: int, points: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n prompts of `points` points (float64 pixels in the 1024 frame, as in the AMG); labels 1 for single
    points, else a mix of positive (1), negative (0) and padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, points, 2, generator=g, dtype=torch.float64) * 1024
    labels = torch.ones(n, points, dtype=torch.int32) if points == 1 else torch.randint(-1, 2, (n, points), generator=g)
    return coords, labels.to(torch.int32)


def embedding(parts: SimpleNamespace, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, parts.prompt_encoder.embed_dim, 64, 64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def shared_decode(parts: SimpleNamespace, emb: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                  masks_of: torch.Tensor | None = None, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """IoUs of all prompts (in batches) and low-res logits of `masks_of` (default: all)."""
    dec = SharedDecoder(parts)
    terms = dec.image_terms(emb)
    ious, factors = [], []
    for i in range(0, coords.shape[0], batch):
        iou, f = dec.prompt_tokens(terms, coords[i : i + batch], labels[i : i + batch])
        ious.append(iou)
        wanted = torch.arange(i, i + iou.shape[0]) if masks_of is None else masks_of
        keep = wanted[(wanted >= i) & (wanted < i + batch)] - i
        factors.append([x[keep] for x in f])
    f = MaskFactors(*(torch.cat(xs) for xs in zip(*factors, strict=True)))
    return dec.prompt_masks(terms.ecg2_up, f), torch.cat(ious)


CASES = [("tiny", 1, 1), ("tiny", 7, 2), ("tiny", 1024, 1), ("vit_b", 1, 1), ("vit_b", 7, 2),
         pytest.param("vit_b", 1024, 1, marks=[pytest.mark.slow, pytest.mark.skipif(
             not os.environ.get("CORRCLIP_SLOW"), reason="minutes on 2 cores: set CORRCLIP_SLOW=1")])]


@pytest.mark.parametrize(("kind", "n", "points"), CASES)
def test_equals_mask_decoder(parts: dict[str, SimpleNamespace], kind: str, n: int, points: int) -> None:
    p = parts[kind]
    emb = embedding(p)
    coords, labels = prompts(n, points)
    # all n prompts go through the shared decoder (in the AMG's batches of 256 at vit_b); the reference,
    # whose every prompt is independent of the others, checks a random subset of 24 of 1024
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:24].sort().values if n > 24 else None
    low, iou = shared_decode(p, emb, coords, labels, masks_of=subset, batch=256 if kind == "vit_b" else 1024)
    assert low.shape[1:] == (3, 256, 256) and iou.shape == (n, 3)
    if subset is not None:
        coords, labels, iou = coords[subset], labels[subset], iou[subset]
    with torch.no_grad():
        ref_low, ref_iou = SamDecoder(p)(emb, coords, labels)
    assert ref_low.abs().max() > 5 and ref_iou.abs().max() > 0.05  # outputs large enough for 1e-4 to mean something
    torch.testing.assert_close(low, ref_low, rtol=0, atol=1e-4)
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bf16_close_to_fp32(parts: dict[str, SimpleNamespace], mode: str) -> None:
    """In bf16 (autocast on fp32 weights, or bf16 weights) the shared decoder stays as close to the fp32
    outputs as segment_anything's decoder does in the same mode (its LayerNorm statistics stay fp32)."""
    p = parts["vit_b"]
    emb = embedding(p)
    coords, labels = prompts(3)
    with torch.no_grad():
        ref_low, ref_iou = SamDecoder(p)(emb, coords, labels)
        if mode == "autocast":
            with torch.autocast("cpu", torch.bfloat16):
                low, iou = shared_decode(p, emb, coords, labels)
                lib_low, lib_iou = SamDecoder(p)(emb, coords, labels)
        else:
            p16 = copy.deepcopy(p)
            p16.prompt_encoder.bfloat16()
            p16.mask_decoder.bfloat16()
            low, iou = shared_decode(p16, emb.bfloat16(), coords, labels)
            lib_low, lib_iou = SamDecoder(p16)(emb.bfloat16(), coords, labels)
    assert low.dtype == iou.dtype == torch.bfloat16
    for got, lib, ref in ((low, lib_low, ref_low), (iou, lib_iou, ref_iou)):
        err, lib_err = (got.float() - ref).abs().max(), (lib.float() - ref).abs().max()
        assert 0 < err <= 2 * lib_err and err <= 0.03 * ref.abs().max(), (float(err), float(lib_err))
