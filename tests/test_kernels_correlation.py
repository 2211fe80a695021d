"""Masked correlation attention, Triton path (interpreted on the CPU, compiled on CUDA) against the torch reference
on the same device and float64."""

import pytest
import torch
import torch.nn.functional as F

from corrclip.kernels import correlation

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


def run_case(b, n, c, d, kind, dtype, seed, device, features=clustered, strided=True, **blocks):
    g = torch.Generator().manual_seed(seed)
    feats = features(b, n, c, g).to(dtype)
    ids = region_ids(kind, b, n, g)
    values = torch.randn(b, n, d, generator=g).to(dtype)
    check_margin(feats, ids, 0.05 if features is clustered else 1e-5)
    exact = correlation.masked_correlation_attention(feats.double(), ids, values.double(), 4.0)
    feats, ids, values = feats.to(device), ids.to(device), values.to(device)
    if strided:  # what the head hands over: channels strided by N
        values = values.transpose(1, 2).contiguous().transpose(1, 2)
    out = correlation.masked_correlation_attention_triton(feats, ids, values, 4.0, **blocks)
    assert out.shape == values.shape and out.dtype == dtype and out.device == feats.device
    assert not out.isnan().any()
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


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[4]}-n{case[1]}")
def test_fp32(case, device, poisoned):
    run_case(*case, torch.float32, seed=case[1], device=device)


@pytest.mark.parametrize("case", [(2, 150, 16, 24, "mixed"), (1, 100, 16, 8, "all_unsegmented")],
                         ids=["mixed", "all_unsegmented"])
def test_fp32_threshold(case, device):
    run_case(*case, torch.float32, seed=4, device=device, features=generic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=lambda case: f"{case[4]}-n{case[1]}")
def test_half(case, dtype, device, poisoned):
    run_case(*case, dtype, seed=case[1] + 1, device=device, strided=case is not CASES[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_blocks(dtype, device, poisoned):
    """The GPU configuration on both devices, at sizes that fill its blocks: two query blocks, three key blocks and
    two channel blocks, each ragged (150 = 64 + 64 + 22, 300 = 256 + 44 or 3 x 128 - 84)."""
    run_case(1, 150, 32, 300, "mixed", dtype, seed=11, device=device, **correlation.gpu_blocks(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_blocks(dtype, device, poisoned):
    """Query and key blocks of unequal size, several ragged D blocks (40 = 16 + 16 + 8)."""
    run_case(2, 90, 40, 40, "mixed", dtype, seed=7, device=device, block_m=16, block_n=32, block_d=16)
