"""The fused SAM attention (models/sam_attention.py) against segment_anything's own, window and global shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from corrclip.models import sam_attention
from corrclip.models.sam import build_sam
from corrclip.models.sam_attention import fuse_sam_attention, fused_attention_forward, is_fused


def _attention(size: int, dim: int = 96, heads: int = 3) -> Attention:
    torch.manual_seed(size)
    a = Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=(size, size)).eval()
    with torch.no_grad():  # segment_anything initializes the tables to zero: give the bias something to do
        a.rel_pos_h.normal_(0, 0.5)
        a.rel_pos_w.normal_(0, 0.5)
    return a


@pytest.mark.parametrize("size,batch", [(14, 3), (40, 1)])  # a window block, and a global block over 2 chunks
def test_matches_reference_fp32(size, batch, monkeypatch):
    monkeypatch.setattr(sam_attention, "QUERY_CHUNK", 1024)
    a = _attention(size)
    x = torch.randn(batch, size, size, 96)
    with torch.no_grad():
        ref, out = a(x), fused_attention_forward(a, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_the_bias_is_applied():
    a = _attention(14)
    x = torch.randn(1, 14, 14, 96)
    with torch.no_grad():
        ref = a(x)
        a.use_rel_pos = False  # the same attention without the rel-pos bias must differ
        out = fused_attention_forward(a, x)
    assert (out - ref).abs().max() > 1e-2


def test_bf16_close_to_fp32():
    a = _attention(14)
    x = torch.randn(2, 14, 14, 96)
    low = copy.deepcopy(a).to(torch.bfloat16)
    with torch.no_grad():
        ref, out = a(x), fused_attention_forward(low, x.to(torch.bfloat16)).float()
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < err < 3e-2


def test_whole_encoder_fused_in_place():
    sam = build_sam("tiny", "random")
    enc = sam.image_encoder
    for blk in enc.blocks:  # random rel-pos tables instead of zeros
        torch.nn.init.normal_(blk.attn.rel_pos_h, 0, 0.5)
        torch.nn.init.normal_(blk.attn.rel_pos_w, 0, 0.5)
    fused = fuse_sam_attention(copy.deepcopy(enc))
    assert is_fused(fused) and not is_fused(enc)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), enc(x), rtol=1e-4, atol=1e-5)
