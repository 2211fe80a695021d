"""The graphs of an engine bundle: which torch module, its inputs and outputs, its dynamic axes,
and fresh random inputs at two or more shapes for the parity check.

Every axis that varies is dynamic: batch B, regions R, classes/queries Q, prompts P, text length L,
and the window. Windows are H x W pixels, multiples of 56 (the pipeline pads them so: a 2048
long-side cap or a short side below the crop gives non-square windows), exported as 56 * k so that
the divisions by DINO's 8 and CLIP's patch stay exact; positional embeddings are interpolated
inside the graphs (models/bicubic.py). Window-derived axes: the DINO grid H8 x W8, the CLIP grid
HP x WP, and their token counts N8 and NP (products, which torch.export derives itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from ..models.build import Models
from ..models.clip import ClipText
from ..runtime.preprocess import PAD_MULTIPLE

# Upper bounds of the dynamic axes (torch.export needs ranges; TensorRT profiles use them too).
# H and W: the largest multiple of 56 within the 2048 long-side cap.
AXIS_MAX = {"B": 64, "R": 1024, "Q": 4096, "P": 4096, "L": 77, "H": 2016, "W": 2016}
WINDOW_AXES = ("H", "W", "H8", "W8", "N8", "HP", "WP", "NP")


def window_axes(h: int, w: int, patch: int) -> dict[str, int]:
    """The sizes of the window-derived axes for an h x w window (pixels) and CLIP patch `patch`."""
    return {"H": h, "W": w, "H8": h // 8, "W8": w // 8, "N8": (h // 8) * (w // 8),
            "HP": h // patch, "WP": w // patch, "NP": (h // patch) * (w // patch)}


def export_dim(symbol: str, dims: dict[str, Dim]):
    """The torch.export dimension of an axis symbol; `dims` shares one Dim per symbol within a graph."""
    if symbol in ("H", "W", "H8", "W8"):  # k window units of 56 pixels, or 7 DINO cells
        unit = dims.setdefault(symbol[0], Dim(f"{symbol[0]}_units", min=1, max=AXIS_MAX[symbol[0]] // PAD_MULTIPLE))
        return unit * (PAD_MULTIPLE if len(symbol) == 1 else PAD_MULTIPLE // 8)
    if symbol in ("N8", "NP"):
        return Dim.AUTO  # a product of the grid's sides
    if symbol in ("HP", "WP"):  # a CLIP grid given on its own (corr_head's values): any size
        return dims.setdefault(symbol, Dim(symbol, min=1, max=AXIS_MAX[symbol[0]] // 14))
    return dims.setdefault(symbol, Dim(symbol, min=1, max=AXIS_MAX[symbol]))


@dataclass
class Graph:
    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: symbol}
    make_inputs: Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]
    # Assignments of the symbols: the first is the export example (every size >= 2: torch.export
    # specializes sizes 0 and 1), all are checked for parity.
    sizes: tuple[dict[str, int], ...]
    # Share of output rows (all axes but the last) allowed past the tolerance, up to FLIP_CEILING: for graphs
    # with hard threshold decisions that a rounding difference flips (SC-CLIP's anomaly quantile, cosine >= beta,
    # prior M < 0; eager torch itself moves a few tokens by ~4e-4 when its input moves by 1e-7).
    flip_rows: float = 0.0


def method_graphs(method: str, models: Models, crop: int) -> list[Graph]:
    """The graphs a method's bundle holds (declared by the method, corrclip/methods/), in eval mode."""
    from .. import methods

    graphs = methods.get(method).graphs(models, crop)
    return [g.__class__(**{**g.__dict__, "module": g.module.eval()}) for g in graphs]


def window_sizes(crop: int) -> tuple[dict[str, int], ...]:
    """Export and parity shapes of a graph that takes windows: a wide window (the export example, so
    that nothing square is baked in), the square crop x crop, and a tall one; batch 2, 1, 1."""
    big, small = max(crop, 2 * PAD_MULTIPLE), max(crop - 2 * PAD_MULTIPLE, PAD_MULTIPLE)
    return ({"B": 2, "H": big, "W": big + 2 * PAD_MULTIPLE}, {"B": 1, "H": crop, "W": crop},
            {"B": 1, "H": crop, "W": small})


def windows_input(s: dict[str, int], g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random H x W windows, batch "B"."""
    return (torch.randn(s["B"], 3, s["H"], s["W"], generator=g),)


WINDOWS = {0: "B", 2: "H", 3: "W"}


def dense_graph(module: nn.Module, outputs: list[str], crop: int, flip_rows: float = 0.0) -> Graph:
    """The one-graph encoders of the CLIP-only methods: windows -> dense outputs."""
    return Graph("clip_dense", module, ["windows"], outputs, {"windows": WINDOWS}, windows_input,
                 window_sizes(crop), flip_rows)


def text_graph(models: Models) -> Graph:
    def text_inputs(s, g):
        tokens = torch.randint(1, 40000, (s["Q"], s["L"]), generator=g)
        tokens[:, -1] = 49407  # end of text: the largest id, where the tower pools
        return (tokens,)

    return Graph("clip_text", ClipText(models.clip).eval(), ["tokens"], ["embeddings"], {"tokens": {0: "Q", 1: "L"}},
                 text_inputs, ({"Q": 6, "L": 20}, {"Q": 3, "L": 77}))


def sam_graphs(sam: nn.Module) -> list[Graph]:
    """SAM's encoder and the shared-image decoder's three stages (per image, per prompt batch, per prompt
    batch whose masks are wanted: the mask generator skips prompts that no mask of would survive)."""
    from ..models.sam import SamEncoder
    from ..models.sam_shared_decoder import ImageTerms, MaskFactors, SamImageTerms, SamPromptMasks, SamPromptTokens

    size = sam.image_encoder.img_size
    chans = sam.prompt_encoder.embed_dim
    grid = sam.prompt_encoder.image_embedding_size
    image_terms, prompt_tokens = SamImageTerms(sam).eval(), SamPromptTokens(sam).eval()

    def image(s, g):
        return (torch.randn(1, 3, size, size, generator=g),)

    def embeddings(s, g):
        return (torch.randn(1, chans, *grid, generator=g),)

    def prompts(s, g):
        # float64 like segment_anything's own points: it adds the 0.5 pixel shift in float64,
        # and rounding to float32 first changes some masks.
        return (torch.rand(s["P"], 1, 2, generator=g, dtype=torch.float64) * size,
                torch.ones(s["P"], 1, dtype=torch.int32))

    # The later stages' inputs are the earlier stages' outputs on random embeddings and points: random
    # tensors would not be consistent (e.g. a negative LayerNorm variance).
    def tokens_inputs(s, g):
        with torch.no_grad():
            return (*image_terms(*embeddings(s, g))[:-1], *prompts(s, g))

    def masks_inputs(s, g):
        with torch.no_grad():
            terms = image_terms(*embeddings(s, g))
            return (terms[-1], *prompt_tokens(*terms[:-1], *prompts(s, g))[1:])

    terms, factors = list(ImageTerms._fields), list(MaskFactors._fields)
    p_axis = {n: {0: "P"} for n in ["point_coords", "point_labels", *factors]}
    sizes = ({"P": 16}, {"P": 5})
    return [
        Graph("sam_encoder", SamEncoder(sam), ["image"], ["embeddings"], {}, image, ({}, {})),
        Graph("sam_image_terms", image_terms, ["embeddings"], terms, {}, embeddings, ({}, {})),
        Graph("sam_prompt_tokens", prompt_tokens, [*terms[:-1], "point_coords", "point_labels"],
              ["iou_predictions", *factors], p_axis, tokens_inputs, sizes),
        Graph("sam_prompt_masks", SamPromptMasks(sam), [terms[-1], *factors], ["low_res_logits"], p_axis,
              masks_inputs, sizes),
    ]
