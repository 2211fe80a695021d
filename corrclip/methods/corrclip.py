"""CorrCLIP: CLIP whose last-layer patch correlations are rebuilt from DINO features inside SAM
regions, then region voting (specs/corrclip.md).

Per window: DINO features -> region merging -> CLIP trunk with mask class tokens -> correlation head.
Bundle graphs: dino, clip_trunk, corr_head, clip_text (+ SAM's encoder and decoder for region masks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..presets import Settings
from ..runtime.regions import window_regions
from .base import Method, register


@dataclass(frozen=True)
class CorrClipSettings(Settings):
    merge_eps: float = 0.2  # region merging threshold on (max cosine - cosine)


# configs/cfg_*.py of the research code
PRESETS = {
    "voc21": CorrClipSettings(prob_thd=0.2),
    "voc20": CorrClipSettings(),
    "context60": CorrClipSettings(prob_thd=0.15),
    "context59": CorrClipSettings(),
    "coco_object": CorrClipSettings(prob_thd=0.25),
    "coco_stuff": CorrClipSettings(),
    "city_scapes": CorrClipSettings(short_side=448, crop=224, stride=112),
    "ade20k": CorrClipSettings(short_side=448),
}


class CorrClipEncoder:
    """DINO features -> region merging -> CLIP trunk with mask class tokens -> correlation head."""

    name = "corrclip"
    needs_masks = True

    def __init__(self, dino: Callable, trunk: Callable, head: Callable, patch: int):
        self.dino, self.trunk, self.head, self.patch = dino, trunk, head, patch
        self.stages = {"dino": dino, "clip_trunk": trunk, "corr_head": head}

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: CorrClipSettings,
               timer) -> tuple[torch.Tensor, None]:
        h, w = windows.shape[-2:]
        with timer("dino"):
            feats = self.dino(windows)
        with timer("regions"):
            # merging and the head's attention are kernel entry points: Triton or torch by device, at call time
            reg = window_regions(masks, feats, (h // 8, w // 8), (h // self.patch, w // self.patch), s.merge_eps)
        with timer("clip_trunk"):
            values, mct = self.trunk(windows, reg.membership)
        with timer("corr_head"):
            logits = self.head(feats, reg.region_ids, values, mct, reg.mct_index, text)
        return logits, None


def build_encoder(models, device: torch.device) -> CorrClipEncoder:
    from ..models.clip import ClipTrunk
    from ..models.corr_head import CorrHead
    from ..models.dino import DinoFeatures

    visual = models.clip.visual
    return CorrClipEncoder(DinoFeatures(models.dino), ClipTrunk(visual), CorrHead(visual), visual.conv1.kernel_size[0])


def from_graphs(run: dict[str, Callable], manifest: dict) -> CorrClipEncoder:
    return CorrClipEncoder(lambda w: run["dino"](w)[0], run["clip_trunk"], lambda *a: run["corr_head"](*a)[0],
                           manifest["clip"]["patch"])


def graphs(models, crop: int) -> list:
    """dino, clip_trunk, corr_head, clip_text, and SAM's graphs when the models have SAM; every window
    axis dynamic (export/graphs.py)."""
    import torch.nn.functional as F

    from ..export.graphs import WINDOWS, Graph, sam_graphs, text_graph, window_axes, window_sizes, windows_input
    from ..models.clip import ClipTrunk
    from ..models.corr_head import CorrHead
    from ..models.dino import DinoFeatures

    visual = models.clip.visual
    patch = visual.conv1.kernel_size[0]
    width = visual.conv1.out_channels
    dino_dim = models.dino.embed_dim
    embed = visual.proj.shape[1]

    def trunk_inputs(s, g):
        n = window_axes(s["H"], s["W"], patch)["NP"]
        ids = torch.randint(0, s["R"], (s["B"], n), generator=g)
        regions = torch.zeros(s["B"], s["R"], n, dtype=torch.bool)
        regions.scatter_(1, ids[:, None], True)
        return torch.randn(s["B"], 3, s["H"], s["W"], generator=g), regions

    def head_inputs(s, g):
        b, r, q = s["B"], s["R"], s["Q"]
        a = window_axes(s["H"], s["W"], patch)
        grid8, grid_clip = (a["H8"], a["W8"]), (a["HP"], a["WP"])
        return (F.normalize(torch.randn(b, a["N8"], dino_dim, generator=g), dim=-1),
                torch.randint(-1, r, (b, *grid8), generator=g),
                torch.randn(b, 2, width, *grid_clip, generator=g),
                torch.randn(b, r, width, generator=g),
                torch.randint(0, r, (b, *grid8), generator=g),
                F.normalize(torch.randn(q, embed, generator=g), dim=-1))

    grid8 = {0: "B", 1: "H8", 2: "W8"}
    out = [
        Graph("dino", DinoFeatures(models.dino), ["windows"], ["feats"], {"windows": WINDOWS}, windows_input,
              window_sizes(crop)),
        Graph("clip_trunk", ClipTrunk(visual), ["windows", "regions"], ["values", "mct"],
              {"windows": WINDOWS, "regions": {0: "B", 1: "R", 2: "NP"}}, trunk_inputs,
              tuple(s | {"R": r} for s, r in zip(window_sizes(crop), (5, 9, 3)))),
        Graph("corr_head", CorrHead(visual), ["feats", "region_ids", "values", "mct", "mct_index", "text"],
              ["logits"], {"feats": {0: "B", 1: "N8"}, "region_ids": grid8, "values": {0: "B", 3: "HP", 4: "WP"},
                           "mct": {0: "B", 1: "R"}, "mct_index": grid8, "text": {0: "Q"}},
              head_inputs, tuple(s | {"R": r, "Q": q} for s, r, q in zip(window_sizes(crop), (5, 9, 3), (7, 3, 4)))),
        text_graph(models),
    ]
    if models.sam is not None:
        out += sam_graphs(models.sam)
    return out


def hyperparameters(s: CorrClipSettings) -> dict:
    return {"tau": 4.0, "alpha": 1.0, "beta": 0.5, "merge_eps": s.merge_eps, "logit_scale": s.logit_scale,
            "templates": 80}


METHOD = register(Method(
    name="corrclip",
    summary="CLIP + DINO + SAM regions (default)",
    uses_dino=True, uses_regions=True, openai_clip=False,
    defaults=CorrClipSettings(), presets=PRESETS,
    build_encoder=build_encoder, graphs=graphs, from_graphs=from_graphs, hyperparameters=hyperparameters,
))
