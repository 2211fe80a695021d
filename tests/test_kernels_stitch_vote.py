"""Fused stitch + classify + vote, Triton path (interpreted on the CPU, compiled on CUDA) against the torch
reference on the same device and float64.

Labels are compared on "sure" pixels only: where the reference's top-2 class probabilities (and the best one and
prob_thd) are more than NEAR apart, and the region's majority cannot flip. Elsewhere float32 rounding in another
order (the kernel's, or compiled FMA contraction) may legitimately pick the other class.
"""

import pytest
import torch

from corrclip.kernels.stitch import stitch
from corrclip.kernels.stitch_vote import GPU_BLOCKS, stitch_classify_vote, stitch_classify_vote_triton
from corrclip.kernels.vote import classify
from corrclip.runtime.preprocess import sliding_windows

NEAR = 1e-5  # class probabilities closer than this may order either way in float32

# name: (input size, crop, stride, output size, query classes, prob_thd, regions kind)
CASES = {
    "single_window": ((56, 56), 56, 56, (45, 70), [0, 1, 2, 3, 4, 5], 0.0, "mixed"),
    "ragged_windows": ((102, 400), 100, 60, (60, 230), [0, 1, 2, 3, 4], 0.0, "mixed"),
    "upsampled_synonyms": ((51, 200), 50, 30, (97, 331), [0, 1, 1, 2, 4, 4, 4, 5], 0.45, "mixed"),
    "one_region": ((56, 120), 56, 32, (40, 90), [0, 1, 2, 3], 0.0, "one"),
    "no_unsegmented": ((56, 120), 56, 32, (70, 150), [0, 0, 1, 2, 3], 0.3, "no_unsegmented"),
    "all_unsegmented": ((56, 120), 56, 32, (70, 150), [0, 1, 2, 2, 3], 0.3, "all_unsegmented"),
}


def make_case(name: str, seed: int = 0, device: torch.device | str = "cpu"):
    """The arguments of stitch_classify_vote, made on the CPU and moved to `device`."""
    (h, w), crop, stride, out, qc, thd, kind = CASES[name]
    g = torch.Generator().manual_seed(seed)
    windows = sliding_windows(h, w, crop, stride)
    ph, pw = windows[0].padded_size
    logits = 0.3 * torch.randn(len(windows), len(qc), ph // 8, pw // 8, generator=g)  # cosines x logit_scale 40
    num_classes = max(qc) + 2  # the last class has no query: probability 0, never chosen
    # blocky regions (a coarse grid of random ids), so that their majorities differ
    coarse = torch.randint(0, 9, (4, 6), generator=g)
    regions, num_regions = coarse[torch.arange(out[0]) * 4 // out[0]][:, torch.arange(out[1]) * 6 // out[1]], 9
    if kind == "one":
        regions, num_regions = torch.ones(out, dtype=torch.long), 2
    elif kind == "no_unsegmented":
        regions = regions.clamp(min=1)
    elif kind == "all_unsegmented":
        regions, num_regions = torch.zeros(out, dtype=torch.long), 1
    return (logits.to(device), windows, (h, w), out, torch.tensor(qc).to(device), num_classes, 40.0, thd,
            regions.to(device), num_regions)


def sure_pixels(args, dtype=torch.float32) -> torch.Tensor:
    """Pixels whose final label cannot depend on rounding: the reference's top-2 class probabilities (and
    the best one and prob_thd) are more than NEAR apart, and so is the majority vote of their region."""
    logits, windows, in_size, out, qc, nc, scale, thd, regions, nr = args
    labels, probs = classify(stitch(logits.to(dtype), windows, in_size, out), qc, nc, scale, thd)
    top = probs.topk(2, dim=0).values
    unsure = (top[0] - top[1] < NEAR) | ((top[0] - thd).abs() < NEAR)
    hist = torch.bincount((regions * nc + labels).flatten(), minlength=nr * nc).view(nr, nc)
    two = hist.topk(2, dim=1).values
    flips = torch.bincount(regions[unsure], minlength=nr)  # each flip moves the margin by at most 2
    shaky = (two[:, 0] - two[:, 1] <= 2 * flips) & (flips > 0)
    shaky[0] = False  # region 0 keeps per-pixel labels
    return ~unsure & ~shaky[regions]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, device, poisoned):
    args = make_case(name, device=device)
    ref = stitch_classify_vote(*args)
    out = stitch_classify_vote_triton(*args)
    assert out.shape == ref.shape and out.dtype == torch.long and out.device == ref.device
    sure = sure_pixels(args)
    assert sure.float().mean() > 0.99, "too many near-ties for a meaningful comparison"
    assert torch.equal(out[sure], ref[sure])
    assert out.min() >= 0 and out.max() < args[5]


@pytest.mark.parametrize("name", ["ragged_windows", "upsampled_synonyms"])
def test_matches_float64(name, device, poisoned):
    args = make_case(name, seed=1, device=device)
    ref64 = stitch_classify_vote(args[0].double(), *args[1:])
    out = stitch_classify_vote_triton(*args)
    sure = sure_pixels(args, torch.float64)
    assert sure.float().mean() > 0.99
    assert torch.equal(out[sure], ref64[sure])


def test_gpu_blocks(device, poisoned):
    """The GPU configuration (canvas tiles 8 x 32, 8 queries a step, 128 pixels a program) on both devices: ragged
    canvas tiles (56 columns = 32 + 24), query chunk (6 of 8) and pixel blocks (45 x 70 = 24 x 128 + 78). Small:
    the interpreter pays ~10 ms a program."""
    args = make_case("single_window", seed=3, device=device)
    out = stitch_classify_vote_triton(*args, **GPU_BLOCKS)
    ref = stitch_classify_vote(*args)
    sure = sure_pixels(args)
    assert sure.float().mean() > 0.99
    assert torch.equal(out[sure], ref[sure])


def test_thresholded_pixels_and_vote(device):
    """prob_thd sends unsure pixels to class 0; a segmented region carries one label, region 0 keeps its own."""
    args = list(make_case("upsampled_synonyms", seed=2, device=device))
    out = stitch_classify_vote_triton(*args)
    regions = args[8]
    per_pixel = stitch_classify_vote_triton(*args[:8], torch.zeros_like(regions), 1)
    assert (per_pixel == 0).any() and (per_pixel != 0).any()
    for r in range(1, args[9]):
        assert out[regions == r].unique().numel() <= 1  # an id may be absent from the grid
    assert torch.equal(out[regions == 0], per_pixel[regions == 0])
