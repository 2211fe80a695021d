"""Scope rule + reconstructed attention (spec steps 7, 9, 12) against element-wise loops."""

import pytest
import torch
import torch.nn.functional as F

from corrclip.kernels.correlation import masked_correlation_attention


def literal(feats, ids, values, tau):
    n = feats.shape[0]
    s = [[float(feats[i] @ feats[j]) for j in range(n)] for i in range(n)]
    mean = sum(map(sum, s)) / (n * n)
    out = torch.zeros_like(values, dtype=torch.float64)
    for i in range(n):
        allowed = []
        for j in range(n):
            same = ids[i] == ids[j] and ids[i] >= 0
            loose = (ids[i] < 0 or ids[j] < 0) and s[i][j] > mean
            if same or loose:
                allowed.append(j)
        z = torch.tensor([tau * s[i][j] for j in allowed], dtype=torch.float64)
        w = torch.softmax(z, 0)
        for wj, j in zip(w, allowed):
            out[i] += wj * values[j].double()
    return out


CASES = ["mixed", "no_unsegmented", "all_unsegmented", "single_token_regions"]


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)))
def test_matches_loops(seed, case):
    g = torch.Generator().manual_seed(seed)  # fixed per case (hash() of a str changes with every process)
    n, c, d = 30, 8, 5
    feats = F.normalize(torch.randn(2, n, c, generator=g), dim=-1)
    values = torch.randn(2, n, d, generator=g)
    ids = torch.randint(-1, 4, (2, n), generator=g)
    if case == "no_unsegmented":
        ids = ids.clamp(min=0)
    elif case == "all_unsegmented":
        ids[:] = -1
    elif case == "single_token_regions":
        ids = torch.arange(n).repeat(2, 1)
        ids[:, :3] = -1
    out = masked_correlation_attention(feats, ids, values, tau=4.0)
    for b in range(2):
        torch.testing.assert_close(out[b].double(), literal(feats[b], ids[b].tolist(), values[b], 4.0),
                                   atol=1e-5, rtol=1e-5)


def test_unsegmented_rule_uses_global_mean():
    """A token in its own region sees only itself; an unsegmented one sees above-mean tokens."""
    feats = F.normalize(torch.tensor([[[1.0, 0], [0.9, 0.1], [0, 1.0], [-1.0, 0.2]]]), dim=-1)
    values = torch.eye(4)[None]
    out = masked_correlation_attention(feats, torch.tensor([[0, -1, 1, 2]]), values, tau=4.0)
    assert out[0, 0, 0] > 0 and out[0, 0, 2] == 0 and out[0, 0, 3] == 0  # 0 sees itself and loose 1
    assert out[0, 3].tolist() == [0, 0, 0, 1]  # 3 is far from everything: only itself
    assert out[0, 1, 3] == 0 and out[0, 1, 0] > 0
