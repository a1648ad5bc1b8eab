"""FedLite product quantisation: bytes vs request, round trips, gradients, plan replay, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adc_flwr.compression import build_compressor
from adc_flwr.compression.pq import ProductQuantizer, choose_levels, pq_nbytes
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.training.modules import modules_state
from adc_flwr.training.workers import ServerWorker
from adc_flwr.wire.codec import (
    ArrayRecord,
    act_and_target_nbytes,
    grads_to_record,
    packet_to_record,
    record_to_grads,
    record_to_packet,
)
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from clients import client_app as client_module
from clients.node_cache import client_setup
from simulations.inprocess_grid import InProcessGrid, set_task_identity
from strategies.lifecycle import build_strategy, run_training
from tests.support.helpers import tiny_config

C = 10


def _batch(b: int = 16, n: int = 9, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=g, requires_grad=True)
    labels = torch.randint(0, C, (b,), generator=g)
    return h, labels, torch.softmax(torch.randn(b, n, generator=g), -1)


def _wire_ratio(packet, wire_dtype: str = "float32") -> float:
    act, _ = act_and_target_nbytes(packet_to_record(packet, wire_dtype))
    return act / uncompressed_act_nbytes(
        *packet.plan["codes"].shape[:2], packet.anchors["act"].shape[-1]
    )


# ---- bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "wire"),
    [(c, "float32") for c in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)]
    + [(c, "float16") for c in (0.005, 0.01, 0.05, 0.1, 0.3)],
)
def test_levels_meet_requests_within_five_percent_at_typical_shape(c: float, wire: str) -> None:
    """B=64, n=50, d=64: requests are met within 5% (pq_nbytes is the codec's count, see
    the next tests); float16 halves the codebook term, which leaves gaps (see below)."""
    q, n_c, ratio = choose_levels(64, 50, 64, c, wire)
    assert ratio == pq_nbytes(64, 50, 64, q, n_c, wire) / uncompressed_act_nbytes(64, 50, 64)
    assert 64 % q == 0 and 2 <= n_c <= 256
    assert abs(ratio / c - 1) <= 0.05


def test_codec_bytes_of_a_real_packet_at_typical_shape() -> None:
    h, labels, attn = _batch(b=64, n=50, d=64)
    comp = ProductQuantizer(C, compression=0.05, kmeans_iters=1)  # bytes do not depend on iters
    pkt = comp.encode(h, labels, attn, seed=0)
    q, n_c, predicted = choose_levels(64, 50, 64, 0.05)
    assert _wire_ratio(pkt) == pytest.approx(predicted, rel=1e-12)
    assert abs(predicted / 0.05 - 1) <= 0.05
    assert pkt.tensors["codebook"].shape == (q, n_c, 64 // q)
    assert pkt.tensors["codes"].shape == (64, 50, q)


@pytest.mark.parametrize(
    ("q", "n_c", "wire"),
    [(1, 2, "float32"), (4, 100, "float16"), (8, 256, "bfloat16"), (2, 300, "float32")],
)
def test_pq_nbytes_is_what_the_codec_counts(q: int, n_c: int, wire: str) -> None:
    """uint8 codes up to L = 256, uint16 beyond; floats at the wire dtype."""
    h, labels, attn = _batch(b=20, n=17, d=16)
    comp = ProductQuantizer(C, subvectors=q, centroids=n_c, wire_dtype=wire, kmeans_iters=1)
    record = packet_to_record(comp.encode(h, labels, attn), wire)
    assert record["i:codes"].numpy().dtype == (np.uint8 if n_c <= 256 else np.uint16)
    assert act_and_target_nbytes(record)[0] == pq_nbytes(20, 17, 16, q, n_c, wire)


def test_reachable_range_and_discrete_levels() -> None:
    lo = choose_levels(64, 50, 64, 1e-4)
    hi = choose_levels(64, 50, 64, 1.0)
    assert lo[:2] == (1, 2) and 0.004 < lo[2] < 0.006
    assert hi[:2] == (64, 256) and 0.32 < hi[2] < 0.34
    # float16 codebooks: q=32 tops out at 0.165 and q=64 starts at 0.25, so 0.2 gets 0.165
    assert choose_levels(64, 50, 64, 0.2, "float16")[:2] == (32, 256)
    # DeiT-Tiny shapes: the codebook term is tiny, so 0.1 falls between two levels of q and
    # the closest level is taken
    q, n_c, ratio = choose_levels(128, 197, 192, 0.1)
    assert (q, n_c) == (64, 256) and 0.09 < ratio < 0.095
    # the automatic L never leaves uint8, and never exceeds the number of sub-vectors
    assert all(choose_levels(2, 3, 8, c)[1] <= 6 for c in (0.1, 0.5, 1.0))


def test_overrides_fix_one_parameter_and_fit_the_other() -> None:
    q, n_c, ratio = choose_levels(64, 50, 64, 0.1, subvectors=8)
    assert q == 8 and abs(ratio / 0.1 - 1) <= 0.05
    q, n_c, _ = choose_levels(64, 50, 64, 0.1, centroids=16)
    # codes alone cost q/256: q=32 (0.125, +25%) is closer than q=16 (0.0625, -37%)
    assert n_c == 16 and q == 32
    assert choose_levels(64, 50, 64, 0.1, subvectors=4, centroids=7)[:2] == (4, 7)
    assert choose_levels(2, 3, 8, 0.1, subvectors=4, centroids=50)[:2] == (4, 6)  # L <= B·n
    with pytest.raises(ValueError, match="pq-subvectors"):
        choose_levels(64, 50, 64, 0.1, subvectors=5)


# ---- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_round_trip_exact_when_centroids_cover_distinct_subvectors(wire: str) -> None:
    """Sub-vectors drawn from 5 exact values per group: L = 8 >= 5 reconstructs exactly."""
    g = torch.Generator().manual_seed(1)
    b, n, d, q = 12, 7, 8, 4
    values = torch.tensor([-2.0, -0.5, 0.0, 1.0, 4.0])  # exact in bf16, sums stay exact
    pick = torch.randint(0, 5, (q, b * n), generator=g)
    sub = torch.stack([values[pick], values[(pick + 2) % 5]], dim=-1)  # (q, N, 2)
    h = sub.transpose(0, 1).reshape(b, n, d).requires_grad_(True)
    comp = ProductQuantizer(C, subvectors=q, centroids=8, wire_dtype=wire)
    pkt = comp.encode(h, torch.zeros(b, dtype=torch.long), torch.rand(b, n), seed=3)
    assert torch.equal(pkt.anchors["act"].detach(), h.detach())
    received = record_to_packet(packet_to_record(pkt, wire))
    h_server, leaves = comp.server_decode(received.tensors)
    assert torch.equal(h_server, h.detach())
    assert set(leaves) == {"act"} and leaves["act"].is_leaf and leaves["act"].requires_grad


def test_reconstruction_error_falls_with_more_centroids() -> None:
    h, labels, attn = _batch(b=32, n=9, d=16)
    errs = [
        (ProductQuantizer(C, subvectors=4, centroids=k).encode(h, labels, attn).anchors["act"] - h)
        .pow(2)
        .mean()
        .item()
        for k in (2, 16, 128)
    ]
    assert errs[0] > errs[1] > errs[2]


# ---- gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_gradient_is_straight_through_plus_fedlite_correction(lam: float) -> None:
    h, labels, attn = _batch()
    comp = ProductQuantizer(C, subvectors=4, centroids=6, lam=lam)
    pkt = comp.encode(h, labels, attn, seed=2)
    assert set(pkt.grad_tensors()) == {"act"}  # the anchor, not the wire tensors
    h_q = pkt.anchors["act"].detach()
    # the server's gradient w.r.t. its reconstruction, through the codec both ways
    h_server, leaves = comp.server_decode(
        record_to_packet(packet_to_record(pkt, "float32")).tensors
    )
    torch.testing.assert_close(h_server, h_q)
    (h_server.sin().sum()).backward()
    grads = record_to_grads(
        grads_to_record(comp.compress_grads({"act": leaves["act"].grad}), "float32")
    )
    assert grads["act"].shape == h.shape
    received = comp.decompress_grads(grads, pkt)
    torch.autograd.backward([pkt.grad_tensors()["act"]], [received["act"]])
    expected = h_q.cos() + lam * (h.detach() - h_q)
    torch.testing.assert_close(h.grad, expected)


# ---- determinism -----------------------------------------------------------------------


def test_same_seed_same_packet_and_plan_replays_bit_for_bit() -> None:
    h, labels, attn = _batch(b=24, n=11, d=16)
    comp = ProductQuantizer(C, compression=0.1)
    a = comp.encode(h, labels, attn, seed=5)
    b = comp.encode(h, labels, attn, seed=5)
    for k in ("codebook", "codes"):
        assert torch.equal(a.tensors[k], b.tensors[k])
    assert any(
        not torch.equal(a.tensors["codes"], comp.encode(h, labels, attn, seed=s).tensors["codes"])
        for s in range(6, 10)
    )
    # replay: no K-means, the plan's codes, centroids recomputed from the same h
    replay = comp.encode(h, labels, attn, plan=a.plan, seed=99)
    assert torch.equal(replay.tensors["codebook"], a.tensors["codebook"])
    assert torch.equal(replay.tensors["codes"], a.tensors["codes"])
    assert torch.equal(replay.anchors["act"], a.anchors["act"])
    assert int(a.plan["seed"]) == 5 and int(replay.plan["seed"]) == 5


def test_bad_plan_and_arguments_rejected_naming_the_key() -> None:
    h, labels, attn = _batch()
    comp = ProductQuantizer(C, subvectors=4, centroids=3)
    plan = comp.encode(h, labels, attn).plan
    with pytest.raises(ValueError, match="plan"):
        comp.encode(h[:4], labels[:4], attn[:4], plan=plan)
    for kwargs, key in [
        ({"compression": 0.0}, "compression"),
        ({"subvectors": -1}, "pq-subvectors"),
        ({"centroids": -1}, "pq-centroids"),
        ({"lam": -0.1}, "pq-lambda"),
    ]:
        with pytest.raises(ValueError, match=key):
            ProductQuantizer(C, **kwargs)


def test_from_config_and_registry() -> None:
    cfg = RunConfig(
        method="pq",
        compression=0.2,
        pq_subvectors=8,
        pq_centroids=32,
        pq_lambda=0.01,
        wire_dtype="float16",
        kmeans_iters=9,
    )
    comp = build_compressor(cfg, num_classes=C)
    assert isinstance(comp, ProductQuantizer)
    assert (comp.subvectors, comp.centroids, comp.lam) == (8, 32, 0.01)
    assert (comp.wire_dtype, comp.kmeans_iters, comp.compression) == ("float16", 9, 0.2)
    with pytest.raises(ValueError, match="pq-subvectors"):
        ProductQuantizer.from_config(cfg.replace(pq_subvectors=5), C, hidden_size=64)


# ---- through the workers and the in-process grid ---------------------------------------


def _cfg(tmp_path: Path, **overrides: object) -> RunConfig:
    return tiny_config(
        tmp_path, **({"method": "pq", "compression": 0.1, "kmeans_iters": 10} | overrides)
    )


def test_one_protocol_step_updates_the_client_front(tmp_path: Path) -> None:
    """Client forward -> codec -> server step -> codec -> client recompute with the plan."""
    set_task_identity()
    cfg = _cfg(tmp_path, pq_lambda=0.01)
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    server: ServerWorker = strategy.server
    setup = client_setup(cfg, 0, 1)
    state = {
        f"front.{k}": v.clone() for k, v in strategy.client_modules["front"].state_dict().items()
    }
    worker = setup.worker(state, optimizer_state=None)
    idx = setup.batch_indices(0)
    packet = worker.forward_packet(idx, seed=11)
    record = packet_to_record(packet, cfg.wire_dtype)
    _, grads, _ = server.step([record_to_packet(record)])
    b, n, d = len(idx), worker.front.num_tokens, worker.front.hidden_size
    assert grads[0]["act"].shape == (b, n, d)
    assert 0.095 < act_and_target_nbytes(record)[0] / uncompressed_act_nbytes(b, n, d) < 0.105
    # the plan waits in context.state as an ArrayRecord, as clients/client_app.py keeps it
    plan = ArrayRecord(dict(packet.plan)).to_torch_state_dict()
    again = worker._encode(idx, seed=12, plan=plan)
    for name, tensor in packet.tensors.items():
        assert torch.equal(tensor, again.tensors[name].detach()), name
    before = {k: v.clone() for k, v in worker.front_state().items()}
    worker.apply_grads(idx, 11, plan, record_to_grads(grads_to_record(grads[0], "float32")))
    after = worker.front_state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every front tensor got a gradient and moved


def test_repeated_batch_loss_falls(tmp_path: Path) -> None:
    """Eight protocol steps on one batch: the model fits it through the quantiser."""
    set_task_identity()
    cfg = _cfg(tmp_path, batch_size=32, pq_lambda=0.01)
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    setup = client_setup(cfg, 0, 1)
    worker = setup.worker(modules_state(strategy.client_modules), optimizer_state=None)
    idx = setup.batch_indices(0)
    losses = []
    for seed in range(8):
        packet = worker.forward_packet(idx, seed)
        loss, grads, _ = strategy.server.step(
            [record_to_packet(packet_to_record(packet, "float32"))]
        )
        worker.apply_grads(
            idx, seed, packet.plan, record_to_grads(grads_to_record(grads[0], "float32"))
        )
        losses.append(loss)
    assert np.mean(losses[-3:]) < losses[0] - 0.1


def test_training_run_lowers_the_loss(tmp_path: Path) -> None:
    """In-process grid, single-class clients (fast to fit), one sampled per round."""
    cfg = _cfg(
        tmp_path,
        local_steps=8,
        pq_lambda=0.01,
        partitioner="pathological",
        classes_per_client=1,
        fraction_train=0.25,
    )
    grid = InProcessGrid(client_module.app, 4, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    losses = RunDir(cfg.run_dir).read_metrics().query("kind == 'step'")["train_loss"].to_numpy()
    assert len(losses) == 8 and np.mean(losses[-3:]) < losses[0] - 0.3
    assert abs(summary["compression_ratio"] / 0.1 - 1) <= 0.05
    # the downlink is the dense gradient at h_q: as large as an uncompressed activation
    assert summary["bytes_down_grad"] > 5 * summary["bytes_up_act"]
