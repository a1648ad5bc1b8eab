"""Pooled clients (``num-partitions``): a population larger than the SuperNodes, each round's
clients run on whichever nodes are free. A client's numbers must not depend on the node that
runs it: the same seed gives the tables of one node per partition, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Message

from adc_flwr.config import ConfigError
from adc_flwr.run.validation import validate_run
from strategies.lifecycle import check_runtime
from tests.support.helpers import run_server_app, tiny_config

WALL = ["wall_time_s"]


def tables(cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = Path(cfg.run_dir)
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=WALL, errors="ignore")
    return metrics, pd.read_csv(run / "clients.csv")


@pytest.mark.parametrize(
    "changes",
    [
        {"client_optimizer": "keep", "fraction_train": 0.5},
        {"sl_mode": "vanilla", "fraction_train": 0.5, "client_optimizer": "keep"},
        {
            "federated_eval_every": 1,
            "profile_mix": "edge",
            "fraction_train": 0.5,
            "over_select": 1.5,
        },
    ],
    ids=["splitfed-keep", "vanilla-keep", "edge-fed-eval-over-select"],
)
def test_pooled_clients_repeat_one_node_per_partition(tmp_path: Path, changes: dict) -> None:
    """Six partitions: once on six nodes that each hold one, once pooled on the fewest
    nodes a round's draw needs (node ids random, handed out in another order)."""
    base = dict(num_server_rounds=3, local_steps=2, **changes)
    own = tiny_config(tmp_path / "own", **base)
    summary_own, _ = run_server_app(own, 6, seed=1)
    pooled = tiny_config(tmp_path / "pooled", num_partitions=6, **base)
    nodes = pooled.draws_per_round(6)
    kinds: list[str] = []
    summary_pooled, _ = run_server_app(
        pooled, nodes, seed=7, before_call=lambda _, msg: kinds.append(msg.metadata.message_type)
    )
    assert summary_own["status"] == summary_pooled["status"] == "completed"
    assert nodes < 6
    for a, b in zip(tables(own), tables(pooled), strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert "query.info" not in kinds  # nobody is asked which partition it holds
    assert _same_but_wall(summary_own["history"], summary_pooled["history"])


def _same_but_wall(a: list[dict], b: list[dict]) -> bool:
    drop = ("wall_time_s",)
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_keep_moments_travel_with_the_client_not_the_node(tmp_path: Path) -> None:
    """With ``keep`` a pooled client's moments come back with its next ``train.start``,
    whichever node runs it; its node holds nothing of it between rounds."""
    cfg = tiny_config(
        tmp_path, num_partitions=4, fraction_train=0.5, num_server_rounds=4, client_optimizer="keep"
    )
    starts: list[tuple[int, bool]] = []

    def before_call(_node_partition: int, msg: Message) -> None:
        if msg.metadata.message_type == "train.start":
            starts.append((int(msg.content["config"]["partition-id"]), "optim" in msg.content))

    summary, grid = run_server_app(cfg, 2, before_call=before_call, seed=3)
    assert summary["status"] == "completed"
    seen: set[int] = set()
    for partition, carried in starts:
        assert carried == (partition in seen)  # moments from its own earlier round only
        seen.add(partition)
    assert len(seen) > 2  # more clients than nodes trained
    assert all(len(c.state) == 0 for c in grid.contexts.values())


def test_more_partitions_than_nodes_trains_every_round(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, num_partitions=40, fraction_train=0.05, num_server_rounds=3)
    summary, grid = run_server_app(cfg, 2, seed=5)
    assert summary["status"] == "completed"
    assert [h["clients"] for h in summary["history"]] == [2, 2, 2]
    profiles = pd.read_csv(Path(cfg.run_dir) / "profiles.csv")
    partitions = pd.read_csv(Path(cfg.run_dir) / "partitions.csv")
    assert len(profiles) == len(partitions) == 40
    assert len(grid.contexts) == 2


def test_too_few_nodes_for_a_draw_is_refused_before_the_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, num_partitions=40, fraction_train=0.1)
    with pytest.raises(ConfigError, match=r"num-partitions.*4 client.*num-supernodes = 3"):
        validate_run(cfg.to_run_config(), num_supernodes=3)
    validate_run(cfg.to_run_config(), num_supernodes=4)
    with pytest.raises(ConfigError, match=r"must be in \[1, 1437\]"):
        validate_run(tiny_config(tmp_path, num_partitions=2000).to_run_config())


def test_a_pick_without_a_free_node_is_unavailable_not_trained_twice(tmp_path: Path) -> None:
    """Fewer nodes than a draw at run time (the pre-run check is bypassed here): the picks
    left over are counted unavailable, never doubled up on a node."""
    cfg = tiny_config(tmp_path, num_partitions=8, fraction_train=0.5, num_server_rounds=2)
    summary, _ = run_server_app(cfg, 3, seed=2)
    assert summary["status"] == "completed"
    assert [(h["sampled"], h["clients"]) for h in summary["history"]] == [(4, 3), (4, 3)]
    assert summary["drops"]["unavailable"] == 2


def test_deployment_grid_refuses_pooled_clients(tmp_path: Path) -> None:
    from flwr.superlink.grid import HttpGrid

    grid = HttpGrid.__new__(HttpGrid)  # its type is what matters; nothing is connected
    with pytest.raises(ConfigError, match="deployment runtime trains each SuperNode"):
        check_runtime(grid, tiny_config(tmp_path, num_partitions=4))
    check_runtime(grid, tiny_config(tmp_path))


def test_a_client_cut_on_its_last_exchange_keeps_that_rounds_moments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock drops partition 0's reply that carries its trained front (and, pooled, its
    moments): as with a node of its own, it keeps the moments of the steps it took, so the
    later rounds are the same."""
    from adc_flwr.run.summary import DROPPED_OUT
    from strategies.simulated_clients import SimulatedClients

    real = SimulatedClients.settle

    def settle(self, server_round, exchange, costs, steps_of, keep=None):
        dropped = real(self, server_round, exchange, costs, steps_of, keep)
        if server_round == 1 and 0 in steps_of and exchange == steps_of[0]:
            dropped[0] = DROPPED_OUT  # its last exchange: the reply carries its front
            self.to_stop.add(0)
        return dropped

    monkeypatch.setattr(SimulatedClients, "settle", settle)
    base = dict(num_server_rounds=3, local_steps=2, client_optimizer="keep", fraction_train=1.0)
    own = tiny_config(tmp_path / "own", **base)
    run_server_app(own, 3, seed=1)
    pooled = tiny_config(tmp_path / "pooled", num_partitions=3, **base)
    run_server_app(pooled, 3, seed=4)
    clients = tables(own)[1]
    assert clients.loc[(clients["round"] == 1) & (clients["partition"] == 0), "outcome"].item() == (
        DROPPED_OUT
    )
    for a, b in zip(tables(own), tables(pooled), strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_a_node_that_never_trained_waits_start_timeout_whatever_partition_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SuperNode that registers during round 1 runs partition 0 in round 2 (its id sorts
    first): its first ``train.start`` loads the data and builds the model, so that exchange
    waits ``start-timeout`` although partition 0 trained before; round 3 is warm."""
    from flwr.app import Context, RecordDict

    from clients import client_app as client_module
    from simulations.inprocess_grid import InProcessGrid
    from strategies.lifecycle import run_training
    from strategies.messaging import Messenger

    cfg = tiny_config(
        tmp_path, num_partitions=2, num_server_rounds=3, step_timeout=5.0, start_timeout=60.0
    )
    waited: list[tuple[str, float]] = []
    real = Messenger.exchange

    def exchange(self, messages, timeout):
        waited.append((messages[0].metadata.message_type, timeout))
        return real(self, messages, timeout)

    monkeypatch.setattr(Messenger, "exchange", exchange)
    late = 1  # node ids are random 63-bit integers above 0: this one sorts first
    late_starts: list[str] = []  # rounds whose train.start the late node ran

    def register_late(pid: int, msg: Message) -> None:
        if pid == 2 and msg.metadata.message_type == "train.start":
            late_starts.append(msg.metadata.group_id)
        if late not in grid.contexts and msg.metadata.message_type == "train.step":
            grid.contexts[late] = Context(
                run_id=1,
                node_id=late,
                node_config={"partition-id": 2, "num-partitions": 3},
                state=RecordDict(),
                run_config=cfg.to_run_config(),
            )

    grid = InProcessGrid(
        client_module.app, 2, cfg.to_run_config(), seed=3, before_call=register_late
    )
    assert run_training(grid, cfg, progress=lambda _: None)["status"] == "completed"
    assert [t for kind, t in waited if kind == "train.start"] == [60.0, 60.0, 5.0]
    assert {t for kind, t in waited if kind == "train.step"} == {5.0}
    assert late_starts == ["2", "3"]
