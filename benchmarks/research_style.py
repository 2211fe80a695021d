"""CorrCLIP computed the way the research code runs it: the baseline of the side-by-side harness.

Same models and same masks as corrclip.Segmenter, so the labels agree; only the way of computing
differs. What makes it "research style" (corrclip.md §1 and §7, "sources of latency beyond FLOPs"):
  * text from open_clip's encode_text on the full 77-token prompts, one class name at a time;
  * masks from segment_anything's own SamAutomaticMaskGenerator, painted with a loop over masks;
  * one window at a time (batch 1);
  * DINO run fully (every block and the final norm), its q+k read by a hook on the last qkv;
  * region means with a loop over regions and a pure-Python DBSCAN on the host (a sync per window);
  * the scope matrix as an OR of one N x N outer product per region;
  * the CLIP trunk on R + 1 + n tokens with one joint bool mask through nn.MultiheadAttention;
  * the vote as one torch.mode per mask in a Python loop, at full resolution;
  * fp16 CLIP and DINO on CUDA (fp32 on the CPU; `precision` chooses), torch.cuda.empty_cache() after every image.

Stages are timed with the engine's stage names so the two paths compare stage by stage:
  regions     = window map on the DINO grid, region means, DBSCAN, relabelling, CLIP-grid map;
  clip_trunk  = joint mask, blocks 1..L-1, value paths, the full last block for the MCTs;
  corr_head   = S = F F^T, the scope matrix, softmax, W V, out_proj, fusion, cosine logits;
  stitch_vote = logits to window size, stitching, resize, softmax, background, threshold, vote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from segment_anything import SamAutomaticMaskGenerator

from corrclip.methods.corrclip import CorrClipSettings as Settings
from corrclip.models.build import Models
from corrclip.models.clip import interpolate_pos_embed_clip, num_spatial_layers
from corrclip.models.dino import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from corrclip.runtime.preprocess import PAD_MULTIPLE, PIXEL_MEAN, PIXEL_STD, resized_size
from corrclip.runtime.timing import StageTimer
from corrclip.vocab import Vocabulary

PAD_ID = 10000  # the research code's mask pad value, also the offset of merged region ids
TAU, ALPHA, BETA = 4.0, 1.0, 0.5


def dbscan_precomputed(dist: list[list[float]], eps: float, min_samples: int = 1) -> list[int]:
    """DBSCAN on a precomputed distance matrix, plain Python (the research code calls sklearn here).

    Clusters grow from the lowest unlabeled core point, as in sklearn, so the numbering matches.
    """
    n = len(dist)
    labels = [-1] * n

    def neighbours(i: int) -> list[int]:
        # A point is its own neighbour whatever the rounding of max(A) - A_ii.
        return [j for j in range(n) if j == i or dist[i][j] <= eps]

    cluster = 0
    for i in range(n):
        if labels[i] != -1:
            continue
        queue = neighbours(i)
        if len(queue) < min_samples:
            continue  # noise for now; a later cluster may still claim it as a border point
        labels[i] = cluster
        while queue:
            j = queue.pop()
            if labels[j] != -1:
                continue
            labels[j] = cluster
            more = neighbours(j)
            if len(more) >= min_samples:  # a core point: its neighbours join too
                queue.extend(k for k in more if labels[k] == -1)
        cluster += 1
    return labels


@torch.inference_mode()
def text_classifier(clip: torch.nn.Module, tokenizer, queries: Sequence[str], device: torch.device) -> torch.Tensor:
    """[Q, E]: per query, open_clip's encode_text on the 80 ImageNet prompts (full 77-token context, one query
    at a time), each prompt's embedding L2-normalized, their mean renormalized. Independent of the engine's
    text path (corrclip.runtime.text), which trims the context and batches every prompt of the vocabulary."""
    rows = []
    for query in queries:
        tokens = tokenizer([template(query) for template in OPENAI_IMAGENET_TEMPLATES]).to(device)
        emb = clip.encode_text(tokens).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def _pad_size(h: int, w: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to a multiple, left/top = floor(pad / 2)."""
    pw, ph = -w % multiple, -h % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer map [h, w] -> [H, W] through F.interpolate(mode='nearest') on floats, as the research code."""
    return F.interpolate(x[None, None].float(), size=size, mode="nearest")[0, 0].long()


RESEARCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def half_precision(device: torch.device | str) -> str:
    """"fp16" where torch runs fp16 matrix work on the device (every CUDA GPU; CPUs where a small fp16
    matmul runs: recent torch emulates it through fp32 where no fp16 units exist), else "bf16"."""
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16"
    try:
        a = torch.ones(4, 4, dtype=torch.float16, device=device)
        ok = bool(torch.isfinite(a @ a).all()) and float((a @ a)[0, 0]) == 4.0
    except RuntimeError:  # "addmm not implemented for 'Half'" on older CPU builds
        ok = False
    return "fp16" if ok else "bf16"


class ResearchStylePath:
    """segment(image, vocab, settings, label_map=None) -> (labels [H0, W0], seconds per stage).

    precision: "fp32", "fp16", "bf16", "half" (fp16 where torch runs fp16 matrix work on the device,
    else bf16: `half_precision`), or None: the research code's own choice, fp16 on CUDA and fp32 on
    the CPU. In half precision the given models are converted in place (CLIP as open_clip's
    precision="fp16"/"bf16", its LayerNorms kept fp32; DINO entirely), as the research code loads
    them, and every activation follows; SAM stays fp32 so the masks match our path's.
    keep_probs: keep the last image's class probabilities before the vote in `last_probs` ([C, H0, W0]).
    """

    def __init__(self, models: Models, device: torch.device | str = "cpu", points_per_side: int = 32,
                 precision: str | None = None, keep_probs: bool = False):
        self.device = torch.device(device)
        if precision is None:  # the research code runs CLIP and DINO in fp16 on the GPU
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision == "half":
            precision = half_precision(self.device)
        if precision not in RESEARCH_DTYPES:
            raise ValueError(f"precision must be fp32, fp16, bf16 or half, not {precision!r}")
        self.precision = precision
        self.dtype = RESEARCH_DTYPES[precision]
        self.half = self.dtype != torch.float32
        self.keep_probs, self.last_probs = keep_probs, None
        self.clip, self.dino, self.sam = models.clip, models.dino, models.sam
        if self.half:
            # LayerNorms stay fp32, as create_model(precision="fp16"); "bf16" is open_clip's pure_bf16 analogue
            open_clip.model.convert_weights_to_lp(self.clip, self.dtype)
            self.dino.to(self.dtype)
        self.visual = self.clip.visual
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16" if models.clip_arch == "tiny" else models.clip_arch)
        self._text: dict[str, torch.Tensor] = {}
        self.amg = None
        self.set_points(points_per_side)
        self._qkv: torch.Tensor | None = None
        self.last_regions = 0  # distinct ids in the last label map, for reports
        # Registered once (the research code's "correct hook" fix); it keeps the last qkv output.
        self._hook = self.dino.blocks[-1].attn.qkv.register_forward_hook(self._keep_qkv)

    def text(self, vocab: Vocabulary) -> torch.Tensor:
        """The vocabulary's text classifier, computed once per vocabulary (the research code does it at start-up)."""
        if vocab.key() not in self._text:
            self._text[vocab.key()] = text_classifier(self.clip, self.tokenizer, vocab.queries, self.device)
        return self._text[vocab.key()]

    def set_points(self, points_per_side: int) -> None:
        if self.sam is not None:
            self.amg = SamAutomaticMaskGenerator(self.sam, points_per_side=points_per_side, pred_iou_thresh=0.7,
                                                 stability_score_thresh=0.7)

    def close(self) -> None:
        self._hook.remove()

    def _keep_qkv(self, module, inputs, output) -> None:
        self._qkv = output

    # ---- masks ------------------------------------------------------------------------------

    def generate_mask(self, image: np.ndarray) -> np.ndarray:
        """Label map at the image's resolution: masks by ascending area, larger ones painted last, 0 = none."""
        if self.amg is None:
            raise ValueError("no SAM in these models: pass a label map")
        records = self.amg.generate(image)
        label_map = np.zeros(image.shape[:2], dtype=np.int64)
        for k, rec in enumerate(sorted(records, key=lambda r: r["area"]), start=1):
            label_map[rec["segmentation"]] = k
        return label_map

    # ---- one image --------------------------------------------------------------------------

    @torch.inference_mode()
    def segment(self, image: np.ndarray, vocab: Vocabulary, settings: Settings,
                label_map: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
        s, dev = settings, self.device
        timer = StageTimer(dev)
        if label_map is None:
            with timer("masks"):
                label_map = self.generate_mask(image)
        self.last_regions = int(len(np.unique(label_map)))
        if int(label_map.max()) >= PAD_ID:
            raise ValueError(f"label ids must stay below {PAD_ID} (the research code's pad id)")
        with timer("preprocess"):
            h0, w0 = image.shape[:2]
            h, w = resized_size(h0, w0, s.short_side, s.long_cap)
            resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)  # uint8, as mmseg
            x = torch.from_numpy(resized).to(dev).permute(2, 0, 1).float()
            mean, std = (torch.tensor(v, device=dev).view(3, 1, 1) for v in (PIXEL_MEAN, PIXEL_STD))
            x = (x - mean) / std
            original = torch.from_numpy(label_map.astype(np.int64)).to(dev)
            on_input = _nearest(original, (h, w))
        with timer("text"):
            text = self.text(vocab)
        q = text.shape[0]
        preds = torch.zeros(q, h, w, device=dev)
        count = torch.zeros(1, h, w, device=dev)
        rows = -(-max(h - s.crop, 0) // s.stride) + 1
        cols = -(-max(w - s.crop, 0) // s.stride) + 1
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * s.stride + s.crop, h), min(c * s.stride + s.crop, w)
                y1, x1 = max(y2 - s.crop, 0), max(x2 - s.crop, 0)
                crop, crop_mask = x[None, :, y1:y2, x1:x2], on_input[y1:y2, x1:x2]
                pad = _pad_size(y2 - y1, x2 - x1)
                if any(pad):
                    crop = F.pad(crop, pad)
                    crop_mask = F.pad(crop_mask, pad, value=PAD_ID)
                logits = self._window(crop, crop_mask, text, s, timer)  # [Q, h/8, w/8]
                with timer("stitch_vote"):
                    logits = F.interpolate(logits[None].float(), size=crop.shape[-2:], mode="bilinear",
                                           align_corners=False)[0]
                    left, top = pad[0], pad[2]
                    logits = logits[:, top:top + y2 - y1, left:left + x2 - x1]
                    preds += F.pad(logits, (x1, w - x2, y1, h - y2))
                    count[:, y1:y2, x1:x2] += 1
        with timer("stitch_vote"):
            labels = self._classify_and_vote(preds / count, original, vocab, s)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return labels.cpu().numpy().astype(np.int32), dict(timer.seconds)

    def _classify_and_vote(self, preds: torch.Tensor, original: torch.Tensor, vocab: Vocabulary,
                           s: Settings) -> torch.Tensor:
        logits = F.interpolate(preds[None], size=original.shape, mode="bilinear", align_corners=False)[0]
        prob = (logits * s.logit_scale).softmax(0)
        q, c = vocab.num_queries, vocab.num_classes
        if q != c:  # the research code's rule: only the first line has synonyms (background)
            if any(len(names) > 1 for names in vocab.classes[1:]):
                raise ValueError("the research code merges synonyms of the first class only")
            prob = torch.cat([prob[: q - c + 1].max(0, keepdim=True)[0], prob[q - c + 1:]])
        if self.keep_probs:
            self.last_probs = prob
        pred = prob.argmax(0)
        pred[prob.max(0)[0] < s.prob_thd] = 0
        # Map correction: every mask but the smallest id takes the mode of its pixels.
        values = torch.unique(original)[1:]
        masks = values[:, None, None] == original[None]  # K x H0 x W0 bools, built at once as there
        for mask in masks:
            pred[mask] = torch.mode(pred[mask])[0]
        return pred

    # ---- one window -------------------------------------------------------------------------

    def _window(self, crop: torch.Tensor, mask: torch.Tensor, text: torch.Tensor, s: Settings,
                timer: StageTimer) -> torch.Tensor:
        hp, wp = crop.shape[-2:]
        patch = self.visual.conv1.kernel_size[0]
        dino_grid, clip_grid = (hp // 8, wp // 8), (hp // patch, wp // patch)
        with timer("dino"):
            feats = self._dino_features(crop)  # [N, C]
        with timer("regions"):
            merged = self._merge(_nearest(mask, dino_grid).flatten(), feats, s.merge_eps)
            on_clip = _nearest(merged.view(dino_grid), clip_grid)
        with timer("clip_trunk"):
            values, mct, region_values = self._clip(crop, on_clip)
        with timer("corr_head"):
            return self._head(feats, merged, values, mct, on_clip, region_values, dino_grid, text)

    def _dino_features(self, crop: torch.Tensor) -> torch.Tensor:
        """Full DINO forward; F = q + k of the last block from the hook, CLS dropped, L2-normalized."""
        dev = crop.device

        def const(v: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(v, device=dev).view(1, 3, 1, 1)

        x = crop * const(CLIP_STD) + const(CLIP_MEAN)  # undo CLIP's normalization, then ImageNet's
        x = ((x - const(IMAGENET_MEAN)) / const(IMAGENET_STD)).to(self.dtype)
        vit = self.dino
        t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([vit.cls_token.expand(1, -1, -1), t], dim=1)
        t = t + self._dino_pos(x.shape[-2] // 8, x.shape[-1] // 8, x.shape[-2] == x.shape[-1])
        for blk in vit.blocks:
            t = blk(t)
        vit.norm(t)  # get_intermediate_layers(n=1) returns the normed output; only the hook is used
        qkv = self._qkv.reshape(1, t.shape[1], 3, -1)
        return F.normalize((qkv[0, 1:, 0] + qkv[0, 1:, 1]), dim=-1)

    def _dino_pos(self, rows: int, cols: int, square: bool) -> torch.Tensor:
        """DINO's own rule: the table as is for a square 28x28 grid, else bicubic by (cells + 0.1) / 28."""
        pos = self.dino.pos_embed
        side = math.isqrt(pos.shape[1] - 1)
        if rows * cols == side * side and square:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def _merge(self, ids: torch.Tensor, feats: torch.Tensor, eps: float) -> torch.Tensor:
        """Regions of the window (the smallest id left out) merged by DBSCAN on region-mean DINO cosines."""
        values = torch.unique(ids)
        if len(values) <= 2:
            return ids
        means = torch.stack([F.normalize(feats[ids == v].mean(0), dim=-1) for v in values])[1:]
        a = means @ means.t()
        dist = (a.max() - a).tolist()  # to the host, as sklearn needs
        clusters = dbscan_precomputed(dist, eps, min_samples=1)
        merged = ids.clone()
        for v, k in zip(values[1:].tolist(), clusters):
            merged[ids == v] = PAD_ID + k
        return merged

    def _clip(self, crop: torch.Tensor, on_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks with R mask class tokens in front: values [2, n, D] (main, spatial), MCTs [R, D], region ids [R]."""
        v = self.visual
        x = v.conv1(crop.to(self.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)[0]
        x = torch.cat([v.class_embedding.to(x.dtype)[None], x])
        x = v.ln_pre(x + interpolate_pos_embed_clip(v.positional_embedding, (gh, gw)).to(x.dtype))
        region_values = torch.unique(on_clip)
        r, n = len(region_values), x.shape[0] - 1
        flat = on_clip.flatten()
        allowed = torch.zeros(r + 1 + n, r + 1 + n, dtype=torch.bool, device=x.device)
        allowed[r:, r:] = True  # original tokens see each other, never an MCT
        allowed[:r, r] = True  # every MCT sees CLS
        for k, val in enumerate(region_values):
            allowed[k, r + 1:] = flat == val  # and the patches of its own region
        mask = ~allowed  # nn.MultiheadAttention: True = blocked
        seq = torch.cat([x[:1].repeat(r, 1), x])
        blocks = v.transformer.resblocks
        depth = len(blocks)
        k_sp = num_spatial_layers(depth)
        streams = []
        for i, blk in enumerate(blocks[:-1]):
            seq = self._block(blk, seq, mask)
            if depth - 2 - k_sp <= i <= depth - 3:
                streams.append(seq[r:])
        x_main, x_sp = seq[r:], torch.stack(streams).mean(0)
        last = blocks[-1]
        d = x.shape[1]
        w_v, b_v = last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:]
        values = torch.stack([last.ln_1(x_main), last.ln_1(x_sp)]) @ w_v.t() + b_v
        mct = self._block(last, seq, mask)[:r]
        return values[:, 1:], mct, region_values

    @staticmethod
    def _block(blk: torch.nn.Module, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One residual block on one sequence [T, D] with a bool attention mask."""
        h = blk.ln_1(seq)[None] if blk.attn.batch_first else blk.ln_1(seq)[:, None]
        a = blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        a = a[0] if blk.attn.batch_first else a[:, 0]
        seq = seq + blk.ls_1(a)
        return seq + blk.ls_2(blk.mlp(blk.ln_2(seq)))

    def _head(self, feats: torch.Tensor, merged: torch.Tensor, values: torch.Tensor, mct: torch.Tensor,
              on_clip: torch.Tensor, region_values: torch.Tensor, dino_grid: tuple[int, int],
              text: torch.Tensor) -> torch.Tensor:
        v = self.visual
        n = feats.shape[0]
        s = feats @ feats.t()
        ids = torch.unique(merged)
        allowed = torch.zeros(n, n, dtype=torch.bool, device=feats.device)
        for val in ids[1:]:
            m = merged == val
            allowed |= torch.outer(m, m)  # one N x N outer product per region
        unseg = merged == ids[0]  # the window's smallest id: attend where S is above its mean
        allowed |= (unseg[:, None] | unseg[None, :]) & (s > s.mean())
        attn = (TAU * s).masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        d, (gh, gw) = values.shape[-1], on_clip.shape
        up = F.interpolate(values.transpose(1, 2).reshape(2, d, gh, gw), size=dino_grid, mode="bilinear",
                           align_corners=False)
        up = up.flatten(2).transpose(1, 2)  # [2, N, D]
        y = v.transformer.resblocks[-1].attn.out_proj(attn.to(up.dtype) @ up)
        onehot = torch.stack([_nearest(on_clip == val, dino_grid).flatten() for val in region_values])
        sem = onehot.t().to(mct.dtype) @ mct  # each patch takes its region's MCT
        z = v.ln_post(y[0]) + ALPHA * v.ln_post(y[1]) + BETA * v.ln_post(sem)
        z = F.normalize(z @ v.proj, dim=-1)
        return (z @ text.to(z.dtype).t()).t().reshape(-1, *dino_grid)
