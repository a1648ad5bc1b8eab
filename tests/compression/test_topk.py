"""Top-K and Random Top-K: the K mapping against codec bytes, selection, gradients, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adc_flwr.compression import build_compressor
from adc_flwr.compression.random_topk import RandomTopKCompressor
from adc_flwr.compression.topk import TopKCompressor, index_nbytes, num_kept
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.wire.codec import act_and_target_nbytes, packet_to_record, record_to_packet
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from tests.support.helpers import front_copy, tiny_config, train_in_process

C = 10
METHODS = (TopKCompressor, RandomTopKCompressor)


def _batch(b: int = 16, n: int = 50, d: int = 64, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, C, (b,), generator=g)
    cls_attn = torch.softmax(torch.randn(b, n, generator=g), dim=-1)
    return h, labels, cls_attn


def _top_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n·d) bool: the true top-K magnitudes per sample, by a full sort."""
    flat = h.detach().reshape(h.shape[0], -1)
    order = flat.abs().argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


# ---- the K mapping -------------------------------------------------------------------


def test_index_width_and_k_mapping() -> None:
    assert [index_nbytes(m) for m in (1, 256, 257, 65536, 65537, 2**32 + 1)] == [1, 1, 2, 2, 4, 8]
    # n·d = 3200 -> uint16 indices: K = floor(c · 4·3200 / 6)
    assert [num_kept(c, 50, 64) for c in (0.05, 0.1, 0.2, 0.5, 1.0)] == [106, 213, 426, 1066, 2133]
    assert num_kept(0.3, 10, 15) == 36  # 0.3·4·150 = 180 bytes / 5 per element (uint8)
    assert (
        num_kept(0.7, 33, 10) == 154
    )  # 0.7·4·330 / 6 is 153.999... in floats: no floor-off-by-one
    assert num_kept(1e-6, 50, 64) == 1  # at least one element
    assert num_kept(1.0, 1, 1) == 1  # never more than n·d


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("compression", [0.05, 0.1, 0.2, 0.5])
def test_codec_bytes_match_requested_compression(cls, compression: float) -> None:
    """At B=16, n=50, d=64 the three arrays' headers+keys (~400 B) stay under 5% of the
    payload for compression >= 0.05; at 0.01 they would be ~18% (payload ~2 kB)."""
    b, n, d = 16, 50, 64
    h, labels, cls_attn = _batch(b, n, d)
    pkt = cls(C, compression=compression).encode(h, labels, cls_attn, seed=1)
    act, _ = act_and_target_nbytes(packet_to_record(pkt, "float32"))
    achieved = act / uncompressed_act_nbytes(b, n, d)
    assert achieved == pytest.approx(compression, rel=0.05)
    # float16 values halve the value bytes, the indices stay as they are
    act16, _ = act_and_target_nbytes(packet_to_record(pkt, "float16"))
    assert act16 < act


def test_paper_scale_shapes_are_within_one_percent() -> None:
    """DeiT-Tiny after block 3: n=197, d=192 (uint16 indices), B=32."""
    b, n, d = 32, 197, 192
    h = torch.randn(b, n, d)
    labels = torch.zeros(b, dtype=torch.long)
    for compression in (0.01, 0.1, 0.5):
        pkt = TopKCompressor(C, compression=compression).encode(h, labels, h[:, :, 0])
        act, _ = act_and_target_nbytes(packet_to_record(pkt, "float32"))
        assert act / uncompressed_act_nbytes(b, n, d) == pytest.approx(compression, rel=0.01)


# ---- top-k selection and decode ------------------------------------------------------


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    h, labels, cls_attn = _batch(b=8, n=17, d=64, dtype=torch.float64)  # no ties in float64
    comp = TopKCompressor(C, compression=0.1)
    pkt = comp.encode(h, labels, cls_attn)
    k = num_kept(0.1, 17, 64)
    idx, values = pkt.tensors["idx"], pkt.tensors["values"]
    assert idx.shape == values.shape == (8, k) and idx.dtype == torch.int64
    assert (idx.diff(dim=1) > 0).all()  # distinct, ascending
    assert torch.equal(pkt.tensors["shape"], torch.tensor([17, 64]))
    kept = torch.zeros(8, 17 * 64, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(kept, _top_mask(h, k))
    assert torch.equal(values.detach(), h.detach().reshape(8, -1).gather(1, idx))
    assert torch.equal(pkt.targets, labels) and not pkt.soft_targets


@pytest.mark.parametrize("cls", METHODS)
def test_decode_through_the_codec_puts_values_back_and_zeros_elsewhere(cls) -> None:
    h, labels, cls_attn = _batch(b=6, n=17, d=64)
    comp = cls(C, compression=0.2)
    pkt = comp.encode(h, labels, cls_attn, seed=4)
    received = record_to_packet(packet_to_record(pkt, "float32"))
    act, leaves = comp.server_decode(received.tensors)
    assert act.shape == h.shape and set(leaves) == {"values"}
    kept = torch.zeros(6, 17 * 64, dtype=torch.bool).scatter_(1, pkt.tensors["idx"], True)
    kept = kept.view_as(h)
    assert torch.equal(act.detach()[kept], h.detach()[kept])  # float32 round trip is exact
    assert (act.detach()[~kept] == 0).all()
    assert torch.equal(received.targets, labels)


# ---- random top-k --------------------------------------------------------------------


def test_random_topk_draws_k_distinct_mostly_from_the_top() -> None:
    b, n, d, p = 64, 50, 64, 0.1
    h, labels, cls_attn = _batch(b, n, d)
    k = num_kept(0.1, n, d)
    top = _top_mask(h, k)
    weights = torch.where(top, (1 - p) / k, p / (n * d - k))  # the paper's distribution
    comp = RandomTopKCompressor(C, compression=0.1, p=p)
    ours, reference = [], []
    for seed in range(4):
        idx = comp.encode(h, labels, cls_attn, seed=seed).tensors["idx"]
        assert idx.shape == (b, k) and (idx.diff(dim=1) > 0).all()  # K distinct per sample
        ours.append(top.gather(1, idx).float().mean())
        gen = torch.Generator().manual_seed(1000 + seed)
        reference.append(top.gather(1, torch.multinomial(weights, k, generator=gen)).float().mean())
    ours_mean, ref_mean = float(torch.stack(ours).mean()), float(torch.stack(reference).mean())
    # without replacement the top set depletes, so the share is a bit under 1-p (~0.81 here)
    assert 1 - 2 * p < ours_mean < 1 - p
    assert ours_mean == pytest.approx(ref_mean, abs=0.01)  # same law as torch.multinomial
    assert ours_mean < 0.95  # it really is random: not plain top-k


def test_random_topk_seeded_and_plan_replays_bit_for_bit() -> None:
    h, labels, cls_attn = _batch(b=16, n=17, d=64)
    comp = RandomTopKCompressor(C, compression=0.1, p=0.3)
    a = comp.encode(h, labels, cls_attn, seed=5)
    b = comp.encode(h, labels, cls_attn, seed=5)
    assert torch.equal(a.tensors["idx"], b.tensors["idx"])
    assert torch.equal(a.tensors["values"], b.tensors["values"])
    assert not torch.equal(
        a.tensors["idx"], comp.encode(h, labels, cls_attn, seed=6).tensors["idx"]
    )
    # replay: another seed and a perturbed h change nothing about the positions
    replay = comp.encode(h + 1e-3, labels, cls_attn, plan=a.plan, seed=99)
    assert torch.equal(replay.tensors["idx"], a.tensors["idx"])
    exact = comp.encode(h, labels, cls_attn, plan=a.plan, seed=99)
    for name in ("values", "idx", "shape"):
        assert torch.equal(exact.tensors[name], a.tensors[name]), name


def test_random_topk_p_zero_is_topk_and_p_one_avoids_the_top() -> None:
    h, labels, cls_attn = _batch(b=4, n=17, d=64, dtype=torch.float64)
    plain = TopKCompressor(C, compression=0.1).encode(h, labels, cls_attn).tensors["idx"]
    zero = RandomTopKCompressor(C, compression=0.1, p=0.0).encode(h, labels, cls_attn, seed=3)
    assert torch.equal(zero.tensors["idx"], plain)
    one = RandomTopKCompressor(C, compression=0.1, p=1.0).encode(h, labels, cls_attn, seed=3)
    assert not _top_mask(h, plain.shape[1]).gather(1, one.tensors["idx"]).any()


# ---- gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", METHODS)
def test_gradient_comes_back_at_kept_positions_only(cls) -> None:
    """Server: loss on the decoded activation; client: backward of the (B, K) grads."""
    h, labels, cls_attn = _batch(b=8, n=17, d=64)
    comp = cls(C, compression=0.1)
    pkt = comp.encode(h, labels, cls_attn, seed=2)
    received = record_to_packet(packet_to_record(pkt, "float32"))
    act, leaves = comp.server_decode(received.tensors)
    weight = torch.randn(17, 64)
    (act * weight).sum().backward()  # d loss / d act = weight, for every sample
    grads = comp.compress_grads({k: t.grad for k, t in leaves.items()})
    assert grads["values"].shape == pkt.tensors["values"].shape  # (B, K), not (B, n, d)

    sent = pkt.grad_tensors()
    assert set(sent) == {"values"}
    received_grads = comp.decompress_grads(grads, pkt)
    torch.autograd.backward([sent["values"]], [received_grads["values"]])
    kept = torch.zeros(8, 17 * 64, dtype=torch.bool).scatter_(1, pkt.tensors["idx"], True)
    kept = kept.view_as(h)
    expected = torch.where(kept, weight.expand_as(h), torch.zeros(()))
    assert torch.equal(h.grad, expected)  # weight at the kept elements, exact zeros elsewhere


# ---- config and validation -----------------------------------------------------------


def test_from_config_and_registry() -> None:
    cfg = RunConfig(method="topk", compression=0.2)
    comp = build_compressor(cfg, C)
    assert type(comp) is TopKCompressor and comp.compression == 0.2
    comp = build_compressor(cfg.replace(method="random-topk", random_topk_p=0.3), C)
    assert isinstance(comp, RandomTopKCompressor) and (comp.compression, comp.p) == (0.2, 0.3)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (TopKCompressor, {"compression": 0.0}, "compression"),
        (TopKCompressor, {"compression": 1.5}, "compression"),
        (RandomTopKCompressor, {"compression": -1.0}, "compression"),
        (RandomTopKCompressor, {"p": 1.2}, "random-topk-p"),
        (RandomTopKCompressor, {"p": -0.1}, "random-topk-p"),
    ],
)
def test_invalid_parameters_rejected_naming_the_key(cls, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        cls(C, **kwargs)


def test_bad_inputs_rejected() -> None:
    h, labels, cls_attn = _batch(b=4, n=17, d=64)
    comp = TopKCompressor(C)
    with pytest.raises(ValueError, match="labels"):
        comp.encode(h, labels[:-1], cls_attn)
    with pytest.raises(ValueError, match="plan"):
        comp.encode(h, labels, cls_attn, plan={"idx": torch.zeros(3, 5, dtype=torch.int64)})
    with pytest.raises(ValueError, match="lacks"):
        comp.decode({"values": torch.zeros(4, 5)})


# ---- through the in-process Flower grid ----------------------------------------------


@pytest.mark.parametrize("method", ["topk", "random-topk"])
def test_grid_step_changes_client_front(tmp_path: Path, method: str) -> None:
    cfg = tiny_config(tmp_path, method=method, compression=0.1, local_steps=1)
    before: dict[str, torch.Tensor] = {}
    strategy, _ = train_in_process(cfg, 1, before_start=lambda s: before.update(front_copy(s)))
    after = strategy.client_modules["front"].state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # one step through the sparse gradient reached the front's weights, down to the patch embedding
    assert any("patch_embeddings" in k for k in changed)
    assert len(changed) > len(before) // 2


@pytest.mark.parametrize("method", ["topk", "random-topk"])
def test_grid_training_lowers_the_loss_and_counts_bytes(tmp_path: Path, method: str) -> None:
    """A ViT from scratch on all ten digits stays near ln(10) for ~100 steps; one client with
    two classes (pathological) shows learning within a few steps."""
    cfg = tiny_config(
        tmp_path,
        method=method,
        compression=0.2,
        local_steps=8,
        partitioner="pathological",
        classes_per_client=2,
    )
    grid = InProcessGrid(client_module.app, 1, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    losses = RunDir(cfg.run_dir).read_metrics().query("kind == 'step'")["train_loss"].to_numpy()
    assert len(losses) == 8
    assert losses[-3:].mean() < losses[:3].mean() - 0.2
    # digits: n=17, d=64, B=16 -> headers and keys add ~3% at 0.2; the downlink is values only
    assert summary["compression_ratio"] == pytest.approx(0.2, rel=0.05)
    assert summary["bytes_down_grad"] < summary["bytes_up_act"]
