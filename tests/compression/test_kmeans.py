"""Batched K-means: quality vs scikit-learn, determinism, no empty clusters, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from adc_flwr.compression.kmeans import kmeans


def _sk_inertia(x: torch.Tensor, k: int, n_init: int, seed: int) -> float:
    # one OpenMP thread: sklearn's thread pool spins badly on a busy 2-core box
    with threadpool_limits(1):
        return float(KMeans(k, n_init=n_init, random_state=seed).fit(x.double().numpy()).inertia_)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n_per: int, centers: torch.Tensor, spread: float, seed: int):
    g = _gen(seed)
    k, d = centers.shape
    labels = torch.arange(k).repeat_interleave(n_per)  # (N,)
    x = centers[labels] + spread * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], labels[perm]


def _sizes(assign: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(assign, minlength=k)


@pytest.mark.parametrize(
    ("n", "d", "k"),
    [(300, 8, 10), (128, 197, 40)],  # generic data; ADC's shape (softmax rows, B=128)
)
def test_inertia_close_to_sklearn_on_random_data(n: int, d: int, k: int) -> None:
    ours, ref = [], []
    for seed in range(4):
        x = torch.randn(n, d, generator=_gen(100 + seed))
        if d == 197:
            x = torch.softmax(2 * x, dim=-1)
        res = kmeans(x, k, generator=_gen(seed))
        assert res.inertia.dtype == torch.float32 and res.assign.dtype == torch.int64
        # reported inertia is the true objective of the returned partition
        manual = (x - res.centroids[res.assign]).pow(2).sum()
        torch.testing.assert_close(res.inertia, manual, rtol=1e-4, atol=1e-6)
        ours.append(res.inertia.item())
        ref.append(_sk_inertia(x, k, n_init=8, seed=seed))
    ratio = np.array(ours) / np.array(ref)
    # one k-means++ run against sklearn's best of 8
    assert ratio.max() < 1.10, ratio
    assert np.median(ratio) < 1.05, ratio


def test_finds_true_partition_on_clustered_data() -> None:
    centers = 10 * torch.randn(6, 5, generator=_gen(1))
    x, truth = _blobs(40, centers, spread=0.3, seed=2)
    res = kmeans(x, 6, generator=_gen(3))
    assert adjusted_rand_score(truth.numpy(), res.assign.numpy()) == pytest.approx(1.0)
    assert res.inertia.item() == pytest.approx(_sk_inertia(x, 6, n_init=5, seed=0), rel=1e-3)
    assert int(res.n_iter) < 10  # well separated: converges in a few steps


def test_same_seed_same_result_and_seed_matters() -> None:
    x = torch.randn(200, 6, generator=_gen(0))
    a = kmeans(x, 12, generator=_gen(7))
    b = kmeans(x, 12, generator=_gen(7))
    assert torch.equal(a.assign, b.assign) and torch.equal(a.centroids, b.centroids)
    others = [kmeans(x, 12, generator=_gen(s)).assign for s in range(8, 12)]
    assert any(not torch.equal(a.assign, o) for o in others)


def test_no_empty_clusters_with_duplicate_points() -> None:
    # 3 distinct locations, 10 clusters: seeding must repeat locations, ties go to one
    # centre and the repair has to refill every empty cluster
    base = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-3.0, 4.0]])
    x = base[torch.arange(30) % 3]  # (30, 2)
    for seed in range(5):
        res = kmeans(x, 10, generator=_gen(seed))
        assert _sizes(res.assign, 10).min() >= 1
        assert torch.isfinite(res.centroids).all()
        assert res.inertia.item() == pytest.approx(0.0, abs=1e-6)


def test_no_empty_clusters_when_all_points_identical() -> None:
    x = torch.ones(16, 4)
    res = kmeans(x, 15, generator=_gen(0))
    assert _sizes(res.assign, 15).min() >= 1
    assert torch.equal(res.centroids, torch.ones(15, 4))


def test_no_empty_clusters_with_outlier_heavy_data() -> None:
    # many clusters on a tight mass plus a few far points: farthest-point repair path
    x = torch.cat([0.01 * torch.randn(60, 3, generator=_gen(0)), 100 + torch.randn(4, 3)])
    for seed in range(5):
        res = kmeans(x, 30, generator=_gen(seed), max_iters=3)
        assert _sizes(res.assign, 30).min() >= 1


def test_k_equals_n_and_k_too_large() -> None:
    x = torch.randn(7, 3)
    res = kmeans(x, 7, generator=_gen(0))
    assert torch.equal(res.assign, torch.arange(7))
    assert torch.equal(res.centroids, x)
    assert res.inertia.item() == 0.0
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 8, generator=_gen(0))
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 0, generator=_gen(0))


def test_single_cluster_is_the_mean() -> None:
    x = torch.randn(50, 4, generator=_gen(0))
    res = kmeans(x, 1, generator=_gen(0))
    assert (res.assign == 0).all()
    torch.testing.assert_close(res.centroids[0], x.mean(0))


@pytest.mark.parametrize("n", [64, 20])  # seeding distances on the fly / pairwise (N <= K·L)
def test_batched_equals_separate_calls(n: int) -> None:
    g, d, k = 5, 4, 8
    x = torch.randn(g, n, d, generator=_gen(0))
    x[2] = x[2, :1].expand(n, d)  # one degenerate problem (all duplicates) in the batch
    batched = kmeans(x, k, generator=_gen(9), max_iters=30)
    gen = _gen(9)  # separate calls, one after another, on one generator
    singles = [kmeans(x[i], k, generator=gen, max_iters=30) for i in range(g)]
    for i, s in enumerate(singles):
        assert torch.equal(batched.assign[i], s.assign)
        torch.testing.assert_close(batched.centroids[i], s.centroids, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched.inertia[i], s.inertia, rtol=1e-5, atol=1e-6)
        assert batched.n_iter[i] == s.n_iter
    # problems converge at different iterations: freezing must be per problem
    assert len({int(v) for v in batched.n_iter}) > 1
    assert batched.assign.shape == (g, n) and batched.centroids.shape == (g, k, d)


def test_iteration_cap_and_tol() -> None:
    x = torch.randn(400, 2, generator=_gen(0))
    capped = kmeans(x, 20, generator=_gen(1), max_iters=2)
    assert int(capped.n_iter) == 2
    loose = kmeans(x, 20, generator=_gen(1), tol=1e-1)
    strict = kmeans(x, 20, generator=_gen(1), tol=0.0, max_iters=300)
    assert int(loose.n_iter) < int(strict.n_iter)
    assert strict.inertia <= loose.inertia + 1e-4


def test_float64_stays_float64() -> None:
    x = torch.randn(30, 3, dtype=torch.float64)
    res = kmeans(x, 4, generator=_gen(0))
    assert res.centroids.dtype == torch.float64
