"""C3-SL against a slow circular-convolution reference; its wire, key and gradient contracts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adc_flwr.compression import build_compressor
from adc_flwr.compression.c3sl import C3SLCompressor, group_size, make_key_spectra
from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.wire.codec import (
    act_and_target_nbytes,
    grads_to_record,
    packet_to_record,
    record_nbytes,
    record_to_grads,
    record_to_packet,
)
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from tests.support.helpers import front_copy, tiny_config, train_in_process

C = 10


def _batch(b: int = 32, n: int = 50, d: int = 64, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=g, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, C, (b,), generator=g)
    return h, labels, torch.softmax(torch.randn(b, n, generator=g), -1)


def _keys(comp: C3SLCompressor, dim: int) -> torch.Tensor:
    """``(R, D)`` keys in the time domain."""
    return torch.fft.irfft(make_key_spectra(comp.seed, comp.r, dim, comp.keys), n=dim)


def _reference(h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Bind-and-sum with explicit index arithmetic: s_g[i] = Σ_r Σ_j k_r[j] x_gr[(i-j) mod D]."""
    b, dim = h.shape[0], keys.shape[1]
    r = keys.shape[0]
    x = h.reshape(b // r, r, dim)
    idx = (torch.arange(dim)[:, None] - torch.arange(dim)[None, :]) % dim  # (i, j) -> i-j
    return torch.einsum("rj,grij->gi", keys, x[:, :, idx])  # (G, D)


def _unbind_reference(s: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Circular correlation: x_gr[i] = Σ_j k_r[j] s_g[(i+j) mod D]."""
    dim = keys.shape[1]
    idx = (torch.arange(dim)[:, None] + torch.arange(dim)[None, :]) % dim  # (i, j) -> i+j
    return torch.einsum("rj,gij->gri", keys, s[:, idx])  # (G, R, D)


@pytest.mark.parametrize(
    ("n", "d", "keys"), [(3, 5, "unitary"), (4, 4, "unitary"), (3, 4, "normal")]
)
def test_matches_circular_convolution_reference(n: int, d: int, keys: str) -> None:
    h, labels, attn = _batch(b=12, n=n, d=d)
    comp = C3SLCompressor(C, r=3, seed=7, keys=keys)
    pkt = comp.encode(h, labels, attn)
    k = _keys(comp, n * d)
    bound = _reference(h.detach(), k)  # (4, D)
    torch.testing.assert_close(pkt.tensors["act"].detach().reshape(4, n * d), bound)
    unbound = _unbind_reference(bound, k).reshape(12, n, d)
    torch.testing.assert_close(comp.decode(pkt.tensors).detach(), unbound)


@pytest.mark.parametrize("dim", [15, 16])  # odd and even D: the real DC/Nyquist bins
def test_unitary_keys_are_real_with_unit_spectrum_and_variance_one_over_d(dim: int) -> None:
    spectra = make_key_spectra(seed=3, r=4, dim=dim)
    torch.testing.assert_close(spectra.abs(), torch.ones_like(spectra.abs()))
    keys = torch.fft.irfft(spectra, n=dim)  # (R, D)
    torch.testing.assert_close(torch.fft.rfft(keys), spectra)  # really a real vector's spectrum
    torch.testing.assert_close(keys.pow(2).sum(1), torch.ones(4, dtype=torch.float64))  # var 1/D
    big = torch.fft.irfft(make_key_spectra(seed=3, r=2, dim=4096), n=4096)
    assert big.var().item() == pytest.approx(1 / 4096, rel=0.05)
    normal = torch.fft.irfft(make_key_spectra(seed=3, r=2, dim=4096, kind="normal"), n=4096)
    assert normal.var().item() == pytest.approx(1 / 4096, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_r1_round_trip_is_exact(dtype: torch.dtype) -> None:
    h, labels, attn = _batch(b=8, n=17, d=64, dtype=dtype)
    comp = C3SLCompressor(C, r=1, seed=5)
    pkt = comp.encode(h, labels, attn)
    assert pkt.tensors["act"].shape == (8, 17, 64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(comp.decode(pkt.tensors), h, rtol=tol, atol=tol)


def test_r1_with_paper_normal_keys_is_not_exact() -> None:
    """The paper's N(0, 1/D) keys: k ⋆ k is only near a delta, ~100% error even alone."""
    h, labels, attn = _batch(b=8, n=17, d=64)
    comp = C3SLCompressor(C, r=1, seed=5, keys="normal")
    err = (comp.decode(comp.encode(h, labels, attn).tensors) - h).norm() / h.norm()
    assert 0.7 < err.item() < 1.3


@pytest.mark.parametrize("r", [2, 4, 8])
def test_error_for_r_above_one_is_the_crosstalk_of_the_other_members(r: int) -> None:
    """Unitary keys: x̂_r - x_r = Σ_{s≠r} x_s ⊛ (k_s ⋆ k_r), E||.||² = Σ_{s≠r} ||x_s||²."""
    h, labels, attn = _batch(b=64, n=50, d=64)
    comp = C3SLCompressor(C, r=r, seed=1)
    out = comp.decode(comp.encode(h, labels, attn).tensors).detach()
    rel = ((out - h.detach()).norm(dim=(1, 2)) / h.detach().norm(dim=(1, 2))).mean()
    assert rel.item() == pytest.approx(math.sqrt(r - 1), rel=0.05)


def test_packet_holds_only_the_bound_tensor_and_hard_labels() -> None:
    h, labels, attn = _batch(b=32, n=50, d=64)
    comp = C3SLCompressor(C, r=4, seed=42)
    pkt = comp.encode(h, labels, attn, seed=9)
    assert set(pkt.tensors) == {"act"} and pkt.tensors["act"].shape == (8, 50, 64)
    assert pkt.plan == {} and pkt.anchors == {}  # keys are rebuilt from the run seed
    assert not pkt.soft_targets and torch.equal(pkt.targets, labels)
    record = packet_to_record(pkt, "float32")
    assert set(record.keys()) == {"f:act", "y"}  # nothing else travels, keys least of all
    assert set(pkt.grad_tensors()) == {"act"}


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16, 32])
def test_achieved_compression_is_one_over_r(r: int) -> None:
    """B=32, n=50, d=64: bytes from the codec. Each array pays a ~128-byte .npy header: at
    R=32 the single 12,800-byte vector carries 1% of header on top of 1/32."""
    h, labels, attn = _batch(b=32, n=50, d=64, dtype=torch.float32)
    pkt = C3SLCompressor(C, r=r, seed=0).encode(h, labels, attn)
    act, _ = act_and_target_nbytes(packet_to_record(pkt, "float32"))
    ratio = act / uncompressed_act_nbytes(32, 50, 64)
    assert ratio == pytest.approx(1 / r, rel=0.015)
    assert ratio >= 1 / r  # the header only ever adds
    # the gradient comes back at the packet's shape: the same bytes downlink
    grads = grads_to_record({"act": torch.randn(32 // r, 50, 64)}, "float32")
    assert record_nbytes(grads) == act


def test_gradient_is_the_adjoint_unbinding_at_the_packet_shape() -> None:
    """Autograd through bind-and-sum gives member r the correlation of the upstream with k_r."""
    h, labels, attn = _batch(b=16, n=9, d=8)
    comp = C3SLCompressor(C, r=4, seed=2)
    pkt = comp.encode(h, labels, attn)
    upstream = torch.randn(4, 9, 8, dtype=torch.float64)
    torch.autograd.backward(list(pkt.grad_tensors().values()), [upstream])
    torch.testing.assert_close(h.grad, comp.decode({"act": upstream}))


def test_short_batch_is_padded_and_the_server_drops_the_padding() -> None:
    h, labels, attn = _batch(b=10, n=5, d=8)
    comp = C3SLCompressor(C, r=4, seed=2, batch_size=16)
    pkt = comp.encode(h, labels, attn)
    assert pkt.tensors["act"].shape == (3, 5, 8)  # ceil(10/4) groups, the last half empty
    assert int(pkt.tensors["valid"]) == 10 and pkt.targets.shape == (10,)
    # the padded group equals binding the two real members alone
    alone = C3SLCompressor(C, r=4, seed=2).encode(
        torch.cat([h[8:], torch.zeros(2, 5, 8, dtype=h.dtype)]),
        torch.zeros(4, dtype=torch.long),
        attn[:4],
    )
    torch.testing.assert_close(pkt.tensors["act"][2:], alone.tensors["act"])

    received = record_to_packet(packet_to_record(pkt, "float32"))
    out, leaves = comp.server_decode(received.tensors)
    assert out.shape == (10, 5, 8) and set(leaves) == {"act"}
    assert len(received.targets) == 10
    out.pow(2).sum().backward()
    grads = record_to_grads(grads_to_record({k: t.grad for k, t in leaves.items()}, "float32"))
    assert grads["act"].shape == (3, 5, 8)
    torch.autograd.backward([pkt.tensors["act"]], [grads["act"].double()])
    assert h.grad.shape == h.shape and (h.grad.abs().sum((1, 2)) > 0).all()


def test_same_seed_same_keys_on_both_sides_and_other_seeds_differ() -> None:
    cfg = RunConfig(method="c3sl", compression=0.25, batch_size=32, seed=11)
    client, server = build_compressor(cfg, C), build_compressor(cfg, C)
    assert client is not server and client.r == 4
    h, labels, attn = _batch(b=32, n=17, d=64, dtype=torch.float32)
    s_client = client.key_spectra(17 * 64, torch.float32, torch.device("cpu"))
    s_server = server.key_spectra(17 * 64, torch.float32, torch.device("cpu"))
    assert torch.equal(s_client, s_server)
    pkt = client.encode(h, labels, attn)
    received = record_to_packet(packet_to_record(pkt, "float32"))
    out, _ = server.server_decode(received.tensors)
    torch.testing.assert_close(out.detach(), client.decode(pkt.tensors).detach())
    other = build_compressor(cfg.replace(seed=12), C)
    assert not torch.allclose(
        other.key_spectra(17 * 64, torch.float32, torch.device("cpu")), s_client
    )


def test_group_size_mapping_and_batch_size_checks() -> None:
    assert group_size(0.25) == 4 and group_size(0.5) == 2 and group_size(1.0) == 1
    assert group_size(0.1) == 10 and group_size(0.03125) == 32 and group_size(0.3) == 3
    assert group_size(0.1, c3sl_r=8) == 8  # c3sl-r wins
    comp = build_compressor(RunConfig(method="c3sl", compression=0.1, c3sl_r=8), C)
    assert isinstance(comp, C3SLCompressor) and comp.r == 8 and comp.seed == 42
    with pytest.raises(ValueError, match=r"batch-size.*c3sl-r.*compression"):
        build_compressor(RunConfig(method="c3sl", compression=0.1, batch_size=64), C)
    with pytest.raises(ValueError, match="batch-size"):
        build_compressor(RunConfig(method="c3sl", c3sl_r=3, batch_size=64), C)
    with pytest.raises(ValueError, match="keys"):
        C3SLCompressor(C, r=2, keys="binary")


def test_bad_inputs_rejected() -> None:
    h, labels, attn = _batch(b=8, n=5, d=4)
    comp = C3SLCompressor(C, r=2)
    with pytest.raises(ValueError, match="labels"):
        comp.encode(h, labels[:-1], attn)
    with pytest.raises(ValueError, match=r"\(B, n, d\)"):
        comp.encode(h[0], labels, attn)


# ---- through the in-process Flower grid ----------------------------------------------


def test_grid_step_changes_client_front(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, method="c3sl", c3sl_r=4, local_steps=1)
    before: dict[str, torch.Tensor] = {}
    strategy, _ = train_in_process(cfg, 1, before_start=lambda s: before.update(front_copy(s)))
    after = strategy.client_modules["front"].state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("patch_embeddings" in k for k in changed)  # the gradient reached the first layer
    assert len(changed) > len(before) // 2


def test_grid_training_lowers_the_loss_and_counts_bytes(tmp_path: Path) -> None:
    """Two classes (pathological partition) so 12 steps visibly learn on a 2-core CPU."""
    cfg = tiny_config(
        tmp_path,
        method="c3sl",
        c3sl_r=2,
        local_steps=12,
        lr=3e-3,
        partitioner="pathological",
        classes_per_client=2,
    )
    grid = InProcessGrid(client_module.app, 1, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    losses = RunDir(cfg.run_dir).read_metrics().query("kind == 'step'")["train_loss"].to_numpy()
    assert len(losses) == 12
    assert losses[-4:].mean() < losses[:4].mean() - 0.3
    # digits: B=16, n=17, d=64 -> 8 vectors of 4,352 bytes; one header on top of 1/2
    assert summary["compression_ratio"] == pytest.approx(0.5, rel=0.01)
    assert summary["bytes_down_grad"] == summary["bytes_up_act"]
