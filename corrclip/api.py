"""The public Python API.

    from corrclip import Segmenter
    seg = Segmenter("vit_b")                       # official weights (downloaded once)
    out = seg.segment("street.jpg", "sky; cloud, road, car")[0]
    out.labels, out.names                          # [H, W] class indices, class names

    eng = Segmenter.from_bundle("bundles/vit_b", backend="onnxruntime")   # an exported engine
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import open_clip
import torch

from . import methods, presets
from . import precision as precision_modes
from .engine.bundle import Bundle
from .models.clip import ClipText
from .runtime.image_io import decode_image
from .runtime.pipeline import Pipeline, Segmentation
from .runtime.text import TextCache, TextEmbedder, default_cache_dir
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
    """Open-vocabulary segmentation with one of the registered methods (corrclip.methods) on the torch
    reference backend; `Segmenter.from_bundle` runs an exported engine instead.

    weights: "official" (each model's official checkpoint) or "random" (seeded random weights:
    exercises the pipeline and its timing, segments nothing meaningful). clip_weights,
    dino_weights and sam_weights override one model each (a tag or a local file). sam="none"
    builds no mask generator: every call then needs label maps. text_cache: a folder for the text
    embeddings' disk cache (default $CORRCLIP_CACHE/text or ~/.cache/corrclip/text), or False for none.
    precision: "fp32" (the exact reference, default), "bf16", "fp16" or "auto" (corrclip/precision.py:
    the fastest mix within the research code's own rounding on this hardware); `self.plan` says what runs.
    plan: an explicit corrclip.precision.Plan instead of `precision` (one stage lowered at a time, for
    benchmarks/fidelity.py's measurements).
    compile: run the encoder stages (DINO, CLIP trunk, SAM encoder, dense CLIP) through torch.compile, at
    the plan's precision (models/compiled.py); the calls that compile report their time apart, as timings
    "compile.<stage>", and eager runs on (after a one-line warning) where compiling fails.
    """

    def __init__(self, backbone: str = "vit_b", weights: str | None = None, *, clip_weights: str | None = None,
                 dino_weights: str | None = None, sam_weights: str | None = None, sam: str | None = None,
                 amg=None, device: str | torch.device | None = None, max_windows: int = 8, method: str = "corrclip",
                 text_cache: str | os.PathLike | bool = True, precision: str = "fp32",
                 plan: precision_modes.Plan | None = None, compile: bool = False):
        from .models.compiled import Compiled, compile_stages
        from .models.half import AtPrecision, lower_stages

        self.device = torch.device(device) if device is not None else default_device()
        self.bundle: Bundle | None = None
        self.backend = "torch"
        self.plan = plan = plan or precision_modes.resolve(precision, self.device)
        spec = methods.get(method)
        models = methods.build_models(spec, backbone, weights, clip_weights=clip_weights, dino_weights=dino_weights,
                                      sam_weights=sam_weights, sam=sam, device=self.device)
        self.method, self.backbone, self.identity = spec.name, models.backbone, models.identity
        masks = None
        if models.sam is not None:
            from .runtime.amg import AmgSettings, MaskGenerator

            masks = MaskGenerator.from_sam(models.sam, amg or AmgSettings())
            if plan.fused_attention:
                masks.encoder = _fused_sam_encoder(masks.encoder)
            lower_stages(masks, {"sam_encoder": masks.encoder}, plan)
            if compile:
                masks.encoder = Compiled(masks.encoder, "sam_encoder", self.device)
        tokenizer = open_clip.get_tokenizer("ViT-B-16" if models.clip_arch == "tiny" else models.clip_arch)
        tower, local = models.identity["clip"], models.weight_files.get(clip_weights or "")
        text_tower = ClipText(models.clip)
        if plan.name("clip_text") != "fp32":
            text_tower = AtPrecision(text_tower, plan.dtype("clip_text"))
        text = TextEmbedder(text_tower, tokenizer, self.device, identity=f"{tower}#{local}" if local else tower,
                            cache=_text_cache(text_cache), variant=plan.name("clip_text"))
        encoder = spec.build_encoder(models, self.device)
        encoder.stages = lower_stages(encoder, encoder.stages, plan)
        if compile:
            encoder.stages = compile_stages(encoder, encoder.stages, self.device)
        self.compiled = compile
        self.pipeline = Pipeline(encoder, text, masks, self.device, max_windows)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str = "onnxruntime", *,
                    device: str | torch.device | None = None, amg=None, max_windows: int = 8,
                    precision: str = "fp32", text_cache: str | os.PathLike | bool = True) -> Segmenter:
        """An engine bundle from corrclip-export, its graphs run by `backend` (corrclip.engine.backends):
        no model code in the loop. `precision`: the bundle's own (fp32, auto) or, on OpenVINO, the inference
        precision it picks at load time (corrclip.precision.bundle_plan)."""
        from .engine import backends
        from .engine.backends import make_executor
        from .engine.bundle import load_bundle

        self = cls.__new__(cls)
        self.device = torch.device(device) if device is not None else default_device()
        bundle = self.bundle = load_bundle(path)
        self.compiled = False  # a bundle's graphs are compiled when exported
        # What runs is the bundle's export precision (OpenVINO may lower it further at load time).
        exported = {name: g.get("precision", "fp32") for name, g in bundle.graphs.items()}
        self.plan = plan = precision_modes.bundle_plan(precision, exported, self.device, backend,
                                                       backends.get(backend).native_precision)
        self.backend = backend
        mf = bundle.manifest
        spec = methods.get(mf["method"])
        self.method, self.backbone, self.identity = spec.name, presets.backbone(mf["backbone"]), dict(mf["weights"])
        run = {name: make_executor(bundle, name, backend, self.device, plan.name(name)) for name in bundle.graphs}
        masks = None
        if "sam_encoder" in run:
            from .runtime.amg import AmgSettings, MaskGenerator, SharedStages

            sam = mf["sam"]
            # the shared decoder's three graphs; bundles exported before it have segment_anything's decoder
            shared = SharedStages(run["sam_image_terms"], run["sam_prompt_tokens"],
                                  lambda *a: run["sam_prompt_masks"](*a)[0]) if "sam_image_terms" in run else None
            masks = MaskGenerator(lambda x: run["sam_encoder"](x)[0], run.get("sam_decoder"), img_size=sam["img_size"],
                                  pixel_mean=sam["pixel_mean"], pixel_std=sam["pixel_std"], device=self.device,
                                  settings=amg or AmgSettings(), shared=shared)
        # The text graph's file hash names its weights and precision exactly.
        onnx = next(e for e in mf["graphs"]["clip_text"]["files"] if e["format"] == "onnx")
        text = TextEmbedder(lambda t: run["clip_text"](t)[0], open_clip.get_tokenizer(mf["clip"]["tokenizer"]),
                            self.device, identity=f"clip_text.onnx#{onnx['sha256'][onnx['file']]}",
                            cache=_text_cache(text_cache))
        self.pipeline = Pipeline(spec.from_graphs(run, mf), text, masks, self.device, max_windows,
                                 window=mf["window"])
        return self

    @property
    def needs_masks(self) -> bool:
        """True when every call must bring region label maps: the method uses regions and no SAM was built."""
        return self.pipeline.method.needs_masks and self.pipeline.mask_generator is None

    @property
    def has_mask_generator(self) -> bool:
        return self.pipeline.mask_generator is not None

    @property
    def amg(self):
        """The mask generator's settings (runtime.amg.AmgSettings, mutable), or None without SAM."""
        gen = self.pipeline.mask_generator
        return gen.settings if gen is not None else None

    @property
    def random_weights(self) -> bool:
        """Whether any model runs seeded random weights (timing only: the labels mean nothing)."""
        return any(str(v).endswith(":random") for k, v in self.identity.items() if k != "backbone")

    @property
    def stages(self) -> dict[str, Callable]:
        """Stage name -> the graph (torch module or executor) it runs."""
        gen = self.pipeline.mask_generator
        return {**(gen.stages if gen is not None and hasattr(gen, "stages") else {}), **self.pipeline.method.stages}

    def settings_for(self, preset: str | None = None, **overrides) -> presets.Settings:
        """The method's settings for a benchmark preset (None: the method's defaults), with overrides."""
        return methods.get(self.method).settings(preset, **overrides)

    def text_embeddings(self, classes: str | Sequence[str] | Vocabulary) -> torch.Tensor:
        """[Q, E] normalized text embeddings of a vocabulary's queries (cached per vocabulary)."""
        return self.pipeline.text(as_vocabulary(classes))

    def run(self, images: Sequence[np.ndarray], vocab: Vocabulary, settings: presets.Settings,
            label_maps: Sequence[np.ndarray | None] | None = None, return_probs: bool = False,
            count_flops: bool = False) -> list[Segmentation]:
        """Decoded RGB uint8 images -> one Segmentation each (labels, names, optional probs, stage timings).
        The call the CLI, bench, eval and serve use; `segment` is the convenient front door."""
        results = self.pipeline(images, vocab, settings, label_maps, return_probs=return_probs, count_flops=count_flops)
        if self.compiled:
            from .models.compiled import set_aside_compile_time

            set_aside_compile_time([r.timings for r in results], self.stages.values())
        return results

    def segment(self, images: ImageLike | Sequence[ImageLike], classes: str | Sequence[str] | Vocabulary | None = None,
                *, preset: str | None = None, masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
                return_probs: bool = False, **overrides) -> list[Segmentation]:
        """Segments one image or a list. `classes` (e.g. "sky; cloud, road, car": commas separate
        classes, semicolons synonyms) or `preset` (a benchmark: its classes and settings).
        `masks`: region label maps at each image's resolution (skips SAM). `overrides`: fields of
        the method's settings, e.g. prob_thd=0.2."""
        single = isinstance(images, (str, os.PathLike, bytes, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4)
        batch = [images] if single else list(images)
        decoded = [decode_image(x) if not isinstance(x, np.ndarray) else np.ascontiguousarray(x, np.uint8)
                   for x in batch]
        if classes is None and preset is None:
            raise ValueError("give classes (e.g. 'sky, road, car') or a preset (e.g. 'voc21')")
        vocab = as_vocabulary(classes) if classes is not None else benchmark_vocabulary(preset)
        settings = self.settings_for(preset, **overrides)
        if masks is not None and (single or isinstance(masks, np.ndarray)):
            masks = [masks]
        if masks is not None and len(masks) != len(decoded):
            raise ValueError(f"got {len(masks)} label maps for {len(decoded)} images")
        return self.run(decoded, vocab, settings, masks, return_probs=return_probs)


def _fused_sam_encoder(encoder):
    """A copy of SAM's encoder whose attention runs fused (models/sam_attention.py); the reference is untouched."""
    import copy

    from .models.sam_attention import fuse_sam_attention

    fused = copy.deepcopy(encoder)
    fuse_sam_attention(fused.image_encoder)
    return fused


def _text_cache(choice: str | os.PathLike | bool) -> TextCache | None:
    if choice is False or choice is None:
        return None
    return TextCache(default_cache_dir() if choice is True else choice)
