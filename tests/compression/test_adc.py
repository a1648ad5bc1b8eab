"""ADC against a slow per-cluster reference, plus its shape, gradient and plan contracts."""

from __future__ import annotations

import math

import pytest
import torch

from adc_flwr.compression import Packet, build_compressor
from adc_flwr.compression.adc import ADCCompressor, num_clusters, num_tokens
from adc_flwr.config import RunConfig

C = 10


def _batch(b: int = 32, n: int = 17, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    cls_attn = torch.softmax(2 * torch.randn(b, n, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, C, (b,), generator=g)
    return h, labels, cls_attn


def _reference(h, labels, cls_attn, assign, t, k):
    """Python loop over clusters: the paper's recipe written the obvious way."""
    acts, idxs, counts = [], [], []
    for c in range(t):
        members = (assign == c).nonzero().flatten().tolist()
        assert members, "reference needs non-empty clusters"
        attn = torch.stack([cls_attn[m] for m in members]).mean(0)  # (n,)
        order = sorted(range(1, h.shape[1]), key=lambda j: -attn[j].item())
        kept = [0, *sorted(order[: k - 1])]
        acts.append(torch.stack([h[m, kept] for m in members]).mean(0))  # (k, d)
        idxs.append(kept)
        counts.append([sum(int(labels[m]) == y for m in members) for y in range(C)])
    return torch.stack(acts), torch.tensor(idxs), torch.tensor(counts)


@pytest.mark.parametrize("pooling", ["attention", "cls", "mean"])
def test_matches_python_loop_reference(pooling: str) -> None:
    h, labels, cls_attn = _batch()
    comp = ADCCompressor(C, xi=0.2, pooling=pooling)
    pkt = comp.encode(h, labels, cls_attn, seed=3)
    assign, token_idx = pkt.plan["assign"], pkt.plan["token_idx"]
    t, k = num_clusters(comp.xi_b, 32), num_tokens(comp.xi_t, 17)
    act, idx, counts = _reference(h.detach(), labels, cls_attn, assign, t, k)
    # cls/mean pooling change the clusters, never the ranking: it stays by attention
    assert torch.equal(token_idx, idx)
    torch.testing.assert_close(pkt.tensors["act"].detach(), act, rtol=1e-12, atol=1e-12)
    assert torch.equal(pkt.targets, counts)
    assert pkt.targets.dtype == torch.int64 and pkt.soft_targets


def test_pooling_changes_clusters_not_the_ranking_rule() -> None:
    h, labels, cls_attn = _batch(b=48)
    plans = {
        p: ADCCompressor(C, xi=0.2, pooling=p).encode(h, labels, cls_attn, seed=0).plan
        for p in ("attention", "cls", "mean")
    }
    # the descriptors differ, so do the partitions
    assert not torch.equal(plans["attention"]["assign"], plans["cls"]["assign"])
    assert not torch.equal(plans["cls"]["assign"], plans["mean"]["assign"])


@pytest.mark.parametrize(("b", "n", "xi"), [(128, 197, 0.1), (128, 197, 0.25), (64, 50, 0.1)])
def test_shapes_cls_first_and_element_ratio(b: int, n: int, xi: float) -> None:
    h = torch.randn(b, n, 4)
    cls_attn = torch.softmax(torch.randn(b, n), -1)
    labels = torch.randint(0, C, (b,))
    pkt = ADCCompressor(C, xi=xi).encode(h, labels, cls_attn)
    t, k = max(2, int(math.sqrt(xi) * b)), max(1, int(math.sqrt(xi) * n))
    assert set(pkt.tensors) == {"act"}
    assert pkt.tensors["act"].shape == (t, k, 4)
    assert pkt.plan["token_idx"].shape == (t, k) and pkt.plan["assign"].shape == (b,)
    idx = pkt.plan["token_idx"]
    assert (idx[:, 0] == 0).all() and (idx[:, 1:] > 0).all()  # CLS kept, first, once
    assert (idx[:, 1:].diff(dim=1) > 0).all()  # distinct tokens
    ratio = (t * k) / (b * n)
    assert 0.85 * xi <= ratio <= xi + 1e-12
    assert torch.bincount(pkt.plan["assign"], minlength=t).min() >= 1


def test_soft_labels_are_mean_one_hot() -> None:
    h, labels, cls_attn = _batch(b=40)
    pkt = ADCCompressor(C, xi=0.1).encode(h, labels, cls_attn)
    counts = pkt.targets  # (T, C)
    assert counts.sum().item() == 40  # every sample counted once
    soft = counts.double() / counts.sum(1, keepdim=True)
    torch.testing.assert_close(soft.sum(1), torch.ones(len(soft), dtype=torch.float64))
    assign = pkt.plan["assign"]
    mean_one_hot = torch.zeros(len(soft), C, dtype=torch.float64).index_add_(
        0, assign, torch.nn.functional.one_hot(labels, C).double()
    ) / torch.bincount(assign).double().unsqueeze(1)
    torch.testing.assert_close(soft, mean_one_hot)


def test_gradient_reaches_only_kept_tokens_of_members() -> None:
    h, labels, cls_attn = _batch(b=24, n=13, d=5)
    pkt = ADCCompressor(C, xi=0.15).encode(h, labels, cls_attn, seed=1)
    act = pkt.tensors["act"]
    upstream = torch.randn_like(act)
    torch.autograd.backward(list(pkt.grad_tensors().values()), [upstream])
    assign, idx = pkt.plan["assign"], pkt.plan["token_idx"]
    sizes = torch.bincount(assign).double()
    expected = torch.zeros_like(h)
    for b in range(h.shape[0]):  # slow, obvious scatter of the upstream gradient
        c = int(assign[b])
        expected[b, idx[c]] = upstream[c] / sizes[c]
    torch.testing.assert_close(h.grad, expected, rtol=1e-12, atol=1e-12)
    kept = torch.zeros(h.shape[:2], dtype=torch.bool)
    kept[torch.arange(24).unsqueeze(1), idx[assign]] = True
    assert (h.grad[~kept] == 0).all() and (h.grad[kept].abs().sum(-1) > 0).all()


def test_same_seed_same_packet_and_plan_replays_bit_for_bit() -> None:
    h, labels, cls_attn = _batch(b=64, n=30, d=16)
    h = h.float()
    cls_attn = cls_attn.float()
    comp = ADCCompressor(C, xi=0.1)
    a = comp.encode(h, labels, cls_attn, seed=5)
    b = comp.encode(h, labels, cls_attn, seed=5)
    assert torch.equal(a.tensors["act"], b.tensors["act"])
    assert torch.equal(a.plan["assign"], b.plan["assign"])
    assert any(
        not torch.equal(a.plan["assign"], comp.encode(h, labels, cls_attn, seed=s).plan["assign"])
        for s in range(6, 10)
    )
    # replay with the plan: no K-means, identical bits, even with different attention
    replay = comp.encode(h, labels, torch.rand_like(cls_attn), plan=a.plan, seed=99)
    assert torch.equal(replay.tensors["act"], a.tensors["act"])
    assert torch.equal(replay.targets, a.targets)
    assert torch.equal(replay.plan["token_idx"], a.plan["token_idx"])


def test_b2_each_sample_its_own_cluster_and_k_equals_n_keeps_all() -> None:
    h, labels, cls_attn = _batch(b=2, n=9, d=3)
    comp = ADCCompressor(C, xi_b=0.5, xi_t=1.0)  # T = max(2, 1) = 2 = B, k = n
    pkt = comp.encode(h, labels, cls_attn)
    assign = pkt.plan["assign"]
    assert sorted(assign.tolist()) == [0, 1]
    assert torch.equal(pkt.plan["token_idx"], torch.arange(9).expand(2, 9))
    torch.testing.assert_close(pkt.tensors["act"][assign], h.detach())  # nothing lost
    assert torch.equal(pkt.targets[assign].argmax(1), labels)


def test_k_one_keeps_only_cls_and_t_never_exceeds_b() -> None:
    h, labels, cls_attn = _batch(b=3, n=11, d=3)
    pkt = ADCCompressor(C, xi_b=1.0, xi_t=0.01).encode(h, labels, cls_attn)
    assert pkt.tensors["act"].shape == (3, 1, 3)
    assert (pkt.plan["token_idx"] == 0).all()
    assert num_clusters(0.9, 2) == 2 and num_clusters(1.0, 1) == 1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"xi": 0.0}, "compression"),
        ({"xi": 1.5}, "compression"),
        ({"xi": -0.1}, "compression"),
        ({"xi_b": 1.2, "xi_t": 0.5}, "batch-compression"),
        ({"xi_b": 0.5, "xi_t": 0.0}, "token-compression"),
        ({"xi_b": 0.5}, "token-compression"),
        ({"pooling": "max"}, "pooling"),
    ],
)
def test_invalid_parameters_rejected_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ADCCompressor(C, **kwargs)


def test_xi_one_is_allowed() -> None:
    comp = ADCCompressor(C, xi=1.0)
    assert comp.xi_b == comp.xi_t == 1.0


def test_from_config_and_registry() -> None:
    cfg = RunConfig(compression=0.09, pooling="mean", kmeans_iters=7, kmeans_tol=1e-3)
    comp = build_compressor(cfg, num_classes=C)
    assert isinstance(comp, ADCCompressor)
    assert comp.xi_b == pytest.approx(0.3) and comp.xi_t == pytest.approx(0.3)
    assert (comp.pooling, comp.kmeans_iters, comp.kmeans_tol) == ("mean", 7, 1e-3)
    comp = build_compressor(cfg.replace(batch_compression=0.5, token_compression=0.2), C)
    assert (comp.xi_b, comp.xi_t) == (0.5, 0.2)


def test_decode_returns_act_and_labels_validated() -> None:
    h, labels, cls_attn = _batch(b=8)
    comp = ADCCompressor(C, xi=0.25)
    pkt = comp.encode(h, labels, cls_attn)
    assert isinstance(pkt, Packet)
    assert comp.decode(pkt.tensors) is pkt.tensors["act"]
    with pytest.raises(ValueError, match="labels"):
        comp.encode(h, labels + C, cls_attn)
    with pytest.raises(ValueError, match="cls_attn"):
        comp.encode(h, labels, cls_attn[:, :-1])
