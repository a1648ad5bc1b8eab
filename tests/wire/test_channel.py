"""The AWGN channel: measured SNR, untouched digital tensors, determinism, server integration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adc_flwr.compression import Packet
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.wire.channel import Channel, build_channel
from adc_flwr.wire.codec import packet_to_record, record_to_packet
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid, set_task_identity
from strategies.lifecycle import build_strategy, run_training
from strategies.split_strategy import SplitLearningStrategy
from tests.support.helpers import tiny_config, train_in_process


def measured_snr_db(signal: torch.Tensor, received: torch.Tensor) -> float:
    """10·log10(signal power / power of the noise actually added)."""
    noise = (received - signal).double()
    return 10 * math.log10(float(signal.double().square().mean() / noise.square().mean()))


def per_vector_snr_db(signal: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """The SNR of each row of the last dimension, in dB."""
    p = signal.double().square().mean(-1)
    n = (received - signal).double().square().mean(-1)
    return 10 * torch.log10(p / n)


def activation(seed: int = 0, shape: tuple[int, ...] = (32, 65, 192)) -> torch.Tensor:
    """Tokens with very different norms, like a ViT's (CLS and outliers)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(*shape[:-1], 1, generator=g) * 10 + 0.1
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("snr", [-10.0, 0.0, 10.0, 20.0])
def test_fixed_snr_is_measured(snr: float) -> None:
    x = activation()
    y = x.clone()
    used = Channel("awgn", (snr, snr), seed=1).apply_(y)
    assert used == snr
    assert abs(measured_snr_db(x, y) - snr) < 0.5
    # the power is estimated per token vector: every row sits near the SNR, not just the mean
    rows = per_vector_snr_db(x, y)
    assert abs(float(rows.mean()) - snr) < 0.2
    assert float(rows.std()) < 1.5  # d = 192 samples per row estimate


def test_uniform_range_draws_within_range_and_spread() -> None:
    channel = Channel("awgn", (-10.0, 10.0), seed=3)
    used = []
    for i in range(40):
        x = activation(i, (8, 17, 256))
        y = x.clone()
        snr = channel.apply_(y)
        assert snr is not None and -10.0 <= snr <= 10.0
        assert abs(measured_snr_db(x, y) - snr) < 0.5
        used.append(snr)
    assert max(used) - min(used) > 10  # draws are spread over the range, not fixed


def test_one_snr_per_message() -> None:
    channel = Channel("awgn", (-10.0, 10.0), seed=4)
    a, b = activation(0, (4, 17, 256)), activation(1, (4, 256))
    msg = {"a": a.clone(), "b": b.clone(), "idx": torch.arange(10)}
    snr = channel.apply_message_(msg)
    assert snr is not None
    assert abs(measured_snr_db(a, msg["a"]) - snr) < 0.5
    assert abs(measured_snr_db(b, msg["b"]) - snr) < 0.5
    assert torch.equal(msg["idx"], torch.arange(10))


def test_clean_is_identity() -> None:
    assert build_channel(RunConfig(channel="clean", snr_db="-5")) is None
    x = activation()
    y = x.clone()
    channel = Channel("clean", (-10.0, 10.0))
    assert channel.apply_(y) is None and channel.apply_message_({"x": y}) is None
    assert torch.equal(x, y)


def test_digital_and_zero_tensors_are_untouched() -> None:
    channel = Channel("awgn", (-10.0, -10.0), seed=0)
    ints = torch.randint(0, 1000, (16, 33))
    codes = ints.to(torch.uint8)
    mask = ints > 500
    snapshot = [ints.clone(), codes.clone(), mask.clone()]
    for t in (ints, codes, mask):
        assert channel.apply_(t) is None
    assert channel.apply_message_({"i": ints, "c": codes, "m": mask}) is None
    for before, after in zip(snapshot, (ints, codes, mask), strict=True):
        assert torch.equal(before, after)
    # zero vectors (no signal) get no noise; the others do
    x = activation(0, (4, 9, 64))
    x[1, 3] = 0
    channel.apply_(x)
    assert torch.equal(x[1, 3], torch.zeros(64))
    assert bool((x[0] != activation(0, (4, 9, 64))[0]).all())


def test_scalar_and_vector_and_half_precision() -> None:
    channel = Channel("awgn", (0.0, 0.0), seed=0)
    s = torch.tensor(2.0)
    channel.apply_(s)
    assert s.shape == () and float(s) != 2.0
    h = activation(0, (4, 17, 64)).half()
    h0 = h.clone()
    channel.apply_(h)
    assert h.dtype == torch.float16 and abs(measured_snr_db(h0.float(), h.float())) < 0.5


def test_deterministic_by_seed() -> None:
    def noisy(seed: int) -> torch.Tensor:
        y = activation()
        Channel("awgn", (-10.0, 10.0), seed=seed).apply_message_({"x": y})
        return y

    assert torch.equal(noisy(5), noisy(5))
    assert not torch.equal(noisy(5), noisy(6))
    cfg = RunConfig(channel="awgn", snr_db="-10,10", seed=9)
    a, b = build_channel(cfg), build_channel(cfg)
    assert a is not None and b is not None and a.snr_range_db == (-10.0, 10.0)
    assert torch.equal(a.state_dict(), b.state_dict())
    # a saved state replays the same draws (checkpoint / resume)
    state = a.state_dict()
    first = activation()
    a.apply_(first)
    a.load_state_dict(state)
    again = activation()
    a.apply_(again)
    assert torch.equal(first, again)


def test_leaf_stays_leaf_and_gradient_is_identity() -> None:
    x = activation(0, (2, 5, 16)).requires_grad_(True)
    before = x.detach().clone()
    Channel("awgn", (0.0, 0.0), seed=0).apply_(x)
    assert x.is_leaf and x.requires_grad and x.grad_fn is None
    assert not torch.equal(x.detach(), before)
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown"):
        Channel("rayleigh")
    with pytest.raises(ValueError, match="low <= high"):
        Channel("awgn", (10.0, -10.0))


# ---- through the server ----------------------------------------------------------------


def server_and_packets(tmp_path: Path, channel: str, method: str = "none"):
    """A built ServerWorker and a function producing identical fresh received packets."""
    set_task_identity()
    cfg = tiny_config(tmp_path, method=method, channel=channel, snr_db="0")
    strategy, _ = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    server = strategy.server
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 17, 64, generator=g)  # vit-cpu on digits: 17 tokens, d = 64
    labels = torch.randint(0, 10, (8,), generator=g)

    def packets():
        packet = Packet({"act": h.clone()}, labels)
        return [record_to_packet(packet_to_record(packet, "float32")) for _ in range(2)]

    return server, packets


def test_server_uplink_noise_changes_loss_and_grads_keep_shape(tmp_path: Path) -> None:
    clean, make_clean = server_and_packets(tmp_path / "c", "clean")
    noisy, make_noisy = server_and_packets(tmp_path / "n", "awgn")
    assert clean.channel is None and noisy.channel is not None
    # same back weights in both (built from the same seed)
    for p, q in zip(clean.back.parameters(), noisy.back.parameters(), strict=True):
        assert torch.equal(p, q)

    sent = make_noisy()
    loss_clean, grads_clean, _ = clean.step(make_clean())
    loss_noisy, grads_noisy, _ = noisy.step(sent)
    assert math.isfinite(loss_noisy) and loss_noisy != loss_clean
    for p in sent:  # the received leaves got noise in place and stayed leaves
        assert p.tensors["act"].is_leaf and p.tensors["act"].grad is not None
    h = make_clean()[0].tensors["act"].detach()
    assert abs(measured_snr_db(h, sent[0].tensors["act"].detach()) - 0.0) < 0.5
    for g_clean, g_noisy in zip(grads_clean, grads_noisy, strict=True):
        assert g_noisy.keys() == g_clean.keys() == {"act"}
        assert g_noisy["act"].shape == h.shape
        assert not torch.equal(g_noisy["act"], g_clean["act"])


def test_server_downlink_noise_on_the_gradients(tmp_path: Path) -> None:
    """Downlink at 0 dB: noise power equals the power of what the server computed."""
    noisy, make = server_and_packets(tmp_path, "awgn")
    computed: list[torch.Tensor] = []
    real_compress = noisy.compressor.compress_grads

    def keep(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = real_compress(grads)
        computed.append(out["act"].clone())
        return out

    noisy.compressor.compress_grads = keep  # type: ignore[method-assign]
    _, grads, _ = noisy.step(make())
    assert len(computed) == 2
    for before, after in zip(computed, grads, strict=True):
        assert abs(measured_snr_db(before, after["act"]) - 0.0) < 0.5
    # a new draw per client: the two messages' noises differ
    assert not torch.equal(grads[0]["act"] - computed[0], grads[1]["act"] - computed[1])


def test_inprocess_run_with_awgn_completes(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, method="adc", compression=0.25, channel="awgn", snr_db="-10,10")
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert math.isfinite(summary["test_accuracy"])


def test_awgn_runs_are_reproducible(tmp_path: Path) -> None:
    """Same seed, same noise: two runs end with the same server back.

    One client: with several, the in-process grid returns replies in message-id (uuid) order,
    so which client gets which draw varies between runs (packet order is not canonical).
    """

    def back_after(path: Path) -> dict[str, torch.Tensor]:
        cfg = tiny_config(path, channel="awgn", snr_db="0,10", optimizer="sgd", lr=0.05)
        strategy, _ = train_in_process(cfg, 1)
        return strategy.server.back.state_dict()

    a, b = back_after(tmp_path / "a"), back_after(tmp_path / "b")
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_server_steps_are_deterministic_for_a_packet_order(tmp_path: Path) -> None:
    """Two servers from the same config, same packets in the same order: same bits out."""
    (a, make_a), (b, make_b) = (
        server_and_packets(tmp_path / "a", "awgn"),
        server_and_packets(tmp_path / "b", "awgn"),
    )
    for _ in range(2):
        loss_a, grads_a, _ = a.step(make_a())
        loss_b, grads_b, _ = b.step(make_b())
        assert loss_a == loss_b
        for ga, gb in zip(grads_a, grads_b, strict=True):
            assert torch.equal(ga["act"], gb["act"])


def test_resume_continues_the_noise_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint holds the channel's generator: a resumed run draws the same noise."""

    def cfg_at(path: Path) -> RunConfig:
        return tiny_config(
            path,
            channel="awgn",
            snr_db="0,10",
            optimizer="sgd",
            lr=0.05,
            num_server_rounds=2,
            local_steps=2,
        )

    whole = cfg_at(tmp_path / "a")
    run_training(
        InProcessGrid(client_module.app, 1, whole.to_run_config()),
        whole,
        progress=lambda _: None,
    )
    cfg = cfg_at(tmp_path / "b")
    real_evaluate = SplitLearningStrategy.evaluate_round

    def crash_in_round_2(self, server_round, outcome):
        if server_round == 2:
            raise RuntimeError("power cut")
        return real_evaluate(self, server_round, outcome)

    monkeypatch.setattr(SplitLearningStrategy, "evaluate_round", crash_in_round_2)
    with pytest.raises(RuntimeError, match="power cut"):
        run_training(
            InProcessGrid(client_module.app, 1, cfg.to_run_config()),
            cfg,
            progress=lambda _: None,
        )
    monkeypatch.setattr(SplitLearningStrategy, "evaluate_round", real_evaluate)
    run_training(
        InProcessGrid(client_module.app, 1, cfg.to_run_config()),
        cfg,
        progress=lambda _: None,
    )
    reference = RunDir(whole.run_dir).load_checkpoint()["back"]
    resumed = RunDir(cfg.run_dir).load_checkpoint()["back"]
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0, msg=name)
