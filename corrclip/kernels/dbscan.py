"""DBSCAN with scikit-learn's exact labels, as tensor ops on the points' device.

scikit-learn semantics (euclidean, the defaults CLIPtrase uses):
  * j is a neighbour of i when ||x_i - x_j|| <= eps (inclusive), i itself included;
  * i is a core point when it has >= min_samples neighbours;
  * clusters are grown in index order from the first unlabeled core point, so cluster c is the
    c-th connected component of the core graph ordered by its lowest core index;
  * a border point (not core, within eps of a core point) joins the first cluster that reaches it,
    i.e. the lowest-numbered cluster among those of its core neighbours; the rest is noise (-1).

How the growth is done: the core graph's connected components come from its transitive closure by
repeated boolean squaring, a fixed ceil(log2 N) matmuls. No per-point loop, no host round trip at
all (not even a convergence check), and the graph stays static (exportable). It costs
O(N^3 log N) flops, which is nothing for CLIPtrase's N <= ~600 patches; label propagation would be
O(N^2) per step but needs up to N steps or a synchronizing convergence test each step.
"""

from __future__ import annotations

import torch


def dbscan_batched(points: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """points [B,N,D] -> labels [B,N] long (0..K-1 per batch item, noise -1)."""
    b, n, _ = points.shape
    # scikit-learn compares float64 squared distances of the float32 input against eps^2.
    x = points.double()
    sq = x.square().sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp_min(0)
    eye = torch.eye(n, dtype=torch.bool, device=points.device)
    near = (d2 <= eps * eps) | eye  # self is always its own neighbour, whatever the rounding
    core = near.sum(-1) >= min_samples

    # Reachability among core points: after t squarings, every path of length <= 2^t is closed.
    reach = ((near & core[:, :, None] & core[:, None, :]) | eye).float()
    for _ in range((n - 1).bit_length()):
        reach = (reach @ reach).clamp_max(1)
    # For a core point: the lowest index of its component (argmax returns the first maximum).
    # A non-core point only reaches itself.
    first = reach.argmax(-1)
    idx = torch.arange(n, device=points.device)
    is_seed = core & (first == idx)
    cluster_of_seed = is_seed.long().cumsum(-1) - 1  # components numbered by their lowest core index
    core_label = cluster_of_seed.gather(-1, first)
    # Every point takes the lowest cluster among its core neighbours; a core point is its own core
    # neighbour and all its core neighbours share its cluster, so this covers core and border alike.
    candidates = torch.where(near & core[:, None, :], core_label[:, None, :], n)
    label = candidates.amin(-1)
    return torch.where(label < n, label, -1)


def dbscan(points: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """points [N,D] -> labels [N] long, identical to sklearn.cluster.DBSCAN(eps, min_samples)."""
    return dbscan_batched(points[None], eps, min_samples)[0]
