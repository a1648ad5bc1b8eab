"""Batched, seeded K-means in plain torch (docs/design.md section 1).

ADC clusters a batch of CLS-attention rows every training step, and product quantization
clusters G sub-vector groups at once, so this solves G independent problems ``(G, N, D)``
in one set of tensor ops: greedy k-means++ seeding from an explicit generator, vectorised
Lloyd iterations, and an empty-cluster repair so a cluster mean is never 0/0 (the public
ADC code gets a NaN there).

Stopping rule (as scikit-learn's): a problem stops when its assignment no longer changes,
or when the total squared centroid shift of one iteration is at most
``tol * mean_j Var(x[:, j])`` (the tolerance is relative to the data's spread), or after
``max_iters`` iterations. Problems of a batch stop independently: a converged problem is
frozen while the others go on, so batched results equal separate calls.

Randomness: all uniforms of the seeding are drawn up front in one ``torch.rand((G, M))``
call (CPU draws fill memory in order), so solving G problems batched gives the same result
as G separate calls made one after another with the same generator. They are drawn on the
generator's device and then moved to the data's: a CPU generator (what ADC and PQ pass)
gives CUDA data the same uniforms as CPU data, and a CPU generator cannot sample on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`; a leading ``G`` axis only when the input had one.

    Attributes:
        assign: ``(N,)`` / ``(G, N)`` int64 cluster id of every point; no cluster is empty.
        centroids: ``(K, D)`` / ``(G, K, D)`` mean of each cluster's members.
        inertia: ``()`` / ``(G,)`` sum of squared distances of points to their centroid.
        n_iter: ``()`` / ``(G,)`` int64 Lloyd iterations run (0 when K == N).
    """

    assign: torch.Tensor
    centroids: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor


def check_kmeans_settings(max_iters: int, tol: float, *, owner: str) -> None:
    """Reject bad K-means settings early, naming the run-config keys (``owner``: the method)."""
    if max_iters < 1:
        raise ValueError(f"{owner}: 'kmeans-iters' = {max_iters!r} must be >= 1")
    if tol < 0:
        raise ValueError(f"{owner}: 'kmeans-tol' = {tol!r} must be >= 0")


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    max_iters: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator,
) -> KMeansResult:
    """Cluster ``x`` of shape ``(N, D)``, or ``(G, N, D)`` for G independent problems.

    Args:
        x: points; half precision is computed in float32, float64 stays float64.
        num_clusters: K, with 1 <= K <= N. K == N puts each point in its own cluster.
        max_iters: cap on Lloyd iterations (>= 1).
        tol: relative tolerance on the centroid shift (see module docstring); 0 means
            stop only when the assignment is stable.
        generator: source of all randomness (k-means++ seeding); same state, same result.
            It may live on another device than ``x`` (the CPU, typically).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"kmeans expects x of shape (N, D) or (G, N, D), got {tuple(x.shape)}")
    batched = x.dim() == 3
    xb = x.detach() if batched else x.detach().unsqueeze(0)  # (G, N, D)
    if xb.dtype != torch.float64:
        xb = xb.float()
    g, n, d = xb.shape
    k = int(num_clusters)
    if not 1 <= k <= n:
        raise ValueError(f"num_clusters must lie in [1, N={n}], got {num_clusters}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")

    if k == n:  # every point its own cluster: nothing to optimise, no randomness used
        assign = torch.arange(n, device=xb.device).expand(g, n).clone()
        centroids = xb.clone()
        inertia = xb.new_zeros(g)
        n_iter = torch.zeros(g, dtype=torch.int64, device=xb.device)
    else:
        x_sq = xb.pow(2).sum(-1)  # (G, N)
        centroids = _kmeans_pp(xb, x_sq, k, generator)  # (G, K, D)
        assign, centroids, n_iter = _lloyd(xb, x_sq, centroids, max_iters, tol)
        diff = xb - centroids.gather(1, assign.unsqueeze(-1).expand(g, n, d))  # (G, N, D)
        inertia = diff.pow(2).sum(dim=(1, 2))  # (G,)

    if not batched:
        return KMeansResult(assign[0], centroids[0], inertia[0], n_iter[0])
    return KMeansResult(assign, centroids, inertia, n_iter)


# Seeding needs the distances from K·L candidates to all N points. When N <= K·L it is cheaper
# to compute all (N, N) pairwise distances once; the choice depends on N and K only (not G),
# so a batched call and separate calls take the same path and agree bit for bit.


def _kmeans_pp(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): each step samples ``2 + ln K`` candidates by D²
    weight and keeps the one that lowers the potential most. Returns ``(G, K, D)``."""
    g, n, d = x.shape
    trials = 2 + int(math.log(k))
    # (G, 1 + (K-1)·L) uniforms, one draw: keeps batched == sequential separate calls
    u = torch.rand((g, 1 + (k - 1) * trials), generator=generator, device=generator.device)
    u = u.to(device=x.device, dtype=x.dtype)
    offsets = torch.arange(g, device=x.device).unsqueeze(1) * n  # (G, 1)

    if n <= k * trials:
        pairwise = _sq_dist(x, x_sq, x, x_sq)  # (G, N, N)
        pairwise.diagonal(dim1=1, dim2=2).zero_()  # a chosen point's own distance is 0
        rows = pairwise.view(g * n, n)

        def dist_from(idx: torch.Tensor) -> torch.Tensor:  # (G, L) -> (G, L, N)
            return rows.index_select(0, (idx + offsets).view(-1)).view(g, -1, n)

    else:
        x_rows = x.reshape(g * n, d)

        def dist_from(idx: torch.Tensor) -> torch.Tensor:  # (G, L) -> (G, L, N)
            flat = (idx + offsets).view(-1)
            c = x_rows.index_select(0, flat).view(g, -1, d)  # (G, L, D)
            out = _sq_dist(c, x_sq.view(-1).index_select(0, flat).view(g, -1), x, x_sq)
            # a chosen point's own distance is exactly 0 (no cancellation residue)
            return out.scatter_(2, idx.unsqueeze(-1), 0.0)

    first = (u[:, :1] * n).long().clamp_max(n - 1)  # (G, 1) uniform pick
    chosen = [first]
    closest = dist_from(first).squeeze(1)  # (G, N) squared distance to the closest centre
    for step in range(1, k):
        cdf = closest.cumsum(-1)  # (G, N)
        lo = 1 + (step - 1) * trials
        targets = u[:, lo : lo + trials] * cdf[:, -1:]  # (G, L)
        # right=True skips zero-weight points; if all weights are 0 (only duplicates
        # left) it lands past the end and the clamp picks the last point
        cand = torch.searchsorted(cdf, targets, right=True).clamp_max_(n - 1)  # (G, L)
        pot = torch.minimum(closest.unsqueeze(1), dist_from(cand))  # (G, L, N)
        best = pot.sum(-1).argmin(-1, keepdim=True)  # (G, 1)
        chosen.append(cand.gather(1, best))
        closest = pot.gather(1, best.unsqueeze(-1).expand(g, 1, n)).squeeze(1)  # (G, N)
    idx = torch.cat(chosen, dim=1)  # (G, K)
    return x.reshape(g * n, d).index_select(0, (idx + offsets).view(-1)).view(g, k, d)


def _sq_dist(
    a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor
) -> torch.Tensor:
    """Squared distances ``(G, M, N)`` between a (G, M, D) and b (G, N, D), clamped at 0."""
    dist = torch.baddbmm(a_sq.unsqueeze(-1) + b_sq.unsqueeze(1), a, b.transpose(1, 2), alpha=-2)
    return dist.clamp_min_(0.0)


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor, max_iters: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised Lloyd iterations from ``centroids`` (G, K, D); converged problems freeze.

    Returns (assign (G, N), centroids (G, K, D) = member means of assign, n_iter (G,)).
    """
    g, n, d = x.shape
    k = centroids.shape[1]
    offsets = (torch.arange(g, device=x.device) * k).unsqueeze(1)  # (G, 1)
    x_flat = x.reshape(g * n, d)  # (G·N, D)
    # tol relative to the mean per-feature variance (Tensor.var over dim 1 is ~10x slower)
    tol_abs = tol * (x - x.mean(1, keepdim=True)).pow(2).mean(dim=(1, 2))  # (G,)
    active = torch.ones(g, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(g, dtype=torch.int64, device=x.device)
    assign = torch.full((g, n), -1, dtype=torch.int64, device=x.device)
    for _ in range(max_iters):
        # E step: argmin_k ||c_k||² - 2 x·c_k  (||x||² is constant per point)
        c_sq = centroids.pow(2).sum(-1)  # (G, K)
        scores = torch.baddbmm(c_sq.unsqueeze(1), x, centroids.transpose(1, 2), alpha=-2)
        min_score, new_assign = scores.min(-1)  # (G, N)
        sizes = _cluster_sizes(new_assign, offsets, g, k)  # (G, K)
        if bool((sizes == 0).any()):
            new_assign = _repair_empty(new_assign, min_score + x_sq, sizes)
            sizes = _cluster_sizes(new_assign, offsets, g, k)
        # M step: member means via one index_add over all G·N points
        sums = x.new_zeros(g * k, d).index_add_(0, (new_assign + offsets).reshape(-1), x_flat)
        new_centroids = sums.view(g, k, d) / sizes.unsqueeze(-1).to(x.dtype)  # (G, K, D)

        shift = (new_centroids - centroids).pow(2).sum(dim=(1, 2))  # (G,)
        stable = (new_assign == assign).all(-1)  # (G,)
        keep = active.view(g, 1)
        assign = torch.where(keep, new_assign, assign)
        centroids = torch.where(keep.unsqueeze(-1), new_centroids, centroids)
        n_iter += active.long()
        active = active & ~(stable | (shift <= tol_abs))
        if not bool(active.any()):
            break
    return assign, centroids, n_iter


def _cluster_sizes(assign: torch.Tensor, offsets: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """Members per cluster, ``(G, K)`` int64."""
    return torch.bincount((assign + offsets).reshape(-1), minlength=g * k).view(g, k)


def _repair_empty(assign: torch.Tensor, dist: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Give every empty cluster one point: the farthest from its centroid, distinct per empty.

    Each non-empty cluster keeps one protected member (its lowest index), so a donor never
    becomes empty itself; there are always enough donors because K <= N.
    """
    g, n = assign.shape
    k = sizes.shape[1]
    point_ids = torch.arange(n, device=assign.device).expand(g, n)
    first = torch.full((g, k), n, dtype=torch.int64, device=assign.device)
    first.scatter_reduce_(1, assign, point_ids, reduce="amin")  # (G, K), n if empty
    protected = torch.zeros(g, n + 1, dtype=torch.bool, device=assign.device)
    protected.scatter_(1, first, True)
    score = dist.masked_fill(protected[:, :n], float("-inf"))  # (G, N)

    empty = sizes == 0  # (G, K)
    n_empty = empty.sum(-1)  # (G,)
    e_max = int(n_empty.max())
    donors = score.topk(e_max, dim=-1).indices  # (G, E) farthest first, distinct
    # empty cluster ids first, in increasing order (stable sort of the mask)
    empties = torch.sort((~empty).to(torch.int8), dim=-1, stable=True).indices[:, :e_max]
    valid = torch.arange(e_max, device=assign.device).unsqueeze(0) < n_empty.unsqueeze(1)
    rows = torch.arange(g, device=assign.device).unsqueeze(1).expand(g, e_max)
    assign = assign.clone()
    assign[rows[valid], donors[valid]] = empties[valid]
    return assign
