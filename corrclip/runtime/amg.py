"""Vectorized SAM automatic mask generation and the label map CorrCLIP builds from it.

MaskGenerator keeps the same masks, in the same order, as segment_anything's SamAutomaticMaskGenerator
with crop_n_layers=0 and output_mode="binary_mask", but stays on the model's device (no RLE round trip)
and upsamples only the masks that pass the predicted-IoU filter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide

from corrclip.kernels import sam_postprocess
from corrclip.models.sam import SamDecoder, SamEncoder, preprocess_image

# SamAutomaticMaskGenerator's default crop_nms_thresh; with one crop it only matters for the
# min_mask_region_area pass, which uses max(box_nms_thresh, crop_nms_thresh).
_CROP_NMS_THRESH = 0.7


@dataclass
class AmgSettings:
    """Automatic mask generation options (segment_anything's names and meanings).

    The defaults follow CorrCLIPv2's SAM option (pred_iou_thresh 0.7, stability_score_thresh 0.7),
    looser than the library's ViT-H defaults (0.88 / 0.95). As in the library, a threshold <= 0
    switches its filter off entirely.
    """

    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.7
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0


@dataclass
class MaskSet:
    """K masks in the order the generator returns them, all on one device."""

    masks: torch.Tensor  # bool [K, H0, W0]
    iou_preds: torch.Tensor  # [K]
    stability: torch.Tensor  # [K]
    boxes: torch.Tensor  # [K, 4] XYXY, inclusive pixel coordinates
    areas: torch.Tensor  # [K] pixels

    def __len__(self) -> int:
        return self.masks.shape[0]

    def label_map(self) -> np.ndarray:
        return paint_label_map(self.masks, self.areas).cpu().numpy()


def paint_label_map(masks: torch.Tensor, areas: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [H, W]: masks ranked by ascending area (stable) get labels 1..K, 0 = no mask.

    Equivalent to painting the ranked masks one after another, so larger masks overwrite smaller
    ones: each pixel takes the highest rank among the masks covering it.
    """
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(h, w, dtype=torch.int32, device=masks.device)
    if areas is None:
        areas = masks.flatten(1).sum(1)
    ranked = masks[torch.sort(areas, stable=True).indices]
    # argmax returns the first maximum, so on the reversed stack it finds the highest covering rank
    top = ranked.flip(0).to(torch.uint8).argmax(0)
    return torch.where(ranked.any(0), k - top, 0).to(torch.int32)


def upscale_logits(low_res: torch.Tensor, input_size: tuple[int, int], orig_size: tuple[int, int],
                   img_size: int = 1024) -> torch.Tensor:
    """[K,256,256] logits -> [K,H0,W0], exactly as Sam.postprocess_masks (to 1024, crop, resize)."""
    if low_res.shape[0] == 0:  # interpolate rejects empty inputs; a batch may lose all masks to the IoU filter
        return low_res.new_empty(0, *orig_size)
    x = F.interpolate(low_res[None], (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, orig_size, mode="bilinear", align_corners=False)[0]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class MaskGenerator:
    """SamAutomaticMaskGenerator (one crop, binary masks) without the per-mask Python work.

    `encoder` and `decoder` are the graph wrappers; anything with the same call signature
    (e.g. an exported graph's session adapter) can replace them. The decoder gets float64 point
    coordinates, as in the library: rounding them to float32 first can move a logit across the threshold.
    """

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], decoder: Callable, *, img_size: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], device: torch.device | str,
                 settings: AmgSettings | None = None) -> None:
        self.encoder = encoder  # [1,3,S,S] normalized, padded image -> [1,C,64,64] embeddings
        self.decoder = decoder  # (embeddings, points [P,1,2] float64, labels [P,1]) -> low-res logits, IoUs
        self.img_size = img_size
        self.device = torch.device(device)
        self.pixel_mean = torch.tensor(pixel_mean, dtype=torch.float32, device=self.device)
        self.pixel_std = torch.tensor(pixel_std, dtype=torch.float32, device=self.device)
        self.settings = settings or AmgSettings()
        self.last_timings: dict[str, float] = {}
        # masks left after each stage of the last generate(): how strict the settings are in practice
        self.last_counts: dict[str, int] = {}

    @classmethod
    def from_sam(cls, sam: Sam, settings: AmgSettings | None = None) -> MaskGenerator:
        """segment_anything's model, its encoder and decoder as torch graphs."""
        return cls(SamEncoder(sam), SamDecoder(sam), img_size=sam.image_encoder.img_size,
                   pixel_mean=sam.pixel_mean.flatten().tolist(), pixel_std=sam.pixel_std.flatten().tolist(),
                   device=sam.device, settings=settings)

    @property
    def stages(self) -> dict[str, Callable]:
        """stage name -> the graph it runs (for bench's weight bytes)."""
        return {"masks.sam_encoder": self.encoder, "masks.prompt_decoding": self.decoder}

    def _points(self, h0: int, w0: int) -> torch.Tensor:
        """The library's point grid, scaled to the image, then to the 1024 frame; float64 as there."""
        grid = build_point_grid(self.settings.points_per_side) * np.array([[w0, h0]])
        coords = ResizeLongestSide(self.img_size).apply_coords(grid, (h0, w0))
        return torch.as_tensor(coords, device=self.device)

    @torch.no_grad()
    def _decode(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encoder once, then the decoder over batches of points. -> low-res logits, IoUs, input size."""
        s = self.settings
        dev = self.device
        h0, w0 = image.shape[:2]
        t0 = _sync(dev)
        x, input_size = preprocess_image(image, self.img_size, self.pixel_mean, self.pixel_std)
        t1 = _sync(dev)
        emb = self.encoder(x)
        t2 = _sync(dev)
        points = self._points(h0, w0)
        lows, ious = [], []
        counts = {"masks": 0, "after_iou": 0}
        for start in range(0, points.shape[0], s.points_per_batch):
            pts = points[start : start + s.points_per_batch, None, :]
            labels = torch.ones(pts.shape[:2], dtype=torch.int32, device=dev)
            low, iou = self.decoder(emb, pts, labels)
            low, iou = low.flatten(0, 1), iou.flatten(0, 1)  # point-major: the library's flatten order
            counts["masks"] += low.shape[0]
            if s.pred_iou_thresh > 0.0:  # filter early to save memory; post-processing filters again
                keep = iou > s.pred_iou_thresh
                low, iou = low[keep], iou[keep]
            lows.append(low)
            ious.append(iou)
            counts["after_iou"] += low.shape[0]
        t3 = _sync(dev)
        self.last_timings = {"preprocess": t1 - t0, "sam_encoder": t2 - t1, "prompt_decoding": t3 - t2}
        self.last_counts = counts
        return torch.cat(lows), torch.cat(ious), input_size

    def _postprocess(self, low: torch.Tensor, iou: torch.Tensor, input_size: tuple[int, int],
                     orig_size: tuple[int, int], return_masks: bool):
        s = self.settings
        t0 = _sync(self.device)
        res = sam_postprocess(
            low, iou, input_size, orig_size, s.pred_iou_thresh, s.stability_score_thresh, s.stability_score_offset,
            s.mask_threshold, s.box_nms_thresh, img_size=self.img_size, return_masks=return_masks)
        self.last_timings["mask_postprocess"] = _sync(self.device) - t0
        n = int(res.keep.numel())
        self.last_counts.update(after_stability=res.num_stable, after_nms=n, final=n)
        return res

    def generate(self, image: np.ndarray) -> MaskSet:
        low, iou, input_size = self._decode(image)
        res = self._postprocess(low, iou, input_size, image.shape[:2], return_masks=True)
        out = MaskSet(res.masks, res.iou_preds, res.stability, res.boxes, res.areas)
        if self.settings.min_mask_region_area > 0:
            t0 = _sync(self.device)
            s = self.settings
            out = _remove_small_regions(out, s.min_mask_region_area, max(s.box_nms_thresh, _CROP_NMS_THRESH))
            out.areas = out.masks.flatten(1).sum(1)
            self.last_timings["mask_postprocess"] += _sync(self.device) - t0
            self.last_counts["final"] = len(out)
        return out

    def label_map(self, image: np.ndarray) -> np.ndarray:
        """int32 [H0, W0]; see paint_label_map. Without small-region removal no mask bitmap is kept."""
        if self.settings.min_mask_region_area > 0:
            return self.generate(image).label_map()
        low, iou, input_size = self._decode(image)
        return self._postprocess(low, iou, input_size, image.shape[:2], return_masks=False).label_map.cpu().numpy()


def _remove_small_regions(ms: MaskSet, min_area: int, nms_thresh: float) -> MaskSet:
    """The library's small-region pass (OpenCV, per mask), via its own code: rare, so not vectorized."""
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import MaskData, mask_to_rle_pytorch, rle_to_mask

    if len(ms) == 0:
        return ms
    dev = ms.masks.device
    data = MaskData(rles=mask_to_rle_pytorch(ms.masks), boxes=ms.boxes.cpu().numpy(),
                    iou_preds=ms.iou_preds.cpu().numpy(), stability=ms.stability.cpu().numpy())
    data = SamAutomaticMaskGenerator.postprocess_small_regions(data, min_area, nms_thresh)
    masks = np.stack([rle_to_mask(r) for r in data["rles"]])
    return MaskSet(torch.as_tensor(masks, device=dev), torch.as_tensor(data["iou_preds"], device=dev),
                   torch.as_tensor(data["stability"], device=dev), torch.as_tensor(data["boxes"], device=dev),
                   ms.areas)


class Sam2MaskGenerator:
    """SAM2's own automatic mask generator behind the MaskGenerator interface (same label map)."""

    def __init__(self, amg: object, device: torch.device) -> None:
        self.amg = amg
        self.device = device
        self.last_timings: dict[str, float] = {}

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> MaskSet:
        t0 = _sync(self.device)
        records = self.amg.generate(image)  # type: ignore[attr-defined]
        h0, w0 = image.shape[:2]
        masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, h0, w0), bool)
        masks = torch.as_tensor(masks, device=self.device)
        xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 4)
        out = MaskSet(
            masks,
            torch.tensor([r["predicted_iou"] for r in records], device=self.device),
            torch.tensor([r["stability_score"] for r in records], device=self.device),
            torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).to(self.device),
            torch.tensor([r["area"] for r in records], dtype=torch.int64, device=self.device),
        )
        self.last_timings = {"total": _sync(self.device) - t0}
        return out

    def label_map(self, image: np.ndarray) -> np.ndarray:
        return self.generate(image).label_map()


def build_sam2_generator(config: str, checkpoint: str | None, device: str | torch.device = "cpu",
                         settings: AmgSettings | None = None) -> Sam2MaskGenerator:
    """SAM2 (`config` e.g. "configs/sam2.1/sam2.1_hiera_l.yaml") with the same settings and label map."""
    try:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2
    except ImportError as e:
        raise RuntimeError("install the sam2 extra: pip install 'corrclip[sam2]' (sam2, hydra-core, iopath)") from e
    s = settings or AmgSettings()
    model = build_sam2(config, checkpoint, device=str(device), mode="eval")
    amg = SAM2AutomaticMaskGenerator(
        model, points_per_side=s.points_per_side, points_per_batch=s.points_per_batch,
        pred_iou_thresh=s.pred_iou_thresh, stability_score_thresh=s.stability_score_thresh,
        stability_score_offset=s.stability_score_offset, mask_threshold=s.mask_threshold,
        box_nms_thresh=s.box_nms_thresh, min_mask_region_area=s.min_mask_region_area,
        output_mode="binary_mask",
    )
    return Sam2MaskGenerator(amg, torch.device(device))
