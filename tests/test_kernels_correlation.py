"""Fused masked correlation attention (Triton, interpreted on the CPU) against the torch reference and float64."""

import pytest
import torch
import torch.nn.functional as F
from triton_support import interpreted

from corrclip.kernels import choose, correlation, set_backend

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def clustered(b: int, n: int, c: int, g: torch.Generator, k: int = 4) -> torch.Tensor:
    """Unit features living in k mutually orthogonal channel groups: cosines are exactly 0 across groups and
    in [0.36, 1] within one, so no pair sits near mean(S) (~0.2) and rounding cannot flip the scope rule."""
    width = c // k
    group = torch.randint(0, k, (b, n), generator=g)
    theta = 0.6 * torch.rand(b, n, 1, generator=g)
    u = F.normalize(torch.randn(b, n, width - 1, generator=g), dim=-1)
    local = torch.cat([theta.cos(), theta.sin() * u], dim=-1)
    feats = torch.zeros(b, n, c)
    return feats.scatter_(2, group[..., None] * width + torch.arange(width), local)


def generic(b: int, n: int, c: int, g: torch.Generator) -> torch.Tensor:
    """Gaussian directions around a shared one (mean(S) ~ 0.25-0.3): cosines spread continuously through the mean,
    so the threshold itself is tested. fp32 only: at the seed used the nearest pair is > 2e-5 off the mean, far above
    fp32 rounding (~1e-7), where fp16/bf16 rounding could flip it."""
    shared = torch.randn(c, generator=g)
    return F.normalize(torch.randn(b, n, c, generator=g) + 0.6 * F.normalize(shared, dim=0) * c**0.5, dim=-1)


def region_ids(kind: str, b: int, n: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.randint(-1, 6, (b, n), generator=g)
    if kind == "no_unsegmented":
        ids = ids.clamp(min=0)
    elif kind == "all_unsegmented":
        ids[:] = -1
    elif kind == "one_token_regions":
        ids = torch.arange(n).repeat(b, 1)
        ids[:, ::7] = -1
    elif kind == "single_region":
        ids[0] = 0  # window 0 is one region; window 1 stays mixed
    return ids


def check_margin(feats: torch.Tensor, ids: torch.Tensor, margin: float) -> None:
    """The test data itself: pairs with an unsegmented end must sit off mean(S) by more than rounding can move them."""
    f = feats.double()
    s = f @ f.transpose(1, 2)
    loose = (ids[:, :, None] < 0) | (ids[:, None, :] < 0)
    gap = (s - s.mean(dim=(1, 2), keepdim=True)).abs()[loose]
    assert gap.numel() == 0 or gap.min() > margin


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def run_case(b, n, c, d, kind, dtype, seed, features=clustered, **blocks):
    g = torch.Generator().manual_seed(seed)
    feats = features(b, n, c, g).to(dtype)
    ids = region_ids(kind, b, n, g)
    values = torch.randn(b, n, d, generator=g).to(dtype)
    check_margin(feats, ids, 0.05 if features is clustered else 1e-5)
    out = torch.full((b, n, d), float("nan"), dtype=dtype)  # poisoned: an unwritten element fails
    correlation._correlation_into(out, feats, ids, values, 4.0, **blocks)
    assert not out.isnan().any()
    exact = correlation.masked_correlation_attention(feats.double(), ids, values.double(), 4.0)
    ref = correlation.masked_correlation_attention(feats, ids, values, 4.0)
    assert rel_err(out, exact) < TOL[dtype]
    assert rel_err(out, ref) < TOL[dtype]


CASES = [  # b, n, c, d, ids
    (2, 100, 32, 40, "mixed"),  # N not a multiple of the 64 block, B > 1
    (2, 70, 16, 5, "no_unsegmented"),
    (2, 130, 32, 24, "all_unsegmented"),
    (1, 50, 16, 8, "one_token_regions"),
    (2, 64, 16, 16, "single_region"),  # N exactly one block
    (1, 300, 32, 64, "mixed"),  # five key blocks, the last ragged
    (1, 1, 16, 5, "no_unsegmented"),  # a single token
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[4]}-n{case[1]}")
def test_fp32(case):
    run_case(*case, torch.float32, seed=case[1])


@interpreted
@pytest.mark.parametrize("case", [(2, 150, 16, 24, "mixed"), (1, 100, 16, 8, "all_unsegmented")],
                         ids=["mixed", "all_unsegmented"])
def test_fp32_threshold(case):
    run_case(*case, torch.float32, seed=4, features=generic)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=lambda case: f"{case[4]}-n{case[1]}")
def test_half(case, dtype):
    run_case(*case, dtype, seed=case[1] + 1)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_blocks(dtype):
    """Several C chunks and D blocks, both ragged (40 = 16 + 16 + 8), and query/key blocks of unequal size."""
    run_case(2, 90, 40, 40, "mixed", dtype, seed=7, block_m=16, block_n=32, block_c=16, block_d=16)


@interpreted
def test_public_function_and_dispatch():
    g = torch.Generator().manual_seed(3)
    feats = clustered(2, 40, 16, g)
    ids = region_ids("mixed", 2, 40, g)
    # The head hands over a transposed view of the upsampled values: strides must be honoured.
    values = torch.randn(2, 24, 40, generator=g).transpose(1, 2)
    out = correlation.masked_correlation_attention_triton(feats, ids, values)
    assert out.shape == values.shape and out.dtype == values.dtype
    assert rel_err(out, correlation.masked_correlation_attention(feats, ids, values)) < 1e-5
    set_backend("triton")
    try:
        assert choose("masked_correlation_attention").__name__ == "masked_correlation_attention_triton"
    finally:
        set_backend("auto")
