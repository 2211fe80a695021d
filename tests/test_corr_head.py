"""The correlation head (spec steps 12-15) against the spec's equations written out per window."""

import torch
import torch.nn.functional as F

from corrclip.models.clip import build_clip
from corrclip.models.corr_head import CorrHead


def literal_head(visual, feats, ids, values, mct, ids_clip, text, tau=4.0, alpha=1.0, beta=0.5):
    """One window. ids [H,W] merged (-1 unsegmented); ids_clip [h,w] compact region of each CLIP patch."""
    hh, ww = ids.shape
    n = hh * ww
    s = feats @ feats.T
    flat = ids.flatten()
    omega = torch.zeros(n, n, dtype=torch.bool)
    for r in flat.unique().tolist():  # the union of per-region blocks, as in the research code
        m = flat == r
        if r >= 0:
            omega |= m[:, None] & m[None, :]
        else:
            omega |= (m[:, None] | m[None, :]) & (s > s.mean())
    w = torch.softmax(tau * s.masked_fill(~omega, float("-inf")), dim=-1)
    blk_out = visual.transformer.resblocks[-1].attn.out_proj
    branches = []
    for k in range(2):
        v = F.interpolate(values[k][None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
        branches.append(blk_out(w @ v.flatten(1).T))
    # Semantic: one-hot M of the CLIP-grid regions nearest-upsampled to the DINO grid.
    up = F.interpolate(ids_clip[None, None].float(), size=(hh, ww), mode="nearest")[0, 0].long().flatten()
    onehot = F.one_hot(up, mct.shape[0]).float()  # [N, R]
    sem = onehot @ mct
    z = visual.ln_post(branches[0]) + alpha * visual.ln_post(branches[1]) + beta * visual.ln_post(sem)
    z = F.normalize(z @ visual.proj, dim=-1)
    return (z @ text.T).T.reshape(-1, hh, ww)


def test_head_matches_literal():
    torch.manual_seed(0)
    visual = build_clip("tiny", "random").visual
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    head = CorrHead(visual)
    b, hh, ww, h, w, c, d, r, q = 2, 12, 12, 6, 6, 16, 64, 4, 5
    feats = F.normalize(torch.randn(b, hh * ww, c), dim=-1)
    ids = torch.randint(-1, 3, (b, hh, ww))
    values = torch.randn(b, 2, d, h, w)
    mct = torch.randn(b, r, d)
    ids_clip = torch.randint(0, r, (b, h, w))
    mct_index = F.interpolate(ids_clip[:, None].float(), size=(hh, ww), mode="nearest")[:, 0].long()
    text = F.normalize(torch.randn(q, 32), dim=-1)
    with torch.no_grad():
        out = head(feats, ids, values, mct, mct_index, text)
        assert out.shape == (b, q, hh, ww)
        for i in range(b):
            ref = literal_head(visual, feats[i], ids[i], values[i], mct[i], ids_clip[i], text)
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-4)
