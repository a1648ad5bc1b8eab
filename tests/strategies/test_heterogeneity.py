"""The client population and the simulated clock, driven through the real ServerApp.

Every run here goes through ``server_app.app(grid, context)`` on the hostile in-process grid
(random node ids, shuffled replies); profiles come from a CSV trace the test writes, so
each expected time is a hand computation from the codec's bytes (``clients.csv``) and the
FLOP counter.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adc_flwr.compression import build_compressor
from adc_flwr.config import ConfigError
from adc_flwr.data import held_out_split, load_data
from adc_flwr.model.flops import step_flops
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import build_model, split_vit
from adc_flwr.population.clock import SimClock, Turn
from adc_flwr.population.profile_csv import read_trace, write_profiles
from adc_flwr.population.profiles import ClientProfile, Population
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.validation import validate_run
from adc_flwr.wire.accounting import Traffic, TrafficLedger
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from clients import client_app
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from strategies.outcomes import RoundFailed
from strategies.simulated_clients import SimulatedClients
from tests.support.helpers import run_server_app, tiny_config

FAST = ClientProfile("fast", 100.0, 200.0, 0.01, 50.0, 1.0, 0.0)
SLOW = ClientProfile("slow", 1.0, 2.0, 0.05, 5.0, 1.0, 0.0)


def trace(tmp_path: Path, *profiles: ClientProfile) -> str:
    path = tmp_path / "trace.csv"
    write_profiles(path, profiles)
    return str(path)


def flops_of(cfg):
    data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
    vit = build_model(cfg, data)
    front, back = split_vit(vit, cfg.split_index)
    compressor = build_compressor(cfg, data.num_classes, hidden_size=front.hidden_size)
    return step_flops(front, back, compressor, InputSpec.for_model(vit, data).pixel_shape), front


def client_seconds(
    profile: ClientProfile, row: pd.Series, batch: int, flops
) -> tuple[float, float]:
    """(compute, transfer) of one client that did one step: start (front down, packet up),
    then step (gradients down, front up). Two messages each way, each with its latency."""
    sync_one_way = row.bytes_model_sync / 2
    down = (sync_one_way + row.bytes_down) * 8 / (profile.downlink_mbps * 1e6)
    up = (row.bytes_up + sync_one_way) * 8 / (profile.uplink_mbps * 1e6)
    transfer = 4 * profile.latency_s + down + up
    compute = batch * (2 * flops.client_forward + flops.client_backward) / (profile.gflops * 1e9)
    return compute, transfer


def test_clock_takes_the_slowest_client_per_exchange_and_adds_the_server() -> None:
    clock = SimClock(Population([FAST, SLOW], seed=0), server_gflops=100.0)
    cut = clock.exchange([Turn(0, 1000, 2000, 1e9), Turn(1, 1000, 2000, 1e9)])
    slow = 0.05 + 1000 * 8 / 2e6 + 1e9 / 5e9 + 0.05 + 2000 * 8 / 1e6
    assert cut == set() and clock.now == pytest.approx(slow)
    assert clock.server_step(2e9) == pytest.approx(0.02)
    assert clock.clients[0].compute_s == pytest.approx(1e9 / 50e9)
    assert clock.clients[1].transfer_s == pytest.approx(slow - 0.2)


def test_deadline_drops_or_waits_and_over_selection_keeps_the_first() -> None:
    turns = [Turn(0, 1000, 1000, 0.0), Turn(1, 1000, 1000, 0.0)]
    drop = SimClock(Population([FAST, SLOW], 0), 100.0, deadline_s=0.05, policy="drop")
    assert drop.exchange(turns) == {1} and drop.now == pytest.approx(0.05)
    wait = SimClock(Population([FAST, SLOW], 0), 100.0, deadline_s=0.05, policy="wait")
    assert wait.exchange(turns) == set() and wait.now > 0.05
    keep = SimClock(Population([SLOW, FAST], 0), 100.0)
    assert keep.exchange(turns, keep=1) == {0}
    assert keep.now == pytest.approx(0.01 + 8000 / 200e6 + 0.01 + 8000 / 100e6)  # FAST


def test_splitfed_step_matches_a_hand_computation(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, local_steps=1, profile_trace=trace(tmp_path, FAST, SLOW), server_gflops=20.0
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed"
    rows = RunDir(cfg.run_dir).read_clients().set_index("partition")
    flops, front = flops_of(cfg)
    times = {p: client_seconds(prof, rows.loc[p], 16, flops) for p, prof in enumerate((FAST, SLOW))}
    for p, (compute, transfer) in times.items():
        assert rows.loc[p, "compute_s"] == pytest.approx(compute)
        assert rows.loc[p, "transfer_s"] == pytest.approx(transfer)
    server = 2 * 16 * flops.server(front.num_tokens) / 20e9  # method none: B rows of n tokens
    assert summary["sim_time_s"] == pytest.approx(sum(times[1]) + server)  # SLOW, both exchanges
    assert list(rows["profile"]) == ["fast", "slow"]
    saved = read_trace(cfg.run_dir / "profiles.csv")
    assert saved == [FAST, SLOW]


def test_vanilla_round_sums_the_turns(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        local_steps=1,
        sl_mode="vanilla",
        profile_trace=trace(tmp_path, FAST, SLOW),
        server_gflops=20.0,
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed"
    rows = RunDir(cfg.run_dir).read_clients().set_index("partition")
    flops, front = flops_of(cfg)
    clients = sum(
        sum(client_seconds(prof, rows.loc[p], 16, flops)) for p, prof in enumerate((FAST, SLOW))
    )
    server = 2 * 16 * flops.server(front.num_tokens) / 20e9
    assert summary["sim_time_s"] == pytest.approx(clients + server)


def test_profiles_leave_training_and_bytes_untouched(tmp_path: Path) -> None:
    """Links and devices only change time: the same run on the uniform mix and on a slow
    trace (everyone reachable, nobody drops) sends the same bytes and learns the same."""
    runs = {}
    for name, extra in {
        "uniform": {},
        "slow": {"profile_trace": trace(tmp_path, SLOW, FAST)},
    }.items():
        cfg = tiny_config(tmp_path, run_name=name, num_server_rounds=2, **extra)
        run_server_app(cfg, nodes=2)
        runs[name] = RunDir(cfg.run_dir).read_metrics()
    time_columns = ["wall_time_s", "sim_time_s"]
    pd.testing.assert_frame_equal(
        runs["uniform"].drop(columns=time_columns), runs["slow"].drop(columns=time_columns)
    )
    assert runs["slow"]["sim_time_s"].iloc[-1] > 10 * runs["uniform"]["sim_time_s"].iloc[-1]


def test_unreachable_client_is_never_sampled_and_counted(tmp_path: Path) -> None:
    never = ClientProfile("never", 10.0, 10.0, 0.0, 10.0, availability=0.0, dropout=0.0)
    cfg = tiny_config(
        tmp_path, num_server_rounds=2, profile_trace=trace(tmp_path, FAST, never, FAST, FAST)
    )
    summary, _ = run_server_app(cfg, nodes=4)
    assert summary is not None and summary["status"] == "completed"
    assert [(h["sampled"], h["offline"]) for h in summary["history"]] == [(3, 1), (3, 1)]
    clients = RunDir(cfg.run_dir).read_clients()
    assert 1 not in set(clients["partition"]) and len(clients) == 6


def test_client_that_always_drops_out_never_finishes(tmp_path: Path) -> None:
    gone = ClientProfile("gone", 10.0, 10.0, 0.0, 10.0, availability=1.0, dropout=1.0)
    cfg = tiny_config(tmp_path, num_server_rounds=2, profile_trace=trace(tmp_path, FAST, gone))
    summary, grid = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed"
    assert summary["drops"]["dropped-out"] == 2
    assert [h["clients"] for h in summary["history"]] == [1, 1]
    clients = RunDir(cfg.run_dir).read_clients()
    assert list(clients.query("partition == 1")["outcome"]) == ["dropped-out"] * 2
    for context in grid.contexts.values():  # train.stop: nothing of the round is left behind
        assert len(context.state) == 0


def test_run_where_everyone_drops_out_fails_truthfully(tmp_path: Path) -> None:
    gone = ClientProfile("gone", 10.0, 10.0, 0.0, 10.0, availability=1.0, dropout=1.0)
    cfg = tiny_config(tmp_path, profile_trace=trace(tmp_path, gone))
    with pytest.raises(RoundFailed, match="dropped-out on 2 client"):
        run_server_app(cfg, nodes=2)
    summary = RunDir(cfg.run_dir).read_summary()
    assert summary is not None and summary["status"] == "failed"


@pytest.mark.parametrize("policy", ["drop", "wait"])
def test_deadline_cuts_the_slow_client_or_waits(tmp_path: Path, policy: str) -> None:
    cfg = tiny_config(
        tmp_path,
        local_steps=2,
        profile_trace=trace(tmp_path, FAST, SLOW),
        deadline_s=1.0,
        straggler_policy=policy,
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed"
    clients = RunDir(cfg.run_dir).read_clients().set_index("partition")
    if policy == "drop":
        assert summary["drops"]["straggler"] == 1 and clients.loc[1, "outcome"] == "straggler"
        assert clients.loc[1, "steps"] == 0 and clients.loc[1, "bytes_up"] > 0  # it did send
        assert summary["history"][0]["clients"] == 1
    else:
        assert summary["drops"]["straggler"] == 0 and summary["history"][0]["clients"] == 2
        assert summary["sim_time_s"] > 3 * 1.0  # waited past the deadline in every exchange


def test_over_selection_keeps_the_first_to_answer(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        fraction_train=0.5,
        over_select=1.5,
        profile_trace=trace(tmp_path, SLOW, FAST, FAST, SLOW),
    )
    summary, _ = run_server_app(cfg, nodes=4)
    assert summary is not None and summary["status"] == "completed"
    clients = RunDir(cfg.run_dir).read_clients()
    assert len(clients) == 3  # 2 wanted, 1.5x drawn
    assert sorted(clients["outcome"]) == ["finished", "finished", "straggler"]
    assert set(clients.query("outcome == 'straggler'")["profile"]) == {"slow"}


def test_bad_population_config_is_named_before_anything_runs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "name,uplink_mbps,downlink_mbps,latency_s,gflops,availability,dropout\na,1,1,0,1,1.5,0\n"
    )
    with pytest.raises(ConfigError, match=r"line 2, column 'availability'"):
        validate_run({"profile-trace": str(bad)}, 2)
    with pytest.raises(ConfigError, match="vanilla"):
        validate_run({"over-select": 1.5, "sl-mode": "vanilla"}, 2)
    with pytest.raises(ConfigError, match="'deadline-s'"):
        validate_run({"deadline-s": -1.0}, 2)
    assert math.isclose(validate_run({"profile-mix": "edge"}, 2).server_gflops, 10000.0)


@pytest.mark.parametrize("method", ["adc", "topk", "quant"])
def test_adaptive_compression_gives_the_slow_uplink_a_smaller_xi(
    tmp_path: Path, method: str
) -> None:
    cfg = tiny_config(
        tmp_path,
        method=method,
        compression=0.25,
        compression_min=0.02,
        adaptive_compression=True,
        local_steps=2,
        profile_trace=trace(tmp_path, FAST, SLOW),
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed"
    clients = RunDir(cfg.run_dir).read_clients().set_index("partition")
    # median uplink 50.5 Mbit/s: FAST would get 0.25 * 100 / 50.5 (clamped to 0.25),
    # SLOW 0.25 * 1 / 50.5 = 0.005 (clamped to compression-min)
    assert clients.loc[0, "xi"] == 0.25 and clients.loc[1, "xi"] == 0.02
    assert clients.loc[1, "bytes_up"] < clients.loc[0, "bytes_up"]
    assert clients.loc[1, "bytes_down"] < clients.loc[0, "bytes_down"]


def test_adaptive_target_upload_fits_each_uplink(tmp_path: Path) -> None:
    medium = ClientProfile("medium", 10.0, 10.0, 0.0, 50.0, 1.0, 0.0)
    cfg = tiny_config(
        tmp_path,
        method="topk",
        compression=0.5,
        compression_min=0.01,
        adaptive_compression=True,
        target_upload_s=0.01,
        profile_trace=trace(tmp_path, FAST, medium),
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed"
    clients = RunDir(cfg.run_dir).read_clients().set_index("partition")
    _, front = flops_of(cfg)
    reference_bits = 8 * uncompressed_act_nbytes(16, front.num_tokens, front.hidden_size)
    assert clients.loc[1, "xi"] == round(0.01 * 10e6 / reference_bits, 4)
    assert clients.loc[0, "xi"] == 0.5  # 100 Mbit/s fits the whole of `compression`


def test_federated_evaluation_fills_clients_csv_and_the_round(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        num_server_rounds=2,
        federated_eval_every=2,
        partitioner="dirichlet",
        alpha=0.3,
        min_partition_size=20,
    )
    summary, _ = run_server_app(cfg, nodes=3)
    assert summary is not None and summary["status"] == "completed"
    clients = RunDir(cfg.run_dir).read_clients()
    first, second = clients.query("round == 1"), clients.query("round == 2")
    assert first["fed_accuracy"].isna().all()  # every 2 rounds only
    assert second["fed_accuracy"].between(0, 1).all() and (second["fed_examples"] >= 2).all()
    last = summary["history"][-1]
    accuracies = second["fed_accuracy"].to_numpy()
    assert last["fed_accuracy_mean"] == pytest.approx(accuracies.mean())
    assert last["fed_accuracy_min"] == pytest.approx(accuracies.min())
    assert last["fed_accuracy_p10"] == pytest.approx(np.percentile(accuracies, 10))
    evals = RunDir(cfg.run_dir).read_metrics().query("kind == 'eval' and round == 2")
    assert evals["fed_accuracy_mean"].iloc[-1] == pytest.approx(accuracies.mean())


def test_held_out_part_is_never_trained_on() -> None:
    indices = np.arange(100, 150)
    train, held = held_out_split(indices, 0.1, seed=3, partition_id=7)
    assert len(held) == 5 and len(train) == 45
    assert not set(train) & set(held) and set(train) | set(held) == set(indices)
    again, _ = held_out_split(indices, 0.1, seed=3, partition_id=7)
    assert np.array_equal(train, again)
    assert len(held_out_split(indices[:1], 0.1, 3, 7)[1]) == 0


def test_an_exchange_where_everyone_vanished_still_takes_their_download() -> None:
    clock = SimClock(Population([SLOW], 0), 100.0)
    seconds = clock.vanished(0, 10_000)
    assert seconds == pytest.approx(0.05 + 10_000 * 8 / 2e6)
    assert clock.exchange([], at_least=seconds) == set() and clock.now == pytest.approx(seconds)


def test_adaptive_xi_is_rounded_but_never_below_compression_min(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, method="topk", adaptive_compression=True, compression=0.5, compression_min=0.01234
    )
    reference = uncompressed_act_nbytes(cfg.batch_size, 50, 64)
    clients = SimulatedClients(cfg, lambda: None, reference)  # type: ignore[arg-type, return-value]
    clients.population = Population([FAST, FAST, FAST, SLOW], seed=0)
    # SLOW: 0.5 * 1 / 100 = 0.005, floored at compression-min rounded up to 4 digits
    assert clients.choose_xi(3) == 0.0124 and clients.choose_xi(0) == 0.5
    clients.population = Population([FAST, SLOW, SLOW, SLOW], seed=0)
    assert clients.choose_xi(1) == 0.5  # the median uplink is SLOW's own
    with pytest.raises(ConfigError, match="compression-min"):
        validate_run({"compression-min": 5e-5}, 2)
    with pytest.raises(ConfigError, match="c3sl"):
        validate_run({"adaptive-compression": True, "method": "c3sl"}, 2)


def test_ledger_reads_a_round_with_nothing_booked_as_zero() -> None:
    ledger = TrafficLedger()
    ledger.add(1, 0, Traffic(bytes_up_act=5))
    assert ledger.client_round(2, 0) == Traffic()  # every pick of round 2 unavailable
    ledger.add(2, 0, Traffic(bytes_up_act=7))
    assert ledger.client_round(2, 0).bytes_up_act == 7
    with pytest.raises(KeyError):
        ledger.client_round(1, 0)


def test_round_lines_show_the_simulated_clock_and_an_eta(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, num_server_rounds=2, local_steps=1)
    lines: list[str] = []
    grid = InProcessGrid(client_app.app, 2, cfg.to_run_config())
    run_training(grid, cfg, progress=lines.append)
    first, last = (next(x for x in lines if x.startswith(f"round   {r}/2")) for r in (1, 2))
    assert " | sim " in first and " | eta " in first  # one round left
    assert " | eta " not in last
