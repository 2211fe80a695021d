"""The graphs of an engine bundle: which torch module, its inputs and outputs, its dynamic axes,
and fresh random inputs at two shapes per dynamic axis for the parity check.

Window size is static per bundle (positional embeddings are interpolated for it at export time);
batch B, regions R, classes/queries Q, prompts P and text length L are dynamic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models.build import Models
from ..models.clip import ClipText

# Upper bounds of the dynamic axes (torch.export needs ranges; TensorRT profiles use them too).
AXIS_MAX = {"B": 64, "R": 1024, "Q": 4096, "P": 4096, "L": 77}


@dataclass
class Graph:
    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: symbol}
    make_inputs: Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]
    sizes: tuple[dict[str, int], dict[str, int]]  # two assignments of the symbols, for export and parity


def method_graphs(method: str, models: Models, crop: int) -> list[Graph]:
    """The graphs a method's bundle holds (declared by the method, corrclip/methods/), in eval mode."""
    from .. import methods

    graphs = methods.get(method).graphs(models, crop)
    return [g.__class__(**{**g.__dict__, "module": g.module.eval()}) for g in graphs]


def windows_input(crop: int) -> Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]:
    """Random crop x crop windows, batch "B"."""

    def make(s, g):
        return (torch.randn(s["B"], 3, crop, crop, generator=g),)

    return make


def dense_graph(module: nn.Module, outputs: list[str], crop: int) -> Graph:
    """The one-graph encoders of the CLIP-only methods: windows -> dense outputs."""
    return Graph("clip_dense", module, ["windows"], outputs, {"windows": {0: "B"}}, windows_input(crop),
                 ({"B": 2}, {"B": 1}))


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
