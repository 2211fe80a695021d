"""The research code's published mIoU, the settings behind each number, and how a run of ours differs.

Numbers are copied from the specs (../shared/specs/*.md §"Reported results"), which cite the
research repositories' READMEs (SC-CLIP's from its paper, unverified there).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reported:
    method: str
    backbone: str
    masks: str | None  # "sam2_32" (pre-generated SAM2 masks, 32x32 points), "sam2_8" (online, 8x8), None
    clip: str  # the CLIP weights as our `identity["clip"]` spells them
    precision: str
    setting: str  # one line, for people
    source: str
    miou: dict[str, float]


def _row(*values: float) -> dict[str, float]:
    keys = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "city_scapes", "ade20k")
    return {k: v for k, v in zip(keys, values, strict=True) if v is not None}


_CORR = "CorrCLIP v1 README"
_CORR_B = "ViT-B-16-quickgelu:metaclip_fullcc"
_CORR_L = "ViT-L-14-quickgelu:metaclip_fullcc"
REPORTED: tuple[Reported, ...] = (
    Reported("corrclip", "vit_b", "sam2_32", _CORR_B, "fp16",
             "CorrCLIP ViT-B/16 MetaCLIP + DINO ViT-B/8, pre-generated SAM2 Hiera-L masks (32x32 points)", _CORR,
             _row(74.8, 88.8, 44.2, 48.8, 43.7, 31.6, 49.4, 26.9)),
    Reported("corrclip", "vit_b", "sam2_8", _CORR_B, "fp16",
             "CorrCLIP ViT-B/16 MetaCLIP + DINO ViT-B/8, online SAM2 Hiera-L masks (8x8 points)", _CORR,
             _row(73.9, 87.6, 43.7, 48.0, 43.6, 31.8, 47.9, 26.5)),
    Reported("corrclip", "vit_l", "sam2_32", _CORR_L, "fp16",
             "CorrCLIP ViT-L/14 MetaCLIP + DINO ViT-B/8, pre-generated SAM2 Hiera-L masks (32x32 points)", _CORR,
             _row(76.7, 91.5, 44.9, 50.8, 49.4, 34.0, 51.1, 30.7)),
    Reported("corrclip", "vit_l", "sam2_8", _CORR_L, "fp16",
             "CorrCLIP ViT-L/14 MetaCLIP + DINO ViT-B/8, online SAM2 Hiera-L masks (8x8 points)", _CORR,
             _row(76.2, 91.2, 44.2, 49.9, 49.0, 33.7, 48.9, 29.8)),
    Reported("sc-clip", "vit_b", None, "ViT-B-16:openai", "fp16", "SC-CLIP ViT-B/16 OpenAI CLIP",
             "SC-CLIP paper Table 1 (as summarised in the spec; the repository has no table)",
             _row(64.6, 84.3, 36.8, 40.1, 37.7, 26.6, 41.0, 20.1)),
    Reported("sc-clip", "vit_l", None, "ViT-L-14:openai", "fp16", "SC-CLIP ViT-L/14 OpenAI CLIP",
             "SC-CLIP paper Table 1 (as summarised in the spec; unverified)",
             _row(65.0, 88.3, 36.9, 40.6, 40.5, 26.9, 41.3, 21.7)),
    Reported("cliptrase", "vit_b", None, "ViT-B-16:openai", "fp32",
             "CLIPtrase ViT-B/16 OpenAI CLIP, 336 centre crop, no DenseCRF", "CLIPtrase README",
             _row(53.04, 81.20, 30.79, 34.92, 44.84, 24.06, None, 17.04)),
)


def find(method: str, backbone: str, preset: str, online_grid: int | None) -> Reported | None:
    """The published row closest to our run: CorrCLIP's 8x8 row for an 8x8 online grid, else 32x32."""
    masks = "sam2_8" if online_grid == 8 else "sam2_32"
    for r in REPORTED:
        if r.method == method and r.backbone == backbone and r.masks in (None, masks) and preset in r.miou:
            return r
    return None


def differences(rep: Reported, *, clip: str, random_weights: bool, masks: str | None, online_grid: int | None,
                precision: str, changed_settings: list[str], subset: str | None) -> list[str]:
    """Where our run's settings differ from the reported one, one phrase each ("ours ...; reported ...")."""
    out = []
    if random_weights:
        out.append("random weights: our number measures nothing")
    elif clip != rep.clip:
        out.append(f"CLIP weights {clip} (reported: {rep.clip})")
    if rep.masks is not None:
        reported_masks = ("pre-generated SAM2 Hiera-L masks, 32x32 points" if rep.masks == "sam2_32"
                          else "online SAM2 Hiera-L, 8x8 points")
        if masks is not None:
            out.append(f"masks from {masks} (reported: {reported_masks}; equal only if the folder holds those)")
        else:
            out.append(f"online SAM v1 masks, {online_grid}x{online_grid} points (reported: {reported_masks})")
    if rep.method == "cliptrase":
        out.append("whole image in non-overlapping 336 windows (reported: 336 centre crop only; README)")
    if rep.method == "sc-clip":
        out.append("CorrCLIP's class files (reported: SC-CLIP's, with person/tv synonyms on VOC and COCO-Object)")
    if precision != rep.precision:
        out.append(f"precision {precision} (reported: {rep.precision})")
    out.extend(changed_settings)
    if subset:
        out.append(subset)
    return out
