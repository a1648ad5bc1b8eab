"""BottleNet++: width rule and bytes, identity round trips, seeding, gradients, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adc_flwr.compression import build_compressor
from adc_flwr.compression.bottlenet import BottleNetCompressor, bottleneck_width, linear_widths
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.training.modules import modules_state
from adc_flwr.wire.codec import (
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


def _identity_(mlp: nn.Sequential) -> None:
    """Every Linear of a full-width MLP becomes the identity."""
    with torch.no_grad():
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.eye(layer.out_features, layer.in_features))
                layer.bias.zero_()


def _through_wire(comp: BottleNetCompressor, h: torch.Tensor, wire: str = "float32"):
    """Encode (encoder inside) -> codec -> server decode (decoder inside). (packet, h_rec)."""
    labels = torch.zeros(h.shape[0], dtype=torch.long)
    pkt = comp.encode(h, labels, torch.rand(h.shape[:2]))
    received = record_to_packet(packet_to_record(pkt, wire))
    h_server, _ = comp.server_decode(received.tensors)
    return pkt, h_server


# ---- width, bytes, architecture ------------------------------------------------------------


@pytest.mark.parametrize("c", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_width_rule_and_codec_bytes_ratio(c: float) -> None:
    b, n, d = 64, 50, 64
    comp = BottleNetCompressor(C, d, compression=c)
    w = round(c * d)
    assert comp.width == w and comp.ratio == w / d
    pkt, _ = _through_wire(comp, torch.randn(b, n, d))
    act, _ = act_and_target_nbytes(packet_to_record(pkt, "float32"))
    assert act == uncompressed_act_nbytes(b, n, w)  # a (B, n, w) float32 "act", header and all
    ratio = act / uncompressed_act_nbytes(b, n, d)
    assert ratio == pytest.approx(w / d, rel=5e-3)  # the level w/d, up to ~130 header bytes
    if c * d >= 10:  # rounding w costs at most half a unit: within 5% of the request
        assert abs(ratio / c - 1) <= 0.05


def test_explicit_width_and_bounds() -> None:
    assert bottleneck_width(64, 0.1, width=20) == 20
    assert bottleneck_width(64, 0.001) == 1  # never 0
    assert bottleneck_width(192, 0.1) == 19
    with pytest.raises(ValueError, match="bottlenet-width"):
        bottleneck_width(64, 0.1, width=65)
    with pytest.raises(ValueError, match="bottlenet-layers"):
        linear_widths(64, 8, 0)


def test_widths_are_linear_and_no_relu_at_either_end() -> None:
    comp = BottleNetCompressor(C, 64, width=8, num_layers=3)
    assert linear_widths(64, 8, 3) == [64, 45, 27, 8]
    enc, dec = comp.client_module(), comp.server_module()
    assert [m.out_features for m in enc if isinstance(m, nn.Linear)] == [45, 27, 8]
    assert [m.out_features for m in dec if isinstance(m, nn.Linear)] == [27, 45, 64]
    for mlp in (enc, dec):
        assert isinstance(mlp[0], nn.Linear) and isinstance(mlp[-1], nn.Linear)
        assert sum(isinstance(m, nn.ReLU) for m in mlp) == 2
    assert comp.client_module() is enc and comp.server_module() is dec  # stable for optimizers


# ---- round trips ------------------------------------------------------------------------


def test_identity_full_width_single_layer_round_trip_is_exact() -> None:
    comp = BottleNetCompressor(C, 16, width=16, num_layers=1)
    _identity_(comp.encoder)
    _identity_(comp.decoder)
    h = torch.randn(5, 7, 16)
    pkt, h_rec = _through_wire(comp, h)
    assert pkt.tensors["act"].shape == (5, 7, 16)
    torch.testing.assert_close(h_rec, h, rtol=0, atol=1e-6)


def test_identity_full_width_two_layers_round_trip_on_nonnegative_input() -> None:
    """The hidden ReLU passes non-negative values unchanged."""
    comp = BottleNetCompressor(C, 12, width=12, num_layers=2)
    _identity_(comp.encoder)
    _identity_(comp.decoder)
    h = torch.rand(4, 3, 12)
    _, h_rec = _through_wire(comp, h)
    torch.testing.assert_close(h_rec, h, rtol=0, atol=1e-6)


def test_encode_rejects_an_activation_of_another_width() -> None:
    """Encode takes the front's output (B, n, d); an already encoded (B, n, w) is refused."""
    comp = BottleNetCompressor(C, 16, compression=0.25)
    with pytest.raises(ValueError, match=r"bottlenet: .*d=16"):
        comp.encode(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"bottlenet: .*d=16"):
        comp.eval_forward(torch.randn(2, 3, 4))


# ---- seeding and config -------------------------------------------------------------------


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = BottleNetCompressor(C, 32, compression=0.25, seed=7)
    assert torch.equal(torch.rand(3), expected)  # building the MLPs drew nothing globally
    b = BottleNetCompressor(C, 32, compression=0.25, seed=7)
    other = BottleNetCompressor(C, 32, compression=0.25, seed=8)
    for x, y, z in zip(
        a.encoder.state_dict().values(), b.encoder.state_dict().values(),
        other.encoder.state_dict().values(), strict=True,
    ):  # fmt: skip
        assert torch.equal(x, y) and not torch.equal(x, z)
    for x, y in zip(a.decoder.parameters(), b.decoder.parameters(), strict=True):
        assert torch.equal(x, y)


def test_from_config_and_registry() -> None:
    cfg = RunConfig(method="bottlenet", compression=0.25, bottlenet_layers=3, seed=5)
    comp = build_compressor(cfg, num_classes=C)  # vit-cpu preset: d = 64 found without help
    assert isinstance(comp, BottleNetCompressor)
    assert (comp.hidden_size, comp.width, comp.num_layers) == (64, 16, 3)
    comp = BottleNetCompressor.from_config(cfg.replace(bottlenet_width=40), C, hidden_size=192)
    assert (comp.hidden_size, comp.width) == (192, 40)
    with pytest.raises(ValueError, match="hidden_size"):
        BottleNetCompressor.from_config(cfg.replace(model="hf:facebook/deit-tiny"), C)


# ---- through the workers and the in-process grid ---------------------------------------


def _cfg(tmp_path: Path, **overrides: object) -> RunConfig:
    return tiny_config(tmp_path, **({"method": "bottlenet", "compression": 0.25} | overrides))


def _workers(cfg: RunConfig):
    set_task_identity()
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    setup = client_setup(cfg, 0, 1)
    worker = setup.worker(modules_state(strategy.client_modules), optimizer_state=None)
    return strategy.server, worker, setup


def _protocol_step(server, worker, idx: np.ndarray, seed: int, wire: str):
    """Client forward -> codec -> server step -> codec -> client recompute and step."""
    packet = worker.forward_packet(idx, seed)
    record = packet_to_record(packet, wire)
    loss, grads, _ = server.step([record_to_packet(record)])
    worker.apply_grads(idx, seed, packet.plan, record_to_grads(grads_to_record(grads[0], wire)))
    return loss, record, grads[0]


def test_gradients_reach_the_client_and_every_learned_part_moves(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    server, worker, setup = _workers(cfg)
    assert set(worker.trainable_modules()) == {"front", "encoder"}
    idx = setup.batch_indices(0)
    before = worker.front_state()
    dec_before = {k: v.clone() for k, v in server.compressor.server_module().state_dict().items()}
    _, record, grads = _protocol_step(server, worker, idx, seed=3, wire="float32")
    b, n = len(idx), worker.front.num_tokens
    assert grads["act"].shape == (b, n, 16)  # at the packet's shape, w = 0.25·64
    assert act_and_target_nbytes(record)[0] == uncompressed_act_nbytes(b, n, 16)
    after = worker.front_state()
    assert any(k.startswith("encoder.") for k in before)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # front and encoder
    dec_after = server.compressor.server_module().state_dict()
    assert all(not torch.equal(dec_before[k], dec_after[k]) for k in dec_before)


def test_recompute_is_bit_exact(tmp_path: Path) -> None:
    _, worker, setup = _workers(_cfg(tmp_path))
    idx = setup.batch_indices(0)
    first = worker.forward_packet(idx, seed=1)
    again = worker._encode(idx, seed=2, plan=first.plan)
    assert first.plan == {} and torch.equal(first.tensors["act"], again.tensors["act"].detach())


def test_repeated_batch_loss_falls(tmp_path: Path) -> None:
    """Eight steps on one batch through the protocol: the model fits it."""
    server, worker, setup = _workers(_cfg(tmp_path, batch_size=32))
    idx = setup.batch_indices(0)
    losses = [_protocol_step(server, worker, idx, seed=s, wire="float32")[0] for s in range(8)]
    assert np.mean(losses[-3:]) < losses[0] - 0.1


def test_training_run_lowers_the_loss(tmp_path: Path) -> None:
    """In-process grid, single-class clients (fast to fit), one sampled per round."""
    cfg = _cfg(
        tmp_path,
        local_steps=8,
        partitioner="pathological",
        classes_per_client=1,
        fraction_train=0.25,
    )
    initial, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    grid = InProcessGrid(client_module.app, 4, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    losses = RunDir(cfg.run_dir).read_metrics().query("kind == 'step'")["train_loss"].to_numpy()
    assert len(losses) == 8 and np.mean(losses[-3:]) < losses[0] - 0.3
    # up and down travel at (B, n, w): a quarter of the uncompressed activation
    assert summary["compression_ratio"] == pytest.approx(0.25, rel=0.01)  # headers: +0.6%
    assert summary["bytes_down_grad"] == summary["bytes_up_act"]
    # the averaged encoder and the server's decoder both trained
    state = RunDir(cfg.run_dir).load_checkpoint()
    init_enc = modules_state({"encoder": initial.client_modules["encoder"]})
    init_dec = initial.server.compressor.server_module().state_dict()
    assert all(not torch.equal(state["client_modules"][k], v) for k, v in init_enc.items())
    assert all(not torch.equal(state["decoder"][k], v) for k, v in init_dec.items())
