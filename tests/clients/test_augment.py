"""``augment = "paper"`` on the client: the training forward sees augmented images, seeded
by the partition's batch number, so the forward that ``apply_grads`` recomputes encodes the
very packet the server got, in every method; evaluation never sees augmented images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adc_flwr.compression import Packet, available_methods
from adc_flwr.config import RunConfig
from adc_flwr.training.modules import client_modules, modules_state
from adc_flwr.training.workers import ClientWorker, front_forward
from clients.node_cache import ClientSetup, client_setup
from strategies.lifecycle import build_strategy
from tests.support.helpers import tiny_config, train_in_process

METHODS = ["none", "adc", "topk", "random-topk", "c3sl", "bottlenet", "quant", "pq"]


def worker_of(cfg: RunConfig, partition: int = 0) -> tuple[ClientSetup, ClientWorker]:
    """Partition ``partition`` of 2 and a worker holding the run's initial client modules."""
    setup = client_setup(cfg, partition, 2)
    sk = setup.skeleton
    return setup, setup.worker(modules_state(client_modules(sk.front, sk.compressor)), None)


def assert_same_packet(first: Packet, again: Packet) -> None:
    assert first.tensors.keys() == again.tensors.keys()
    for name, tensor in first.tensors.items():
        assert torch.equal(tensor, again.tensors[name].detach()), name
    for name, tensor in first.anchors.items():
        assert torch.equal(tensor, again.anchors[name].detach()), name
    assert torch.equal(first.targets, again.targets)


def test_every_method_is_covered() -> None:
    assert sorted(METHODS) == available_methods()


@pytest.mark.parametrize("method", METHODS)
def test_replayed_forward_sees_the_same_augmented_images(tmp_path: Path, method: str) -> None:
    """forward_packet, then the recomputation apply_grads does (plan and augment seed of the
    same batch): bit for bit the same packet; the next batch number, other images."""
    cfg = tiny_config(tmp_path, method=method, compression=0.25, augment="paper")
    setup, worker = worker_of(cfg)
    batch, seed = 5, 7
    idx = setup.batch_indices(batch)  # (16,)
    first = worker.forward_packet(idx, seed, setup.augment_seed(batch))
    again = worker._encode(idx, seed, plan=first.plan, augment_seed=setup.augment_seed(batch))
    assert_same_packet(first, again)
    # the same samples drawn as another batch: other augmented images, another packet
    other = worker.forward_packet(idx, seed, setup.augment_seed(batch + 1))
    assert any(not torch.equal(t, other.tensors[k]) for k, t in first.tensors.items())


def test_the_client_app_replays_each_forward_with_its_batchs_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ClientApp over two rounds: apply_grads gets the augment seed its
    forward got, and the seed is that of the partition's batch counted over the run (round 2
    goes on from round 1's batches, it does not start again at 0)."""
    cfg = tiny_config(tmp_path, augment="paper", num_server_rounds=2, local_steps=2)
    seen: dict[str, list[tuple[tuple[int, ...], int, int]]] = {"forward": [], "replay": []}
    real_forward, real_apply = ClientWorker.forward_packet, ClientWorker.apply_grads

    def forward(
        self: ClientWorker, idx: np.ndarray, seed: int, augment_seed: int | None = None
    ) -> Packet:
        seen["forward"].append((tuple(idx.tolist()), seed, augment_seed))
        return real_forward(self, idx, seed, augment_seed)

    def apply(
        self: ClientWorker,
        idx: np.ndarray,
        seed: int,
        plan: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        augment_seed: int | None = None,
    ) -> None:
        seen["replay"].append((tuple(idx.tolist()), seed, augment_seed))
        return real_apply(self, idx, seed, plan, grads, augment_seed)

    monkeypatch.setattr(ClientWorker, "forward_packet", forward)
    monkeypatch.setattr(ClientWorker, "apply_grads", apply)
    train_in_process(cfg, nodes=2)
    assert sorted(seen["forward"]) == sorted(seen["replay"])
    expected = {
        (tuple(s.batch_indices(b).tolist()), s.augment_seed(b))
        for s in (client_setup(cfg, 0, 2), client_setup(cfg, 1, 2))
        for b in range(2 * 2)  # rounds x local steps
    }
    assert {(idx, aug) for idx, _, aug in seen["forward"]} == expected
    assert len(seen["forward"]) == len(expected) == 8


def test_augment_seed_is_per_partition_and_batch_and_gives_other_pixels(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, augment="paper")
    setup, other_partition = client_setup(cfg, 0, 2), client_setup(cfg, 1, 2)
    seeds = {setup.augment_seed(b) for b in range(50)} | {other_partition.augment_seed(0)}
    assert len(seeds) == 51
    assert setup.augment_seed(3) == client_setup(cfg, 0, 2).augment_seed(3)  # a resume's
    sk, idx = setup.skeleton, setup.batch_indices(0)
    assert sk.augment is not None

    def pixels(seed: int | None) -> torch.Tensor:
        view = None if seed is None else (lambda images: sk.augment(images, seed))
        return sk.spec.batch(setup.data.train, idx, None, view)[0]  # (16, C, S, S)

    plain, once, twice = pixels(None), pixels(setup.augment_seed(0)), pixels(setup.augment_seed(0))
    assert torch.equal(once, twice) and once.shape == plain.shape
    assert not torch.equal(once, plain)
    assert not torch.equal(once, pixels(setup.augment_seed(1)))


def test_augmented_forward_without_its_seed_is_refused(tmp_path: Path) -> None:
    setup, worker = worker_of(tiny_config(tmp_path, method="adc", augment="paper"))
    with pytest.raises(ValueError, match="augment seed"):
        worker._encode(setup.batch_indices(0), 7, plan=None)
    with pytest.raises(ValueError, match="augment seed"):
        worker.forward_packet(setup.batch_indices(0), 7)


def test_without_augment_the_packet_is_the_plain_forwards(tmp_path: Path) -> None:
    """augment = none: the augment seed is ignored and the packet is the un-augmented
    images' (the path as it was before the key existed)."""
    cfg = tiny_config(tmp_path, method="adc", compression=0.25)
    setup, worker = worker_of(cfg)
    assert worker.augment is None and setup.skeleton.augment is None
    idx = setup.batch_indices(2)
    packet = worker.forward_packet(idx, 7)
    assert_same_packet(packet, worker.forward_packet(idx, 7, setup.augment_seed(2)))
    with torch.no_grad():
        pixels, labels = setup.skeleton.spec.batch(setup.data.train, idx)
        h, attn = front_forward(worker.front, pixels, cfg.precision, with_cls_attention=True)
        assert attn is not None
        assert_same_packet(packet, worker.compressor.encode(h, labels, attn, seed=7))


def test_central_evaluation_is_not_augmented(tmp_path: Path) -> None:
    """The same weights score the same under either setting, and twice the same."""
    paper, _ = build_strategy(
        tiny_config(tmp_path / "p", augment="paper"), run_dir=None, progress=lambda _: None
    )
    plain, _ = build_strategy(tiny_config(tmp_path / "n"), run_dir=None, progress=lambda _: None)
    for name, module in paper.client_modules.items():
        plain.client_modules[name].load_state_dict(module.state_dict())
    plain.server.back.load_state_dict(paper.server.back.state_dict())
    accuracy, loss = paper.evaluator.central(paper.client_modules)
    assert (accuracy, loss) == plain.evaluator.central(plain.client_modules)
    assert (accuracy, loss) == paper.evaluator.central(paper.client_modules)  # no draws


def test_federated_held_out_activations_are_not_augmented(tmp_path: Path) -> None:
    held = {"federated_eval_every": 1, "federated_eval_fraction": 0.2}
    paper = client_setup(tiny_config(tmp_path, augment="paper", **held), 0, 2)
    plain = client_setup(tiny_config(tmp_path, **held), 0, 2)
    np.testing.assert_array_equal(paper.held_out, plain.held_out)
    assert len(paper.held_out) > 0 and paper.skeleton.augment is not None
    state = modules_state(client_modules(paper.skeleton.front, paper.skeleton.compressor))
    h, labels = paper.held_out_activations(state)  # (E, n, d), (E,)
    h_plain, labels_plain = plain.held_out_activations(state)
    assert torch.equal(h, h_plain) and torch.equal(labels, labels_plain)
