"""Many clients, counted truthfully: through the ServerApp's own entry path, with node ids that
are random and unrelated to partition ids (as under Ray)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from adc_flwr.run.summary import DROP_REASONS
from adc_flwr.training.workers import ClientWorker, ServerWorker
from clients.node_cache import client_setup
from strategies.evaluation import Evaluator
from tests.support.helpers import run_server_app, tiny_config


class CallLog:
    """Which partition each delivered message went to, and the batches each one encoded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.current = -1
        self.starts: list[tuple[int, int]] = []  # (round, partition) of each train.start
        self.batches: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        real_forward = ClientWorker.forward_packet

        def forward(
            worker: ClientWorker, idx: np.ndarray, seed: int, augment_seed: int | None = None
        ):
            self.batches[self.current].append(np.array(idx))
            return real_forward(worker, idx, seed, augment_seed)

        monkeypatch.setattr(ClientWorker, "forward_packet", forward)

    def before_call(self, pid: int, msg: Message) -> None:
        self.current = pid
        if msg.metadata.message_type == "train.start":
            config = msg.content["config"]
            assert int(config["partition-id"]) == pid  # addressed to the node that holds it
            self.starts.append((int(config["server-round"]), pid))

    def per_round(self) -> dict[int, list[int]]:
        rounds: dict[int, list[int]] = collections.defaultdict(list)
        for server_round, pid in self.starts:
            rounds[server_round].append(pid)
        return dict(rounds)


def test_vanilla_over_three_nodes_trains_three_clients_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, sl_mode="vanilla", num_server_rounds=2)
    log = CallLog(monkeypatch)
    summary, _ = run_server_app(cfg, 3, before_call=log.before_call, seed=1)
    assert summary["status"] == "completed"
    assert [(h["sampled"], h["clients"]) for h in summary["history"]] == [(3, 3), (3, 3)]
    assert {r: sorted(p) for r, p in log.per_round().items()} == {1: [0, 1, 2], 2: [0, 1, 2]}
    assert summary["drops"] == dict.fromkeys(DROP_REASONS, 0)


def test_fraction_train_half_of_four_nodes_trains_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, fraction_train=0.5, num_server_rounds=3)
    log = CallLog(monkeypatch)
    summary, _ = run_server_app(cfg, 4, before_call=log.before_call, seed=2)
    assert summary["status"] == "completed"
    assert [h["clients"] for h in summary["history"]] == [2, 2, 2]
    assert all(len(set(p)) == 2 for p in log.per_round().values())


def test_fifty_partitions_five_sampled_each_trains_its_own_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, fraction_train=0.1, num_server_rounds=3, local_steps=2)
    log = CallLog(monkeypatch)
    summary, _ = run_server_app(cfg, 50, before_call=log.before_call, seed=3)
    assert summary["status"] == "completed"
    assert [h["clients"] for h in summary["history"]] == [5, 5, 5]
    rounds = log.per_round()
    assert all(len(set(p)) == 5 for p in rounds.values())
    for pid, batches in log.batches.items():
        setup = client_setup(cfg, pid, 50)
        # its own partition's stream, continued where it stopped in an earlier round
        expected = [setup.batch_indices(k) for k in range(len(batches))]
        for got, want in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(got, want)
            assert np.isin(got, setup.indices).all()
        times_sampled = sum(pid in p for p in rounds.values())
        assert len(batches) == times_sampled * cfg.local_steps


def test_seeded_sampling_repeats_under_other_node_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = []
    for grid_seed in (10, 11):
        cfg = tiny_config(
            tmp_path / str(grid_seed), fraction_train=0.25, num_server_rounds=3, local_steps=1
        )
        log = CallLog(monkeypatch)
        run_server_app(cfg, 12, before_call=log.before_call, seed=grid_seed)
        picks.append({r: sorted(p) for r, p in log.per_round().items()})
    assert picks[0] == picks[1]
    assert len({tuple(p) for p in picks[0].values()}) > 1  # rounds do sample differently


@pytest.mark.parametrize("mode", ["splitfed", "vanilla"])
def test_eval_every_evaluates_the_clients_current_fronts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A mid-round evaluation sees a model that exists: the clients' fronts as they stand
    after the step (SplitFed: their average by examples; vanilla: the client whose turn it
    is, also at the end of its turn), with the back as it stands."""
    cfg = tiny_config(tmp_path, sl_mode=mode, local_steps=4, eval_every=2)
    latest: dict[int, dict[str, torch.Tensor]] = {}  # partition -> front after its last step
    called: list[int] = []
    real_apply = ClientWorker.apply_grads

    def apply_grads(worker: ClientWorker, *args, **kwargs):
        real_apply(worker, *args, **kwargs)
        latest[called[-1]] = {k: v.clone() for k, v in worker.front_state().items()}

    monkeypatch.setattr(ClientWorker, "apply_grads", apply_grads)
    probes: list[int] = []
    server_steps = [0]
    real_step, real_central = ServerWorker.step, Evaluator.central

    def count_steps(self, packets):
        server_steps[0] += 1
        return real_step(self, packets)

    def capture(self, modules):
        if modules is not self.client_modules:  # a mid-round probe
            if mode == "splitfed":
                expected = {k: (latest[0][k] + latest[1][k]) / 2 for k in latest[0]}
            else:
                expected = latest[called[-1]]
            for name, value in modules["front"].state_dict().items():
                torch.testing.assert_close(value, expected[f"front.{name}"], atol=1e-6, rtol=0)
            probes.append(server_steps[0])
        return real_central(self, modules)

    monkeypatch.setattr(ServerWorker, "step", count_steps)
    monkeypatch.setattr(Evaluator, "central", capture)
    summary, _ = run_server_app(cfg, 2, seed=4, before_call=lambda pid, _m: called.append(pid))
    assert summary["status"] == "completed"
    # splitfed: 4 steps, probe after step 2 (step 4 ends the round, which is evaluated);
    # vanilla: 8 steps, probes after 2, 4 (the end of the first turn) and 6
    assert probes == ([2] if mode == "splitfed" else [2, 4, 6])
