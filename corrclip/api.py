"""The public Python API.

    from corrclip import Segmenter
    seg = Segmenter("vit_b")                       # official weights (downloaded once)
    out = seg.segment("street.jpg", "sky; cloud, road, car")[0]
    out.labels, out.names                          # [H, W] class indices, class names
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import open_clip
import torch

from . import presets
from .models.build import build_models
from .models.clip import ClipText
from .runtime.image_io import decode_image
from .runtime.methods import Cliptrase, CorrClip, Dense, build_method
from .runtime.pipeline import Pipeline, Segmentation
from .runtime.text import TextEmbedder
from .vocab import Vocabulary, benchmark_vocabulary, parse_classes

ImageLike = str | os.PathLike | bytes | np.ndarray


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_vocabulary(classes: str | Sequence[str] | Vocabulary) -> Vocabulary:
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, str):
        return parse_classes(classes)
    return parse_classes("\n".join(classes))


class Segmenter:
    """CorrCLIP open-vocabulary segmentation with the torch reference backend.

    weights: "official" (each model's official checkpoint) or "random" (seeded random weights:
    exercises the pipeline and its timing, segments nothing meaningful). clip_weights,
    dino_weights and sam_weights override one model each (a tag or a local file). sam="none"
    builds no mask generator: every call then needs label maps.
    """

    def __init__(self, backbone: str = "vit_b", weights: str | None = None, *, clip_weights: str | None = None,
                 dino_weights: str | None = None, sam_weights: str | None = None, sam: str | None = None,
                 amg=None, device: str | torch.device | None = None, max_windows: int = 8,
                 engine: str | os.PathLike | None = None, backend: str = "onnxruntime", method: str = "corrclip"):
        self.device = torch.device(device) if device is not None else default_device()
        self.bundle = None
        if engine is not None:
            self._init_from_bundle(engine, backend, amg, max_windows)
            return
        if method not in presets.METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(presets.METHODS)}")
        self.method = method
        if method != "corrclip":
            # SC-CLIP and CLIPtrase need neither DINO nor SAM, and their research code uses OpenAI CLIP.
            sam = "none"
            if clip_weights is None and backbone in presets.OPENAI_ARCH:
                arch = presets.OPENAI_ARCH[backbone]
                clip_weights = f"{arch}:random" if weights == "random" else "openai"
        models = build_models(backbone, weights, clip_weights=clip_weights, dino_weights=dino_weights,
                              sam_weights=sam_weights, sam=sam, dino=None if method == "corrclip" else "none",
                              device=self.device)
        self.backbone, self.identity = models.backbone, models.identity
        clip, clip_arch = models.clip, models.clip_arch
        masks = None
        if models.sam is not None:
            from .runtime.amg import AmgSettings, MaskGenerator

            masks = MaskGenerator(models.sam, amg or AmgSettings())
        tokenizer = open_clip.get_tokenizer("ViT-B-16" if clip_arch == "tiny" else clip_arch)
        text = TextEmbedder(ClipText(clip), tokenizer, self.device)
        self.pipeline = Pipeline(build_method(method, models, self.device), text, masks, self.device, max_windows)

    def default_settings(self, preset: str | None = None, **overrides) -> presets.Settings:
        """The method's settings for a benchmark preset (None: the method's defaults), with overrides."""
        return presets.dataset_settings(preset, self.method, **overrides)

    # INTERIM (issue 15 branch): the names issue 9 lands on main; main's api.py replaces these.
    def settings_for(self, preset: str | None = None, **overrides) -> presets.Settings:
        return self.default_settings(preset, **overrides)

    @property
    def needs_masks(self) -> bool:
        return self.pipeline.method.needs_masks and self.pipeline.mask_generator is None

    def run(self, images: list[np.ndarray], vocab: Vocabulary, settings: presets.Settings, label_maps=None,
            return_probs: bool = False) -> list[Segmentation]:
        return self.pipeline(images, vocab, settings, label_maps, return_probs=return_probs)

    def _init_from_bundle(self, path, backend: str, amg, max_windows: int) -> None:
        """Runs the exported graphs (no model code in the loop): ONNX Runtime, AOTInductor or TensorRT."""
        from .engine.bundle import load_bundle
        from .engine.executors import make_executor

        bundle = self.bundle = load_bundle(path)
        mf = bundle.manifest
        self.method = mf["method"]
        self.backbone, self.identity = presets.backbone(mf["backbone"]), dict(mf["weights"])
        run = {}
        for name, graph in bundle.graphs.items():
            # TensorRT has no float64: SAM's decoder (float64 points, for fidelity) runs on ONNX Runtime.
            float64 = any(i["dtype"] == "float64" for i in graph["inputs"])
            run[name] = make_executor(bundle, name, "onnxruntime" if backend == "tensorrt" and float64 else backend,
                                      self.device)
        masks = None
        if "sam_encoder" in run:
            from .runtime.amg import AmgSettings, MaskGenerator

            masks = MaskGenerator(_SamShell(mf["sam"], self.device), amg or AmgSettings())
            masks.encoder, masks.decoder = (lambda x: run["sam_encoder"](x)[0]), run["sam_decoder"]
        text = TextEmbedder(lambda t: run["clip_text"](t)[0], open_clip.get_tokenizer(mf["clip"]["tokenizer"]),
                            self.device)
        patch = mf["clip"]["patch"]
        if self.method == "corrclip":
            method = CorrClip(lambda w: run["dino"](w)[0], run["clip_trunk"], lambda *a: run["corr_head"](*a)[0], patch)
        elif self.method == "sc-clip":
            method = Dense("sc-clip", lambda w: run["clip_dense"](w)[0], patch)
        else:
            method = Cliptrase(run["clip_dense"], patch)
        self.pipeline = Pipeline(method, text, masks, self.device, max_windows, window=mf["window"]["crop"])

    def segment(self, images: ImageLike | Sequence[ImageLike], classes: str | Sequence[str] | Vocabulary | None = None,
                *, preset: str | None = None, masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
                return_probs: bool = False, **overrides) -> list[Segmentation]:
        """Segments one image or a list. `classes` (e.g. "sky; cloud, road, car": commas separate
        classes, semicolons synonyms) or `preset` (a benchmark: its classes and settings).
        `masks`: region label maps at each image's resolution (skips SAM). `overrides`: fields of
        presets.Settings, e.g. prob_thd=0.2."""
        single = isinstance(images, (str, os.PathLike, bytes, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4)
        batch = [images] if single else list(images)
        decoded = [decode_image(x) if not isinstance(x, np.ndarray) else np.ascontiguousarray(x, np.uint8)
                   for x in batch]
        if classes is None and preset is None:
            raise ValueError("give classes (e.g. 'sky, road, car') or a preset (e.g. 'voc21')")
        vocab = as_vocabulary(classes) if classes is not None else benchmark_vocabulary(preset)
        settings = self.default_settings(preset, **overrides)
        if masks is not None and (single or isinstance(masks, np.ndarray)):
            masks = [masks]
        if masks is not None and len(masks) != len(decoded):
            raise ValueError(f"got {len(masks)} label maps for {len(decoded)} images")
        return self.pipeline(decoded, vocab, settings, masks, return_probs=return_probs)


class _SamShell(torch.nn.Module):
    """What the mask generator reads from a segment_anything Sam (device, input size, the
    normalize-and-pad step) when the encoder and decoder are exported graphs instead."""

    def __init__(self, info: dict, device: torch.device):
        super().__init__()
        import types

        self.image_encoder = types.SimpleNamespace(img_size=info["img_size"])
        self.prompt_encoder = self.mask_decoder = None
        self.register_buffer("pixel_mean", torch.tensor(info["pixel_mean"], device=device).view(-1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(info["pixel_std"], device=device).view(-1, 1, 1))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.pixel_mean) / self.pixel_std
        size = self.image_encoder.img_size
        return torch.nn.functional.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
