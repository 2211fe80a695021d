"""Region merging, Triton path (interpreted on the CPU, compiled on CUDA) against the torch reference on the same
device and float64."""

import pytest
import torch
import torch.nn.functional as F

from corrclip.kernels import merging
from corrclip.runtime.regions import compact_per_window


def make_windows(b: int, n: int, c: int, num_ids: int, kind: str, seed: int):
    """Clustered features and per-window local ids 0..R_b-1. The six cluster centres lie on two arcs: 0.4 rad apart
    is within eps (1 - cos 0.4 = 0.08), 0.8 is not (0.30). The first arc (0, 0.4, 0.8) merges only through a chain
    (the transitive closure), the second (0, 0.4, 1.2) splits in two; no region pair sits near the eps boundary."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.tensor([0.0, 0.4, 0.8, 0.0, 0.4, 1.2])
    centers = torch.zeros(6, c)
    centers[:3, 0], centers[:3, 1] = angle[:3].cos(), angle[:3].sin()
    centers[3:, 2], centers[3:, 3] = angle[3:].cos(), angle[3:].sin()
    centers = centers @ torch.linalg.qr(torch.randn(c, c, generator=g))[0]  # no axis-aligned structure
    raw = torch.randint(0, num_ids, (b, n), generator=g) * 7 + 3  # arbitrary, non-contiguous ids
    if kind == "one_token_regions":
        raw = torch.randperm(n, generator=g).repeat(b, 1) * 7 + 3
    elif kind == "single_region":
        raw[0] = 10  # window 0 holds only its "unsegmented" region
        raw[-1, : n // 2] = 3  # the last window: region 0 and one other
        raw[-1, n // 2:] = 17
    noise = 0.15 / c**0.5 * torch.randn(b, n, c, generator=g)
    feats = F.normalize(centers[(raw // 7) % 6] + noise, dim=-1)
    local, r = compact_per_window(raw)
    return feats, local, r


def float64_graph(feats: torch.Tensor, local: torch.Tensor, r: int, eps: float):
    """Means, counts, reach and the distance of the nearest pair to the eps boundary, all in float64."""
    b, n, c = feats.shape
    index = local[:, :, None].expand(-1, -1, c)
    sums = torch.zeros(b, r, c, dtype=torch.float64).scatter_add_(1, index, feats.double())
    counts = torch.zeros(b, r, dtype=torch.float64).scatter_add_(1, local, torch.ones(b, n, dtype=torch.float64))
    means = sums / counts.clamp(min=1)[:, :, None]
    unit = F.normalize(means, dim=-1)
    valid = counts > 0  # regions present in the window ...
    valid[:, 0] = False  # ... except the smallest id, which plays "unsegmented"
    pair = valid[:, :, None] & valid[:, None, :]
    a = unit @ unit.transpose(1, 2)
    a_max = a.masked_fill(~pair, float("-inf")).amax(dim=(1, 2), keepdim=True)
    dist = a_max - a
    reach = ((dist <= eps) | torch.eye(r, dtype=torch.bool)) & pair
    off_diag = pair & ~torch.eye(r, dtype=torch.bool)
    margin = (dist - eps).abs()[off_diag].min().item() if off_diag.any() else float("inf")
    return means, counts, reach, margin


CASES = [  # b, n, c, num_ids, kind
    (3, 64, 6, 12, "mixed"),
    (2, 150, 32, 40, "mixed"),  # N and R not multiples of the blocks
    (2, 50, 16, 50, "one_token_regions"),
    (3, 40, 8, 5, "single_region"),
    (1, 1, 8, 1, "mixed"),  # a single token: nothing to merge
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[4]}-n{case[1]}-r{case[3]}")
def test_ids_match_reference(case, dtype, device):
    """merge_regions_triton launches with the one configuration it has (MEANS_BLOCKS, GRAPH_BLOCKS) on every device."""
    feats, local, r = make_windows(*case, seed=case[1] + case[3])
    feats = feats.to(dtype)
    _, _, _, margin = float64_graph(feats, local, r, 0.2)
    assert margin > 1e-3, "test data: no pair may sit on the eps boundary"
    exact = merging.merge_regions(feats.double(), local, r, 0.2)
    feats, local = feats.to(device), local.to(device)
    out = merging.merge_regions_triton(feats, local, r, 0.2)
    assert out.device == feats.device
    assert out.tolist() == merging.merge_regions(feats, local, r, 0.2).tolist()
    assert out.tolist() == exact.tolist()
    if case[3] >= 12:
        assert len(out.unique()) < r, "test data should make some regions merge"


@pytest.mark.parametrize("blocks", ["small", "gpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_means_and_graph_poisoned(dtype, blocks, device):
    """Intermediates against float64, several ragged blocks of regions, tokens and channels (small blocks) or the
    GPU configuration at sizes that fill it (130 tokens = 64 + 64 + 2, 80 channels = 32 + 32 + 16, 70 regions);
    buffers pre-filled with values the kernels never write (NaN, 2) so that a missed element fails."""
    n, c, ids = (90, 40, 40) if blocks == "small" else (130, 80, 70)
    feats, local, r = make_windows(2, n, c, ids, "mixed", seed=5)
    feats = feats.to(dtype)
    means64, counts64, reach64, margin = float64_graph(feats, local, r, 0.2)
    assert margin > 1e-3
    means = torch.full((2, r, c), float("nan"), device=device)
    counts = torch.full((2, r), float("nan"), device=device)
    means_blocks = dict(block_r=16, block_n=32, block_c=16) if blocks == "small" else merging.MEANS_BLOCKS
    merging._region_means_into(means, counts, feats.to(device), local.to(device), **means_blocks)
    assert counts.tolist() == counts64.tolist()
    torch.testing.assert_close(means.cpu().double(), means64, rtol=1e-5, atol=1e-6)
    reach = torch.full((2, r, r), 2, dtype=torch.int8, device=device)
    graph_blocks = dict(block_r=16, block_c=16) if blocks == "small" else merging.GRAPH_BLOCKS
    merging._region_graph_into(reach, means, counts, 0.2, **graph_blocks)
    assert reach.tolist() == reach64.to(torch.int8).tolist()
