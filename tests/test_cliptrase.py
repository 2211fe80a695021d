"""CLIPtrase graph and post-processing against literal implementations of
shared/specs/cliptrase.md (eq. 1-5 and "Precise semantics" 5, 6, 8): per-head loops for the
block-(L-1) correlation and the block-L attention, scikit-learn's DBSCAN (or a literal copy of its
algorithm), and scipy's median filter."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrclip.kernels.cliptrase_post import cluster_regions, median_filter_2d
from corrclip.kernels.dbscan import dbscan, dbscan_batched
from corrclip.models.clip import build_clip
from corrclip.models.cliptrase import CliptraseDense, qkv_correlation, self_correlation_attention

try:
    from sklearn.cluster import DBSCAN
except ImportError:  # the literal algorithm below stands in
    DBSCAN = None
try:
    from scipy.ndimage import median_filter
except ImportError:
    median_filter = None

needs_scipy = pytest.mark.skipif(median_filter is None, reason="scipy is not installed")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = build_clip("tiny", "random")
    with torch.no_grad():  # random init leaves biases at zero: perturb so every term matters
        for p in model.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------------------------
# Literal references


def head_proj(blk, x, which, i):
    """ln_1(x) projected to q (0), k (1) or v (2) of head i, bias included."""
    attn = blk.attn
    d = x.shape[-1]
    hd = d // attn.num_heads
    lo = which * d + i * hd
    return blk.ln_1(x) @ attn.in_proj_weight[lo:lo + hd].t() + attn.in_proj_bias[lo:lo + hd]


def literal_correlation(blk, x):
    """x [T,D]: eq. (1) head by head, cosines the way the research code takes them."""
    nh = blk.attn.num_heads
    total = 0
    for i in range(nh):
        per = 0
        for which in range(3):
            t = head_proj(blk, x, which, i)
            per = per + torch.cosine_similarity(t[:, None], t[None], dim=-1, eps=1e-8)
        total = total + per / 3.0
    return total / nh


def literal_attention(blk, x):
    """x [T,D]: eq. (2) head by head, out_proj included (no residual)."""
    nh = blk.attn.num_heads
    outs = []
    for i in range(nh):
        q, k, v = (head_proj(blk, x, which, i) for which in range(3))
        scale = q.shape[-1] ** -0.5
        a = (q * scale @ q.t()).softmax(-1) + (k * scale @ k.t()).softmax(-1) + (v * scale @ v.t()).softmax(-1)
        outs.append(a @ v)
    return blk.attn.out_proj(torch.cat(outs, dim=-1))


def literal_cliptrase(visual, window):
    blocks = visual.transformer.resblocks
    x = visual.conv1(window[None])
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)[0]
    pos = visual.positional_embedding
    if gh * gw != pos.shape[0] - 1:
        g0 = int(math.sqrt(pos.shape[0] - 1))
        grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic",
                             align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    x = visual.ln_pre(torch.cat([visual.class_embedding[None], x]) + pos)
    for blk in blocks[:-2]:
        x = blk(x[None])[0]
    s = literal_correlation(blocks[-2], x)
    x = blocks[-2](x[None])[0]
    last = blocks[-1]
    x = x + literal_attention(last, x)
    x = x + last.mlp(last.ln_2(x))
    f = visual.ln_post(x) @ visual.proj
    f = f / f.norm(dim=-1, keepdim=True)
    corr = s[1:, 1:] - s[0:1, 1:]
    corr[corr < 0] = 0
    return f[1:], f[0], corr


def literal_dbscan(points, eps, min_samples):
    """scikit-learn's algorithm, step by step: neighbourhoods, core points, stack-based growth."""
    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    neighbourhoods = [np.flatnonzero(np.sqrt(((x - x[i]) ** 2).sum(-1)) <= eps) for i in range(n)]
    core = [len(nb) >= min_samples for nb in neighbourhoods]
    labels = [-1] * n
    label = 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        stack = [i]
        while stack:
            j = stack.pop()
            if labels[j] != -1:
                continue
            labels[j] = label
            if core[j]:
                stack.extend(v for v in neighbourhoods[j] if labels[v] == -1)
        label += 1
    return np.array(labels)


def reference_dbscan(points, eps, min_samples):
    if DBSCAN is None:
        return literal_dbscan(points, eps, min_samples)
    return DBSCAN(eps=eps, min_samples=min_samples).fit_predict(np.asarray(points, dtype=np.float32))


def literal_cluster_regions(corr, labels, grid, out_size):
    """What the research script does, with scipy's median filter."""
    ids = [int(i) for i in torch.unique(labels) if i >= 0]
    if not ids:
        return None
    maps = torch.stack([corr[labels == i].mean(dim=0) for i in ids]).reshape(len(ids), *grid)
    maps = F.interpolate(maps[None], size=(4 * grid[0], 4 * grid[1]), mode="bilinear", align_corners=False)[0]
    maps = maps.numpy()
    for i in range(maps.shape[0]):
        maps[i] = median_filter(maps[i], size=7)
    maps = F.interpolate(torch.from_numpy(maps)[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return maps.argmax(dim=0)


# --------------------------------------------------------------------------------------------
# Graph


def test_block_correlation_and_attention_match_loops(clip):
    torch.manual_seed(0)
    blocks = clip.visual.transformer.resblocks
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        s = qkv_correlation(blocks[-2], x)
        a = self_correlation_attention(blocks[-1], x)
        for b in range(2):
            torch.testing.assert_close(s[b], literal_correlation(blocks[-2], x[b]), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a[b], literal_attention(blocks[-1], x[b]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (224, 288)])
def test_dense_matches_literal(clip, size):
    torch.manual_seed(1)
    model = CliptraseDense(clip.visual)
    windows = torch.randn(2, 3, *size)
    n = (size[0] // 16) * (size[1] // 16)
    with torch.no_grad():
        feats, cls, corr = model(windows)
        assert feats.shape == (2, n, 32) and cls.shape == (2, 32) and corr.shape == (2, n, n)
        for b in range(2):
            f_ref, c_ref, s_ref = literal_cliptrase(clip.visual, windows[b])
            torch.testing.assert_close(feats[b], f_ref, rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(cls[b], c_ref, rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(corr[b], s_ref, rtol=1e-4, atol=2e-5)
    assert (corr >= 0).all() and (corr == 0).any() and (corr > 0).any()


# --------------------------------------------------------------------------------------------
# DBSCAN


def blobs(seed, n=120, d=2, centers=4, noise=15, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 4
    pts = c[torch.randint(0, centers, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
    scatter = (torch.rand(noise, d, generator=g) - 0.5) * 16  # sparse noise and border points
    pts = torch.cat([pts, scatter])
    return pts[torch.randperm(len(pts), generator=g)]  # cluster ids must not follow the blob order


@pytest.mark.parametrize("seed,eps,min_samples", [(0, 0.5, 5), (1, 0.8, 4), (2, 0.3, 3), (3, 1.2, 10)])
def test_dbscan_matches_reference_on_blobs(seed, eps, min_samples):
    pts = blobs(seed)
    got = dbscan(pts, eps, min_samples).numpy()
    ref = reference_dbscan(pts.numpy(), eps, min_samples)
    assert (got == ref).all()
    assert got.max() >= 1 and (got == -1).any()  # several clusters and some noise: a real test


def test_dbscan_high_dimensional_rows():
    """Points like CLIPtrase's: N rows of an N x N non-negative matrix."""
    pts = blobs(4, n=180, d=196, centers=5, noise=16, spread=0.05).abs()
    got = dbscan(pts, 1.1, 7).numpy()
    ref = reference_dbscan(pts.numpy(), 1.1, 7)
    assert (got == ref).all() and got.max() >= 1


def test_dbscan_border_rule_and_inclusive_eps():
    # index 0 is a border point: exactly eps (2.0, inclusive) from cluster 0's core at (2, 0), and
    # 1.9 from cluster 1's core at (-1.9, 0). The first cluster grown reaches it first and keeps it.
    right = [(2.0, 0.0), (2.5, 0.0), (3.0, 0.0), (3.5, 0.0)]
    left = [(-1.9, 0.0), (-2.4, 0.0), (-2.9, 0.0), (-3.4, 0.0)]
    pts = torch.tensor([(0.0, 0.0), *right, *left, (0.0, 9.0)])
    got = dbscan(pts, 2.0, 4)
    assert got.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert (got.numpy() == literal_dbscan(pts.numpy(), 2.0, 4)).all()
    # min_samples counts the point itself: with 1 and a tiny eps every point is its own cluster,
    # with 2 every point is noise.
    assert (dbscan(pts, 0.1, 1) == torch.arange(10)).all()
    assert (dbscan(pts, 0.1, 2) == -1).all()


@pytest.mark.skipif(DBSCAN is None, reason="scikit-learn is not installed")
def test_literal_dbscan_is_sklearn():
    pts = blobs(5).numpy()
    assert (literal_dbscan(pts, 0.6, 5) == DBSCAN(eps=0.6, min_samples=5).fit_predict(pts)).all()


def test_dbscan_batched():
    pts = torch.stack([blobs(6), blobs(7)])
    got = dbscan_batched(pts, 0.6, 4)
    for b in range(2):
        assert (got[b].numpy() == reference_dbscan(pts[b].numpy(), 0.6, 4)).all()
        assert got[b].max() >= 1 and (got[b] == -1).any()  # several clusters and some noise


# --------------------------------------------------------------------------------------------
# Cluster maps


@needs_scipy
@pytest.mark.parametrize("shape", [(3, 56, 56), (2, 5, 9), (1, 2, 3)])
def test_median_filter_matches_scipy(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, : shape[1] // 2] = torch.randint(0, 3, (shape[1] // 2, shape[2])).float()  # ties
    ref = np.stack([median_filter(m, size=7, mode="reflect") for m in x.numpy()])
    assert np.array_equal(median_filter_2d(x, 7).numpy(), ref)


@needs_scipy
def test_cluster_regions_match_literal():
    torch.manual_seed(0)
    h, w = 14, 14
    n = h * w
    # Block-structured S' with many exact zeros, as after the CLS subtraction.
    group = torch.randint(0, 4, (n,))
    corr = ((group[:, None] == group[None]).float() * 0.5 + 0.3 * torch.randn(n, n) - 0.1).clamp_min(0)
    labels = group.clone()
    labels[torch.rand(n) < 0.15] = -1  # noise rows are excluded from the means
    got = cluster_regions(corr, labels, (h, w), (224, 224))
    ref = literal_cluster_regions(corr, labels, (h, w), (224, 224))
    assert got.shape == (224, 224) and got.dtype == torch.long
    assert torch.equal(got, ref)
    assert len(torch.unique(got)) == 4


def test_cluster_regions_ties_and_all_noise():
    corr = torch.zeros(16, 16)
    labels = torch.tensor([0, 1, 2] * 5 + [-1])
    assert torch.equal(cluster_regions(corr, labels, (4, 4), (20, 20)), torch.zeros(20, 20, dtype=torch.long))
    assert cluster_regions(torch.rand(16, 16), torch.full((16,), -1), (4, 4), (20, 20)) is None
