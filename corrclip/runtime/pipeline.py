"""The CorrCLIP pipeline, backend-agnostic: images + vocabulary -> label maps.

Data flow (DESIGN.md): region masks -> resize, normalize, sliding windows -> (all windows of all
images in shared batches) DINO features -> region merging -> CLIP trunk -> correlation head ->
per image: stitch, resize, classify, vote on the original region map.

The graphs (`dino`, `trunk`, `head`) are any callables with the signatures of the torch modules
in corrclip.models; the engine layer may hand in exported executors instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.stitch import stitch
from ..kernels.vote import classify, vote
from ..presets import Settings
from ..vocab import Vocabulary
from .preprocess import Window, cut_window, normalize, resize_image, resize_nearest, sliding_windows
from .regions import compact_label_map, window_regions
from .timing import StageTimer

STAGES = ("masks", "preprocess", "text", "dino", "regions", "clip_trunk", "corr_head", "stitch_vote")


@dataclass
class Segmentation:
    labels: np.ndarray  # [H0, W0] class index per pixel
    names: list[str]  # class display names, index = label
    probs: np.ndarray | None = None  # [C, H0, W0] class probabilities before voting, if asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class _Image:
    image: np.ndarray
    regions: torch.Tensor  # [H0, W0] compact region ids, 0 = unsegmented
    num_regions: int
    input_size: tuple[int, int]
    windows: list[Window]
    crops: list[torch.Tensor]
    mask_crops: list[torch.Tensor]


class CorrClipPipeline:
    def __init__(self, dino: Callable, trunk: Callable, head: Callable, text: Callable[[Vocabulary], torch.Tensor],
                 patch: int, mask_generator=None, device: torch.device | str = "cpu", max_windows: int = 8,
                 merge: Callable | None = None, window: int | None = None):
        self.dino, self.trunk, self.head, self.text = dino, trunk, head, text
        self.patch = patch  # CLIP patch size
        self.mask_generator = mask_generator
        self.device = torch.device(device)
        self.max_windows = max_windows
        self.merge_kw = {} if merge is None else {"merge": merge}
        self.window = window  # exported graphs are built for one window size

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray], vocab: Vocabulary, settings: Settings,
                 label_maps: Sequence[np.ndarray | None] | None = None, return_probs: bool = False
                 ) -> list[Segmentation]:
        timer = StageTimer(self.device)
        label_maps = list(label_maps) if label_maps is not None else [None] * len(images)
        prepared = [self._prepare(img, lm, settings, timer) for img, lm in zip(images, label_maps, strict=True)]
        with timer("text"):
            text = self.text(vocab)
        logits = self._encode(prepared, text, settings, timer)
        results = []
        query_class = torch.tensor(vocab.query_class, device=self.device)
        for item, window_logits in zip(prepared, logits, strict=True):
            with timer("stitch_vote"):
                full = stitch(window_logits, item.windows, item.input_size, item.image.shape[:2])
                labels, probs = classify(full, query_class, vocab.num_classes, settings.logit_scale,
                                         settings.prob_thd)
                labels = vote(labels, item.regions, item.num_regions, vocab.num_classes)
                out = Segmentation(labels.cpu().numpy().astype(np.int32), list(vocab.names),
                                   probs.cpu().numpy() if return_probs else None)
            results.append(out)
        for r in results:
            r.timings = dict(timer.seconds)
        return results

    def _prepare(self, image: np.ndarray, label_map: np.ndarray | None, s: Settings, timer: StageTimer) -> _Image:
        if label_map is None:
            if self.mask_generator is None:
                raise ValueError("no region masks: pass a label map (--masks) or build the segmenter with SAM")
            with timer("masks"):
                label_map = self.mask_generator.label_map(image)
            for k, v in getattr(self.mask_generator, "last_timings", {}).items():
                timer.seconds[f"masks.{k}"] += v
        with timer("preprocess"):
            compact, k = compact_label_map(np.asarray(label_map))
            regions = torch.from_numpy(compact).to(self.device)
            resized = resize_image(image, s.short_side, s.long_cap)
            x = normalize(resized, self.device)
            size = resized.shape[:2]
            on_input = resize_nearest(regions, size)
            windows = sliding_windows(size[0], size[1], s.crop, s.stride)
            crops = [cut_window(x, w, 0.0) for w in windows]
            mask_crops = [cut_window(on_input, w, k) for w in windows]  # pad id k: above every real id
        return _Image(image, regions, k, size, windows, crops, mask_crops)

    def _encode(self, items: list[_Image], text: torch.Tensor, s: Settings, timer: StageTimer
                ) -> list[torch.Tensor]:
        """Runs every window of every image through the encoders, batched by window shape."""
        jobs = [(i, j) for i, item in enumerate(items) for j in range(len(item.windows))]
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for i, j in jobs:
            by_shape[tuple(items[i].crops[j].shape[-2:])].append((i, j))
        out: dict[tuple[int, int], torch.Tensor] = {}
        for (h, w), group in by_shape.items():
            if self.window is not None and (h, w) != (self.window, self.window):
                raise ValueError(
                    f"this engine bundle was exported for {self.window}x{self.window} windows, but this image gives "
                    f"{h}x{w} windows (crop {s.crop}, or an aspect ratio above ~6 that pads windows); use the "
                    f"torch backend, or re-export with --crop {s.crop}")
            dino_grid, clip_grid = (h // 8, w // 8), (h // self.patch, w // self.patch)
            for start in range(0, len(group), self.max_windows):
                chunk = group[start:start + self.max_windows]
                windows = torch.stack([items[i].crops[j] for i, j in chunk])
                masks = torch.stack([items[i].mask_crops[j] for i, j in chunk])
                with timer("dino"):
                    feats = self.dino(windows)
                with timer("regions"):
                    reg = window_regions(masks, feats, dino_grid, clip_grid, s.merge_eps, **self.merge_kw)
                with timer("clip_trunk"):
                    values, mct = self.trunk(windows, reg.membership)
                with timer("corr_head"):
                    logits = self.head(feats, reg.region_ids, values, mct, reg.mct_index, text)
                for (i, j), lg in zip(chunk, logits, strict=True):
                    out[(i, j)] = lg.float()
        return [torch.stack([out[(i, j)] for j in range(len(item.windows))]) for i, item in enumerate(items)]
