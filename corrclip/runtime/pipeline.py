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

from ..kernels import stitch_classify_vote
from ..kernels.stitch import stitch
from ..kernels.vote import classify, vote
from ..presets import Settings
from ..vocab import Vocabulary
from .preprocess import Window, cut_window, normalize, resize_image, resize_nearest, sliding_windows
from .regions import compact_label_map
from .timing import StageTimer

STAGES = ("masks", "preprocess", "text", "dino", "regions", "clip_trunk", "corr_head", "stitch_vote")


@dataclass
class Segmentation:
    labels: np.ndarray  # [H0, W0] class index per pixel
    names: list[str]  # class display names, index = label
    probs: np.ndarray | None = None  # [C, H0, W0] class probabilities before voting, if asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    flops: dict[str, int] | None = None  # counted FLOPs per stage, when asked for (torch backend)


@dataclass
class _Image:
    image: np.ndarray
    regions: torch.Tensor | None  # [H0, W0] compact region ids, 0 = unsegmented (None: no masks)
    num_regions: int
    input_size: tuple[int, int]
    windows: list[Window]
    crops: list[torch.Tensor]
    mask_crops: list[torch.Tensor] | None


class Pipeline:
    """Shared by every method: region masks, resize, windows, text, batching, stitch, classify, vote."""

    def __init__(self, method, text: Callable[[Vocabulary], torch.Tensor], mask_generator=None,
                 device: torch.device | str = "cpu", max_windows: int = 8, window: dict | None = None):
        self.method = method
        self.text = text
        self.mask_generator = mask_generator
        self.device = torch.device(device)
        self.max_windows = max_windows
        self.window = window  # an engine bundle's window sizes (its manifest's "window"); None: any

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray], vocab: Vocabulary, settings: Settings,
                 label_maps: Sequence[np.ndarray | None] | None = None, return_probs: bool = False,
                 count_flops: bool = False) -> list[Segmentation]:
        timer = StageTimer(self.device, count_flops=count_flops)
        label_maps = list(label_maps) if label_maps is not None else [None] * len(images)
        prepared = [self._prepare(img, lm, settings, timer) for img, lm in zip(images, label_maps, strict=True)]
        with timer("text"):
            text = self.text(vocab)
        encoded = self._encode(prepared, text, settings, timer)
        results = []
        query_class = torch.tensor(vocab.query_class, device=self.device)
        for item, (window_logits, window_regions) in zip(prepared, encoded, strict=True):
            with timer("stitch_vote"):
                size = item.image.shape[:2]
                regions, num_regions = item.regions, item.num_regions
                if window_regions is not None:  # the method found its own regions (CLIPtrase)
                    regions, num_regions = paint_window_regions(window_regions, item.windows, item.input_size, size)
                probs = None
                if regions is not None and settings.area_thd is None and not return_probs:
                    # One fused pass (Triton on CUDA) that never forms Q x H0 x W0 probabilities.
                    labels = stitch_classify_vote(
                        window_logits, item.windows, item.input_size, size, query_class, vocab.num_classes,
                        settings.logit_scale, settings.prob_thd, regions, num_regions)
                else:
                    full = stitch(window_logits, item.windows, item.input_size, size)
                    labels, probs = classify(full, query_class, vocab.num_classes, settings.logit_scale,
                                             settings.prob_thd, settings.area_thd)
                    if regions is not None:
                        labels = vote(labels, regions, num_regions, vocab.num_classes)
                out = Segmentation(labels.cpu().numpy().astype(np.int32), list(vocab.names),
                                   probs.cpu().numpy() if return_probs else None)
            results.append(out)
        for r in results:
            r.timings = dict(timer.seconds)
            r.flops = dict(timer.flops) if timer.flops is not None else None
        return results

    def _prepare(self, image: np.ndarray, label_map: np.ndarray | None, s: Settings, timer: StageTimer) -> _Image:
        if label_map is None and self.method.needs_masks:
            if self.mask_generator is None:
                raise ValueError("no region masks: pass a label map (--masks) or build the segmenter with SAM")
            with timer("masks"):
                label_map = self.mask_generator.label_map(image)
            for k, v in getattr(self.mask_generator, "last_timings", {}).items():
                timer.seconds[f"masks.{k}"] += v
        with timer("preprocess"):
            resized = resize_image(image, s.short_side, s.long_cap)
            x = normalize(resized, self.device)
            size = resized.shape[:2]
            windows = sliding_windows(size[0], size[1], s.crop, s.stride)
            crops = [cut_window(x, w, 0.0) for w in windows]
            regions, k, mask_crops = None, 0, None
            if label_map is not None:
                compact, k = compact_label_map(np.asarray(label_map))
                regions = torch.from_numpy(compact).to(self.device)
                on_input = resize_nearest(regions, size)
                mask_crops = [cut_window(on_input, w, k) for w in windows]  # pad id k: above every real id
        return _Image(image, regions, k, size, windows, crops, mask_crops)

    def _encode(self, items: list[_Image], text: torch.Tensor, s: Settings, timer: StageTimer
                ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Runs every window of every image through the method, batched by window shape."""
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for i, item in enumerate(items):
            for j, crop in enumerate(item.crops):
                by_shape[tuple(crop.shape[-2:])].append((i, j))
        logits_of: dict[tuple[int, int], torch.Tensor] = {}
        regions_of: dict[tuple[int, int], torch.Tensor] = {}
        for (h, w), group in by_shape.items():
            if self.window is not None:
                check_window(self.window, h, w, s.crop)
            for start in range(0, len(group), self.max_windows):
                chunk = group[start:start + self.max_windows]
                windows = torch.stack([items[i].crops[j] for i, j in chunk])
                masks = None
                if self.method.needs_masks:
                    masks = torch.stack([items[i].mask_crops[j] for i, j in chunk])
                logits, regions = self.method.encode(windows, masks, text, s, timer)
                for n, key in enumerate(chunk):
                    logits_of[key] = logits[n].float()
                    if regions is not None:
                        regions_of[key] = regions[n]
        out = []
        for i, item in enumerate(items):
            keys = [(i, j) for j in range(len(item.windows))]
            regions = torch.stack([regions_of[k] for k in keys]) if regions_of else None
            out.append((torch.stack([logits_of[k] for k in keys]), regions))
        return out


def check_window(window: dict, h: int, w: int, crop: int) -> None:
    """Raises ValueError when a bundle's graphs cannot take h x w windows (`window`: its manifest's "window")."""
    if not window.get("dynamic"):  # bundles exported before window sizes were dynamic
        c = window["crop"]
        if (h, w) != (c, c):
            raise ValueError(
                f"this engine bundle takes only {c}x{c} windows (it predates dynamic window sizes), but this image "
                f"gives {h}x{w} windows (crop {crop}; small images and aspect ratios above ~6 give smaller, padded "
                "windows); re-export the bundle with this version's corrclip-export, or use the torch backend")
        return
    multiple, largest = window["multiple"], window["max"]
    if h % multiple or w % multiple or max(h, w) > largest:
        raise ValueError(f"this engine bundle takes windows up to {largest}x{largest} pixels in multiples of "
                         f"{multiple}, not {h}x{w} (crop {crop}); use a smaller --crop")


def paint_window_regions(regions: torch.Tensor, windows: Sequence[Window], input_size: tuple[int, int],
                         output_size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Per-window region ids [B, h, w] (0..K_b-1, -1 = none) -> one map at the original size.

    Windows are painted in order, each with its own id range (ids from 1), later windows winning
    overlaps; -1 becomes 0 (not voted). The map is nearest-resampled to the original size.
    """
    canvas = torch.zeros(input_size, dtype=torch.long, device=regions.device)
    offset = 1
    for r, win in zip(regions, windows, strict=True):
        left, _, top, _ = win.pad
        r = r[top: top + win.y2 - win.y1, left: left + win.x2 - win.x1]
        canvas[win.y1:win.y2, win.x1:win.x2] = torch.where(r >= 0, r + offset, 0)
        offset += int(r.max()) + 1
    return resize_nearest(canvas, output_size), offset
