"""The CorrCLIP trunk against a literal implementation of spec steps 6 and 10-13.

The literal version does what the research code does: one window at a time, R mask class tokens
prepended to the sequence, one joint bool attention mask through nn.MultiheadAttention.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrclip.models.clip import (
    ClipText,
    ClipTrunk,
    build_clip,
    embed_windows,
    interpolate_pos_embed_clip,
    num_spatial_layers,
    pos_embed_for_export,
)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = build_clip("tiny", "random")
    # Random init leaves some parameters at exact zeros/ones; perturb so every term matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def keys_cubic(x, a=-0.75):
    """The bicubic convolution kernel (Keys, a = -0.75: what torch and OpenCV use)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def literal_resize_axis(grid, axis, scale):
    """Bicubic resize of one axis by `scale` (half-pixel centres, no corner alignment, edge samples
    repeated), sample by sample in float64: output i reads source (i + 0.5) / scale - 0.5."""
    n = grid.shape[axis]
    out = []
    for i in range(math.floor(n * scale)):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        out.append(sum(keys_cubic(src - (base + k)) * np.take(grid, min(max(base + k, 0), n - 1), axis=axis)
                       for k in (-1, 0, 1, 2)))
    return np.stack(out, axis=axis)


def literal_pos_embed(pos, gh, gw):
    """The research code's rule: bicubic with scale factor (g + 0.1) / g0 per axis, the native grid as is."""
    g0 = int(math.sqrt(pos.shape[0] - 1))
    if (gh, gw) == (g0, g0):
        return pos
    grid = pos[1:].detach().double().numpy().reshape(g0, g0, -1)
    grid = literal_resize_axis(literal_resize_axis(grid, 0, (gh + 0.1) / g0), 1, (gw + 0.1) / g0)
    assert grid.shape[:2] == (gh, gw)
    return torch.cat([pos[:1], torch.from_numpy(grid).float().reshape(gh * gw, -1)])


def literal_trunk(visual, window, region_of_patch, num_regions):
    """One window [3,h,w]; region_of_patch [n] in 0..R-1. Returns values [2,n,D], mct [R,D]."""
    blocks = visual.transformer.resblocks
    x = visual.conv1(window[None])
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)[0]
    x = torch.cat([visual.class_embedding[None], x])
    x = x + literal_pos_embed(visual.positional_embedding, gh, gw)
    x = visual.ln_pre(x)
    n = x.shape[0] - 1
    r = num_regions
    seq = torch.cat([x[:1].repeat(r, 1), x])  # [R + 1 + n, D]: MCTs first, like the research code
    allowed = torch.zeros(r + 1 + n, r + 1 + n, dtype=torch.bool)
    allowed[r:, r:] = True  # original tokens <-> original tokens
    for k in range(r):
        allowed[k, r] = True  # MCT -> CLS
        for j in range(n):
            if region_of_patch[j] == k:
                allowed[k, r + 1 + j] = True
    mask = ~allowed  # nn.MultiheadAttention: True = blocked

    def block(blk, s):
        h = blk.ln_1(s)[:, None]  # LND, batch 1
        a = blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0][:, 0] if not blk.attn.batch_first else \
            blk.attn(h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), need_weights=False,
                     attn_mask=mask)[0][0]
        s = s + a
        return s + blk.mlp(blk.ln_2(s))

    depth = len(blocks)
    k_sp = num_spatial_layers(depth)
    streams = []
    for i, blk in enumerate(blocks[:-1]):
        seq = block(blk, seq)
        if depth - 2 - k_sp <= i <= depth - 3:
            streams.append(seq[r:])
    x_main = seq[r:]
    x_sp = torch.stack(streams).mean(0)
    last = blocks[-1]
    d = x.shape[1]
    wv, bv = last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:]
    values = torch.stack([last.ln_1(x_main) @ wv.t() + bv, last.ln_1(x_sp) @ wv.t() + bv])[:, 1:]
    mct = block(last, seq)[:r]
    return values, mct


def test_num_spatial_rule():
    assert [num_spatial_layers(d) for d in (12, 24, 32, 6)] == [5, 12, 28, 2]


@pytest.mark.parametrize("grid", [(21, 21), (17, 21), (14, 14)])
def test_pos_embed_interpolation(clip, grid):
    pos = clip.visual.positional_embedding
    torch.testing.assert_close(interpolate_pos_embed_clip(pos, grid), literal_pos_embed(pos, *grid))
    # The +0.1 rule is not an interpolation to size: the two differ.
    if grid == (21, 21):
        plain = F.interpolate(pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                              align_corners=False)
        assert not torch.allclose(plain.permute(0, 2, 3, 1).reshape(441, -1), interpolate_pos_embed_clip(pos, grid)[1:])


@pytest.mark.parametrize("grid", [(21, 21), (14, 21), (21, 14), (3, 126), (14, 14)])
def test_pos_embed_export_form_agrees(clip, grid):
    """The matrix form traced by torch.export: the eager F.interpolate numbers to ~1e-6, the table at 14 x 14."""
    pos = clip.visual.positional_embedding.detach()
    traced = pos_embed_for_export(pos, grid)
    assert float((traced - interpolate_pos_embed_clip(pos, grid)).abs().max()) <= 2e-6 * float(pos.abs().max())
    if grid == (14, 14):
        assert torch.equal(traced, pos)


def test_window_embedding_exports_with_dynamic_sides(clip):
    """Patches + interpolated positions exported once at 336 x 448 serve other (non-square) windows."""
    from torch.export import Dim

    class Embed(torch.nn.Module):
        def forward(self, windows):
            return embed_windows(clip.visual, windows)

    rows, cols = Dim("rows", min=1, max=36), Dim("cols", min=1, max=36)
    with torch.no_grad():
        program = torch.export.export(Embed(), (torch.randn(2, 3, 336, 448),),
                                      dynamic_shapes=({2: 56 * rows, 3: 56 * cols},))
        for h, w in ((224, 336), (336, 224), (56, 560), (224, 224)):
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(program.module()(x), Embed()(x), atol=2e-6, rtol=1e-5)


def test_trunk_matches_literal_joint_mask(clip):
    torch.manual_seed(1)
    trunk = ClipTrunk(clip.visual)
    windows = torch.randn(2, 3, 336, 336)
    n = 21 * 21
    ids = [torch.randint(0, 5, (n,)), torch.randint(0, 3, (n,))]  # 5 and 3 regions: padded to 5
    ids[1][:50] = 2
    membership = torch.zeros(2, 5, n, dtype=torch.bool)
    for b in range(2):
        membership[b, ids[b], torch.arange(n)] = True
    with torch.no_grad():
        values, mct = trunk(windows, membership)
        assert values.shape == (2, 2, 64, 21, 21) and mct.shape == (2, 5, 64)
        for b, r in ((0, 5), (1, 3)):
            v_ref, m_ref = literal_trunk(clip.visual, windows[b], ids[b], r)
            torch.testing.assert_close(values[b].flatten(2).transpose(1, 2), v_ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(mct[b, :r], m_ref, atol=2e-5, rtol=1e-4)


def test_image_tokens_are_vanilla_clip(clip):
    """Spec step 10: the MCTs must not change the original tokens."""
    torch.manual_seed(2)
    trunk = ClipTrunk(clip.visual)
    window = torch.randn(1, 3, 224, 224)
    x = trunk.embed(window)
    m = x[:, :1].expand(1, 3, -1)
    bias = torch.zeros(1, 1, 3, x.shape[1])
    ours = x
    for blk in trunk.blocks:
        ours, m = trunk._attend(blk, ours, m, bias)
    vanilla = clip.visual.transformer(x)
    torch.testing.assert_close(ours, vanilla, atol=1e-5, rtol=1e-4)


def test_text_tower_trimmed_equals_full(clip):
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog.", "a bad photo of the sky and a very long tail"])
    text = ClipText(clip)
    with torch.no_grad():
        full = clip.encode_text(tok)
        trimmed = text(tok[:, : int(tok.argmax(-1).max()) + 1])
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)
