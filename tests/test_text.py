"""Text embeddings (spec step 3) against open_clip's own encode_text on the full 77-token prompts: per
prompt L2-normalized, averaged over the 80 ImageNet templates, renormalized. For every CLIP architecture
a backbone can use, at tiny width; the engine trims the context and batches prompts, the reference does not."""

import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from corrclip.api import as_vocabulary
from corrclip.models.clip import ClipText, build_clip
from corrclip.presets import BACKBONES, OPENAI_ARCH
from corrclip.runtime.text import TextEmbedder

ARCHS = sorted({b.clip_arch for b in BACKBONES.values()} | set(OPENAI_ARCH.values()))
# Synonyms, and a long name (its prompts are longer than the others in their chunk).
VOCAB = as_vocabulary("sky; cloud, a red double-decker bus parked beside an old stone bridge")


def tiny_width(arch: str) -> torch.nn.Module:
    """The architecture's text tower (context, vocabulary, heads, activation) at width 8 per head, one block."""
    if arch == "tiny":
        model = build_clip("tiny", "random")
    else:
        cfg = open_clip.get_model_config(arch)
        text = dict(cfg["text_cfg"], width=8 * cfg["text_cfg"]["heads"], layers=1)
        vision = dict(cfg["vision_cfg"], layers=1, width=64, head_width=32)
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.get("quick_gelu", False))
    with torch.no_grad():  # random init leaves biases at zero and norms at one: perturb so every term matters
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokenizer_for(arch: str):
    return open_clip.get_tokenizer("ViT-B-16" if arch == "tiny" else arch)


def reference(model: torch.nn.Module, tokenizer, queries) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for query in queries:
            tokens = tokenizer([template(query) for template in OPENAI_IMAGENET_TEMPLATES])
            assert tokens.shape == (80, 77)
            emb = model.encode_text(tokens)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_text_matches_open_clip(arch):
    model = tiny_width(arch)
    ref = reference(model, tokenizer_for(arch), VOCAB.queries)
    # chunk 100: the 240 prompts go in 3 chunks, each trimmed after its own longest prompt
    got = TextEmbedder(ClipText(model), tokenizer_for(arch), torch.device("cpu"), chunk=100)(VOCAB)
    assert got.shape == (3, model.text_projection.shape[1]) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert (ref @ ref.t()).fill_diagonal_(0).abs().max() < 0.999  # three different rows, not one

